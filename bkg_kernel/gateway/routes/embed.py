"""Embeddings and rerank scores from the models candle and llmserver run (`/api/embed`, `/api/rerank`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, ClassVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field

from bkg_kernel.auth import Principal
from bkg_kernel.gateway import storeops
from bkg_kernel.gateway.bodylimit import CheckedJSONRoute
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.store.validate import EMBED_MODEL_PATTERN
from bkg_kernel.strict import StrictBody

router = APIRouter(tags=["models"], route_class=CheckedJSONRoute)


class EmbedRequest(StrictBody):
    MAX_ITEMS: ClassVar[dict[str, int]] = {"input": 10_000}  # refused as the body is read (CheckedJSONRoute)
    MAX_BODY_BYTES: ClassVar[int] = 2**40  # up to the gateway's max_body_mb
    model: str = Field(..., pattern=EMBED_MODEL_PATTERN, description='"candle:<model>" or "llmserver:<model>"')
    input: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1, max_length=10_000)


@router.post("/api/embed")
async def embed(body: EmbedRequest, request: Request, p: Annotated[Principal, Depends(need("llm:use"))]) -> Any:
    """Embed texts with a candle or llmserver model (what collections with an embed_model use)."""
    vecs = await storeops.embed(gateway(request).supervisor, p, body.model, body.input, field="model")
    answer = {"model": body.model, "dim": int(vecs.shape[1]), "embeddings": np.ascontiguousarray(vecs)}
    # 10,000 texts of a 1024-d model are 10 M numbers: encoded by orjson straight from the array, in a thread (as
    # Python lists through FastAPI's encoder they held the event loop for seconds)
    content = await asyncio.to_thread(orjson.dumps, answer, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, media_type="application/json")


class RerankRequest(StrictBody):
    MAX_ITEMS: ClassVar[dict[str, int]] = {"documents": 1000}
    MAX_BODY_BYTES: ClassVar[int] = 2**40
    model: str = Field(..., pattern=r"^candle:.+$", description='"candle:<cross-encoder model>"')
    query: str = Field(
        ..., min_length=1, max_length=storeops.MAX_QUERY
    )  # paired with every document: its length counts 1000x
    documents: list[str] = Field(..., min_length=1, max_length=1000)


@router.post("/api/rerank")
async def rerank(body: RerankRequest, request: Request, p: Annotated[Principal, Depends(need("llm:use"))]) -> Any:
    """Score documents against a query with a cross-encoder (higher is more relevant), in the given order."""
    scores = await storeops.rerank(gateway(request).supervisor, p, body.model, body.query, body.documents)
    return {"model": body.model, "scores": scores}
