"""The store: one DuckDB catalog per data dir, owned by one process, holding every collection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb

from bkg_kernel.errors import AlreadyExists, CorruptData, InsufficientStorage, InvalidInput, NotFound, Unavailable
from bkg_kernel.settings import Settings, get_settings
from bkg_kernel.store import migrations, snapshots, validate
from bkg_kernel.store.collection import Collection
from bkg_kernel.store.index import DEFAULT_PARAMS, PARAM_RANGES, meta_path
from bkg_kernel.store.lock import LOCK_NAME, DataDirLock
from bkg_kernel.store.results import CollectionInfo, CollectionList, SnapshotInfo, SnapshotList
from bkg_kernel.store.sql import scalar, transaction

log = logging.getLogger("bkg.store")
DB_NAME = "bkg.duckdb"
# what a store makes in its data dir: its database (and DuckDB's write-ahead log and spill folder), its lock, its
# index files and its snapshots
STORE_ENTRIES = frozenset({DB_NAME, f"{DB_NAME}.wal", f"{DB_NAME}.tmp", LOCK_NAME, "indexes", "snapshots"})
CLOSE_WAIT_S = 5.0  # how long closing waits for reads still running (each told to stop first)


def _connect(db_path: Path) -> duckdb.DuckDBPyConnection:
    """Open the store's database; a file there that DuckDB cannot open is one line naming it (and left as it is),
    not DuckDB's IOException."""
    try:
        return duckdb.connect(str(db_path), config={"autoinstall_known_extensions": False})
    except duckdb.IOException as exc:
        said = str(exc).split("\n", 1)[0].removeprefix("IO Error: ")
        if "not a valid DuckDB database file" in said:
            raise CorruptData(
                f"{db_path} is not a bkg store: it is not a DuckDB database file (another program's?); it was left "
                "as it is: move it away, or name another data dir (--data-dir, BKG_DATA_DIR)",
                field="data_dir",
            ) from None
        raise Unavailable(f"{db_path}, the bkg store's database, cannot be opened: {said}", field="data_dir") from None


