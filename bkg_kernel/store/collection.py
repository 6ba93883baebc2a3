"""A collection: its points in DuckDB (the source of truth) and its FAISS index (rebuildable from them).

`Collection` is the API; writing is in `ingest`, ranking in `search` (and `fulltext`, the BM25 index).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np

from bkg_kernel.errors import Conflict, InvalidInput, NotFound, Unavailable
from bkg_kernel.store import ingest, search, validate
from bkg_kernel.store.filters import compile_filter, field_path
from bkg_kernel.store.fulltext import TextIndex
from bkg_kernel.store.index import VectorIndex
from bkg_kernel.store.ingest import UPSERT_BATCH, UpsertResult
from bkg_kernel.store.results import CollectionInfo, Point, PointList, QueryResult
from bkg_kernel.store.sql import scalar

if TYPE_CHECKING:
    from bkg_kernel.store.store import Store

__all__ = ["Collection", "UpsertResult"]


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
        # the `seq` (place in a scroll) of the next point new to the collection: as stored, raised by `load` past
        # every place its points hold (a collection from before the column has none stored)
        self._next_seq = int(row.get("next_seq") or 0)
        self._seqs = np.zeros(0, dtype=np.int64)  # `seq` by position (a position's never changes until compaction)
        self._epoch: int = int(row["epoch"])
        self._index: VectorIndex | None = None
        self._text: TextIndex | None = None  # loaded by the first text query or upsert with text
        self._text_unsaved = False
        # In-memory mirrors of DuckDB, by FAISS position, so a vector query never waits on SQL.
        self._ids: list[int | str | None] = []
        self._payloads: list[str | None] = []
        self._fid_of: dict[str, int] = {}
        # Positions matching recent filters; any write to the collection clears it.
        self._filter_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        # Counts payload edits in place (`set_payload`...): a filter's scan begun before one is done again.
        self._payload_edits = 0
        # Texts of recent hits by position (a position's text never changes; compaction clears it).
        self._text_cache: OrderedDict[int, str | None] = OrderedDict()
        self._unsaved = False
        self._last_save = time.monotonic()
        self.dropped = False
        self.replaced = False  # by a restore (set before its table goes): a 409, where a drop is a 404
        # This collection's own: its indexes, mirrors and caches. A query takes it alone; a write takes
        # `_write_lock`, then this, and the store's lock only for each of its DuckDB transactions
        # (`Store._transaction`): what a long write or a compaction does in memory (its indexes, a rebuild) holds up
        # neither the queries nor the writes of other collections. A drop or a restore takes `_write_lock`, then
        # the store's lock: it waits for a write of the collection, not for a query (which meets the table gone: a
        # 404 or a 409). In this order, always: `_write_lock`, `_lock`, the store's lock; none of these is taken
        # while holding one after it.
        self._write_lock = threading.RLock()
        self._lock = threading.RLock()
        self._writing = False  # a write holds the locks (`_locked`)
        self._saving = threading.Lock()  # one save of the index files at a time (`flush`: `Store.close` too)

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r})"

    def _repr_html_(self) -> str:
        return self.describe()._repr_html_()

    def _live(self) -> None:
        """A 404 (dropped), or a 409 (replaced by a restore), for a handle that no longer is the collection, and
        a 503 once the store closed: a call that looked it up, then waited for a lock, must not query a table
        that is gone or a closed connection (a 500) or an index that no longer answers for the name."""
        if self._store.closed:
            raise Unavailable("the store is closed")
        if self.dropped:
            if self.replaced:
                raise Conflict(f"collection {self.name!r} was replaced (restored from a snapshot) while this call "
                               "waited: ask again", field="name")  # fmt: skip
            raise NotFound(f"collection {self.name!r} was dropped while this call waited", field="name")

    @contextlib.contextmanager
    def _searching(self) -> Iterator[None]:
        """The collection's lock alone, for a read of its in-memory indexes and caches (a query): the store's lock
        is not needed, so another collection's long write or compaction does not hold it up. What it reads in
        DuckDB it reads on a connection of its own (`_reading`), an index not loaded yet too (`_ensure_index`)."""
        with self._lock:
            self._live()
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The collection's locks, while this handle still is the collection: for writes, and what reads and
        writes the index files. Not the store's lock, which its DuckDB transactions take one at a time
        (`_transaction`): another collection's writes go on between them (a drop or a restore of this one waits
        for `_write_lock`)."""
        with self._write_lock, self._lock:
            self._live()
            if self._writing:  # within a write of this thread's (the locks are reentrant)
                yield
                return
            with self._store.writing():
                self._writing = True
                try:
                    yield
                finally:
                    self._writing = False

    @contextlib.contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection for one read outside the store's lock (`Store.reading`): the collection is looked up
        under its own lock, then read on its own snapshot; one dropped or replaced before the read began is the
        caller's 404 or 409, as with `_locked`."""
        with self._searching():
            lent = self._store.reading()
        with lent as con:
            try:
                yield con
            except duckdb.CatalogException:
                if self.replaced:  # set before a restore drops the table
                    raise Conflict(f"collection {self.name!r} was replaced (restored from a snapshot) while this "
                                   "call read it: ask again", field="name") from None  # fmt: skip
                raise NotFound(f"collection {self.name!r} was dropped while this call read it", field="name") from None

    def _transaction(self, **tables: Any) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """One DuckDB write transaction of this collection's, within a write (`_locked`): `Store._transaction`."""
        if not self._writing:
            raise RuntimeError("a collection writes only under `_locked`")
        return self._store._transaction(**tables)  # noqa: SLF001

    # -- index lifecycle --------------------------------------------------------------------------
    def _ensure_index(self) -> VectorIndex:
        """The vector index, loaded (and the mirrors filled) the first time or after a compaction; call holding
        the collection's lock, outside a transaction. It reads DuckDB on a connection of its own, not under the
        store's lock: with the collection's lock held no write of it is under way, and other collections' writes
        go on meanwhile."""
        if self._index is not None:
            return self._index
        with self._reading() as con:  # a drop or a restore meanwhile: the caller's 404 or 409
            return ingest.load(self, con)

    def _ensure_text(self) -> TextIndex:
        """The full-text index, loaded the first time or after a compaction (as `_ensure_index`)."""
        if self._text is not None:
            return self._text
        with self._reading() as con:
            return ingest.load_text(self, con)

    def flush(self) -> None:
        """Persist the FAISS and full-text indexes now (also done on close and every `index_save_interval` s)."""
        with self._saving:  # a load under the collection's lock and `Store.close` under the store's may meet here
            if self.dropped:
                return
            meta = {"epoch": self._epoch, "collection": self.name}
            if self._index is not None and self._unsaved:
                self._index.save(self._store.index_path(self.table), meta)
                self._unsaved = False
            if self._text is not None and self._text_unsaved:
                self._text.save(self._store.text_index_path(self.table), meta)
                self._text_unsaved = False
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
        with self._locked():
            ingest.upsert(self, batch, batch_size, show)
        return UpsertResult(len(batch), (time.perf_counter() - t0) * 1000)

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
            where, params = compile_filter(filter, tests_a_field=True)
            found = search.Matching(self, filter, where, params)  # the scan, outside the store's lock
            with self._locked():
                return ingest.delete_at(self, found.now())
        with self._locked():
            return ingest.delete(self, where, params)

    # -- payloads (Qdrant's set / overwrite / delete payload): the vectors, texts and positions stay ------------
    def set_payload(self, payload: dict[str, Any], points: list[Any] | None = None, *,
                    filter: dict[str, Any] | None = None) -> int:  # fmt: skip
        """Set these payload keys on the points (by ids or filter), keeping their other keys; return how many
        points were set. An id not stored is a 404 and nothing is set; a filter that matches nothing sets none."""
        text = validate.payload(payload)
        add, enc = dict(payload), validate.encode

        def merged(old: str | None) -> str:
            return enc({**json.loads(old), **add}) if old is not None else text

        return self._edit_payloads(points, filter, merged)

    def overwrite_payload(self, payload: dict[str, Any], points: list[Any] | None = None, *,
                          filter: dict[str, Any] | None = None) -> int:  # fmt: skip
        """Replace the whole payload of the points (by ids or filter) with this one; return how many were set."""
        text = validate.payload(payload)
        return self._edit_payloads(points, filter, lambda old: text)

    def delete_payload(self, keys: list[str], points: list[Any] | None = None, *,
                       filter: dict[str, Any] | None = None) -> int:  # fmt: skip
        """Remove these payload fields (dotted names, as a filter's) from the points (by ids or filter); return
        how many points it went through (those without the fields included)."""
        paths, enc = validate.payload_keys(keys, "keys"), validate.encode

        def without(old: str | None) -> str | None:
            if old is None:
                return None
            obj = json.loads(old)
            for path in paths:
                node = obj
                for key in path[:-1]:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    node.pop(path[-1], None)
            return enc(obj)

        return self._edit_payloads(points, filter, without)

    def _edit_payloads(
        self, points: list[Any] | None, filter: dict[str, Any] | None, edit: Callable[[str | None], str | None]
    ) -> int:
        """Write `edit(payload JSON)` as the payload of each point named (all must be stored) or matched, in one
        transaction, in place: the point keeps its position, so its vector, its text in the full-text index (which
        reads only the `text` column) and its place in a scroll stay as they are."""
        import pyarrow as pa

        if (points is None) == (filter is None):
            raise InvalidInput("pass either points (a list of ids) or filter", field="points")
        named: list[Any] = []
        keys: list[str] = []
        found = None
        if points is not None:
            if not isinstance(points, list):
                raise InvalidInput("points must be a list of point ids", field="points")
            named, keys = points, [validate.point_key(pid, f"points[{i}]") for i, pid in enumerate(points)]
        else:
            if not filter:
                raise InvalidInput("an empty filter would change every point's payload: name a field to test",
                                   field="filter")  # fmt: skip
            where, params = compile_filter(filter, tests_a_field=True)
            found = search.Matching(self, filter, where, params)  # the scan, outside the store's lock
        with self._locked():
            self._ensure_index()  # the id and payload mirrors
            ids = self._ids
            if found is None:
                fids = []
                for i, key in enumerate(keys):
                    f = self._fid_of.get(key)
                    if f is None:
                        raise NotFound(f"no point with id {named[i]!r} in collection {self.name!r}: nothing was "
                                       "changed", field=f"points[{i}]")  # fmt: skip
                    fids.append(f)
                fids = list(dict.fromkeys(fids))
            else:
                fids = [f for f in found.now().tolist() if ids[f] is not None]  # those deleted since left out
            if not fids:
                return 0
            new = [edit(self._payloads[f]) for f in fids]
            self._store.require_space(f"a payload change in {self.name!r}")
            changed = pa.table({"fid": pa.array(fids, pa.int64()), "payload": ingest.strings(new)})
            with self._transaction(_bkg_payloads=changed) as con:
                con.execute(f"UPDATE {self.table} SET payload = CAST(n.payload AS JSON) FROM _bkg_payloads n "
                            f"WHERE {self.table}.fid = n.fid")  # fmt: skip
                con.execute("UPDATE collections SET updated_at = now() WHERE name = ?", [self.name])
            for f, p in zip(fids, new, strict=True):
                self._payloads[f] = p
            self._filter_cache.clear()
            self._payload_edits += 1
        return len(fids)

    def optimize(self) -> None:
        """Renumber live points densely and rebuild the index without dead positions, holding the collection's
        lock alone (the indexes of 100,000 points take seconds): other collections' queries and writes go on."""
        with self._write_lock, self._lock:
            had_text = self._text is not None
            with self._locked():
                renumbered = ingest.renumber(self)
            if renumbered:
                self._ensure_index()
                if had_text:
                    self._ensure_text()

    # -- reading ----------------------------------------------------------------------------------
    def count(self, filter: dict[str, Any] | None = None) -> int:
        """Count points, optionally only those matching a filter."""
        where, params = compile_filter(filter)
        with self._reading() as con:
            return int(scalar(con, f"SELECT count(*) FROM {self.table} WHERE {where}", params))

    def count_distinct(self, field: str, filter: dict[str, Any] | None = None) -> int:
        """Count the distinct values of a payload field among the points (matching a filter) that have it.

        `field` is a dotted path like a filter's (`"meta.source"`, `"a\\.b"` for the key "a.b"). Values compare as
        filters compare them: 1 and 1.0 are one value, 1 and "1" two, 2**53 and 2**53 + 1 two; a missing or null
        field is not counted; a list or object counts as one value.
        """
        path = field_path(field, "field")
        where, params = compile_filter(filter)
        # The field is extracted once per point. A number is keyed by its integer value when it has one (a double
        # such as 1.0 too, within 128 bits), else by its DOUBLE value; the rest by their JSON text ('"1"', 'true').
        sql = (
            "SELECT count(DISTINCT CASE WHEN t IN ('BIGINT','UBIGINT') THEN CAST(TRY_CAST(v AS HUGEINT) AS VARCHAR) "
            "WHEN t = 'DOUBLE' AND d = trunc(d) AND abs(d) < 1e38 THEN CAST(TRY_CAST(d AS HUGEINT) AS VARCHAR) "
            "WHEN t = 'DOUBLE' THEN CAST(d AS VARCHAR) WHEN t <> 'NULL' THEN CAST(v AS VARCHAR) END) "
            "FROM (SELECT v, json_type(v) AS t, TRY_CAST(v AS DOUBLE) AS d "
            f"FROM (SELECT json_extract(payload, ?) AS v FROM {self.table} WHERE {where}))"
        )
        with self._reading() as con:
            return int(scalar(con, sql, [path, *params]))

    def scroll(
        self,
        filter: dict[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        after: str | None = None,
        with_vectors: bool = False,
    ) -> PointList:
        """Page through the points (matching a filter) in the order they were first inserted, like Qdrant's scroll:
        pass the page's `next_after` as `after` for the next one. A point keeps its place when it is upserted again
        (vector, payload or text changed) and through a compaction, so a scroll from start to end returns every
        point that was there all along exactly once, whatever others write between pages; a point inserted
        meanwhile comes at the end. `offset` (a count of points to skip) shifts by one for each point deleted
        before it meanwhile: the cursor does not."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidInput("limit must be from 1 to 10000", field="limit")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= validate.INT64_MAX:
            raise InvalidInput(f"offset must be an integer from 0 to {validate.INT64_MAX}", field="offset")
        mark = _cursor(after) if after is not None else None
        if mark is not None and offset:
            raise InvalidInput("give offset or after, not both (after: the page's next_after)", field="after")
        where, params = compile_filter(filter)
        with self._reading() as con:
            con.execute("BEGIN TRANSACTION")  # where the last page ended and this page: one moment
            try:
                start = -1
                if mark is not None and len(mark) == 2:  # `s<place>@<table>`
                    start, table = mark
                    if table != self.table:
                        raise Conflict(
                            f"that cursor is not one of collection {self.name!r} as it is now (another collection's, "
                            "or from before this one was dropped and made again, or restored from a snapshot): "
                            "scroll again from the start",
                            field="after",
                        )
                elif mark is not None:
                    start = self._seq_of_old_cursor(con, *mark)
                rows = con.execute(
                    f"SELECT seq, pk, vec, CAST(payload AS VARCHAR), text FROM {self.table} WHERE {where} "
                    "AND seq > ? ORDER BY seq LIMIT ? OFFSET ?",
                    [*params, start, limit, offset],
                ).fetchall()
            finally:
                con.execute("ROLLBACK")
        last = rows[-1] if len(rows) == limit else None
        return PointList(
            [
                Point(
                    json.loads(pk),
                    np.frombuffer(vec, dtype=np.float32).tolist() if with_vectors else None,
                    json.loads(payload) if payload else None,
                    text,
                )
                for _, pk, vec, payload, text in rows
            ],
            next_after=f"s{last[0]}@{self.table}" if last is not None else None,
        )

    def _seq_of_old_cursor(self, con: duckdb.DuckDBPyConnection, epoch: int, fid: int, key: str) -> int:
        """Where a cursor of the earlier format (`<epoch>:<position>:<id>`, from a bkg that scrolled by position)
        goes on: after that position while no compaction came since (positions then were places in a scroll, and
        a point keeps its place from then on), else after the point it ended on; that point gone too is a 409."""
        row = con.execute("SELECT epoch FROM collections WHERE name = ?", [self.name]).fetchone()
        if row is None:
            raise NotFound(f"collection {self.name!r} was dropped while this call read it", field="name")
        if int(row[0]) == epoch:
            return fid
        moved = con.execute(f"SELECT seq FROM {self.table} WHERE pk = ?", [key]).fetchone()
        if moved is None:
            raise Conflict(
                f"collection {self.name!r} was compacted since that page, and the point it ended on is gone: scroll "
                "again from the start",
                field="after",
            )
        return int(moved[0])

    def get(self, ids: list[Any], with_vectors: bool = True) -> PointList:
        """Return the points with these ids, in the order asked (ids not stored are left out)."""
        if not isinstance(ids, list):
            raise InvalidInput("ids must be a list", field="ids")
        keys = [validate.point_key(pid, f"ids[{i}]") for i, pid in enumerate(ids)]
        with self._reading() as con:
            rows = con.execute(
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
        explain: bool = False,
        fusion: str = "rrf",
        score_threshold: float | None = None,
        offset: int = 0,
        with_payload: bool | list[str] = True,
        with_vectors: bool = False,
    ) -> QueryResult:
        """Rank points by vector similarity, BM25 full-text score, or both fused with reciprocal rank fusion.

        A filter is applied before ranking, so k results come back whenever k points match it. Scores are
        cosine / inner-product similarity (higher is closer), L2 distance (lower is closer), BM25, or RRF.
        Hybrid weighs the vector ranking by `vector_weight` and the text ranking by `1 - vector_weight`
        (0.5: classic RRF; like Weaviate's `alpha`); `fusion="relative"` sums min-max normalised scores with
        those weights instead of reciprocal ranks. `explain` adds each hit's vector and BM25 rank and score.

        As Qdrant's: `score_threshold` drops the hits worse than it by the score they carry (an L2 vector query
        keeps distances <= it; cosine, ip, BM25 and the fused hybrid scores keep scores >= it); `offset` skips the
        first hits (k + offset at most 1000); `with_payload` is true, false (no payloads) or a list of payload
        fields to return (dotted names, as a filter's); `with_vectors` adds each hit's stored vector.
        """
        return search.query(
            self, vector, text, k, filter, mode, rrf_k, ef_search, with_text, vector_weight, explain, fusion,
            score_threshold, offset, with_payload, with_vectors,
        )  # fmt: skip

    def describe(self) -> CollectionInfo:
        """Return count, dim, metric, index, bytes on disk and the last snapshot."""
        return self._store.describe(self.name)

    def snapshot(self, *, progress: bool | Callable[[float, str], None] | None = None) -> Any:
        """Write a snapshot archive of this collection and return its description (`progress`: `Store.snapshot`)."""
        return self._store.snapshot(self.name, progress=progress)


_CURSOR = re.compile(r"s([0-9]{1,19})@(points_[0-9]{1,19})")  # ASCII digits: "²".isdigit() is True
_OLD_CURSOR = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):(.+)", re.DOTALL)  # a bkg's that scrolled by position


def _cursor(after: Any) -> tuple[int, str] | tuple[int, int, str]:
    """A scroll cursor, `s<seq>@<points table>` (`PointList.next_after`: the place in a scroll of the point a page
    ended on, in the collection as it was made: a collection dropped and made again, or restored, has another
    table), or one of the earlier format, `<epoch>:<position>:<id as stored>`: 422 for anything else."""
    if isinstance(after, str) and len(after) <= 2048:
        if m := _CURSOR.fullmatch(after):
            if int(m[1]) < 2**63:  # what DuckDB's BIGINT holds (a bigger one was a 500 binding it)
                return int(m[1]), m[2]
        elif m := _OLD_CURSOR.fullmatch(after):
            epoch, fid = int(m[1]), int(m[2])
            if epoch < 2**63 and fid < 2**63:
                return epoch, fid, m[3]
    raise InvalidInput("after must be a page's next_after, as a scroll returned it", field="after")
