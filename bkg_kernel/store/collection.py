"""A collection: its points in DuckDB (the source of truth) and its FAISS index (rebuildable from them)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from bkg_kernel.errors import CorruptData, InvalidInput
from bkg_kernel.store import validate
from bkg_kernel.store.filters import compile_filter
from bkg_kernel.store.index import VectorIndex
from bkg_kernel.store.results import CollectionInfo, Point, PointList, QueryResult
from bkg_kernel.store.sql import scalar

if TYPE_CHECKING:
    import pyarrow as pa

    from bkg_kernel.store.store import Store

log = logging.getLogger("bkg.store")
MODES = ("vector", "text", "hybrid")
READ_CHUNK = 50_000
# Compact (renumber positions, rebuild the index) when more than this share of positions is dead.
COMPACT_DEAD_RATIO = 0.5
FILTER_CACHE_SIZE = 32
# Upsert batches default to DuckDB's row group size: a transaction that fills whole row groups is written
# straight to the database file, while a smaller one goes to the WAL first and is written again by the
# next checkpoint (1M x 384 floats: 22 s in 122,880-row batches, 89 s in 20,000-row batches).
UPSERT_BATCH = 122_880
# One thread adds vectors to FAISS while the caller commits the next batch to DuckDB.
_INDEXER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bkg-index")


@dataclass
class UpsertResult:
    """How many points an upsert wrote and how long it took."""

    upserted: int
    took_ms: float


class Collection:
    """Points with vectors, JSON payloads and optional text; query by vector, text or both."""

    def __init__(self, store: Store, row: dict[str, Any]) -> None:
        self._store = store
        self.name: str = row["name"]
        self.table: str = row["points_table"]
        self.dim: int = int(row["dim"])
        self.metric: str = row["metric"]
        self.index_kind: str = row["index_kind"]
        self.params: dict[str, Any] = json.loads(row["params"])
        self.embed_model: str | None = row.get("embed_model")
        self._next_fid: int = int(row["next_fid"])
        self._epoch: int = int(row["epoch"])
        self._text_version: int = int(row["text_version"])
        self._fts_version: int = int(row["fts_version"])
        self._index: VectorIndex | None = None
        # In-memory mirrors of DuckDB, by FAISS position, so a vector query never waits on SQL.
        self._ids: list[int | str | None] = []
        self._payloads: list[str | None] = []
        self._fid_of: dict[str, int] = {}
        # Positions matching recent filters; any write to the collection clears it.
        self._filter_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._unsaved = False
        self._last_save = time.monotonic()
        self.dropped = False

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r})"

    def _repr_html_(self) -> str:
        return self.describe()._repr_html_()

    @property
    def _con(self) -> Any:
        return self._store._con  # noqa: SLF001 - the store and its collections share one connection

    # -- index lifecycle --------------------------------------------------------------------------
    def _ensure_index(self) -> VectorIndex:
        if self._index is not None:
            return self._index
        import pyarrow as pa  # lazily: ~27 MB the gateway only pays once a collection is used

        rows = self._con.execute(f"SELECT fid, pk, CAST(payload AS VARCHAR) FROM {self.table} ORDER BY fid").arrow()
        if not isinstance(rows, pa.Table):
            rows = rows.read_all()
        fids = rows.column(0).to_numpy()
        self._ids = [None] * self._next_fid
        self._payloads = [None] * self._next_fid
        self._fid_of = {}
        for f, k, p in zip(fids.tolist(), rows.column(1).to_pylist(), rows.column(2).to_pylist(), strict=True):
            self._ids[f] = json.loads(k)
            self._payloads[f] = p
            self._fid_of[k] = f
        alive = np.zeros(self._next_fid, dtype=bool)
        alive[fids] = True
        path = self._store.index_path(self.table)
        try:
            index, meta = VectorIndex.load(path, self.dim, self.metric, self.index_kind)
            if meta.get("epoch") != self._epoch or index.ntotal > self._next_fid:
                raise CorruptData(f"index file {path} is from another state of the collection")
        except CorruptData as exc:
            if path.exists():
                log.warning("rebuilding the index of %s from DuckDB: %s", self.name, exc)
            index = VectorIndex(self.dim, self.metric, self.index_kind, self.params)
        start = index.ntotal
        self._add_from_db(index, start, self._next_fid, alive)
        index.alive = alive
        index.n_dead = int(self._next_fid - alive.sum())
        self._index = index
        if start < self._next_fid:
            self._unsaved = True
            self.flush()
        return index

    def _add_from_db(self, index: VectorIndex, start: int, end: int, alive: np.ndarray) -> None:
        """Append positions start..end to the index from DuckDB; dead positions get zero placeholders."""
        bar = tqdm(total=end - start, desc=f"index {self.name}", unit="vec", disable=end - start < 20_000)
        for a in range(start, end, READ_CHUNK):
            b = min(a + READ_CHUNK, end)
            rows = self._vectors_where("fid >= ? AND fid < ?", [a, b])
            mat = np.zeros((b - a, self.dim), dtype=np.float32)
            mat[rows[0] - a] = rows[1]
            index.add(mat, alive=alive[a:b])
            bar.update(b - a)
        bar.close()

    def _vectors_where(self, where: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa

        tbl = self._con.execute(f"SELECT fid, vec FROM {self.table} WHERE {where} ORDER BY fid", params).arrow()
        if not isinstance(tbl, pa.Table):
            tbl = tbl.read_all()
        return tbl.column(0).to_numpy(), blob_matrix(tbl.column(1), self.dim)

    def flush(self) -> None:
        """Persist the FAISS index now (it is also saved on close and every `index_save_interval` seconds)."""
        if self._index is not None and self._unsaved and not self.dropped:
            self._index.save(self._store.index_path(self.table), {"epoch": self._epoch, "collection": self.name})
            self._unsaved = False
            self._last_save = time.monotonic()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_save >= self._store.settings.index_save_interval:
            self.flush()

    # -- writing ----------------------------------------------------------------------------------
    def upsert(
        self,
        points: list[Any] | None = None,
        *,
        ids: list[Any] | None = None,
        vectors: Any = None,
        payloads: list[Any] | None = None,
        texts: list[Any] | None = None,
        batch_size: int = UPSERT_BATCH,
        progress: bool | None = None,
    ) -> UpsertResult:
        """Insert or replace points (as dicts, or as columns); each batch is committed before the next starts."""
        t0 = time.perf_counter()
        batch = validate.upsert_batch(points, ids, vectors, payloads, texts, self.dim, self.name)
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1", field="batch_size")
        show = len(batch) >= 50_000 if progress is None else progress
        with self._store._mutex:  # noqa: SLF001
            self._ensure_index()
            pending: Future[None] | None = None
            try:
                with tqdm(total=len(batch), desc=f"upsert {self.name}", unit="pt", disable=not show) as bar:
                    for a in range(0, len(batch), batch_size):
                        part = batch.slice(a, a + batch_size)
                        pending = self._write(part, pending)
                        bar.update(len(part))
            finally:
                if pending is not None:
                    pending.result()
            self._maybe_compact()
            self._maybe_flush()
        return UpsertResult(len(batch), (time.perf_counter() - t0) * 1000)

    def _write(self, b: validate.Batch, pending: Future[None] | None = None) -> Future[None]:
        """Commit one batch to DuckDB, then hand its vectors to the index on a helper thread, so the next
        batch's DuckDB write overlaps this batch's FAISS add (both release the GIL). `pending` is the
        previous batch's add: it must finish before the index is touched again."""
        import pyarrow as pa

        start, n = self._next_fid, len(b)
        arrow = pa.table(
            {
                "fid": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "pk": pa.array(b.keys, type=pa.string()),
                "vec": matrix_blob(b.vectors),
                "payload": pa.array(b.payloads, type=pa.string()),
                "text": pa.array(b.texts, type=pa.string()),
            }
        )
        con = self._con
        index = self._ensure_index()
        old = np.array([f for f in map(self._fid_of.get, b.keys) if f is not None], dtype=np.int64)
        con.register("_bkg_batch", arrow)
        con.execute("BEGIN TRANSACTION")
        try:
            if len(old):
                con.execute(f"DELETE FROM {self.table} WHERE fid IN (SELECT unnest(?::BIGINT[]))", [old.tolist()])
            con.execute(f"INSERT INTO {self.table} SELECT fid, pk, vec, CAST(payload AS JSON), text FROM _bkg_batch")
            text_changed = int(len(old) > 0 or any(t is not None for t in b.texts))
            con.execute(
                "UPDATE collections SET next_fid = ?, text_version = text_version + ?, updated_at = now() "
                "WHERE name = ?",
                [start + n, text_changed, self.name],
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("_bkg_batch")
        self._next_fid = start + n
        self._text_version += text_changed
        self._filter_cache.clear()
        if pending is not None:
            pending.result()
        index.mark_dead(old)
        for f in old.tolist():
            self._ids[f] = self._payloads[f] = None
        done = _INDEXER.submit(index.add, b.vectors)
        self._ids.extend(b.ids)
        self._payloads.extend(b.payloads)
        self._fid_of.update(zip(b.keys, range(start, start + n), strict=True))
        self._unsaved = True
        return done

    def delete(self, ids: list[Any] | None = None, *, filter: dict[str, Any] | None = None) -> int:
        """Delete points by ids or by payload filter; return how many were deleted."""
        if (ids is None) == (filter is None):
            raise InvalidInput("pass either ids or filter", field="ids")
        if ids is not None:
            if not isinstance(ids, list):
                raise InvalidInput("ids must be a list", field="ids")
            keys = [validate.point_key(pid, f"ids[{i}]") for i, pid in enumerate(ids)]
            where, params = "pk IN (SELECT unnest(?::VARCHAR[]))", [keys]
        else:
            if not filter:
                raise InvalidInput(
                    "an empty filter would delete every point; drop the collection instead", field="filter"
                )
            where, params = compile_filter(filter)
        with self._store._mutex:  # noqa: SLF001
            index = self._ensure_index()
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                gone = con.execute(f"DELETE FROM {self.table} WHERE {where} RETURNING fid, pk", params).fetchnumpy()
                fids = gone["fid"]
                if len(fids):
                    con.execute(
                        "UPDATE collections SET text_version = text_version + 1, updated_at = now() WHERE name = ?",
                        [self.name],
                    )
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            if len(fids):
                self._text_version += 1
                self._filter_cache.clear()
                index.mark_dead(np.asarray(fids, dtype=np.int64))
                for f, key in zip(fids.tolist(), gone["pk"].tolist(), strict=True):
                    self._ids[f] = self._payloads[f] = None
                    self._fid_of.pop(key, None)
                self._unsaved = True
                self._maybe_compact()
                self._maybe_flush()
            return len(fids)

    def _maybe_compact(self) -> None:
        index = self._index
        if index is not None and index.ntotal >= 1000 and index.n_dead > COMPACT_DEAD_RATIO * index.ntotal:
            self.optimize()

    def optimize(self) -> None:
        """Renumber live points densely and rebuild the index without dead positions."""
        with self._store._mutex:  # noqa: SLF001
            self._ensure_index()
            con = self._con
            live = int(scalar(con, f"SELECT count(*) FROM {self.table}"))
            if live == self._next_fid:
                return
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    f"UPDATE {self.table} SET fid = m.new_fid FROM (SELECT fid AS old_fid, "
                    f"row_number() OVER (ORDER BY fid) - 1 AS new_fid FROM {self.table}) m "
                    f"WHERE {self.table}.fid = m.old_fid"
                )
                con.execute("UPDATE collections SET next_fid = ?, epoch = epoch + 1 WHERE name = ?", [live, self.name])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            self._next_fid, self._epoch = live, self._epoch + 1
            self._filter_cache.clear()
            self._index = None
            self._ensure_index()  # rebuilds: the saved index is from the previous epoch

    # -- reading ----------------------------------------------------------------------------------
    def count(self, filter: dict[str, Any] | None = None) -> int:
        """Count points, optionally only those matching a filter."""
        where, params = compile_filter(filter)
        with self._store._mutex:  # noqa: SLF001
            return int(scalar(self._con, f"SELECT count(*) FROM {self.table} WHERE {where}", params))

    def scroll(
        self,
        filter: dict[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        with_vectors: bool = False,
    ) -> PointList:
        """Page through the points (matching a filter) in insertion order, like Qdrant's scroll."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidInput("limit must be from 1 to 10000", field="limit")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer", field="offset")
        where, params = compile_filter(filter)
        with self._store._mutex:  # noqa: SLF001
            rows = self._con.execute(
                f"SELECT pk, vec, CAST(payload AS VARCHAR), text FROM {self.table} WHERE {where} "
                "ORDER BY fid LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return PointList(
            [
                Point(
                    json.loads(pk),
                    np.frombuffer(vec, dtype=np.float32).tolist() if with_vectors else None,
                    json.loads(payload) if payload else None,
                    text,
                )
                for pk, vec, payload, text in rows
            ]
        )

    def get(self, ids: list[Any], with_vectors: bool = True) -> PointList:
        """Return the points with these ids, in the order asked (ids not stored are left out)."""
        if not isinstance(ids, list):
            raise InvalidInput("ids must be a list", field="ids")
        keys = [validate.point_key(pid, f"ids[{i}]") for i, pid in enumerate(ids)]
        with self._store._mutex:  # noqa: SLF001
            rows = self._con.execute(
                f"SELECT pk, vec, CAST(payload AS VARCHAR), text FROM {self.table} "
                "WHERE pk IN (SELECT unnest(?::VARCHAR[]))",
                [keys],
            ).fetchall()
        by_key = {r[0]: r for r in rows}
        out = []
        for key in dict.fromkeys(keys):
            if key in by_key:
                _, vec, payload, text = by_key[key]
                vector = np.frombuffer(vec, dtype=np.float32).tolist() if with_vectors else None
                out.append(Point(json.loads(key), vector, json.loads(payload) if payload else None, text))
        return PointList(out)

    def query(
        self,
        vector: Any = None,
        text: str | None = None,
        *,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        mode: str | None = None,
        rrf_k: float = 60.0,
        ef_search: int | None = None,
        with_text: bool = False,
        vector_weight: float = 0.5,
    ) -> QueryResult:
        """Rank points by vector similarity, BM25 full-text score, or both fused with reciprocal rank fusion.

        A filter is applied before ranking, so k results come back whenever k points match it. Scores are
        cosine / inner-product similarity (higher is closer), L2 distance (lower is closer), BM25, or RRF.
        Hybrid weighs the vector ranking by `vector_weight` and the text ranking by `1 - vector_weight`
        (0.5: classic RRF; like Weaviate's `alpha`).
        """
        t0 = time.perf_counter()
        k = validate.k_value(k)
        mode = mode or (
            "hybrid" if vector is not None and text is not None else "text" if text is not None else "vector"
        )
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})", field="mode")
        q = None
        if mode in ("vector", "hybrid"):
            if vector is None:
                raise InvalidInput(f"{mode} search needs a query vector", field="vector")
            q = validate.query_vector(vector, self.dim, self.name)
        if mode in ("text", "hybrid") and (not isinstance(text, str) or not text.strip() or len(text) > 10_000):
            raise InvalidInput(f"{mode} search needs a query text of 1 to 10000 characters", field="text")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or rrf_k < 0:  # noqa: UP038
            raise InvalidInput("rrf_k must be a number >= 0", field="rrf_k")
        if (
            isinstance(vector_weight, bool)
            or not isinstance(vector_weight, (int, float))
            or not 0 <= vector_weight <= 1
        ):  # noqa: UP038
            raise InvalidInput("vector_weight must be a number from 0 to 1", field="vector_weight")
        if ef_search is not None and (not isinstance(ef_search, int) or not 1 <= ef_search <= 4096):
            raise InvalidInput("ef_search must be an integer from 1 to 4096", field="ef_search")
        where, params = compile_filter(filter)
        with self._store._mutex:  # noqa: SLF001
            index = self._ensure_index()
            allowed = self._allowed(filter, where, params) if filter else None
            if mode == "vector":
                assert q is not None
                fids, raw = index.search(q, k, allowed, ef_search)
                scores = index.score(raw)
            elif mode == "text":
                fids, scores = self._text_search(str(text), k, where, params)
            else:
                assert q is not None
                depth = max(k, 100)
                vf, _ = index.search(q, depth, allowed, ef_search)
                tf, _ = self._text_search(str(text), depth, where, params)
                w = float(vector_weight)
                fids, scores = rrf([vf, tf], float(rrf_k), k, weights=[2 * w, 2 * (1 - w)])
            fl, sl = fids.tolist(), scores.tolist()
            if not all(map(math.isfinite, sl)):  # scores must serialise as JSON
                sl = [x if math.isfinite(x) else 0.0 for x in sl]
            result = QueryResult(
                None,
                0.0,
                mode,
                ids=[self._ids[f] for f in fl],
                scores=sl,
                payloads=[self._payloads[f] for f in fl],
            )
            if with_text and fl:
                hits = result.hits
                texts = dict(
                    self._con.execute(
                        f"SELECT fid, text FROM {self.table} WHERE fid IN (SELECT unnest(?::BIGINT[]))",
                        [fids.tolist()],
                    ).fetchall()
                )
                for h, f in zip(hits, fl, strict=True):
                    h.text = texts.get(f)
        result.took_ms = (time.perf_counter() - t0) * 1000
        return result

    def _allowed(self, flt: dict[str, Any], where: str, params: list[Any]) -> np.ndarray:
        """Return the positions matching a filter, from DuckDB or from the cache of recent filters."""
        key = json.dumps(flt, sort_keys=True, default=str)
        hit = self._filter_cache.get(key)
        if hit is not None:
            self._filter_cache.move_to_end(key)
            return hit
        fids = self._con.execute(f"SELECT fid FROM {self.table} WHERE {where}", params).fetchnumpy()["fid"]
        fids = np.asarray(fids, dtype=np.int64)
        if FILTER_CACHE_SIZE:
            self._filter_cache[key] = fids
            while len(self._filter_cache) > FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return fids

    def _text_search(self, text: str, k: int, where: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        if not self._ensure_fts():
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        rows = self._con.execute(
            f"SELECT fid, score FROM (SELECT fid, fts_main_{self.table}.match_bm25(fid, ?) AS score "
            f"FROM {self.table} WHERE {where}) sq WHERE score IS NOT NULL ORDER BY score DESC, fid LIMIT ?",
            [text, *params, k],
        ).fetchnumpy()
        return rows["fid"].astype(np.int64), rows["score"].astype(np.float64)

    def _ensure_fts(self) -> bool:
        """(Re)build the BM25 index when the collection's text changed since it was built."""
        if self._fts_version == self._text_version:
            return self._fts_version >= 0 and self._has_fts()
        con = self._con
        has_text = scalar(con, f"SELECT count(*) FROM {self.table} WHERE text IS NOT NULL") > 0
        if has_text:
            con.execute(
                f"PRAGMA create_fts_index('{self.table}', 'fid', 'text', stemmer='porter', stopwords='english', "
                "ignore='[^\\p{L}\\p{N}]+', strip_accents=1, lower=1, overwrite=1)"
            )
        else:
            con.execute(f"DROP SCHEMA IF EXISTS fts_main_{self.table} CASCADE")
        con.execute("UPDATE collections SET fts_version = ? WHERE name = ?", [self._text_version, self.name])
        self._fts_version = self._text_version
        return bool(has_text)

    def _has_fts(self) -> bool:
        sql = "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = ?"
        return bool(scalar(self._con, sql, [f"fts_main_{self.table}"]))

    def describe(self) -> CollectionInfo:
        """Return count, dim, metric, index, bytes on disk and the last snapshot."""
        return self._store.describe(self.name)

    def snapshot(self) -> Any:
        """Write a snapshot archive of this collection and return its description."""
        return self._store.snapshot(self.name)


def rrf(
    rankings: list[np.ndarray], rrf_k: float, k: int, weights: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked id lists: score(d) = sum over lists of weight / (rrf_k + rank of d), rank from 1."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        if weight == 0:
            continue
        for rank, fid in enumerate(ranking.tolist(), start=1):
            scores[fid] = scores.get(fid, 0.0) + weight / (rrf_k + rank)
    best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return np.array([b[0] for b in best], dtype=np.int64), np.array([b[1] for b in best])


def matrix_blob(mat: np.ndarray) -> pa.Array:
    """Pack an (n, dim) float32 matrix as one BLOB of raw bytes per row, without copying row by row."""
    import pyarrow as pa

    mat = np.ascontiguousarray(mat, dtype=np.float32)
    n, dim = mat.shape
    offsets = np.arange(n + 1, dtype=np.int64) * (dim * 4)
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(mat)])


def blob_matrix(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Unpack BLOB rows written by `matrix_blob` into an (n, dim) float32 matrix."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if arr.null_count:
        raise CorruptData("a stored vector is missing")
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=off_type)[arr.offset : arr.offset + n + 1]
    if not np.all(np.diff(offs) == dim * 4):
        raise CorruptData(f"a stored vector does not have {dim} float32 values")
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offs[0] : offs[-1]]
    return data.view(np.float32).reshape(n, dim).copy()
