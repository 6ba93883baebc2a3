"""A collection's write holds its own locks, and the store's only for each of its DuckDB transactions: what a long
write of one collection does beside DuckDB (a compaction's rebuilt indexes: seconds for 100,000 points; its FAISS
and full-text updates, its mirrors) holds up neither the queries nor the writes of another. What must wait for a
write still does: a drop or a restore of that collection, and the store's close, which then saves what the write
left. Real stores, real threads; a join's timeout is a deadlock guard, not a timing assertion."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import filled_store, on_thread

from bkg_kernel.errors import NotFound, Unavailable
from bkg_kernel.store import Store

DIM = 8


@pytest.fixture
def store(filled: Any) -> Any:
    return filled(("busy", "other"), DIM)


def every_write(c: Any) -> Any:
    """An upsert, a delete by ids and by filter, a payload edit and a compaction of `c`: what they return."""
    one = np.ones((1, DIM), np.float32)

    def run() -> list[Any]:
        return [
            c.upsert(ids=[500], vectors=one, texts=["a new one"]).upserted,
            c.delete(ids=[1, 3]),
            c.delete(filter={"n": {"$gte": 190}}),
            c.set_payload({"seen": True}, [0, 2]),
            c.optimize(),
        ]

    return run


def test_a_write_of_one_collection_holds_up_no_write_of_another(store: Store) -> None:
    """Before, a write held the store's lock (its one connection) from its first step to its last, its index
    updates and a compaction's rebuild included: every other collection's write waited for it."""
    busy, other = store.collection("busy"), store.collection("other")
    with busy._locked():  # noqa: SLF001 - as busy's own long write holds it
        t, got = on_thread(every_write(other))
        t.join(10)
        assert got == [[1, 2, 10, 2, None]], "a write waited for another collection's write"
    assert other.count() == 189 and other.get([0])[0].payload["seen"] is True
    assert other.query(text="new one", k=1).hits[0].id == 500


def test_writes_of_two_collections_at_once_all_land_and_survive_a_reopen(tmp_path: Path) -> None:
    """Two collections written on two threads at once, each its upserts, deletes and compactions (their DuckDB
    transactions one at a time, the rest side by side): each ends as if it had run alone, in DuckDB, in its
    indexes and after a reopen."""
    s = filled_store(tmp_path / "data", ("a", "b"), DIM, n=300)
    rng = np.random.default_rng(3)
    vecs = {name: rng.standard_normal((600, DIM)).astype(np.float32) for name in ("a", "b")}

    def write(name: str) -> None:
        c = s.collection(name)
        for r in range(12):
            new = list(range(300 + 25 * r, 325 + 25 * r))
            c.upsert(ids=new, vectors=vecs[name][new], texts=[f"fresh {i} in {name}" for i in new])
            c.delete(ids=list(range(r * 25, r * 25 + 20)))
            if r % 4 == 3:
                c.optimize()

    threads = [on_thread(lambda name=name: write(name)) for name in ("a", "b")]
    for t, _ in threads:
        t.join(60)
    assert [got for _, got in threads] == [[None], [None]]
    # each keeps ids 20..24 of every 25 below 300, and the 300 new ones
    want = sorted([i for i in range(300) if i % 25 >= 20] + list(range(300, 600)))
    for _ in range(2):
        for name in ("a", "b"):
            c = s.collection(name)
            assert c.count() == len(want) == 360
            assert sorted(p.id for p in c.scroll(limit=1000).points) == want
            hit = c.query(vecs[name][450], k=1).hits[0]
            assert hit.id == 450 and hit.score == pytest.approx(1.0, abs=1e-5)
            assert c.query(text="fresh 451", k=1, with_text=True).hits[0].text == f"fresh 451 in {name}"
            assert c.query(text="number 22", k=1).hits[0].id == 22
            assert not c.get([10]) and 10 not in [h.id for h in c.query(text="number 10", k=400).hits]
        s.close()
        s = Store(tmp_path / "data")
    s.close()


@pytest.mark.parametrize("end", ["drop", "restore"])
def test_a_drop_or_a_restore_waits_for_a_write_of_its_collection(store: Store, end: str) -> None:
    """The write ends whole before its table goes (or is replaced): a drop or a restore takes the collection's
    write lock, then the store's."""
    busy = store.collection("busy")
    snap = store.snapshot("busy").id
    with busy._locked():  # noqa: SLF001 - busy's own write, under way
        busy.upsert(ids=[900], vectors=np.ones((1, DIM), np.float32), texts=["written"])
        t, got = on_thread(
            lambda: store.drop_collection("busy") if end == "drop" else store.restore_snapshot("busy", snap)
        )
        t.join(0.5)
        assert t.is_alive() and got == [], "the drop or the restore did not wait for the write"
        assert busy.count() == 201  # still there, whole
    t.join(10)
    assert len(got) == 1 and not isinstance(got[0], BaseException), got
    if end == "drop":
        assert "busy" not in store
        with pytest.raises(NotFound):
            busy.count()
    else:  # the snapshot's 200 points, the write after it gone with the collection it replaced
        assert store.collection("busy").count() == 200


def test_a_drop_does_not_wait_for_another_collections_write(store: Store) -> None:
    busy = store.collection("busy")
    with busy._locked():  # noqa: SLF001
        t, got = on_thread(lambda: store.drop_collection("other"))
        t.join(10)
        assert got == [None], "a drop waited for another collection's write"
    assert "other" not in store and busy.count() == 200


