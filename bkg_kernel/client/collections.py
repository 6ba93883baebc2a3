"""Collections on the gateway: `wb.collection(name)` makes the same calls as a local store `Collection`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from tqdm.auto import tqdm

from bkg_kernel.client.transport import renumber, seg
from bkg_kernel.errors import BkgError, InvalidInput, JobFailed, TooManyRequests, from_dict
from bkg_kernel.store.results import (
    EXPLAIN_KEYS,
    CollectionInfo,
    Hit,
    Point,
    PointList,
    QueryResult,
    SnapshotInfo,
    SnapshotList,
)
from bkg_kernel.store.snapshots import SHOW_FROM

if TYPE_CHECKING:
    from bkg_kernel.client.workbench import Workbench

T = TypeVar("T")


PAGE_NUMBERS = 2_000_000  # vector numbers the gateway puts in one answer (routes/collections.MAX_NUMBERS)
MAX_DIM = 65_536  # the widest vectors a collection takes
MAX_IDS = 100_000  # ids one request may name
MAX_SCROLL = 10_000  # points one scroll page may ask for (a larger limit is the gateway's 422, as the store's)


class RemoteCollection:
    """One collection on the gateway; the same calls as a local `Collection`."""

    def __init__(self, wb: Workbench, name: str) -> None:
        self.wb, self.name = wb, name
        self.base = f"/api/collections/{seg(name)}"

    def __repr__(self) -> str:
        return f"RemoteCollection({self.name!r})"

    def _repr_html_(self) -> str:
        return self.describe()._repr_html_()

    def describe(self) -> CollectionInfo:
        """Count, dim, metric, index, bytes, last snapshot."""
        return CollectionInfo(**self.wb.call("GET", self.base))

    def upsert(
        self,
        points: list[dict[str, Any]] | None = None,
        *,
        ids: list[Any] | None = None,
        vectors: Any = None,
        payloads: list[Any] | None = None,
        texts: list[Any] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> int:
        """Insert or replace points in batches of at most `batch_size` points (1,000; `EMBED_BATCH` when the gateway
        embeds their texts) and about `BATCH_BYTES` of JSON, with a progress bar for big uploads (and for any of
        more than one batch the gateway embeds); return how many. A batch the gateway refuses says how many points
        the batches before it stored."""
        if points is None:
            points = _points(ids, vectors, payloads, texts)
        embeds = any(isinstance(p, dict) and p.get("vector") is None for p in points)  # seconds per batch
        batch_size = batch_size or (EMBED_BATCH if embeds else 1000)
        big = len(points) > batch_size if embeds else len(points) >= 10 * batch_size
        show = big if progress is None else progress
        done = start = 0
        limit = self.wb.health().get("max_body_bytes") if len(points) > 1 else None  # (an older gateway: none)
        budget = min(BATCH_BYTES, int(limit) // 2) if isinstance(limit, int) else BATCH_BYTES
        with tqdm(total=len(points), desc=f"upsert {self.name}", unit="pt", disable=not show) as bar:
            for part in _batches(points, batch_size, budget):
                try:
                    done += self.wb.call("PUT", f"{self.base}/points", json={"points": part})["upserted"]
                except BkgError as exc:
                    before = f"{done:,} of {len(points):,} points were stored before" if done else ""
                    renumber(exc, "points", start, before)  # its index in `points`, not in the batch
                    raise
                start += len(part)
                bar.update(len(part))
        return done

    def query(self, vector: Any = None, text: str | None = None, *, k: int = 10, **kw: Any) -> QueryResult:
        """Vector, text or hybrid search (same arguments as `Collection.query`: `filter`, `mode`, ...,
        `score_threshold`, `offset`, `with_payload` (true, false or a list of fields), `with_vectors`)."""
        body = {"vector": vector.tolist() if hasattr(vector, "tolist") else vector, "text": text, "k": k, **kw}
        r = self.wb.call("POST", f"{self.base}/query", json=body)
        hits = [Hit(h["id"], h["score"], h.get("payload"), h.get("text"), h.get("vector")) for h in r["results"]]
        result = QueryResult(hits, r["took_ms"], r["mode"])
        if kw.get("explain"):
            result.explain = [{k: h.get(k) for k in EXPLAIN_KEYS} for h in r["results"]]
        return result

    def map(self, sample: int = 5000, filter: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """A sample of the points as 2-D PCA coordinates with ids, payloads and texts (`components`, `seed`)."""
        return dict(self.wb.call("POST", f"{self.base}/map", json={"sample": sample, "filter": filter, **kw}))

    def explore(
        self, color: str | None = None, *, method: str = "pca", sample: int = 5000, seed: int = 0, **kw: Any
    ) -> Any:
        """Draw the collection as a 2-D map (PCA, or UMAP with method="umap") coloured by a payload field: hover
        shows a point, a box or lasso selection lists points, a click shows its nearest neighbours; a `seed` picks
        the sample and the UMAP layout."""
        from bkg_kernel.pictures.explorer import Explorer

        return Explorer(self.wb, self.name, color=color, method=method, sample=sample, seed=seed, **kw)

    def get(self, ids: list[Any], with_vectors: bool = True) -> PointList:
        """Points by id, in the order asked for (missing ids left out): a table in a notebook. Many with their
        vectors are asked for in pages (one answer holds at most 2,000,000 vector numbers)."""
        ids = list(dict.fromkeys(ids)) if all(isinstance(i, (int, str)) for i in ids) else list(ids)  # once each
        page = max(len(ids), 1)
        if with_vectors and len(ids) > PAGE_NUMBERS // MAX_DIM:  # more than fits whatever the dim: its pages
            page = max(1, PAGE_NUMBERS // self.describe().dim)
        page = min(page, MAX_IDS)
        found: list[Any] = []
        for a in range(0, max(len(ids), 1), page):
            body = {"ids": ids[a : a + page], "with_vectors": with_vectors}
            found += self.wb.call("POST", f"{self.base}/points/get", json=body)["points"]
        return PointList([_known(Point, p) for p in found])

    def delete(self, ids: list[Any] | None = None, *, filter: dict[str, Any] | None = None) -> int:
        """Delete by ids or filter; return how many."""
        body = {"ids": ids, "filter": filter}
        return int(self.wb.call("POST", f"{self.base}/points/delete", json=body)["deleted"])

    def set_payload(
        self, payload: dict[str, Any], points: list[Any] | None = None, *, filter: dict[str, Any] | None = None
    ) -> int:
        """Set these payload keys on the points (by ids or filter), keeping their other keys, vectors and texts;
        return how many points were set (an id not stored is a 404, and nothing is set)."""
        return self._edit_payload("POST", "", {"payload": payload}, points, filter)

    def overwrite_payload(
        self, payload: dict[str, Any], points: list[Any] | None = None, *, filter: dict[str, Any] | None = None
    ) -> int:
        """Replace the whole payload of the points (by ids or filter); return how many were set."""
        return self._edit_payload("PUT", "", {"payload": payload}, points, filter)

    def delete_payload(
        self, keys: list[str], points: list[Any] | None = None, *, filter: dict[str, Any] | None = None
    ) -> int:
        """Remove these payload fields (dotted names, as a filter's) from the points (by ids or filter); return how
        many points it went through."""
        return self._edit_payload("POST", "/delete", {"keys": keys}, points, filter)

    def _edit_payload(
        self, method: str, tail: str, body: dict[str, Any], points: list[Any] | None, filter: dict[str, Any] | None
    ) -> int:
        if points is not None and hasattr(points, "tolist"):
            points = points.tolist()
        full = {**body, "points": points, "filter": filter}
        return int(self.wb.call(method, f"{self.base}/points/payload{tail}", json=full)["updated"])

    def count(self, filter: dict[str, Any] | None = None) -> int:
        """Count points (optionally matching a filter)."""
        return int(self.wb.call("POST", f"{self.base}/points/count", json={"filter": filter})["count"])

    def count_distinct(self, field: str, filter: dict[str, Any] | None = None) -> int:
        """Count the distinct values of a payload field (a dotted path) among the points (matching a filter) that
        have it, as `Collection.count_distinct` counts them."""
        body = {"field": field, "filter": filter}
        return int(self.wb.call("POST", f"{self.base}/points/count_distinct", json=body)["count"])

    def scroll(
        self,
        filter: dict[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        after: str | None = None,
        with_vectors: bool = False,
    ) -> PointList:
        """Page through the points (matching a filter) in the order first inserted, as `Collection.scroll` (a point
        upserted again keeps its place: each point once): pass the page's `next_after` as `after` for the next one.
        A page with more vector numbers than one answer holds is asked for in parts, each after the last."""
        page = limit
        if with_vectors and type(limit) is int and PAGE_NUMBERS // MAX_DIM < limit <= MAX_SCROLL:
            page = max(1, min(limit, PAGE_NUMBERS // self.describe().dim))
        body = {"filter": filter, "limit": page, "offset": offset, "after": after, "with_vectors": with_vectors}
        found: list[Any] = []
        while True:
            r = self.wb.call("POST", f"{self.base}/points/scroll", json=body)
            found += r["points"]
            cursor = r.get("next_after")
            if cursor is None or len(found) >= limit:
                break
            body = {**body, "limit": min(page, limit - len(found)), "offset": 0, "after": cursor}
        return PointList([_known(Point, p) for p in found], next_after=cursor)

    def snapshot(self, *, progress: bool | None = None) -> SnapshotInfo:
        """Write a snapshot. `progress`: as a gateway job whose steps a bar shows (true; None: for a collection of
        50,000 points or more, seconds of work), else one call that answers when it is done."""
        if self._shows(progress):
            return _known(SnapshotInfo, self._waited(self._as_job(f"{self.base}/snapshots")))
        return _known(SnapshotInfo, self._when_free("POST", f"{self.base}/snapshots"))

    def _as_job(self, path: str, **kw: Any) -> str:
        """Start `POST path` as a gateway job and return its id (waiting for a slot as `_when_free`)."""
        return str(self._when_free("POST", path, params={"background": "true"}, **kw)["job"]["id"])

    def _when_free(self, method: str, path: str, **kw: Any) -> Any:
        """A snapshot's or a restore's call; while the gateway runs as many as it takes (a 429), wait for a slot,
        as long as one call may wait (`Workbench.timeout`), then raise the 429."""
        deadline = time.monotonic() + self.wb.timeout
        while True:
            try:
                return self.wb.call(method, path, **kw)
            except TooManyRequests as exc:
                if time.monotonic() + exc.retry_after > deadline:
                    raise
                time.sleep(exc.retry_after)

    def _waited(self, job_id: str) -> dict[str, Any]:
        """A snapshot's or a restore's job waited for with a bar: its result, or the error the call would have
        raised had it not run as a job (a damaged archive's `CorruptData`, not `JobFailed`), whatever its size."""
        try:
            return self.wb.wait_job(job_id)
        except JobFailed:
            job = self.wb.call("GET", f"/api/jobs/{seg(job_id)}")
            if not job.get("error_code"):
                raise
            raise from_dict({"code": job["error_code"], "status": job.get("error_status"), "message": job["error"],
                             "field": job.get("error_field")}) from None  # fmt: skip

    def _shows(self, progress: bool | None) -> bool:
        """Whether a snapshot or a restore shows its progress (`progress`; None: from `SHOW_FROM` points)."""
        if progress is not None and not isinstance(progress, bool):
            raise InvalidInput("progress must be true, false or None (from 50,000 points)", field="progress")
        return progress if progress is not None else self.describe().count >= SHOW_FROM

    def snapshots(self) -> SnapshotList:
        """List snapshots, newest first."""
        listed = self.wb.call("GET", f"{self.base}/snapshots")["snapshots"]
        return SnapshotList([_known(SnapshotInfo, s) for s in listed])

    def restore(self, snapshot_id: str, into: str | None = None, *, progress: bool | None = None) -> CollectionInfo:
        """Restore a snapshot into this collection or a new one. `progress`: as `snapshot`'s (None: shown when the
        snapshot holds 50,000 points or more)."""
        path = f"{self.base}/snapshots/{seg(snapshot_id)}/restore"
        if progress is None:
            size = next((s.points for s in self.snapshots() if s.id == snapshot_id), 0)
            progress = size >= SHOW_FROM
        if self._shows(progress):
            return CollectionInfo(**self._waited(self._as_job(path, json={"into": into})))
        return CollectionInfo(**self._when_free("POST", path, json={"into": into}))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete one snapshot archive of this collection (`Store.delete_snapshot`)."""
        self.wb.call("DELETE", f"{self.base}/snapshots/{seg(snapshot_id)}")


def _known(cls: type[T], d: dict[str, Any]) -> T:
    """A result dataclass from the gateway's JSON: the fields it has (what a newer gateway adds is left out)."""
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})  # type: ignore[arg-type]


