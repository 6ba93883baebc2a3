"""Each collection has locks of its own: a query takes its lock alone; a write takes its write lock and its lock
and the store's only for each DuckDB transaction (tests/test_store_writers.py). So a long write of one collection holds
up neither other collections' queries nor, now, their writes (a snapshot takes no store lock either:
tests/test_snapshot_locks.py): before, a query of any collection waited for the whole of it (a 100,000-point
compaction held every other query 2.2 s). The store's lock is for the catalog (a collection made, dropped or
restored) and the close. Real stores, real threads; a join's timeout is a deadlock guard, not a timing
assertion."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from helpers import on_thread

from bkg_kernel.errors import Conflict, NotFound, Unavailable
from bkg_kernel.store import Store

DIM = 8


@pytest.fixture
def store(filled: Any) -> Any:
    return filled(("busy", "other"), DIM)


def reads(c: Any) -> dict[str, Any]:
    """Every kind of read of a collection, vector, text and hybrid, filtered, with texts and vectors; counting,
    scrolling, getting."""
    q = np.ones(DIM, np.float32)
    return {
        "vector": len(c.query(q, k=5, with_vectors=True)),
        "text": c.query(text="number 7", k=3, with_text=True).hits[0].text,
        "hybrid": len(c.query(q, "number", k=5, filter={"even": True}, explain=True)),
        "count": c.count({"even": False}),
        "scroll": len(c.scroll(limit=50)),
        "get": len(c.get([1, 2, 3])),
    }


def held_in_text_rebuild(c: Any) -> tuple[threading.Event, threading.Event]:
    """A stand-in for a slow full-text rebuild of `c` (a compaction's, under its locks): the next one sets `held`
    and waits for `release` before it builds."""
    held, release = threading.Event(), threading.Event()
    real = c._ensure_text  # noqa: SLF001

    def slow_text() -> Any:
        held.set()
        release.wait(10)
        return real()

    c._ensure_text = slow_text  # noqa: SLF001
    return held, release


def test_a_collection_is_read_while_a_long_write_holds_the_stores_lock(store: Store) -> None:
    other = store.collection("other")
    alone = reads(other)
    with store._mutex:  # noqa: SLF001 - as a long write of "busy" (an upsert, a compaction) holds it
        t, got = on_thread(lambda: reads(other))
        t.join(10)
        assert got == [alone], "a query waited for another collection's write"
    assert alone["text"] == "point number 7 of other" and alone["count"] == 100


def test_a_compaction_of_one_collection_does_not_stop_the_reads_of_another(store: Store) -> None:
    busy, other = store.collection("busy"), store.collection("other")
    busy.delete(ids=list(range(0, 200, 3)))
    alone = reads(other)
    held, release = held_in_text_rebuild(busy)
    compacting, done = on_thread(busy.optimize)
    assert held.wait(10)
    t, got = on_thread(lambda: reads(other))
    t.join(10)
    release.set()
    compacting.join(10)
    assert got == [alone], "a query waited for another collection's compaction"
    assert done == [None] and busy.count() == 133
    assert busy.query(text="number 4", k=1, with_text=True).hits[0].text == "point number 4 of busy"


def test_a_compaction_of_one_collection_does_not_stop_the_writes_of_another(store: Store) -> None:
    """The indexes a compaction builds again (seconds for 100,000 points) are built holding the collection's locks
    alone: another collection's write goes on meanwhile (it waited for all of it before)."""
    busy, other = store.collection("busy"), store.collection("other")
    busy.delete(ids=list(range(0, 200, 2)))
    held, release = held_in_text_rebuild(busy)
    compacting, done = on_thread(busy.optimize)
    assert held.wait(10)
    t, got = on_thread(lambda: other.upsert(ids=[500], vectors=np.ones((1, DIM), np.float32), texts=["new one"]))
    t.join(10)
    wrote = list(got)
    release.set()
    compacting.join(10)
    assert len(wrote) == 1 and wrote[0].upserted == 1, "a write waited for another collection's index rebuild"
    assert done == [None] and busy.count() == 100 and other.count() == 201
    assert other.query(text="new one", k=1).hits[0].id == 500


def test_a_collection_first_read_after_a_restart_loads_without_the_stores_lock(tmp_path: Path) -> None:
    """Loading a collection's indexes and mirrors (its first query after the gateway started) reads DuckDB on a
    connection of its own: a long write of another collection does not hold it up."""
    with Store(tmp_path / "d") as s:
        s.create_collection("c", dim=DIM).upsert(
            ids=[1, 2], vectors=np.eye(2, DIM, dtype=np.float32), texts=["one", "two"]
        )
    with Store(tmp_path / "d") as s:
        c = s.collection("c")
        assert c._index is None and c._text is None  # noqa: SLF001 - nothing loaded yet
        with s._mutex:  # noqa: SLF001 - as a long write of another collection holds it
            t, got = on_thread(lambda: [c.query(np.eye(1, DIM, dtype=np.float32)[0], k=1).hits[0].id,
                                        c.query(text="two", k=1, with_text=True).hits[0].text])  # fmt: skip
            t.join(10)
            assert got == [[1, "two"]], got


def test_a_query_waits_for_a_write_of_its_own_collection(store: Store) -> None:
    """The other way round stays: what a query reads of its collection is whole, never half an upsert."""
    busy = store.collection("busy")
    with busy._locked():  # noqa: SLF001 - as busy's own write holds it
        t, got = on_thread(lambda: busy.count())
        t.join(0.5)
        assert t.is_alive() and got == []
    t.join(10)
    assert got == [200]


def test_a_collection_dropped_under_a_query_is_a_404_and_the_store_closed_under_one_a_503(store: Store) -> None:
    """A drop or a close waits for no query (the drop takes the collection's write lock, not its lock): a query
    that holds its collection's lock when its table goes is told so (404, or 503 for a closed store), not given a
    DuckDB error (a 500)."""
    from bkg_kernel.store.search import _texts

    other = store.collection("other")
    for end, error in ((lambda: store.drop_collection("other"), NotFound), (store.close, Unavailable)):
        c = other if error is NotFound else store.collection("busy")
        with c._searching():  # noqa: SLF001 - a query under way
            t, got = on_thread(end)
            t.join(10)
            assert got == [None], got  # the drop or the close did not wait for the query
            with pytest.raises(error):
                _texts(c, [150, 151])  # the query's read of its hits' texts


def test_queries_and_writes_of_two_collections_at_once_end_without_a_deadlock(store: Store) -> None:
    """Queries, upserts, deletes, payload edits, compactions and snapshots of two collections on six threads: each
    ends, and nothing raises but the 409 a snapshot may meet (none here: nothing is restored or dropped)."""
    rng = np.random.default_rng(1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(fn: Any) -> None:
        try:
            while not stop.is_set():
                fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    def writes(name: str) -> Any:
        c = store.collection(name)

        def write() -> None:
            ids = rng.integers(0, 300, 20).tolist()
            c.upsert(ids=ids, vectors=rng.standard_normal((20, DIM)).astype(np.float32),
                     texts=[f"point number {i} of {name}" for i in ids])  # fmt: skip
            c.delete(ids=rng.integers(0, 300, 5).tolist())
            c.set_payload({"seen": True}, filter={"even": True})
            c.optimize()

        return write

    threads = [threading.Thread(target=loop, args=(fn,), daemon=True) for fn in (
        writes("busy"), writes("other"), lambda: reads(store.collection("busy")),
        lambda: reads(store.collection("other")), lambda: store.snapshot("busy"),
        lambda: store.describe("other"),
    )]  # fmt: skip
    for t in threads:
        t.start()
    stop.wait(4)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: a deadlock"
    assert not [e for e in errors if not isinstance(e, Conflict)], errors


def test_a_read_of_a_collection_a_restore_replaces_under_it_is_a_409(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: a read that met the table gone told "dropped" or "replaced" apart by whether the name
    was in the store's open handles, which a restore empties between its swap and the new handle (a 404 for a
    collection that was never dropped). The handle is marked replaced before its table goes."""
    from bkg_kernel.store import snapshots

    busy = store.collection("busy")
    snap = store.snapshot("busy")
    swapped, read = threading.Event(), threading.Event()
    real = snapshots._swap  # noqa: SLF001

    def swap(*args: Any) -> None:  # the table swapped, the old handle not yet marked dropped: a read comes now
        real(*args)
        swapped.set()
        read.wait(10)

    monkeypatch.setattr(snapshots, "_swap", swap)
    restoring, restored = on_thread(lambda: store.restore_snapshot("busy", snap.id))
    assert swapped.wait(10)
    t, got = on_thread(busy.count)
    t.join(10)
    read.set()
    restoring.join(10)
    assert len(got) == 1 and isinstance(got[0], Conflict), got
    assert store.collection("busy").count() == 200 and restored[0].name == "busy"


def test_a_write_or_a_first_load_after_the_store_closed_is_a_503(tmp_path: Path) -> None:
    """Found by a review: a handle kept past `close` wrote, or loaded its indexes, on the closed connection (a
    500, DuckDB's "connection already closed")."""
    s = Store(tmp_path / "d")
    s.create_collection("c", dim=DIM).upsert(ids=[1], vectors=np.ones((1, DIM), np.float32), texts=["one"])
    s.close()
    for loaded in (False, True):
        s = Store(tmp_path / "d")
        c = s.collection("c")
        if loaded:
            c.query(text="one", k=1)  # its indexes loaded: a write would go straight to the connection
        s.close()
        for call in [*_calls(c), *_store_calls(s)]:
            with pytest.raises(Unavailable):
                call()


@pytest.mark.parametrize("end", ["drop", "restore"])
def test_a_collection_dropped_or_replaced_during_its_first_load_is_a_404_or_409_and_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """Found by a review: a first load (a query's, holding the collection's lock alone) met a drop or a restore
    between its reads: DuckDB's "table does not exist" (a 500); and its save wrote the dropped table's index
    files back after the drop had removed them."""
    from bkg_kernel.store import ingest

    with Store(tmp_path / "d") as s:
        c = s.create_collection("c", dim=DIM)
        c.upsert(ids=list(range(50)), vectors=np.ones((50, DIM), np.float32), texts=["t"] * 50)
        snap = s.snapshot("c").id
    for f in (tmp_path / "d" / "indexes").glob("points_*"):
        f.unlink()  # as after a compaction or a crash: the first load reads every row
    s = Store(tmp_path / "d")
    c = s.collection("c")
    table = c.table
    real = ingest._add_from_db  # noqa: SLF001

    def between(*args: Any) -> None:  # the load has read the ids; the collection goes before it reads vectors
        t, got = on_thread(lambda: s.drop_collection("c") if end == "drop" else s.restore_snapshot("c", snap))
        t.join(10)
        assert got and not isinstance(got[0], BaseException), got  # it did not wait for the load
        real(*args)

    monkeypatch.setattr(ingest, "_add_from_db", between)
    with pytest.raises(NotFound if end == "drop" else Conflict):
        c.query(np.ones(DIM, np.float32), k=3)
    monkeypatch.setattr(ingest, "_add_from_db", real)
    assert not list((tmp_path / "d" / "indexes").glob(f"{table}.*")), "the old table's index files came back"
    if end == "restore":
        assert s.collection("c").count() == 50
    s.close()


def _store_calls(s: Store) -> list[Any]:
    return [s.list_collections, lambda: s.describe("c"), lambda: s.collection("c"), lambda: "c" in s,
            lambda: s.create_collection("d", dim=DIM)]  # fmt: skip


def _calls(c: Any) -> list[Any]:
    one = np.ones((1, DIM), np.float32)
    return [lambda: c.query(text="one", k=1), lambda: c.upsert(ids=[2], vectors=one), lambda: c.delete(ids=[1]),
            c.optimize, lambda: c.set_payload({"a": 1}, [1])]  # fmt: skip


class _Paused:
    """A stand-in for the store's condition that holds the first thread to take it just before it does."""

    def __init__(self, cv: threading.Condition) -> None:
        self.cv, self.at, self.go, self.first = cv, threading.Event(), threading.Event(), True

    def __enter__(self) -> Any:
        if self.first:
            self.first = False
            self.at.set()
            self.go.wait(10)
        return self.cv.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.cv.__exit__(*exc)

    def wait(self, timeout: float) -> bool:
        return self.cv.wait(timeout)

    def notify_all(self) -> None:
        self.cv.notify_all()


def test_a_read_lent_as_the_store_closes_is_refused_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: `reading` looked at `closed` before it took the condition `close` stops reads under, so
    a read could be lent after `close` had stopped the others and before it closed the connection: not
    interrupted, and `close` waited for it. Now one lent is one `close` stops, or it is refused (503)."""
    s = Store(tmp_path / "d")
    s.create_collection("c", dim=DIM).upsert(ids=[1], vectors=np.ones((1, DIM), np.float32))
    paused = _Paused(s._readers_cv)  # noqa: SLF001
    monkeypatch.setattr(s, "_readers_cv", paused)
    at_checkpoint, closing_on = threading.Event(), threading.Event()
    real_checkpoint = s._checkpoint  # noqa: SLF001

    def checkpoint() -> None:  # `close`, past stopping the reads, before closing the connection
        at_checkpoint.set()
        closing_on.wait(10)
        real_checkpoint()

    monkeypatch.setattr(s, "_checkpoint", checkpoint)
    reader, lent = on_thread(s.reading)  # past its first look at `closed`, held before the condition
    assert paused.at.wait(10)
    closer, _ = on_thread(s.close)
    assert at_checkpoint.wait(10)
    paused.go.set()
    reader.join(10)
    try:
        assert len(lent) == 1 and isinstance(lent[0], Unavailable), lent
    finally:
        if lent and not isinstance(lent[0], BaseException):
            with lent[0]:  # the read the old code lent: let it go, so the close below can end
                pass
        closing_on.set()
        closer.join(10)
    assert s.closed and not closer.is_alive()


class _ReadDuringCheckpoint:
    """The store's connection, but a CHECKPOINT meets a read that begins and ends while it runs (reads are lent
    under a collection's lock now, not the store's), and is refused as DuckDB refuses it then."""

    def __init__(self, store: Store) -> None:
        self.store, self.con = store, store._con  # noqa: SLF001

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "CHECKPOINT":
            with self.store.reading() as read:
                read.execute("SELECT 1").fetchall()
            raise duckdb.TransactionException("Cannot CHECKPOINT: there are other write transactions active")
        return self.con.execute(sql, *args)


def test_a_read_that_begins_and_ends_during_a_checkpoint_does_not_fail_describe(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fresh-clone CI run (the six-thread test above): describe's checkpoint let DuckDB's refusal
    through when a read began and ended while it ran, unseen by its before-and-after look at the reads running."""
    monkeypatch.setattr(store, "_con", _ReadDuringCheckpoint(store))
    assert store.describe("other").count == 200  # the checkpoint waits for DuckDB's own, later