def test_close_waits_for_a_write_under_way_then_saves_what_it_wrote(tmp_path: Path) -> None:
    """Before, a close took the store's lock, which a write held: it waited for it. Now a write holds the store's
    lock only for its DuckDB transactions, and the close waits for it by count; a write that begins once the close
    did is a 503, and a reopen finds the write's points and indexes that agree with them."""
    s = filled_store(tmp_path / "data", ("busy", "other"), DIM)
    busy = s.collection("busy")
    inside, release = threading.Event(), threading.Event()
    real = busy._ensure_index  # noqa: SLF001

    def slow_index() -> Any:  # a write's first step: the index it adds to
        if threading.current_thread() is not threading.main_thread():  # the writer's
            inside.set()
            release.wait(10)
        return real()

    busy._ensure_index = slow_index  # noqa: SLF001
    vecs = np.random.default_rng(5).standard_normal((50, DIM)).astype(np.float32)
    writer, wrote = on_thread(lambda: busy.upsert(ids=list(range(1000, 1050)), vectors=vecs, texts=["late"] * 50))
    assert inside.wait(10)
    closing, closed = on_thread(s.close)
    closing.join(0.5)
    assert closing.is_alive(), "the close did not wait for the write under way"
    with pytest.raises(Unavailable):  # no write begins once the close did
        s.collection("other").upsert(ids=[7], vectors=np.ones((1, DIM), np.float32))
    release.set()
    writer.join(10)
    closing.join(10)
    assert len(wrote) == 1 and wrote[0].upserted == 50 and closed == [None]
    with Store(tmp_path / "data") as s:
        c = s.collection("busy")
        assert c.count() == 250
        assert c.query(vecs[7], k=1).hits[0].id == 1007
        assert len(c.query(text="late", k=100).hits) == 50
        assert s.collection("other").count() == 200 and s.collection("other").get([7])[0].payload["n"] == 7


def test_a_close_interrupted_while_it_waits_for_a_write_leaves_the_store_writable(tmp_path: Path) -> None:
    """Found by a review: Ctrl-C in a notebook while `close` waited for a write under way left the store open
    (reads answered) yet refusing every write, of every collection, as closed."""
    import signal

    s = filled_store(tmp_path / "data", ("busy", "other"), DIM)
    busy = s.collection("busy")
    inside, release = threading.Event(), threading.Event()
    real = busy._ensure_index  # noqa: SLF001

    def slow_index() -> Any:
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(10)
        return real()

    busy._ensure_index = slow_index  # noqa: SLF001
    writer, wrote = on_thread(lambda: busy.upsert(ids=[600], vectors=np.ones((1, DIM), np.float32)))
    assert inside.wait(10)

    def ctrl_c(*_: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            s.close()  # waits for the write; the user presses Ctrl-C
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    release.set()
    writer.join(10)
    assert len(wrote) == 1 and wrote[0].upserted == 1 and not s.closed
    assert s.collection("other").upsert(ids=[601], vectors=np.ones((1, DIM), np.float32)).upserted == 1
    assert busy.count() == 201 and s.collection("other").count() == 201
    s.close()


def test_a_delete_that_compacts_holds_up_no_write_of_another_collection(tmp_path: Path) -> None:
    """A delete that leaves more than `COMPACT_DEAD_RATIO` of the positions dead compacts the collection as part
    of itself: before, its rebuilt indexes (seconds for 100,000 points) held the store's lock, and every other
    collection's write waited for them."""
    from bkg_kernel.store.ingest import COMPACT_DEAD_RATIO

    s = filled_store(tmp_path / "data", ("big", "other"), DIM, n=1200)
    big, other = s.collection("big"), s.collection("other")
    held, release = threading.Event(), threading.Event()
    real = big._ensure_text  # noqa: SLF001

    def slow_text() -> Any:  # the compaction's full-text rebuild, under way
        if big._text is None:  # noqa: SLF001 - dropped by the renumbering: this is the rebuild
            held.set()
            release.wait(10)
        return real()

    big._ensure_text = slow_text  # noqa: SLF001
    gone = int(1200 * COMPACT_DEAD_RATIO) + 10
    deleting, deleted = on_thread(lambda: big.delete(ids=list(range(gone))))
    try:
        assert held.wait(10), "the delete did not compact"
        t, got = on_thread(lambda: other.upsert(ids=[900], vectors=np.ones((1, DIM), np.float32), texts=["x y"]))
        t.join(10)
        wrote = list(got)
    finally:
        release.set()
        deleting.join(10)
    assert len(wrote) == 1 and wrote[0].upserted == 1, "a write waited for another collection's compaction"
    assert deleted == [gone] and big.count() == 1200 - gone and big._next_fid == 1200 - gone  # noqa: SLF001
    assert big.query(text="number 1199", k=1, with_text=True).hits[0].text == "point number 1199 of big"
    s.close()


def test_a_restore_of_a_store_closed_while_it_checked_the_archive_is_a_503(tmp_path: Path) -> None:
    """Found by a review: a restore whose store closed while it verified the archive made its staging table on
    the closed connection (DuckDB's ConnectionException: a 500)."""
    s = filled_store(tmp_path / "data", ("busy",), DIM)
    snap = s.snapshot("busy").id

    def close_at_start(fraction: float, message: str) -> None:
        if fraction == 0.0:
            s.close()  # as the gateway shutting down meanwhile

    with pytest.raises(Unavailable):
        s.restore_snapshot("busy", snap, into="copy", progress=close_at_start)
    with Store(tmp_path / "data") as s2:
        assert "copy" not in s2 and s2.collection("busy").count() == 200
