from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered

from bkg_kernel.errors import AlreadyExists, CorruptData, InvalidInput, NotFound
from bkg_kernel.store import Store


def _coll(store: Store, name: str = "docs", kind: str = "hnsw") -> tuple[object, np.ndarray]:
    x = clustered(2000, 16, seed=11)
    c = store.create_collection(name, dim=16, index=kind)
    c.upsert(
        ids=list(range(2000)),
        vectors=x,
        payloads=[{"lang": "en" if i % 3 else "de", "i": i} for i in range(2000)],
        texts=[f"document number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(2000)],
    )
    c.delete([0, 1, 2])  # dead positions travel with the snapshot
    return c, x


def _answers(c, x) -> list:  # type: ignore[no-untyped-def]
    out = []
    for i in (5, 500, 1500):
        out.append([(h.id, round(h.score, 5), h.payload) for h in c.query(x[i], k=10)])
        out.append(c.query(x[i], k=10, filter={"lang": "de"}).ids)
        out.append(c.query(x[i], text="cats", k=10).ids)
    out.append(c.query(text="dogs", k=10).ids)
    return out


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_round_trip_identical_results(store: Store, kind: str) -> None:
    c, x = _coll(store, kind=kind)
    before = _answers(c, x)
    snap = store.snapshot("docs")
    assert snap.points == 1997 and snap.bytes > 0 and snap.collection == "docs"
    assert store.describe("docs").last_snapshot == snap.id
    c.upsert(ids=[5], vectors=[x[1500]], payloads=[{"changed": True}])
    c.delete(filter={"lang": "de"})
    restored = store.restore_snapshot("docs", snap.id)
    assert restored.count() == 1997
    assert _answers(restored, x) == before
    copy = store.restore_snapshot("docs", snap.id, into="docs-copy")
    assert _answers(copy, x) == before
    assert store.list_collections().names == ["docs", "docs-copy"]


def test_snapshot_survives_drop_and_reopen(store: Store) -> None:
    c, x = _coll(store)
    before = _answers(c, x)
    snap = store.snapshot("docs")
    store.drop_collection("docs")
    assert "docs" not in store
    assert [s.id for s in store.list_snapshots("docs")] == [snap.id]
    store.close()
    with Store(store.data_dir) as s2:
        restored = s2.restore_snapshot("docs", snap.id)
        assert _answers(restored, x) == before


def test_list_and_delete(store: Store) -> None:
    _coll(store)
    a = store.snapshot("docs")
    b = store.snapshot("docs")
    assert [s.id for s in store.list_snapshots("docs")] == [b.id, a.id]  # newest first
    assert [s.id for s in store.list_snapshots()] == [b.id, a.id]
    store.delete_snapshot("docs", a.id)
    assert [s.id for s in store.list_snapshots("docs")] == [b.id]
    with pytest.raises(NotFound):
        store.delete_snapshot("docs", a.id)
    with pytest.raises(InvalidInput):
        store.delete_snapshot("docs", "../../etc")


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "flip":
        with tarfile.open(path) as tar:
            member = tar.getmember("points.parquet")
        raw[member.offset_data + 100] ^= 0xFF  # one flipped byte inside the Parquet part
        path.write_bytes(bytes(raw))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"this is not a tar file" * 100)


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "garbage"])
def test_damaged_snapshot_refused_and_live_untouched(store: Store, how: str) -> None:
    c, x = _coll(store)
    snap = store.snapshot("docs")
    c.upsert(ids=["after"], vectors=[x[9]], payloads=[{"after": True}])
    before = _answers(c, x)
    _damage(Path(snap.path), how)
    with pytest.raises(CorruptData) as err:
        store.restore_snapshot("docs", snap.id)
    assert snap.id in err.value.message
    assert err.value.status == 500 and err.value.code == "corrupt_data"  # bkg's own file: a server-side fault
    live = store["docs"]
    assert live.count() == 1998 and live.get(["after"])[0].payload == {"after": True}
    assert _answers(live, x) == before
    assert store.list_collections().names == ["docs"]  # no half-restored table left behind
    listed = store.list_snapshots("docs")
    assert len(listed) == 1
    if how != "flip":  # a flipped data byte keeps the manifest readable; only restore catches it
        assert not listed[0].ok and listed[0].error


