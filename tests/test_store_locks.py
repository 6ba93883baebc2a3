"""Each collection has a lock of its own: a query takes it alone, a write takes it and then the store's. So a long
write of one collection (an upsert of 100,000 points, a compaction, a snapshot's save: seconds, all under the
store's lock) holds up other collections' writes, never their queries: before, a query of any collection waited
for the whole of it (a 100,000-point compaction held every other query 2.2 s). Real stores, real threads; a
join's timeout is a deadlock guard, not a timing assertion."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import on_thread

from bkg_kernel.errors import Conflict, NotFound, Unavailable
from bkg_kernel.store import Store

DIM = 8


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "data")
    rng = np.random.default_rng(0)
    for name in ("busy", "other"):
        c = s.create_collection(name, dim=DIM)
        c.upsert(
            ids=list(range(200)),
            vectors=rng.standard_normal((200, DIM)).astype(np.float32),
            payloads=[{"n": i, "even": i % 2 == 0} for i in range(200)],
            texts=[f"point number {i} of {name}" for i in range(200)],
        )
        c.query(text="warm", k=1)  # both indexes built
    yield s
    s.close()


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
    held = threading.Event()
    release = threading.Event()
    real = busy._ensure_text  # noqa: SLF001

    def slow_text() -> Any:  # the compaction's full-text rebuild, under both locks, held until the reads are done
        held.set()
        release.wait(10)
        return real()

    busy._ensure_text = slow_text  # type: ignore[method-assign]  # noqa: SLF001
    compacting, done = on_thread(busy.optimize)
    assert held.wait(10)
    t, got = on_thread(lambda: reads(other))
    t.join(10)
    release.set()
    compacting.join(10)
    assert got == [alone], "a query waited for another collection's compaction"
    assert done == [None] and busy.count() == 133
    assert busy.query(text="number 4", k=1, with_text=True).hits[0].text == "point number 4 of busy"


def test_a_compaction_holds_the_stores_lock_only_to_renumber(store: Store) -> None:
    """The indexes a compaction builds again (seconds for 100,000 points) are built holding the collection's lock
    alone: another collection's write goes on meanwhile (it waited for all of it before)."""
    busy, other = store.collection("busy"), store.collection("other")
    busy.delete(ids=list(range(0, 200, 2)))
    held, release = threading.Event(), threading.Event()
    real = busy._ensure_text  # noqa: SLF001

    def slow_text() -> Any:
        held.set()
        release.wait(10)
        return real()

    busy._ensure_text = slow_text  # type: ignore[method-assign]  # noqa: SLF001
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
    """A drop or a close takes the store's lock, not the collection's: a query that holds its collection's lock
    when its table goes is told so (404, or 503 for a closed store), not given a DuckDB error (a 500)."""
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
