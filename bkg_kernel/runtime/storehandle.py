"""The store as a plugin sees it: `self.context.store`.

Every method acts as the caller of the running call: the gateway checks that caller's scopes and books the
work to them, whether the plugin runs inline (a direct call) or in a worker (a message over the worker's own
pipe, answered by the gateway; no HTTP, no second authentication, no token of the plugin's own). The same
interface either way: a plugin never knows where its store lives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np

from bkg_kernel.errors import Cancelled

Send = Callable[[str, dict[str, Any]], Any]  # send(op, arguments) -> result, raising the gateway's BkgError
Opener = Callable[[str, dict[str, Any]], Iterator[Any]]  # open_stream(op, arguments) -> the answer's chunks


class StoreHandle:
    """Collections, points, queries, embeddings, rerank and chat, as the current caller."""

    def __init__(self, send: Send, *, open_stream: Opener | None = None) -> None:
        self._send = send
        # a streamed answer (chat_stream): over a worker's pipe, a reader of its chunks; inline, `send` returns one
        self._open_stream = open_stream or send

    # -- collections ------------------------------------------------------------------------------------
    def list_collections(self) -> list[dict[str, Any]]:
        """Describe every collection (scope collections:read)."""
        out: list[dict[str, Any]] = self._send("list_collections", {})
        return out

    def describe(self, name: str) -> dict[str, Any]:
        """Describe one collection: count, dim, metric, index, embed_model (404 when missing)."""
        out: dict[str, Any] = self._send("describe", {"name": name})
        return out

    def create_collection(
        self,
        name: str,
        dim: int,
        *,
        metric: str = "cosine",
        index: str = "flat",
        embed_model: str | None = None,
        params: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Create a collection (scope collections:write) and describe it."""
        args = {"name": name, "dim": dim, "metric": metric, "index": index, "embed_model": embed_model}
        out: dict[str, Any] = self._send("create_collection", {**args, "params": params or {}})
        return out

    def drop_collection(self, name: str) -> None:
        """Drop a collection (scope collections:write)."""
        self._send("drop_collection", {"name": name})

    # -- points -----------------------------------------------------------------------------------------
    def upsert(self, name: str, points: Sequence[dict[str, Any]], *, embed_model: str | None = None) -> dict[str, Any]:
        """Insert or replace points (`id`, `vector` or `text` to embed, `payload`); scope collections:write."""
        out: dict[str, Any] = self._send("upsert", {"name": name, "points": list(points), "embed_model": embed_model})
        return out

    def get(self, name: str, ids: Sequence[int | str], *, with_vectors: bool = True) -> list[dict[str, Any]]:
        """Return points by id, in the order asked (missing ids left out)."""
        out: list[dict[str, Any]] = self._send("get", {"name": name, "ids": list(ids), "with_vectors": with_vectors})
        return out

    def scroll(
        self,
        name: str,
        filter: dict[str, Any] | None = None,
        *,
        limit: int = 1000,
        after: str | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Return one page of points in the order first inserted and the next page's cursor (None at the end): a
        point upserted again keeps its place, so a scroll returns each point once (the store's `Collection.scroll`)."""
        args = {"name": name, "filter": filter, "limit": limit, "after": after, "with_vectors": with_vectors}
        page, nxt = self._send("scroll", args)
        return page, nxt

    def iter_points(
        self, name: str, filter: dict[str, Any] | None = None, *, with_vectors: bool = False, page: int = 10_000
    ) -> Iterator[dict[str, Any]]:
        """Yield every point (matching a filter), page by page."""
        after: str | None = None
        while True:
            points, after = self.scroll(name, filter, limit=page, after=after, with_vectors=with_vectors)
            yield from points
            if after is None:
                return

    def delete(self, name: str, ids: Sequence[int | str] | None = None, filter: dict[str, Any] | None = None) -> int:
        """Delete points by ids or by filter; return how many went (scope collections:write)."""
        return int(
            self._send("delete", {"name": name, "ids": list(ids) if ids is not None else None, "filter": filter})
        )

    def count(self, name: str, filter: dict[str, Any] | None = None) -> int:
        """Count points, optionally matching a filter."""
        return int(self._send("count", {"name": name, "filter": filter}))

    def count_distinct(self, name: str, field: str, filter: dict[str, Any] | None = None) -> int:
        """Count the distinct values of a payload field among the points matching a filter."""
        return int(self._send("count_distinct", {"name": name, "field": field, "filter": filter}))

    def query(
        self,
        name: str,
        *,
        vector: Sequence[float] | np.ndarray | None = None,
        text: str | None = None,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        mode: str | None = None,
        vector_weight: float = 0.5,
        fusion: str = "rrf",
        rrf_k: float = 60.0,
        ef_search: int | None = None,
        with_text: bool = False,
        explain: bool = False,
    ) -> list[dict[str, Any]]:
        """Vector, full-text or hybrid search (text is embedded with the collection's embed_model); the hits."""
        args = {
            "name": name, "vector": vector, "text": text, "k": k, "filter": filter, "mode": mode,
            "vector_weight": vector_weight, "fusion": fusion, "rrf_k": rrf_k, "ef_search": ef_search,
            "with_text": with_text, "explain": explain,
        }  # fmt: skip
        out: list[dict[str, Any]] = self._send("query", args)
        return out

    # -- models -----------------------------------------------------------------------------------------
    def embed(self, model: str, texts: Sequence[str], dim: int | None = None) -> np.ndarray:
        """Embed texts with `candle:<id>` or `llmserver:<id>` (scope llm:use); float32 rows (`dim` wide, else a
        422 naming the model)."""
        args: dict[str, Any] = {"model": model, "texts": list(texts), **({"dim": dim} if dim is not None else {})}
        return np.asarray(self._send("embed", args), dtype=np.float32)

    def rerank(self, model: str, query: str, documents: Sequence[str]) -> list[float]:
        """Score (query, document) pairs with a candle cross-encoder (scope llm:use); higher is more relevant."""
        out: list[float] = self._send("rerank", {"model": model, "query": query, "documents": list(documents)})
        return out

    def chat(self, body: dict[str, Any], *, route: str) -> dict[str, Any]:
        """Run an OpenAI-style chat completion in llmserver (scope llm:use); usage is booked to the caller
        under `route` (e.g. "brainml.ask")."""
        out: dict[str, Any] = self._send("chat", {"body": body, "route": route})
        return out

    def chat_stream(self, body: dict[str, Any], *, route: str) -> Generator[dict[str, Any], None, None]:
        """`chat`, its OpenAI chunks yielded as the model writes them (the last one carries the usage, booked to
        the caller under `route`, as what was written is when the reading stops early); closing the iterator stops
        the generation."""
        chunks: Iterator[dict[str, Any]] = self._open_stream("chat_stream", {"body": body, "route": route})
        try:
            yield from chunks
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def chat_pieces(
        self, body: dict[str, Any], *, route: str, cancelled: threading.Event, reply: dict[str, Any]
    ) -> Generator[str, None, None]:
        """`chat_stream`'s text, piece by piece as the model writes it; `reply` gets the answer's `model` and
        `usage`. Once `cancelled` is set (the plugin's own client left) the next piece raises `Cancelled` and the
        model stops."""
        chunks = self.chat_stream(body, route=route)
        try:
            for chunk in chunks:
                if cancelled.is_set():
                    raise Cancelled(f"{route} was cancelled")
                reply["model"] = chunk.get("model") or reply.get("model")
                if chunk.get("usage"):
                    reply["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if piece := (choice.get("delta") or {}).get("content"):
                        yield piece
        finally:
            chunks.close()

    # -- the audit log ----------------------------------------------------------------------------------
    def audit(self, action: str, target: str | None = None, **detail: Any) -> None:
        """Record what the caller did through the plugin in the audit log, as `<plugin id>.<action>` by the caller's
        user and key (no scope needed: it records the caller's own act). Who did what belongs there, read with
        admin:audit, and not in the plugin's log, which everyone with plugins:read reads. `action`: lowercase
        letters, digits, `_` and `.`; `detail`: JSON, 4 KiB at most."""
        self._send("audit", {"action": action, "target": target, "detail": detail})