def test_restore_into_existing_other_name_refused(store: Store) -> None:
    _coll(store)
    store.create_collection("other", dim=16)
    snap = store.snapshot("docs")
    with pytest.raises(AlreadyExists) as err:
        store.restore_snapshot("docs", snap.id, into="other")
    assert err.value.field == "into"
    with pytest.raises(NotFound):
        store.restore_snapshot("docs", "20990101T000000000000Z-abcdef")


def test_a_call_that_waited_through_a_drop_or_a_restore_is_told_so(store: Store) -> None:
    """Found by a review: every route looks a collection up, then calls it; a drop or a restore that ran in between
    left the call on a table that was gone (DuckDB's CatalogException: a 500) or on an index that no longer
    answered for the name. Such a call is now a 404 (dropped) or a 409 (replaced: ask again)."""
    from bkg_kernel.errors import Conflict

    c = store.create_collection("d", dim=4)
    c.upsert(ids=[1, 2], vectors=np.eye(4, dtype=np.float32)[:2], texts=["one", "two"])
    snap = store.snapshot("d").id
    ops = {
        "count": lambda h: h.count(),
        "upsert": lambda h: h.upsert(ids=[3], vectors=np.ones((1, 4), np.float32)),
        "delete": lambda h: h.delete([1]),
        "scroll": lambda h: h.scroll(),
        "get": lambda h: h.get([1]),
        "query": lambda h: h.query(np.ones(4)),
        "query+filter": lambda h: h.query(np.ones(4), filter={"a": 1}),
        "text": lambda h: h.query(text="one"),
    }
    waited = store.collection("d")
    store.restore_snapshot("d", snap)
    for op in ops.values():
        with pytest.raises(Conflict, match="replaced"):
            op(waited)
    assert store.collection("d").count() == 2  # the restored one answers
    waited = store.collection("d")
    store.drop_collection("d")
    for op in ops.values():
        with pytest.raises(NotFound, match="dropped"):
            op(waited)


def test_a_snapshot_deleted_while_it_is_read_is_a_404(store: Store, tmp_path: Path) -> None:
    """Found by a review: a restore (or a second delete) that found the archive, then lost it to a delete that ran
    meanwhile, called it damaged (a 500)."""
    from bkg_kernel.store import snapshots

    gone = tmp_path / "gone.bkgsnap"
    for read in (lambda: snapshots._read_manifest(gone), lambda: snapshots._extract_verified(gone, tmp_path)):
        with pytest.raises(NotFound, match="deleted meanwhile"):
            read()


