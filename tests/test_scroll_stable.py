"""A scroll from start to end returns every point that was there all along exactly once, as Qdrant's does. Found by a
review: a re-upsert gave a point a new position (`fid`) and the scroll went by position, so a point upserted again
after the scroll had passed it came back at the end: a full scroll returned it twice. A point now keeps its place in
a scroll (`seq`, its position when first inserted) through re-upserts, compactions, snapshots and restores, and a
data dir or an archive from before has it filled from the positions. Real stores on disk, real DuckDB and FAISS."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from bkg_kernel.errors import Conflict, InvalidInput
from bkg_kernel.store import Store
from bkg_kernel.store.collection import Collection

DIM = 4


def _vec(i: int, v: int = 0) -> list[float]:
    return [1.0, float(i), float(v), 0.5]


def _point(i: int, v: int = 0) -> dict[str, Any]:
    return {"id": i, "vector": _vec(i, v), "payload": {"i": i, "v": v}, "text": f"point {i} version {v}"}


def _filled(store: Store, name: str, n: int = 100) -> Collection:
    c = store.create_collection(name, dim=DIM, metric="l2")
    c.upsert([_point(i) for i in range(n)])
    return c


def _scroll(c: Collection, between: Callable[[int], None], limit: int = 10) -> list[Any]:
    """Every point of a scroll in pages of `limit`, calling `between(page number)` after each page."""
    seen: list[Any] = []
    after, page_no = None, 0
    while True:
        page = c.scroll(limit=limit, after=after, with_vectors=True)
        seen += list(page)
        between(page_no)
        page_no, after = page_no + 1, page.next_after
        if after is None:
            return seen


def _ids(c: Collection) -> list[Any]:
    return [p.id for p in c.scroll(limit=10_000)]


def test_points_upserted_again_between_pages_come_once_in_their_place(store: Store) -> None:
    c = _filled(store, "pages")

    def between(page_no: int) -> None:
        v = page_no + 1
        passed = [10 * page_no, 10 * page_no + 1, 10 * page_no + 2]  # read already: vector, payload, text changed
        ahead = [10 * v + 5, 10 * v + 7, 99]  # not read yet
        c.upsert([_point(i, v) for i in [*passed, *ahead] if i < 100])
        c.upsert(ids=[42], vectors=[_vec(42, v)], payloads=[{"i": 42, "v": v}])  # one point again and again
        if page_no == 4:
            c.upsert([_point(1000, v), _point(7, v)])  # a new point with one read already

    seen = _scroll(c, between)
    ids = [p.id for p in seen]
    assert ids == [*range(100), 1000]  # each once, in the order first inserted; the new one at the end
    by_id = {p.id: p for p in seen}
    for i in (15, 17, 25, 27, 95, 97):  # changed before the scroll reached them: read as changed
        v = i // 10
        assert by_id[i].payload == {"i": i, "v": v} and by_id[i].text == f"point {i} version {v}", by_id[i]
        assert by_id[i].vector == _vec(i, v)
    assert by_id[99].payload == {"i": 99, "v": 9}  # changed before each page, read on the last
    assert by_id[42].payload == {"i": 42, "v": 4}  # as it was when its page was read
    assert _ids(c) == [*range(100), 1000]  # the order stays after the scroll too
    assert c.count() == 101 and c.get([7])[0].payload == {"i": 7, "v": 5}
    assert c.query(_vec(7, 5), k=1).ids == [7]  # the index follows the new vectors
    assert c.query(text="version 5", k=20).ids  # and the full-text index the new texts


def test_a_compaction_between_pages_skips_and_repeats_nothing(store: Store) -> None:
    c = _filled(store, "compacted")
    deleted: set[int] = set()

    def between(page_no: int) -> None:
        v = page_no + 1
        if page_no in (1, 3, 6):
            gone = [10 * page_no + 1, 10 * v + 2]  # one read already, one not yet
            c.delete(gone)
            deleted.update(gone)
            c.upsert([_point(i, v) for i in (10 * page_no + 4, 10 * v + 6, 10 * v + 8) if i < 100])
            epoch = c._epoch  # noqa: SLF001
            c.optimize()  # positions renumbered, indexes built again
            assert c._epoch == epoch + 1  # noqa: SLF001 - it did compact
        else:
            c.upsert([_point(10 * page_no, v)])  # a point just read, upserted again

    seen = _scroll(c, between)
    ids = [p.id for p in seen]
    assert len(ids) == len(set(ids))  # none twice
    never_gone = [i for i in range(100) if i not in deleted]
    assert [i for i in ids if i in never_gone] == never_gone  # none that was there all along skipped
    assert set(ids) - set(never_gone) == {11, 31, 61}  # the deleted ones it read before they went
    by_id = {p.id: p for p in seen}
    assert by_id[26].payload == {"i": 26, "v": 2} and by_id[26].vector == _vec(26, 2)  # re-upserted, then compacted
    assert _ids(c) == never_gone
    assert c.query(_vec(78, 7), k=1).ids == [78]


def test_a_data_dir_from_before_scroll_order_was_kept_scrolls_in_its_old_order(data_dir: Path) -> None:
    """A points table without `seq` (as bkg made them before) gets one when the store opens, filled from the
    positions: the scroll order it had. From then on a point upserted again keeps its place. A cursor of the
    earlier format (`<epoch>:<position>:<id>`) still goes on where it was."""
    with Store(data_dir) as s:
        c = _filled(s, "old", 20)
        c.upsert([_point(3, 1)])  # position 20 now: at the end of the old scroll order
        table = c.table
        old_cursor = f"{c._epoch}:{c._fid_of['9']}:9"  # noqa: SLF001 - as a page ending on point 9 gave it
    con = duckdb.connect(str(data_dir / "bkg.duckdb"))
    con.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS seq")  # as bkg made them before
    con.execute("CHECKPOINT")
    assert [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()] == ["fid", "pk", "vec", "payload", "text"]
    con.close()

    old_order = [0, 1, 2, *range(4, 20), 3]
    with Store(data_dir) as s:
        c = s.collection("old")
        assert _ids(c) == old_order
        assert [p.id for p in c.scroll(limit=5, after=old_cursor)] == [10, 11, 12, 13, 14]
        c.upsert([_point(0, 2), _point(3, 2), _point(50, 2)])  # two upserted again, one new
        assert _ids(c) == [*old_order, 50]
        assert c.get([0])[0].payload == {"i": 0, "v": 2}
    with Store(data_dir) as s:  # opened again: kept, nothing added twice
        c = s.collection("old")
        assert _ids(c) == [*old_order, 50]
        c.delete([1, 2, 4, 5])
        c.optimize()
        assert [p.id for p in c.scroll(limit=3, after=old_cursor)] == [10, 11, 12]  # compacted: after point 9
        with pytest.raises(Conflict, match="scroll again from the start"):  # compacted, and its point gone
            c.scroll(after="0:1:1")
        c.upsert([_point(51, 3), _point(6, 3)])
        assert _ids(c) == [0, *range(6, 20), 3, 50, 51]


def _archive_without_seq(path: Path) -> None:
    """Rewrite a snapshot archive as bkg wrote them before scroll order was kept: points.parquet without `seq`
    (the manifest's sha256 and size of it kept true)."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(members.pop("manifest.json"))
    src, dst = path.with_suffix(".in.parquet"), path.with_suffix(".out.parquet")
    src.write_bytes(members["points.parquet"])
    con = duckdb.connect()
    con.execute(f"COPY (SELECT fid, pk, vec, payload, text FROM read_parquet('{src}') ORDER BY fid) TO '{dst}' "
                "(FORMAT parquet)")  # fmt: skip
    assert "seq" in {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{src}')").fetchall()}
    con.close()
    blob = dst.read_bytes()
    src.unlink()
    dst.unlink()
    members["points.parquet"] = blob
    manifest["parts"]["points.parquet"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    with tarfile.open(path, "w") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_snapshot_and_its_restore_keep_the_scroll_order(store: Store) -> None:
    c = _filled(store, "snap", 30)
    c.upsert([_point(i, 1) for i in (0, 5, 17)])
    c.delete([2, 3])
    c.optimize()
    c.upsert([_point(1, 2), _point(30, 2)])
    order = [0, 1, *range(4, 31)]
    assert _ids(c) == order
    snap = store.snapshot("snap")
    c.upsert([_point(4, 3)])
    back = store.restore_snapshot("snap", snap.id, into="snap-copy")
    assert _ids(back) == order
    back.upsert([_point(0, 4), _point(31, 4)])  # upserted again after the restore: kept in its place
    assert _ids(back) == [*order, 31] and back.get([0])[0].payload == {"i": 0, "v": 4}
    assert back.query(_vec(17, 1), k=1).ids == [17]

    # an archive from before (no `seq`): restored in position order, as it scrolled then
    old = store.snapshot("snap")
    _archive_without_seq(Path(old.path))
    positions = [int(r[0]) for r in store._con.execute(f"SELECT pk FROM {c.table} ORDER BY fid").fetchall()]  # noqa: SLF001
    assert positions != order  # re-upserts moved positions: the orders differ
    restored = store.restore_snapshot("snap", old.id, into="from-old")
    assert _ids(restored) == positions
    restored.upsert([_point(positions[0], 5), _point(99, 5)])
    assert _ids(restored) == [*positions, 99]
    assert restored.query(_vec(4, 3), k=1).ids == [4] and restored.query(text="version 5", k=5).ids


def test_a_place_given_out_is_never_given_again_after_a_restart_or_a_restore(tmp_path: Path) -> None:
    """Found by a review: the next place in a scroll was worked out at load from the positions and the places the
    points hold. After a compaction (positions renumbered lower) and the deletion of the points with the highest
    places, a restart (or a restore into itself) gave a new point a place a cursor had already passed: a scroll
    under way never met it. The next place is stored with the collection and in a snapshot (a cursor does not cross
    a restore: a 409)."""
    data = tmp_path / "data"
    with Store(data) as store:
        c = store.create_collection("places", dim=DIM, metric="l2")
        c.upsert([_point(i) for i in range(2000)])
        page = c.scroll(limit=1500)
        assert page.next_after == f"s1499@{c.table}"
        c.delete(list(range(999, 2000)))  # past the ratio: compacted, positions 0..998
        assert c._next_fid == 999  # noqa: SLF001 - it did compact
        snap = c.snapshot()
    with Store(data) as store:  # restarted
        c = store.collection("places")
        c.upsert([_point(5000)])
        assert [p.id for p in c.scroll(limit=10, after=page.next_after)] == [5000]
        store.restore_snapshot("places", snap.id)  # into itself: what the snapshot held, places going on
        c = store.collection("places")
        c.upsert([_point(6000)])
        with pytest.raises(Conflict):  # a cursor from before the restore: another collection's now
            c.scroll(limit=10, after=page.next_after)
        assert [p.id for p in c.scroll(limit=10_000)][-1] == 6000


def test_a_collection_from_before_the_stored_next_place_never_gives_a_place_again(tmp_path: Path) -> None:
    """Found by a review: a collection from before `next_seq` was stored (NULL) kept it NULL through a compaction,
    and a restore into itself read it from a handle never loaded (0): after a restart, a new point took a place a
    cursor had passed. The store fills it in when it opens."""
    data = tmp_path / "data"

    def forget_next_place() -> None:  # as a data dir from before migration 0014 has it
        con = duckdb.connect(str(data / "bkg.duckdb"))
        con.execute("UPDATE collections SET next_seq = NULL")
        con.close()

    with Store(data) as store:
        c = store.create_collection("old", dim=DIM, metric="l2")
        c.upsert([_point(i) for i in range(2000)])
        cursor = c.scroll(limit=1500).next_after
    forget_next_place()
    with Store(data) as store:
        store.collection("old").delete(list(range(999, 2000)))  # compacted: positions 0..998
    with Store(data) as store:
        store.collection("old").upsert([_point(5000)])
        assert [p.id for p in store.collection("old").scroll(limit=10, after=cursor)] == [5000]

    with Store(data) as store:
        c = store.create_collection("small", dim=DIM, metric="l2")
        c.upsert([_point(i) for i in range(10)])
        snap = c.snapshot()
        c.upsert([_point(i) for i in range(10, 20)])
        cursor = c.scroll(limit=15).next_after
    forget_next_place()
    with Store(data) as store:  # the collection not loaded when it is replaced by its own snapshot
        store.restore_snapshot("small", snap.id)
        small = store.collection("small")
        small.upsert([_point(5000)])
        assert small._next_seq == 21  # noqa: SLF001 - past every place the replaced collection gave out
        assert [p.id for p in small.scroll(limit=100)] == [*range(10), 5000]
        with pytest.raises(Conflict):  # a cursor from before the restore
            small.scroll(limit=10, after=cursor)


def test_a_cursor_of_a_collection_dropped_and_made_again_or_restored_is_a_409(store: Store) -> None:
    """A cursor names the collection as it was made: after a drop and a create of the same name, or a restore into
    it, the places it counts from are another collection's (a new one starts from 0: the scroll would have skipped
    its first points without a word). A 409 says to scroll again; a cursor of the same collection goes on."""
    c = _filled(store, "again", n=30)
    snap = c.snapshot()
    page = c.scroll(limit=10)
    assert [p.id for p in c.scroll(limit=100, after=page.next_after)] == list(range(10, 30))
    store.drop_collection("again")
    _filled(store, "again", n=5)
    with pytest.raises(Conflict, match="scroll again from the start") as gone:
        store.collection("again").scroll(limit=10, after=page.next_after)
    assert gone.value.field == "after"
    page = store.collection("again").scroll(limit=2)
    store.restore_snapshot("again", snap.id)
    with pytest.raises(Conflict):
        store.collection("again").scroll(limit=10, after=page.next_after)
    assert len(store.collection("again").scroll(limit=100)) == 30
    other = _filled(store, "other", n=3)
    with pytest.raises(Conflict, match="another collection's"):  # a cursor of another collection
        store.collection("again").scroll(after=other.scroll(limit=1).next_after)
    for bad in ("s1@points_x", "s1@", "s1@other_1", "s@points_1", "s4"):
        with pytest.raises(InvalidInput):
            store.collection("again").scroll(after=bad)
