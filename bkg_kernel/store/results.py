"""What store calls return: small dataclasses that print as tables in a notebook and serialise to JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from bkg_kernel.display import fmt_bytes, html_table

PointId = int | str


@dataclass
class Point:
    """One stored point."""

    id: PointId
    vector: list[float] | None = None
    payload: dict[str, Any] | None = None
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the point as plain JSON-able data."""
        return asdict(self)


class Hit:
    """One query result. The payload is decoded from its stored JSON on first access."""

    __slots__ = ("id", "score", "text", "vector", "_payload", "_payload_json")

    def __init__(
        self,
        id: PointId,
        score: float,
        payload: dict[str, Any] | None = None,
        text: str | None = None,
        vector: list[float] | None = None,
        *,
        payload_json: str | None = None,
    ) -> None:
        self.id, self.score, self.text, self.vector = id, score, text, vector
        self._payload = payload
        self._payload_json = payload_json

    @property
    def payload(self) -> dict[str, Any] | None:
        """Return the point's payload."""
        if self._payload_json is not None:
            self._payload, self._payload_json = json.loads(self._payload_json), None
        return self._payload

    @payload.setter
    def payload(self, value: dict[str, Any] | None) -> None:
        self._payload, self._payload_json = value, None

    def to_dict(self) -> dict[str, Any]:
        """Return the hit as plain JSON-able data, leaving out what was not asked for."""
        d: dict[str, Any] = {"id": self.id, "score": self.score, "payload": self.payload}
        if self.text is not None:
            d["text"] = self.text
        if self.vector is not None:
            d["vector"] = self.vector
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hit) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Hit(id={self.id!r}, score={self.score:.4f}, payload={self.payload!r})"


# `explain`: each hit's rank and score in the vector and in the BM25 ranking, as `<side>_rank`, `<side>_score`
EXPLAIN_SIDES = ("vector", "text")
EXPLAIN_KEYS = tuple(f"{side}_{what}" for side in EXPLAIN_SIDES for what in ("rank", "score"))


class QueryResult:
    """Ranked hits of a query, best first, with the time it took.

    The store hands over parallel lists (ids, scores, payload JSON); `Hit` objects are built on first use,
    so a caller that only wants `.ids` pays for none of them.
    """

    def __init__(
        self,
        hits: list[Hit] | None,
        took_ms: float,
        mode: str,
        *,
        ids: list[PointId] | None = None,
        scores: list[float] | None = None,
        payloads: list[str | None] | None = None,
    ) -> None:
        self._hits = hits
        self._cols = (ids or [], scores or [], payloads or [])
        self.took_ms = took_ms
        self.mode = mode
        self.explain: list[dict[str, Any]] | None = None  # per hit: vector and BM25 rank and score, when asked

    @property
    def hits(self) -> list[Hit]:
        """Return the hits, best first."""
        if self._hits is None:
            ids, scores, payloads = self._cols
            self._hits = [Hit(i, s, payload_json=p) for i, s, p in zip(ids, scores, payloads, strict=True)]
        return self._hits

    def __repr__(self) -> str:
        return f"QueryResult({len(self)} hits, mode={self.mode!r}, took_ms={self.took_ms:.3f})"

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self._hits) if self._hits is not None else len(self._cols[0])

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]

    @property
    def ids(self) -> list[PointId]:
        """Return the ids of the hits, in rank order."""
        return list(self._cols[0]) if self._hits is None else [h.id for h in self._hits]

    def to_dict(self) -> dict[str, Any]:
        """Return `{"results": [...], "took_ms": ..., "mode": ...}` (each result with its explanation, if asked)."""
        results = [h.to_dict() for h in self.hits]
        if self.explain is not None:
            results = [{**r, **e} for r, e in zip(results, self.explain, strict=True)]
        return {"results": results, "took_ms": self.took_ms, "mode": self.mode}

    def to_pandas(self) -> Any:
        """Return the hits as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame([h.to_dict() for h in self.hits])

    def _repr_html_(self) -> str:
        with_text = any(h.text is not None for h in self.hits)
        cols = ["rank", "id", "score", "payload"] + (["text"] if with_text else [])
        rows = [[i + 1, h.id, h.score, h.payload] + ([h.text] if with_text else []) for i, h in enumerate(self.hits)]
        return html_table(cols, rows, f"{len(self.hits)} results ({self.mode}) in {self.took_ms:.2f} ms")


@dataclass
class PointList:
    """Points returned by `get`, in the order asked for (missing ids left out); by `scroll`, a page, with the
    cursor of the next page (`next_after`, None at the end)."""

    points: list[Point]
    next_after: str | None = None

    def __iter__(self) -> Iterator[Point]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> Point:
        return self.points[i]

    def _repr_html_(self) -> str:
        rows = [(p.id, p.payload, p.text, f"[{len(p.vector)} floats]" if p.vector else "") for p in self.points]
        return html_table(["id", "payload", "text", "vector"], rows, f"{len(self.points)} points")


@dataclass
class CollectionInfo:
    """What `describe` says about a collection."""

    name: str
    dim: int
    metric: str
    index: str
    count: int
    bytes_on_disk: int
    last_snapshot: str | None
    params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    embed_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the description as plain JSON-able data."""
        return asdict(self)

    def _repr_html_(self) -> str:
        return html_table(["field", "value"], list(self.to_dict().items()), f"collection {self.name}")


@dataclass
class CollectionList:
    """All collections, each described."""

    collections: list[CollectionInfo]

    def __iter__(self) -> Iterator[CollectionInfo]:
        return iter(self.collections)

    def __len__(self) -> int:
        return len(self.collections)

    def __getitem__(self, i: int) -> CollectionInfo:
        return self.collections[i]

    @property
    def names(self) -> list[str]:
        """Return the collection names."""
        return [c.name for c in self.collections]

    def _repr_html_(self) -> str:
        cols = ["name", "dim", "metric", "index", "count", "size", "last_snapshot"]
        rows = [[c.name, c.dim, c.metric, c.index, c.count, fmt_bytes(c.bytes_on_disk), c.last_snapshot or ""]
                for c in self.collections]  # fmt: skip
        return html_table(cols, rows, f"{len(rows)} collection{'' if len(rows) == 1 else 's'}")


@dataclass
class SnapshotInfo:
    """One snapshot archive on disk."""

    id: str
    collection: str
    created_at: str
    points: int
    bytes: int
    path: str
    ok: bool = True
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot description as plain JSON-able data."""
        return asdict(self)

    def _repr_html_(self) -> str:
        return html_table(["field", "value"], list(self.to_dict().items()), f"snapshot {self.id}")


@dataclass
class SnapshotList:
    """Snapshots, newest first."""

    snapshots: list[SnapshotInfo]

    def __iter__(self) -> Iterator[SnapshotInfo]:
        return iter(self.snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)

    def __getitem__(self, i: int) -> SnapshotInfo:
        return self.snapshots[i]

    def _repr_html_(self) -> str:
        cols = ["id", "collection", "created_at", "points", "size", "ok"]
        rows = [[s.id, s.collection, s.created_at, s.points, fmt_bytes(s.bytes), s.ok] for s in self.snapshots]
        return html_table(cols, rows, f"{len(rows)} snapshot{'' if len(rows) == 1 else 's'}")
