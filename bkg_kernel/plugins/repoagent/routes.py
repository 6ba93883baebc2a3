"""`POST /api/repo/{workspace}/run/{name}`: an allow-listed command's output as server-sent events.

Each event is `{"output": text}` as the command writes it, then `{"result": {...}}` (exit code, capped
output, timed_out) and `[DONE]`; a client that disconnects cancels the command (its process group is
killed). The same command runs as a job through `repo.command`. (No `from __future__ import annotations`:
FastAPI must see the local dependency.)
"""

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import StreamingResponse

from bkg_kernel.auth import Principal
from bkg_kernel.errors import BkgError
from bkg_kernel.plugins.repoagent.schemas import WORKSPACE_PATTERN
from bkg_kernel.runtime.contract import GatewayAPI


def build(api: GatewayAPI) -> APIRouter:
    """Return the `/api/repo` router (scope repo:use; runs as the caller)."""
    router = APIRouter(prefix="/api/repo", tags=["repoagent"])
    repo = api.need("repo:use")

    @router.post("/{workspace}/run/{name}")
    async def run(
        workspace: Annotated[str, Path(pattern=WORKSPACE_PATTERN)],
        name: Annotated[str, Path(min_length=1, max_length=128)],
        p: Annotated[Principal, Depends(repo)],
        args: Annotated[list[str] | None, Body(embed=True)] = None,
    ) -> StreamingResponse:
        """Run command `name` of the allow-list in `workspace`, streaming its output."""
        data: dict[str, Any] = {"workspace": workspace, "name": name, "args": args or []}
        chunks = api.stream("repoagent", "repo.command", data, p)
        try:  # validation and allow-list errors come before the first event: they stay HTTP errors
            first: dict[str, Any] | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[str]:
            try:
                pending = [first] if first is not None else []
                while True:
                    chunk = pending.pop() if pending else await chunks.__anext__()
                    if "result" in chunk:
                        yield f"data: {json.dumps({'result': chunk['result']})}\n\n"
                    elif chunk.get("message"):
                        yield f"data: {json.dumps({'output': chunk['message']})}\n\n"
            except StopAsyncIteration:
                yield "data: [DONE]\n\n"
            except BkgError as exc:
                yield f"data: {json.dumps(exc.to_dict())}\n\n"
            finally:
                await chunks.aclose()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return router