def _size(path: Path) -> int:
    """Bytes of an index file; 0 when there is none, or none any more: a compaction of the collection (under its
    own locks, not the store's) removes the files of the positions it renumbered, and saves them again later."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Store:
    """Collections of vectors + JSON payloads + text in one data dir: `Store("./data")` or `with Store() as s:`."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.data_dir = Path(data_dir if data_dir is not None else self.settings.data_dir).resolve()
        self._lock = DataDirLock(self.data_dir)
        self._lock.acquire()
        self.db_path = self.data_dir / DB_NAME
        con = None
        try:
            con = _connect(self.db_path)
            # `now()` and a column's `DEFAULT current_timestamp` write UTC, as every timestamp bkg writes itself
            # (the machine's own zone put local times into TIMESTAMP columns read back as UTC); ICU is built in
            con.execute("SET GLOBAL TimeZone = 'UTC'")  # GLOBAL: the connections of `reading` too
            migrations.migrate(con, str(self.db_path))
            self._con = con
            self._sweep()
            self._add_seq()
        except BaseException:
            if con is not None:
                con.close()
            self._lock.release()
            raise
        self._mutex = threading.RLock()
        self._busy: set[duckdb.DuckDBPyConnection] = set()  # reads running outside the lock (`reading`)
        self._reads_lent = 0  # reads lent so far (`_checkpoint`: one lent while it ran)
        self._readers_cv = threading.Condition()
        self._writes = 0  # writes of a collection under way (`writing`): `close` waits for them
        self._closing = False  # set by `close`: no write begins, those under way end first
        self._open: dict[str, Collection] = {}
        self.closed = False

    def _sweep(self) -> None:
        """Remove what a process killed mid-way left behind: a snapshot's or a restore's work folder, a staged
        points table no collection names (a restore that never swapped in), and index files of no table."""
        for work in [*self.data_dir.glob(".restore-*"), *self.snapshot_dir.glob("*/.tmp-*")]:
            shutil.rmtree(work, ignore_errors=True)
        used = {r[0] for r in self._con.execute("SELECT points_table FROM collections").fetchall()}
        sql = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"
        tables = {r[0] for r in self._con.execute(sql).fetchall() if r[0].removeprefix("points_").isdigit()}
        for table in sorted(tables - used):
            self._con.execute(f"DROP TABLE {table}")
        # DuckDB FTS indexes of data dirs from before bkg kept a full-text index of its own (fulltext.py): a row per
        # word of every text, read by nothing
        sql = "SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'fts_main_points_%'"
        for (schema,) in self._con.execute(sql).fetchall():
            try:
                self._con.execute(f'DROP SCHEMA "{schema}" CASCADE')
            except duckdb.Error as exc:  # disk it wastes, nothing it breaks: the store opens
                log.warning("cannot drop %s, an old full-text index: %s", schema, exc)
        for f in (self.data_dir / "indexes").glob("points_*"):
            if f.name.split(".", 1)[0] not in used or f.suffix == ".tmp":  # a table's, or a save cut short
                f.unlink(missing_ok=True)

    def _add_seq(self) -> None:
        """Give the points tables of data dirs from before scroll order was kept a `seq` column (a point's place in a
        scroll, kept by a re-upsert), filled from their positions: their scroll order as it was; and their
        collections the next place to give (`next_seq`)."""
        sql = (
            "SELECT c.points_table FROM collections c WHERE NOT EXISTS (SELECT 1 FROM duckdb_columns() d WHERE "
            "d.schema_name = 'main' AND d.table_name = c.points_table AND d.column_name = 'seq') ORDER BY 1"
        )
        tables = [r[0] for r in self._con.execute(sql).fetchall()]
        for table in tables:
            with transaction(self._con) as con:
                con.execute(f"ALTER TABLE {table} ADD COLUMN seq BIGINT")
                con.execute(f"UPDATE {table} SET seq = fid")
        # a collection from before `next_seq` (migration 0014): past every place its points hold and every position
        # given (a place given out and then deleted was a position too, until a compaction: from then on this
        # value is kept, and a compaction never lowers it)
        unset = self._con.execute("SELECT name, points_table FROM collections WHERE next_seq IS NULL").fetchall()
        for name, table in unset:
            held = f"(SELECT coalesce(max(seq) + 1, 0) FROM {table})"
            self._con.execute(f"UPDATE collections SET next_seq = greatest(next_fid, {held}) WHERE name = ?", [name])
        if tables or unset:
            # straight into the database file, as a migration's: a WAL holding an ALTER TABLE may not replay
            self._con.execute("CHECKPOINT")

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Save every open index, checkpoint DuckDB and release the data dir. The writes under way end first (no
        new one begins): their indexes are saved as they leave them."""
        if self.closed:
            return
        with self._readers_cv:
            self._closing = True
            try:
                while self._writes:
                    self._readers_cv.wait()
            except BaseException:  # interrupted (Ctrl-C in a notebook): the store stays open, and writable
                self._closing = False
                self._readers_cv.notify_all()
                raise
        with self._mutex:
            if self.closed:  # closed by another thread while this one waited
                return
            try:
                for coll in self._open.values():
                    coll.flush()
            finally:
                self.closed = True
                try:
                    self._stop_reads()
                    self._checkpoint()
                finally:
                    self._con.close()
                    self._lock.release()

    def _checkpoint(self) -> None:
        """Write what the WAL holds into the database file, unless a read outside the lock (`reading`) runs now:
        DuckDB refuses to checkpoint past a transaction that began before the last compaction or table made or
        dropped. Then the WAL keeps it (DuckDB checkpoints by itself later, and when the store closes), and what
        waits for this is an estimate."""
        reading, lent = bool(self._busy), self._reads_lent
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.TransactionException:
            # a read lent in between counts, ended or not: reads are lent under a collection's lock, not the
            # store's, so one may begin and end while this runs
            if not (reading or self._busy or self._reads_lent != lent):
                raise

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A write of one collection under way, under that collection's locks, not the store's (`close` waits
        for it, and none begins once it closes): its DuckDB transactions take the store's lock one at a time
        (`_transaction`), what it does in memory (the indexes, the mirrors, a compaction's rebuilt indexes) holds
        up no other collection."""
        with self._readers_cv:
            if self._closing or self.closed:
                raise Unavailable("the store is closed")
            self._writes += 1
        try:
            yield
        finally:
            with self._readers_cv:
                self._writes -= 1
                self._readers_cv.notify_all()

    @contextlib.contextmanager
    def _transaction(self, **tables: Any) -> Iterator[duckdb.DuckDBPyConnection]:
        """One DuckDB write transaction on the store's connection, holding the store's lock for it alone (`tables`:
        Arrow tables its statements read, as `sql.transaction`). DuckDB's write transactions never overlap: a
        SIGKILL mid-write with several open at once, and a checkpoint among them, left a database DuckDB would not
        open again (2 runs in 230 here, 0 in 330 one at a time)."""
        with self._mutex:
            self._still_open()
            with transaction(self._con, **tables) as con:
                yield con

    @contextlib.contextmanager
    def _claimed(self, name: str) -> Iterator[Collection | None]:
        """Collection `name` (None when there is none) with its write lock held, then the store's: what drops or
        replaces a collection waits for a write of it (which holds the collection's locks, not the store's:
        `writing`), not for a query."""
        while True:
            with self._mutex:
                try:
                    coll: Collection | None = self.collection(name)  # a 503 once the store closed
                except NotFound:
                    coll = None
                if coll is None:
                    yield None
                    return
            with coll._write_lock, self._mutex:  # noqa: SLF001 - in this order, always
                self._still_open()
                if self._open.get(name) is coll and not coll.dropped:
                    yield coll
                    return
            # dropped or replaced while this waited for its lock: look the name up again

    def reading(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A DuckDB connection of its own for one read that may scan every point (a filter): it runs outside the
        store's lock, on its own snapshot of the data, so a slow read holds up its caller alone, not every other
        call to the store. Take it holding the collection's lock (where the caller checked that its collection
        still is): not the store's, which a long write of another collection may hold. A new one each time (a few
        microseconds): one kept would keep its last read's transaction open, and DuckDB does not checkpoint past
        it."""
        if self.closed:
            raise Unavailable("the store is closed")
        with self._readers_cv:
            if self.closed:  # again, under the condition `_stop_reads` waits on: a read lent is one it stops
                raise Unavailable("the store is closed")
            try:
                con = self._con.cursor()  # DuckDB's way to a connection per thread, from any thread
            except duckdb.Error:  # closed meanwhile: `close` holds the store's lock, not the collections'
                raise Unavailable("the store is closed") from None
            self._busy.add(con)
            self._reads_lent += 1
        return self._lent(con)

    @contextlib.contextmanager
    def _lent(self, con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            yield con
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.InterruptException) or self.closed:  # stopped, or cut off, by `close`
                raise Unavailable("the store closed while this call read it") from None
            raise
        finally:
            with self._readers_cv:  # out of `_busy` before it closes: `_stop_reads` interrupts what is in it
                self._busy.discard(con)
                con.close()
                self._readers_cv.notify_all()

    def _stop_reads(self) -> None:
        """Tell the reads still running to stop and wait for them (a while): their connections keep the database
        file open, and the next owner of the data dir must be able to open it. DuckDB drops an interrupt that
        comes before a query runs (or while it is still being planned): it is sent again until they end."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        with self._readers_cv:
            while self._busy and (left := deadline - time.monotonic()) > 0:
                for con in self._busy:
                    with contextlib.suppress(duckdb.Error):
                        con.interrupt()
                self._readers_cv.wait(min(left, 0.05))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.data_dir)!r})"

    def _repr_html_(self) -> str:
        return self.list_collections()._repr_html_()

    def index_path(self, table: str) -> Path:
        """Return where the FAISS index of a points table lives."""
        return self.data_dir / "indexes" / f"{table}.faiss"

    def text_index_path(self, table: str) -> Path:
        """Return where the full-text index of a points table lives."""
        return self.data_dir / "indexes" / f"{table}.fts"

    @property
    def snapshot_dir(self) -> Path:
        """Return the folder that holds snapshot archives (kept when collections are dropped)."""
        return self.data_dir / "snapshots"

    # -- collections ------------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        index: str = "flat",
        *,
        embed_model: str | None = None,
        **params: Any,
    ) -> Collection:
        """Create a collection (metric cosine|l2|ip, index flat|hnsw|ivf; index params such as m, ef_search, nlist).

        `embed_model` ("candle:<id>" or "llmserver:<id>") names the model the gateway uses to compute vectors
        from text when points or queries come without one.
        """
        validate.collection_name(name)
        validate.embed_model(embed_model)
        validate.collection_config(dim, metric, index)
        unknown = set(params) - set(DEFAULT_PARAMS[index])
        if unknown:
            allowed = ", ".join(DEFAULT_PARAMS[index]) or "none"
            raise InvalidInput(
                f"unknown {index} index parameter {sorted(unknown)[0]!r} (allowed: {allowed})", field="params"
            )
        for key, value in params.items():
            lo, hi = PARAM_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidInput(f"{key} must be an integer from {lo} to {hi:,}", field=f"params.{key}")
        full = {**DEFAULT_PARAMS[index], **params}
        if index == "ivf" and full["nlist"] > full["ivf_train_min"]:
            raise InvalidInput(f"nlist ({full['nlist']:,}) must be at most ivf_train_min ({full['ivf_train_min']:,}): "
                               "FAISS trains each list's centroid from the vectors there are then, at least one a "
                               "list (nlist 0 chooses from the data)", field="params.nlist")  # fmt: skip
        with self._mutex:
            return self._create(name, dim, metric, index, full, embed_model)

    def _create(
        self, name: str, dim: int, metric: str, index: str, params: dict[str, Any], embed_model: str | None = None
    ) -> Collection:
        self._still_open()
        if self._row(name) is not None:
            raise AlreadyExists(f"collection {name!r} already exists", field="name")
        table = self._new_points_table()
        self._con.execute(
            "INSERT INTO collections (name, points_table, dim, metric, index_kind, params, embed_model, next_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            [name, table, dim, metric, index, json.dumps(params), embed_model],
        )
        return self.collection(name)

    def set_embed_model(self, name: str, embed_model: str | None) -> None:
        """Set (or clear) the model that computes a collection's vectors from text."""
        validate.embed_model(embed_model)
        with self._mutex:
            coll = self.collection(name)
            self._con.execute("UPDATE collections SET embed_model = ? WHERE name = ?", [embed_model, name])
            coll.embed_model = embed_model

    def _new_points_table(self) -> str:
        seq = scalar(self._con, "SELECT nextval('points_table_seq')")
        table = f"points_{seq}"
        self._con.execute(
            f"CREATE TABLE {table} "
            # Raw float32 bytes do not compress: skipping DuckDB's compression analysis halves ingest time. `fid` is
            # the point's position in the indexes (a re-upsert or a compaction moves it), `seq` its place in a scroll
            # (the next one when the point is first inserted, then kept by a re-upsert and a compaction).
            "(fid BIGINT NOT NULL, pk VARCHAR NOT NULL, vec BLOB NOT NULL USING COMPRESSION uncompressed, "
            "payload JSON, text VARCHAR, seq BIGINT NOT NULL)"
        )
        return table

    def _row(self, name: str) -> dict[str, Any] | None:
        cur = self._con.execute("SELECT * FROM collections WHERE name = ?", [name])
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def _still_open(self) -> None:
        """A 503 for a call that comes once the store closed (its connection is gone: DuckDB's error is a 500)."""
        if self.closed:
            raise Unavailable("the store is closed")

    def collection(self, name: str) -> Collection:
        """Return an existing collection."""
        with self._mutex:
            self._still_open()
            coll = self._open.get(name)
            if coll is not None:
                return coll
            row = self._row(validate.collection_name(name))
            if row is None:
                raise NotFound(f"collection {name!r} does not exist", field="name")
            coll = self._open[name] = Collection(self, row)
            return coll

    __getitem__ = collection

    def __contains__(self, name: str) -> bool:
        with self._mutex:
            self._still_open()
            return self._row(name) is not None

    def list_collections(self) -> CollectionList:
        """Describe every collection."""
        with self._mutex:
            self._still_open()
            names = [r[0] for r in self._con.execute("SELECT name FROM collections ORDER BY name").fetchall()]
        described = []
        for n in names:  # each under the lock on its own: other calls go between them
            with contextlib.suppress(NotFound):  # dropped meanwhile
                described.append(self.describe(n))
        return CollectionList(described)

    def describe(self, name: str) -> CollectionInfo:
        """Return count, dim, metric, index kind, bytes on disk and last snapshot of a collection."""
        last = snapshots.list_snapshots(self.snapshot_dir, validate.collection_name(name))  # files: not under the lock
        with self._mutex:
            coll = self.collection(name)
            self._checkpoint()  # so the table's blocks are on disk, not only in the WAL
            count = int(scalar(self._con, f"SELECT count(*) FROM {coll.table}"))
            blocks = scalar(
                self._con,
                f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{coll.table}') WHERE block_id >= 0",
            )
            block_size = scalar(self._con, "SELECT block_size FROM pragma_database_size()")
            path = self.index_path(coll.table)
            files = (path, meta_path(path), self.text_index_path(coll.table))
            index_bytes = sum(map(_size, files))
            row = self._row(name) or {}
            return CollectionInfo(
                name=name,
                dim=coll.dim,
                metric=coll.metric,
                index=coll.index_kind,
                count=count,
                bytes_on_disk=int(blocks or 0) * int(block_size or 0) + index_bytes,
                last_snapshot=last[0].id if len(last) else None,
                params=coll.params,
                created_at=str(row.get("created_at", "")),
                embed_model=coll.embed_model,
            )

    def drop_collection(self, name: str) -> None:
        """Drop a collection and its index; its snapshots stay on disk. A write of it under way ends first."""
        with self._claimed(name) as coll:
            if coll is None:
                raise NotFound(f"collection {name!r} does not exist", field="name")
            self._drop(coll)

    def _drop(self, coll: Collection) -> None:
        with transaction(self._con) as con:
            con.execute("DELETE FROM collections WHERE name = ?", [coll.name])
            con.execute(f"DROP TABLE IF EXISTS {coll.table}")
        self._open.pop(coll.name, None)
        with coll._saving:  # noqa: SLF001 - a save under way (a first load's) ends first, and none comes after
            coll.dropped = True
            path = self.index_path(coll.table)
            for p in (path, meta_path(path), self.text_index_path(coll.table)):
                p.unlink(missing_ok=True)

    # -- snapshots --------------------------------------------------------------------------------
    def require_space(self, what: str) -> None:
        """507 before `what` writes anything when the data dir's disk has less than `min_free_mb` free: DuckDB
        that runs out of disk mid-write marks its database invalid, and every read and write fails until a
        restart; refused here, the store stays readable and whoever frees space can write again at once."""
        free = shutil.disk_usage(self.data_dir).free
        least = self.settings.min_free_mb * 2**20
        if free < least:
            raise InsufficientStorage(
                f"{what}: the data dir's disk has {free / 2**20:,.0f} MB free, under min_free_mb "
                f"({self.settings.min_free_mb:,}): free space (old snapshots, models, job outputs) before writing "
                "more, or lower BKG_MIN_FREE_MB (0: no check)"
            )

    def snapshot(self, name: str, *, progress: bool | snapshots.Progress | None = None) -> SnapshotInfo:
        """Write a snapshot archive (rows + index + manifest with sha256 of each part) of a collection.

        `progress`: a tqdm bar (true; None: for 50,000 points or more), or a function of (fraction, message)
        called at each step (indexes saved, rows exported, parts hashed, archive written)."""
        snapshots.check_progress(progress)
        self.require_space(f"a snapshot of {name!r}")
        return snapshots.create(self, self.collection(name), progress)  # holding locks only while it needs them

    def list_snapshots(self, name: str | None = None) -> SnapshotList:
        """List snapshot archives, newest first, for one collection or all (dropped collections included)."""
        if name is not None:
            validate.collection_name(name)
        return snapshots.list_snapshots(self.snapshot_dir, name)

    def restore_snapshot(
        self, name: str, snapshot_id: str, into: str | None = None, *, progress: bool | snapshots.Progress | None = None
    ) -> Collection:
        """Restore a snapshot of `name` into `into` (default: `name`, replacing it); a damaged archive is refused.

        `progress`: as `snapshot`'s (steps: archive verified, points loaded, indexes saved, swapped in)."""
        snapshots.check_progress(progress)
        self.require_space(f"restoring a snapshot of {name!r}")
        return snapshots.restore(self, name, snapshot_id, into, progress)  # holding the lock only while it needs it

    def check_restore(self, name: str, snapshot_id: str, into: str | None = None) -> None:
        """Refuse now what `restore_snapshot` would refuse before reading the archive: a missing snapshot (404),
        `into` held by another collection (409), a bad id or name (422), too little disk (507)."""
        snapshots.check_restore(self, name, snapshot_id, into)
        self.require_space(f"restoring a snapshot of {name!r}")

    def delete_snapshot(self, name: str, snapshot_id: str) -> None:
        """Delete one snapshot archive."""
        snapshots.delete(self.snapshot_dir, name, snapshot_id)
