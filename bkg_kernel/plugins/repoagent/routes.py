"""`POST /api/repo/{workspace}/run/{name}`: an allow-listed command's output as server-sent events.

Each event is `{"output": text}` as the command writes it, then `{"result": {...}}` (exit code, capped
output, timed_out) and `[DONE]`; a client that disconnects cancels the command (its process group is
killed). The same command runs as a job through `repo.command`. (No `from __future__ import annotations`:
FastAPI must see the local dependency.)
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import StreamingResponse

from bkg_kernel.auth import Principal
from bkg_kernel.plugins.repoagent.schemas import WORKSPACE_PATTERN
from bkg_kernel.runtime.contract import GatewayAPI
from bkg_kernel.runtime.sse import event_stream


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

        def render(chunk: dict[str, Any]) -> dict[str, Any] | None:
            if "result" in chunk:
                return {"result": chunk["result"]}
            return {"output": chunk["message"]} if chunk.get("message") else None

        response: StreamingResponse = await event_stream(api.stream("repoagent", "repo.command", data, p), render)
        return response

    return router
