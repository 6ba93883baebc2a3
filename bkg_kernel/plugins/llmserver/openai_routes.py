"""OpenAI-compatible routes on the gateway (`/v1`), served by the llmserver worker.

Mounted by the gateway because `LLMServer.router` names this module. The official `openai` package works
against it unchanged (`base_url=http://127.0.0.1:43119/v1`, the API key as usual); scope `llm:use`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bkg_kernel.errors import BkgError
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.plugins.apikeys.service import Principal
from bkg_kernel.plugins.llmserver.schemas import ChatRequest, CompletionRequest, EmbedRequest

router = APIRouter(prefix="/v1", tags=["openai"])
LLM = need("llm:use")
log = logging.getLogger("bkg.gateway.openai")


def _host(request: Request) -> Any:
    sup = gateway(request).supervisor
    assert sup is not None
    return sup.get("llmserver")


def _record(request: Request, p: Principal, route: str, result: dict[str, Any]) -> None:
    usage = result.get("usage") or {}
    auth = gateway(request).auth
    if auth is None or not usage:
        return
    try:
        auth.record_usage(
            p, route, result.get("model"), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        )
    except Exception:  # accounting must never fail the answer the caller already has
        log.exception("recording token usage failed")


@router.get("/models")
async def list_models(request: Request, p: Annotated[Principal, Depends(LLM)]) -> dict[str, Any]:
    """The GGUF models llmserver can serve (OpenAI model list)."""
    out = await _host(request).invoke("llm.models", {})
    data = [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "bkg"} for m in out["models"]]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, request: Request, p: Annotated[Principal, Depends(LLM)]
) -> JSONResponse | StreamingResponse:
    """Chat (streaming with SSE when `stream` is true)."""
    return await _answer(
        request, p, "llm.chat", "/v1/chat/completions", body.model_dump(mode="json", exclude_unset=True)
    )


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, p: Annotated[Principal, Depends(LLM)]
) -> JSONResponse | StreamingResponse:
    """Text completion (streaming with SSE when `stream` is true)."""
    return await _answer(
        request, p, "llm.complete", "/v1/completions", body.model_dump(mode="json", exclude_unset=True)
    )


@router.post("/embeddings")
async def embeddings(body: EmbedRequest, request: Request, p: Annotated[Principal, Depends(LLM)]) -> JSONResponse:
    """Embeddings of one text or a batch."""
    result = await _host(request).invoke("llm.embed", body.model_dump(mode="json", exclude_unset=True))
    _record(request, p, "/v1/embeddings", result)
    return JSONResponse(result)


async def _answer(
    request: Request, p: Principal, capability: str, route: str, data: dict[str, Any]
) -> JSONResponse | StreamingResponse:
    host = _host(request)
    if not data.get("stream"):
        result = await host.invoke(capability, data)
        _record(request, p, route, result)
        return JSONResponse(result)
    include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    chunks = host.stream(capability, data).__aiter__()
    try:  # the first chunk comes after the model is loaded and the prompt checked: errors are still HTTP errors
        first: dict[str, Any] | None = await chunks.__anext__()
    except StopAsyncIteration:
        first = None

    async def events() -> AsyncIterator[str]:
        try:
            pending = [first] if first is not None else []
            while True:
                chunk = pending.pop() if pending else await chunks.__anext__()
                if "usage" in chunk and not chunk.get("choices"):
                    _record(request, p, route, chunk)
                    if not include_usage:
                        continue
                yield f"data: {json.dumps(chunk)}\n\n"
        except StopAsyncIteration:
            yield "data: [DONE]\n\n"
        except BkgError as exc:  # the worker died or timed out mid-stream: say so in the stream
            yield f"data: {json.dumps(exc.to_dict())}\n\n"
        finally:
            await chunks.aclose()  # a client that left frees its slot now

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
