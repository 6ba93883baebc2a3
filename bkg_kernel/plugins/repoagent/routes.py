"""Server-sent events of repoagent: `POST /api/repo/{workspace}/run/{name}`, an allow-listed command's output,
and `POST /api/repo/{workspace}/ask`, `repo.ask` as the model writes it.

A command's events are `{"output": text}` as it writes, then `{"result": {...}}` (exit code, capped output,
timed_out) and `[DONE]`; a client that disconnects cancels the command (its process group is killed). The same
command runs as a job through `repo.command`. An answer's are `{"sources": [...]}` (the code shown to the model),
`{"delta": text}` as it writes, then `{"result": {...}}` (what `repo.ask` answers, citations checked) and
`[DONE]`; a refusal comes before the stream as a plain HTTP error, and a client that leaves stops the model.
(No `from __future__ import annotations`: FastAPI must see the local dependency.)
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

    @router.post("/{workspace}/ask")
    async def ask(
        workspace: Annotated[str, Path(pattern=WORKSPACE_PATTERN)],
        p: Annotated[Principal, Depends(repo)],
        question: Annotated[str, Body(embed=True)],
        top_k: Annotated[int | None, Body(embed=True)] = None,
    ) -> StreamingResponse:
        """Answer a question about the workspace's code, streamed as it is written."""
        data: dict[str, Any] = {"workspace": workspace, "question": question}
        if top_k is not None:
            data["top_k"] = top_k  # checked with the rest by repo.ask's own input model
        response: StreamingResponse = await event_stream(api.stream("repoagent", "repo.ask", data, p), dict)
        return response

    return router
