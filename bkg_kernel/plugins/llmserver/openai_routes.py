"""OpenAI-compatible routes on the gateway (`/v1`), served by the llmserver worker.

Built by `LLMServer.routes(api)`: the gateway hands in its auth dependency and plugin calls (as the caller).
The official `openai` package works against it unchanged (`base_url=http://127.0.0.1:43119/v1`, the API key as
usual); scope `llm:use`. (No `from __future__ import annotations`: FastAPI must see the local dependency.)
"""

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from bkg_kernel.auth import Principal
from bkg_kernel.errors import InvalidInput, NotFound, closest, openai_shaped
from bkg_kernel.plugins.llmserver.schemas import ChatRequest, CompletionRequest, EmbedRequest
from bkg_kernel.runtime.bodyjson import BIG_BODY, TOO_DEEP, RawJSON
from bkg_kernel.runtime.contract import GatewayAPI, StreamUsage, booked_under
from bkg_kernel.runtime.disconnect import while_connected
from bkg_kernel.runtime.sse import event_stream


async def handed(body: BaseModel, request: Request) -> Any:
    """A request's validated body as the worker takes it. A big one (over `BIG_BODY`: a long chat, a batch to embed,
    up to 8 MiB) is dumped and encoded on a thread and goes as JSON bytes the worker parses (`RawJSON`): dumping
    and pickling it here would hold the event loop for tens of milliseconds."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) <= BIG_BODY:
        return _dumped(body)

    def encoded() -> Any:
        data = _dumped(body)
        try:
            return RawJSON(orjson.dumps(data))
        except orjson.JSONEncodeError:  # an integer past 64 bits (a seed, an extra field): the data as it is
            return data

    return await asyncio.to_thread(encoded)


def _dumped(body: BaseModel) -> Any:
    """`body` as JSON data; one nested past pydantic's serialization depth (~250 levels, in the extra fields the
    models allow) is the caller's 400 naming `body`: the JSON parser takes more levels than pydantic writes."""
    try:
        return body.model_dump(mode="json", exclude_unset=True)
    except ValueError:  # "Maximum serialization depth exceeded": nothing else fails to dump a parsed JSON body
        raise InvalidInput(TOO_DEEP, field="body") from None


# Fields of OpenAI's chat, completion and embedding requests that bkg takes and does not use (its SDKs, LangChain
# and LiteLLM send them): kept without a word. Any other unknown field close to one bkg reads is a misspelling.
OPENAI_FIELDS = frozenset((
    "audio", "best_of", "function_call", "functions", "logprobs", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "reasoning_effort", "service_tier", "store", "stream_options",
    "top_logprobs", "user", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
))  # fmt: skip


def misspelt(body: BaseModel) -> None:
    """400 for an unknown field that looks like one the route reads (`max_tokenz`): it was dropped without a word,
    and the call ran as if it had not been given. OpenAI's own fields that bkg does not use pass."""
    known = sorted(type(body).model_fields)
    for key in body.model_extra or {}:
        near = closest(key, known, cutoff=0.8) if key not in OPENAI_FIELDS else None
        if near:
            raise InvalidInput(f"{key}: not a field of this request (did you mean {near!r}?)", field=key)


def build(api: GatewayAPI) -> APIRouter:
    """Return the `/v1` router; every route needs scope `llm:use` and runs as its caller."""
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=api.route_class)
    llm = api.need("llm:use")

    @router.get("/models")
    async def list_models(p: Annotated[Principal, Depends(llm)]) -> dict[str, Any]:
        """The GGUF models llmserver can serve (OpenAI model list)."""
        return {"object": "list", "data": await _models(p)}

    # the parameter is `model`, as in OpenAI's API and as this route's errors name it (a %2F in it is a 404 naming
    # the parameter: one name for one thing)
    @router.get("/models/{model}")
    async def retrieve_model(model: str, p: Annotated[Principal, Depends(llm)]) -> dict[str, Any]:
        """One model (OpenAI's `models.retrieve`); an unknown one is OpenAI's 404 `model_not_found`."""
        found = next((m for m in await _models(p) if m["id"] == model), None)
        if found is None:
            raise NotFound(f"no model {model!r} (GET /v1/models lists them)", field="model")
        return found

    async def _models(p: Principal) -> list[dict[str, Any]]:
        out = await api.invoke("llmserver", "llm.models", {}, p)
        return [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "bkg"} for m in out["models"]]

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatRequest, request: Request, p: Annotated[Principal, Depends(llm)]
    ) -> JSONResponse | StreamingResponse:
        """Chat (streaming with SSE when `stream` is true)."""
        misspelt(body)
        return await _answer(request, p, "llm.chat", "/v1/chat/completions", body, await handed(body, request))

    @router.post("/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, p: Annotated[Principal, Depends(llm)]
    ) -> JSONResponse | StreamingResponse:
        """Text completion (streaming with SSE when `stream` is true)."""
        misspelt(body)
        return await _answer(request, p, "llm.complete", "/v1/completions", body, await handed(body, request))

    @router.post("/embeddings")
    async def embeddings(body: EmbedRequest, request: Request, p: Annotated[Principal, Depends(llm)]) -> Response:
        """Embeddings of one text or a batch (a client that leaves stops the work between two batches; what was
        embedded until then is booked to it all the same)."""
        misspelt(body)
        data = await handed(body, request)
        with booked_under("/v1/embeddings"):
            result = await while_connected(request, api.invoke("llmserver", "llm.embed", data, p))
        api.record_usage(p, "/v1/embeddings", result)
        # a batch of embeddings is megabytes of numbers: encoded in a thread, not on the event loop
        return Response(await asyncio.to_thread(orjson.dumps, result), media_type="application/json")

    async def _answer(
        request: Request, p: Principal, capability: str, route: str, body: ChatRequest | CompletionRequest, data: Any
    ) -> JSONResponse | StreamingResponse:
        if not body.stream:  # a client that leaves first stops the generation, as it does a stream's (and pays
            # for the tokens generated until then: the host books the answer that comes after it left)
            with booked_under(route):
                result = await while_connected(request, api.invoke("llmserver", capability, data, p))
            api.record_usage(p, route, result)
            return JSONResponse(result)
        options = (body.model_extra or {}).get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        usage = StreamUsage(lambda result: api.record_usage(p, route, result), body.model)

        def render(chunk: dict[str, Any]) -> dict[str, Any] | None:
            shown = usage.read(chunk)
            if shown is not None and "usage" in shown and not shown.get("choices") and not include_usage:
                return None
            if shown is not None and include_usage and shown.get("choices"):
                shown.setdefault("usage", None)  # OpenAI's shape: null on each chunk, the count on the last one
            return shown

        async def booked(chunks: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
            """`chunks`; however the stream ends (a client that left, a failure), what was generated is booked."""
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
                usage.close()

        chunks = booked(api.stream("llmserver", capability, data, p))
        response: StreamingResponse = await event_stream(chunks, render, lambda said: openai_shaped(said["error"])[1])
        return response

    return router
