"""Writing a collection: upsert and delete in DuckDB, the id / payload mirrors and the FAISS index kept in step.

The functions here work on a `Collection`'s state and are called only by its methods, under the store's mutex.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from bkg_kernel.errors import CorruptData
from bkg_kernel.store import validate
from bkg_kernel.store.fulltext import TextIndex
from bkg_kernel.store.index import VectorIndex, meta_path
from bkg_kernel.store.sql import scalar

if TYPE_CHECKING:
    import pyarrow as pa

    from bkg_kernel.store.collection import Collection

log = logging.getLogger("bkg.store")
READ_CHUNK = 50_000
# Compact (renumber positions, rebuild the index) when more than this share of positions is dead.
COMPACT_DEAD_RATIO = 0.5
# Upsert batches default to DuckDB's row group size: a transaction that fills whole row groups is written
# straight to the database file, while a smaller one goes to the WAL first and is written again by the
# next checkpoint (1M x 384 floats: 22 s in 122,880-row batches, 89 s in 20,000-row batches).
UPSERT_BATCH = 122_880
# One thread adds vectors to FAISS while the caller commits the next batch to DuckDB.
# Rows per C-level call over a batch's Python objects (strings to Arrow, keys into the id map): each such call holds
# the interpreter until it returns, so in a process that serves others (the gateway's event loop) a 100,000-row
# call would stall them ~20 ms; 8,192 rows is ~2 ms.
GIL_SLICE = 8192

_INDEXER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bkg-index")


@dataclass
class UpsertResult:
    """How many points an upsert wrote and how long it took."""

    upserted: int
    took_ms: float


def load(c: Collection, con: Any) -> VectorIndex:
    """Fill the id / payload mirrors from DuckDB (read on `con`) and load the saved index, adding what it misses."""
    import pyarrow as pa  # lazily: ~27 MB the gateway only pays once a collection is used

    rows = con.execute(f"SELECT fid, pk, CAST(payload AS VARCHAR), seq FROM {c.table} ORDER BY fid").arrow()
    if not isinstance(rows, pa.Table):
        rows = rows.read_all()
    fids = rows.column(0).to_numpy()
    seqs = rows.column(3).to_numpy()
    c._seqs = np.zeros(c._next_fid, dtype=np.int64)
    c._seqs[fids] = seqs
    # past every place in a scroll given so far (a compaction lowers `next_fid`, never a point's `seq`)
    c._next_seq = max(c._next_seq, c._next_fid, int(seqs.max()) + 1 if len(seqs) else 0)
    c._ids = [None] * c._next_fid
    c._payloads = [None] * c._next_fid
    c._fid_of = {}
    for f, k, p in zip(fids.tolist(), rows.column(1).to_pylist(), rows.column(2).to_pylist(), strict=True):
        c._ids[f] = json.loads(k)
        c._payloads[f] = p
        c._fid_of[k] = f
    alive = np.zeros(c._next_fid, dtype=bool)
    alive[fids] = True
    path = c._store.index_path(c.table)
    try:
        index, meta = VectorIndex.load(path, c.dim, c.metric, c.index_kind)
        if meta.get("epoch") != c._epoch or index.ntotal > c._next_fid:
            raise CorruptData(f"index file {path} is from another state of the collection")
    except CorruptData as exc:
        if path.exists():
            log.warning("rebuilding the index of %s from DuckDB: %s", c.name, exc)
        index = VectorIndex(c.dim, c.metric, c.index_kind, c.params)
    start = index.ntotal
    _add_from_db(c, con, index, start, c._next_fid, alive)
    index.alive = alive
    index.n_dead = int(c._next_fid - alive.sum())
    c._index = index
    if start < c._next_fid:
        c._unsaved = True
        c.flush()
    return index


def load_text(c: Collection, con: Any) -> TextIndex:
    """Load the saved full-text index, mask the positions whose rows are gone and index the texts it misses (read
    on `con`)."""
    path = c._store.text_index_path(c.table)
    try:
        text, meta = TextIndex.load(path)
        if meta.get("epoch") != c._epoch or text.ntotal > c._next_fid:
            raise CorruptData(f"full-text index {path} is from another state of the collection")
    except CorruptData as exc:
        if path.exists():
            log.warning("rebuilding the full-text index of %s from DuckDB: %s", c.name, exc)
        text = TextIndex()
    sql = f"SELECT fid FROM {c.table} WHERE fid < ? AND length(text) > 0"
    alive = np.zeros(text.ntotal, dtype=bool)
    alive[con.execute(sql, [text.ntotal]).fetchnumpy()["fid"]] = True
    text.set_alive(alive)
    start, end = text.ntotal, c._next_fid
    bar = tqdm(total=end - start, desc=f"full text {c.name}", unit="pt", disable=end - start < 20_000)
    for a in range(start, end, READ_CHUNK):
        b = min(a + READ_CHUNK, end)
        texts: list[str | None] = [None] * (b - a)
        sql = f"SELECT fid, text FROM {c.table} WHERE fid >= ? AND fid < ? AND text IS NOT NULL"
        rows = con.execute(sql, [a, b])
        while got := rows.fetchmany(GIL_SLICE):  # each fetch turns its rows into str holding the GIL
            for f, t in got:
                texts[f - a] = t
        text.add(a, texts)
        bar.update(b - a)
    bar.close()
    c._text = text
    if start < end:
        c._text_unsaved = True
        c.flush()
    return text


def _add_from_db(c: Collection, con: Any, index: VectorIndex, start: int, end: int, alive: np.ndarray) -> None:
    """Append positions start..end to the index from DuckDB (read on `con`); dead positions get zero placeholders."""
    bar = tqdm(total=end - start, desc=f"index {c.name}", unit="vec", disable=end - start < 20_000)
    for a in range(start, end, READ_CHUNK):
        b = min(a + READ_CHUNK, end)
        rows = _vectors_where(c, con, "fid >= ? AND fid < ?", [a, b])
        mat = np.zeros((b - a, c.dim), dtype=np.float32)
        mat[rows[0] - a] = rows[1]
        index.add(mat, alive=alive[a:b])
        bar.update(b - a)
    bar.close()


def _vectors_where(c: Collection, con: Any, where: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    tbl = con.execute(f"SELECT fid, vec FROM {c.table} WHERE {where} ORDER BY fid", params).arrow()
    if not isinstance(tbl, pa.Table):
        tbl = tbl.read_all()
    return tbl.column(0).to_numpy(), blob_matrix(tbl.column(1), c.dim)


def upsert(c: Collection, batch: validate.Batch, batch_size: int, show: bool) -> None:
    """Write a validated batch in parts of `batch_size`, each committed before the next starts."""
    c._ensure_index()
    if c._text is None and any(t is not None for t in batch.texts):
        c._ensure_text()  # kept in step from the first write with text on
    pending: Future[None] | None = None
    try:
        with tqdm(total=len(batch), desc=f"upsert {c.name}", unit="pt", disable=not show) as bar:
            for a in range(0, len(batch), batch_size):
                # held to the disk's free space batch by batch (the batches written before a refusal are kept)
                c._store.require_space(f"an upsert into {c.name!r}" + (f", after {a:,} points" if a else ""))
                part = batch.slice(a, a + batch_size)
                pending = _write(c, part, pending)
                bar.update(len(part))
    finally:
        if pending is not None:
            pending.result()
    maybe_compact(c)
    c._maybe_flush()


def _write(c: Collection, b: validate.Batch, pending: Future[None] | None = None) -> Future[None]:
    """Commit one batch to DuckDB, then hand its vectors to the index on a helper thread, so the next
    batch's DuckDB write overlaps this batch's FAISS add (both release the GIL). `pending` is the
    previous batch's add: it must finish before the index is touched again."""
    import pyarrow as pa

    index = c._ensure_index()
    start, n = c._next_fid, len(b)
    # A point new to the collection takes the next place in a scroll (`seq`); one upserted again keeps its own.
    found = [(i, f) for i, f in enumerate(map(c._fid_of.get, b.keys)) if f is not None]
    rows = np.array([i for i, _ in found], dtype=np.int64)
    old = np.array([f for _, f in found], dtype=np.int64)
    seq = np.arange(c._next_seq, c._next_seq + n, dtype=np.int64)
    seq[rows] = c._seqs[old]
    arrow = pa.table(
        {
            "fid": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "pk": strings(b.keys),
            "vec": matrix_blob(b.vectors),
            "payload": strings(b.payloads),
            "text": strings(b.texts),
            "seq": pa.array(seq),
        }
    )
    # the old positions as a table: a list parameter would be converted value by value
    with c._transaction(_bkg_batch=arrow, _bkg_old=pa.table({"fid": old})) as con:
        if len(old):
            con.execute(f"DELETE FROM {c.table} WHERE fid IN (SELECT fid FROM _bkg_old)")
        con.execute(
            f"INSERT INTO {c.table} (fid, pk, vec, payload, text, seq) "
            "SELECT fid, pk, vec, CAST(payload AS JSON), text, seq FROM _bkg_batch"
        )
        con.execute(
            "UPDATE collections SET next_fid = ?, next_seq = ?, updated_at = now() WHERE name = ?",
            [start + n, c._next_seq + n, c.name],
        )
    c._next_fid, c._next_seq = start + n, c._next_seq + n
    _keep_seqs(c, start, seq)
    c._filter_cache.clear()
    if pending is not None:
        pending.result()
    index.mark_dead(old)
    text = c._text
    if text is not None:
        text.remove(old)
        c._text_unsaved = True
    for f in old.tolist():
        c._ids[f] = c._payloads[f] = None
    done = _INDEXER.submit(_add, index, text, start, b)
    c._ids.extend(b.ids)
    c._payloads.extend(b.payloads)
    for a in range(0, n, GIL_SLICE):
        c._fid_of.update(zip(b.keys[a : a + GIL_SLICE], range(start + a, start + min(a + GIL_SLICE, n)), strict=True))
    c._unsaved = True
    return done