def _rewrite(archive: Path, manifest_change: dict[str, object], parts: dict[str, bytes] | None = None) -> None:
    """Rewrite an archive as another bkg might have written it: manifest fields changed, parts replaced (their
    sha256 and size in the manifest kept true, so only what they hold differs)."""
    import hashlib
    import io
    import json

    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(members.pop("manifest.json"))
    for name, blob in (parts or {}).items():
        members[name] = blob
        manifest["parts"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    manifest.update(manifest_change)
    with tarfile.open(archive, "w") as tar:
        for name, blob in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_an_archive_from_a_newer_bkg_is_named_so(store: Store) -> None:
    """Found by a review: a newer archive format was "damaged" (a 500), an unknown index kind a KeyError (a 500):
    both are a newer bkg's archive, a 409 that says so."""
    from bkg_kernel.errors import SchemaTooNew

    _coll(store)
    newer, odd = store.snapshot("docs"), store.snapshot("docs")
    _rewrite(Path(newer.path), {"format": "bkg-snapshot/2"})
    _rewrite(Path(odd.path), {"index": "diskann"})
    with pytest.raises(SchemaTooNew, match="made by a newer bkg") as err:
        store.restore_snapshot("docs", newer.id, into="newer")
    assert err.value.status == 409 and "bkg-snapshot/1" in err.value.message
    with pytest.raises(SchemaTooNew, match="holds a 'diskann' index, which this bkg does not know"):
        store.restore_snapshot("docs", odd.id, into="odd")
    listed = {s.id: s for s in store.list_snapshots("docs")}
    assert not listed[newer.id].ok and "newer bkg" in str(listed[newer.id].error)
    assert not listed[odd.id].ok
    assert store.list_collections().names == ["docs"]


def test_a_full_text_part_built_another_way_is_built_again_from_the_rows(store: Store) -> None:
    """Found by a review: a full-text index from another analyser (the next version's, or an older one) made the
    whole archive unrestorable (a 500 naming the restore's temp folder); like an archive without one, the text
    index is now built again from the rows."""
    import io
    import json
    import zipfile

    c, x = _coll(store)
    before = _answers(c, x)
    snap = store.snapshot("docs")
    with tarfile.open(snap.path) as tar:
        fts = tar.extractfile("fulltext.fts").read()  # type: ignore[union-attr]
    with zipfile.ZipFile(io.BytesIO(fts)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["meta.json"] = json.dumps({**json.loads(members["meta.json"]), "analyzer": "another/2"}).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, blob in members.items():
            z.writestr(n, blob)
    _rewrite(Path(snap.path), {}, {"fulltext.fts": out.getvalue()})
    restored = store.restore_snapshot("docs", snap.id, into="again")
    assert _answers(restored, x) == before


def test_a_restored_trained_ivf_answers_broad_filters(store: Store) -> None:
    """Found by a review: the manifest keeps the collection's setting (`nlist` 0: chosen from the data), and the
    restored index took it for its lists: a filter allowing over 5,000 points asked FAISS for 0 probes (a 500)."""
    x = clustered(12_000, 16, seed=3)
    c = store.create_collection("ivf", dim=16, index="ivf", ivf_train_min=1000)
    c.upsert(ids=list(range(12_000)), vectors=x, payloads=[{"half": i % 2} for i in range(12_000)])
    asked = [c.query(x[i], k=10, filter={"half": 0}).ids for i in (2, 4000)]
    snap = store.snapshot("ivf")
    restored = store.restore_snapshot("ivf", snap.id, into="ivf2")
    assert [restored.query(x[i], k=10, filter={"half": 0}).ids for i in (2, 4000)] == asked
    store.close()
    again = Store(store.data_dir)  # and after a reopen, from the saved index
    assert [again["ivf2"].query(x[i], k=10, filter={"half": 0}).ids for i in (2, 4000)] == asked
    again.close()


def test_calls_racing_restores_over_a_collection_get_409s_never_a_dropped_table(store: Store) -> None:
    """Found by a review: a restore swapped the table in, let go of the store's lock, then took it again to mark
    the old handle replaced; a write or a filtered query in that gap reached the dropped table (a CatalogException,
    a 500) instead of the 409 "replaced: ask again". Bounded: restores for 3 s against four kinds of calls."""
    import collections
    import threading
    import time

    from bkg_kernel.errors import BkgError

    c = store.create_collection("t", dim=4)
    c.upsert(ids=list(range(200)), vectors=[[1, 0, 0, 0]] * 200, payloads=[{"g": i % 3} for i in range(200)])
    snap = store.snapshot("t")
    stop = time.monotonic() + 3
    refused: collections.Counter[str] = collections.Counter()
    failed: list[str] = []

    def calls(kind: str) -> None:
        i = 1000
        while time.monotonic() < stop:
            try:
                coll = store.collection("t")
                if kind == "upsert":
                    coll.upsert(ids=[i], vectors=[[0, 1, 0, 0]])
                    i += 1
                elif kind == "count":
                    coll.count({"g": 1})
                elif kind == "query":
                    coll.query([1, 0, 0, 0], k=5, filter={"g": 2})
                else:
                    coll.scroll(limit=10)
            except BkgError as exc:  # 409 replaced, 404 while swapped: ask again
                refused[type(exc).__name__] += 1
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                failed.append(f"{kind}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=calls, args=(k,)) for k in ("upsert", "count", "query", "scroll")]
    for t in threads:
        t.start()
    restores = 0
    while time.monotonic() < stop:
        store.restore_snapshot("t", snap.id)
        restores += 1
    for t in threads:
        t.join()
    assert restores > 10 and not failed, failed[:3]
    assert set(refused) <= {"Conflict", "NotFound"}, refused
