"""Compute vectors from text with a plugin's model, for collections that name an `embed_model`; upsert and query
through it (the REST routes and the plugins' store handle share these).

`candle:<model>` runs a sentence model in the candle worker; `llmserver:<model>` a GGUF model in llmserver.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np

from bkg_kernel.errors import BkgError, InvalidInput
from bkg_kernel.runtime import bodyjson
from bkg_kernel.store import validate

if TYPE_CHECKING:
    from bkg_kernel.auth import Principal
    from bkg_kernel.runtime.supervisor import Supervisor
    from bkg_kernel.store import Collection
    from bkg_kernel.store.ingest import UpsertResult

BATCH = 1024  # texts per embedding call: the model sorts them by length, so bigger batches pad less
MAX_QUERY = 16_384  # characters of a rerank query, which goes with every document
MANY = 5000  # points: past this, going through them happens on a thread


async def embed_missing(
    sup: Supervisor, caller: Principal, coll: Collection, points: list[dict[str, Any]], embed_model: str | None
) -> int:
    """Give the points (dicts with id, vector, payload, text) that have no vector the embedding of their text;
    return how many were embedded."""

    def find() -> list[int]:
        return [i for i, pt in enumerate(points) if pt.get("vector") is None]

    # 100,000 points are ~9 ms to scan, ~30 ms to fill: on a thread, not on the event loop, past a few thousand
    many = len(points) > MANY
    missing = await asyncio.to_thread(find) if many else find()
    if missing:
        spec = embed_model or coll.embed_model
        if spec is None:
            raise InvalidInput(
                f"points[{missing[0]}].vector is missing and collection {coll.name!r} has no embed_model to compute it",
                field=f"points[{missing[0]}].vector",
            )
        no_text = [i for i in missing if not points[i].get("text")]
        if no_text:
            raise InvalidInput(
                f"points[{no_text[0]}] has neither a vector nor a text to embed", field=f"points[{no_text[0]}].text"
            )
        vecs = await embed(sup, caller, spec, [points[i]["text"] for i in missing], coll.dim)

        def fill() -> None:
            for i, v in zip(missing, vecs, strict=True):
                points[i]["vector"] = v

        if many:
            await asyncio.to_thread(fill)
        else:
            fill()
    return len(missing)


async def upsert_points(
    sup: Supervisor,
    caller: Principal,
    coll: Collection,
    points: list[dict[str, Any]],
    embed_model: str | None,
    *,
    release: bool = False,
) -> dict[str, Any]:
    """Upsert points, embedding the texts of those without a vector (the store work on a thread). `release`: the
    points are the caller's to lose: that thread frees them a slice at a time afterwards, under a paused collector
    (a big request body's, which would otherwise be freed at once wherever its last reference goes)."""
    try:
        embedded = await embed_missing(sup, caller, coll, points, embed_model)
    except BaseException:  # refused or cancelled before the store had them: freed on a thread all the same
        if release:
            await asyncio.to_thread(_release, points)
        raise

    def store() -> UpsertResult:
        try:
            return coll.upsert(points)
        finally:
            if release:
                _release(points)

    r = await asyncio.to_thread(store)
    return {"upserted": r.upserted, "embedded": embedded, "took_ms": r.took_ms}


def _release(points: list[dict[str, Any]]) -> None:
    with bodyjson.gc_paused():
        bodyjson.release(points)


async def query_vector(
    sup: Supervisor, caller: Principal, coll: Collection, vector: Any, text: str | None, mode: str | None
) -> tuple[Any, str | None]:
    """The vector and mode a query runs with: with text and no vector on a collection with an embed_model, the
    text's embedding (mode defaults to hybrid, and `vector` mode searches by the text's embedding)."""
    if vector is None and text and not coll.embed_model and mode in ("vector", "hybrid"):
        raise InvalidInput(
            f"collection {coll.name!r} has no embed_model to embed the query text: send a vector, or use mode 'text'",
            field="vector",
        )
    if vector is None and text and coll.embed_model and mode in (None, "vector", "hybrid"):
        vector = (await embed(sup, caller, coll.embed_model, [text], coll.dim))[0]
        mode = mode or "hybrid"
    return vector, mode


async def embed(
    sup: Supervisor,
    caller: Principal,
    spec: str,
    texts: list[str],
    dim: int | None = None,
    field: str = "embed_model",
) -> np.ndarray:
    """Embed `texts` with `spec` ("plugin:model") as `caller`; check the vectors have the collection's dimension.

    Running a model is `llm:use`, whichever route asks (an upsert or a query that embeds, a plugin's store handle)."""
    validate.embed_model(spec, field)
    caller.require("llm:use", f"embedding with {spec}")
    plugin, _, model = spec.partition(":")
    host = sup.get(plugin)
    out: list[list[float]] = []
    for i in range(0, len(texts), BATCH):
        batch = texts[i : i + BATCH]
        if plugin == "candle":
            try:
                r = await host.invoke("candle.run", {"model_id": model, "inputs": batch, "task": "embed"}, caller)
            except BkgError as exc:
                if exc.field != "model_id" or exc.status != 422:
                    raise
                # a model that does another job, or whose files are damaged: candle's words say which
                raise InvalidInput(f"{spec} cannot embed: {exc.message}", field=field) from None
            out.extend(r["embeddings"])
        else:
            r = await host.invoke("llm.embed", {"model": model, "input": batch}, caller)
            out.extend(d["embedding"] for d in sorted(r["data"], key=lambda d: d["index"]))
            auth = host.services.get("auth")
            if auth is not None:  # the caller's tokens, whichever route embedded (as /v1/embeddings books them)
                auth.book_usage(caller, "/api/plugins/llmserver/invoke/llm.embed", r)
    if len(texts) > 256:  # thousands of rows of lists: built off the event loop (a query's one row stays on it)
        vecs = await asyncio.to_thread(_matrix, out, len(texts))
    else:
        vecs = _matrix(out, len(texts))
    if dim is not None and vecs.shape[1] != dim:
        raise InvalidInput(f"{spec} gives {vecs.shape[1]}-d vectors; the collection holds {dim}-d vectors", field=field)
    return vecs


def _matrix(rows: list[list[float]], n: int) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(n, -1)


async def rerank(
    sup: Supervisor, caller: Principal, spec: str, query: str, documents: list[str], field: str = "model"
) -> list[float]:
    """Score (query, document) pairs with a candle cross-encoder (`candle:<model>`) as `caller`; higher is more
    relevant."""
    validate.embed_model(spec, field)
    caller.require("llm:use", f"reranking with {spec}")
    plugin, _, model = spec.partition(":")
    if plugin != "candle":
        raise InvalidInput(f"rerank models run in candle (candle:<model>), not {plugin}", field=field)
    if len(query) > MAX_QUERY:  # paired with every document: tokenized once for each
        raise InvalidInput(f"a rerank query holds at most {MAX_QUERY:,} characters, not {len(query):,}", field="query")
    host = sup.get(plugin)
    scores: list[float] = []
    for i in range(0, len(documents), BATCH):
        pairs = [[query, d] for d in documents[i : i + BATCH]]
        try:
            r = await host.invoke("candle.run", {"model_id": model, "inputs": pairs, "task": "score"}, caller)
        except BkgError as exc:
            if exc.field not in ("inputs", "model_id") or exc.status != 422:
                raise
            raise InvalidInput(f"{spec} is not a reranker (a cross-encoder): {exc.message}", field=field) from None
        scores.extend(r["scores"])
    return scores