def _points(
    ids: list[Any] | None, vectors: Any, payloads: list[Any] | None, texts: list[Any] | None
) -> list[dict[str, Any]]:
    if ids is None or (vectors is None and texts is None):
        raise InvalidInput("upsert needs points, or ids with vectors (or texts to embed)", field="points")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    vecs = None if vectors is None else vectors.tolist() if hasattr(vectors, "tolist") else list(vectors)
    for name, col in (("vectors", vecs), ("payloads", payloads), ("texts", texts)):
        if col is not None and len(col) != len(ids):
            raise InvalidInput(f"{name}: {len(col)} of them for {len(ids)} ids", field=name)
    if vecs is None:  # the gateway embeds the texts with the collection's embed_model
        points: list[dict[str, Any]] = [{"id": i} for i in ids]
    else:
        points = [{"id": i, "vector": v} for i, v in zip(ids, vecs, strict=True)]
    for col, key in ((payloads, "payload"), (texts, "text")):
        if col is not None:
            for p, value in zip(points, col, strict=True):
                p[key] = value
    return points


# JSON per upsert request, at most about (or half the gateway's body limit, max_body_mb, if less): 1,000 points of
# 3,072 floats are ~65 MB as JSON, past the default 32 MB; batches this size keep each request short
BATCH_BYTES = 8 * 2**20
# points whose texts the gateway embeds, per upsert request: a few seconds each on two cores (~18 texts/s with
# all-MiniLM-L6-v2), where 1,000 came near the client's 120 s wait
EMBED_BATCH = 128


def _batches(points: list[dict[str, Any]], most: int, budget: int) -> Iterator[list[dict[str, Any]]]:
    """`points` in runs of at most `most` points and about `budget` bytes (a float is ~20 characters of JSON)."""
    part: list[dict[str, Any]] = []
    size = 0
    for p in points:
        vector = p.get("vector")
        n = 64 + 20 * (len(vector) if vector is not None else 0) + 2 * len(p.get("text") or "")
        n += len(orjson.dumps(p.get("payload"), default=str, option=orjson.OPT_SERIALIZE_NUMPY))
        if part and (len(part) >= most or size + n > budget):
            yield part
            part, size = [], 0
        part.append(p)
        size += n
    if part:
        yield part