def _keep_seqs(c: Collection, start: int, seq: np.ndarray) -> None:
    """Record the places in a scroll of positions `start`.. in the mirror, grown by half again when full (not
    copied whole for every small upsert)."""
    end = start + len(seq)
    if len(c._seqs) < end:
        grown = np.zeros(max(end, len(c._seqs) * 3 // 2), dtype=np.int64)
        grown[:start] = c._seqs[:start]
        c._seqs = grown
    c._seqs[start:end] = seq


def _add(index: VectorIndex, text: TextIndex | None, start: int, b: validate.Batch) -> None:
    index.add(b.vectors)
    if text is not None:
        text.add(start, b.texts)


def delete_at(c: Collection, positions: np.ndarray) -> int:
    """Delete the points at these positions (those still there) in one transaction; return how many were deleted."""
    import pyarrow as pa

    # a table: a list parameter would be converted value by value
    return delete(c, "fid IN (SELECT fid FROM _bkg_gone)", [], _bkg_gone=pa.table({"fid": positions}))


def delete(c: Collection, where: str, params: list[Any], **tables: Any) -> int:
    """Delete the points matching a WHERE clause (reading `tables`) in one transaction; return how many were
    deleted."""
    index = c._ensure_index()
    with c._transaction(**tables) as con:
        gone = con.execute(f"DELETE FROM {c.table} WHERE {where} RETURNING fid, pk", params).fetchnumpy()
        fids = gone["fid"]
        if len(fids):
            con.execute("UPDATE collections SET updated_at = now() WHERE name = ?", [c.name])
    if len(fids):
        c._filter_cache.clear()
        index.mark_dead(np.asarray(fids, dtype=np.int64))
        if c._text is not None:
            c._text.remove(np.asarray(fids, dtype=np.int64))
            c._text_unsaved = True
        for f, key in zip(fids.tolist(), gone["pk"].tolist(), strict=True):
            c._ids[f] = c._payloads[f] = None
            c._fid_of.pop(key, None)
        c._unsaved = True
        maybe_compact(c)
        c._maybe_flush()
    return len(fids)


def maybe_compact(c: Collection) -> None:
    """Compact when more than `COMPACT_DEAD_RATIO` of the index's positions are dead."""
    index = c._index
    if index is not None and index.ntotal >= 1000 and index.n_dead > COMPACT_DEAD_RATIO * index.ntotal:
        compact(c)


def compact(c: Collection) -> None:
    """Renumber live points densely and rebuild the index without dead positions."""
    had_text = c._text is not None
    if renumber(c):
        c._ensure_index()
        if had_text:
            c._ensure_text()


def renumber(c: Collection) -> bool:
    """Renumber live points densely in DuckDB and drop the indexes, for `_ensure_index` and `_ensure_text` to
    build again: the part of a compaction that needs the store's connection. False: nothing to renumber. A point's
    `seq` (its place in a scroll) stays: a scroll under way goes on as if nothing happened."""
    c._ensure_index()
    with c._transaction() as con:
        live = int(scalar(con, f"SELECT count(*) FROM {c.table}"))
        if live == c._next_fid:
            return False
        con.execute(
            f"UPDATE {c.table} SET fid = m.new_fid FROM (SELECT fid AS old_fid, "
            f"row_number() OVER (ORDER BY fid) - 1 AS new_fid FROM {c.table}) m "
            f"WHERE {c.table}.fid = m.old_fid"
        )
        con.execute("UPDATE collections SET next_fid = ?, epoch = epoch + 1 WHERE name = ?", [live, c.name])
    # as one step for a save (`flush`, which `Store.close` may run meanwhile): the old indexes with the new epoch
    # would be loaded as current at the next open
    with c._saving:
        c._next_fid, c._epoch = live, c._epoch + 1
        c._filter_cache.clear()
        c._text_cache.clear()  # positions were renumbered
        c._index = None
        saved = c._store.index_path(c.table)
        for p in (saved, meta_path(saved)):  # of the previous epoch: rebuilt, not loaded and found stale (a warning)
            p.unlink(missing_ok=True)
        c._text = None
        c._store.text_index_path(c.table).unlink(missing_ok=True)
    return True


def strings(col: Sequence[str | None]) -> pa.ChunkedArray:
    """A column of strings as Arrow, converted `GIL_SLICE` rows per call."""
    import pyarrow as pa

    parts = [pa.array(col[a : a + GIL_SLICE], type=pa.string()) for a in range(0, len(col), GIL_SLICE)]
    return pa.chunked_array(parts, type=pa.string())


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
