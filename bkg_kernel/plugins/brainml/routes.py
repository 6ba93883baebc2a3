"""`POST /api/brain/ask`: `brainml.ask` as server-sent events, the answer shown as the model writes it.

Events: `{"sources": [...]}` once the chunks are found (what the answer is given, numbered from 1), then
`{"delta": text}` as the model writes, then `{"result": {...}}` (what `brainml.ask` answers: the whole text, its
citations, model and usage) and `[DONE]`. A bad input, a collection the caller may not read or nothing that
matches is a plain HTTP error before the stream starts; a client that disconnects stops the generation. Scope
`llm:use`, and the search is done as the caller (`collections:read`). (No `from __future__ import annotations`:
FastAPI must see the local dependency.)
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import StreamingResponse

from bkg_kernel.auth import Principal
from bkg_kernel.runtime.contract import GatewayAPI
from bkg_kernel.runtime.sse import event_stream


def build(api: GatewayAPI) -> APIRouter:
    """Return the `/api/brain` router."""
    router = APIRouter(prefix="/api/brain", tags=["brainml"])
    asker = api.need("llm:use")

    @router.post("/ask")
    async def ask(
        body: Annotated[dict[str, Any], Body(description="brainml.ask's input: collection, question, top_k, filters")],
        p: Annotated[Principal, Depends(asker)],
    ) -> StreamingResponse:
        """Answer a question from a collection, streamed as it is written."""
        response: StreamingResponse = await event_stream(api.stream("brainml", "brainml.ask", body, p), dict)
        return response

    return router
