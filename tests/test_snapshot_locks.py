"""A snapshot saves its collection's indexes holding that collection's lock, not the store's: before, it held the
store's lock for the whole save, and every other collection's write (and whatever else takes the store's lock: a
describe, a new collection) waited for it. Its rows and index files are still of one moment: a write of the same
collection waits, and lands after the snapshot. Real stores, real threads; a join's timeout is a deadlock guard,
not a timing assertion."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from helpers import on_thread

from bkg_kernel.store import Store
from bkg_kernel.store.ingest import UpsertResult

DIM = 8


@pytest.fixture
def store(filled: Any) -> Any:
    return filled(("snapped", "other"), DIM)


def answers(c: Any) -> list[Any]:
    """Vector, filtered, text and hybrid answers and counts of a collection."""
    q = np.ones(DIM, np.float32)
    return [
        [(h.id, round(h.score, 5), h.payload) for h in c.query(q, k=10)],
        c.query(q, k=10, filter={"even": True}).ids,
        c.query(text="number 7", k=5).ids,
        c.query(q, "number", k=10).ids,
        c.count(),
        c.count({"even": False}),
    ]


class ProbeLock:
    """Stand-in for a collection's lock (the real RLock inside): tells when a thread other than `owner` comes to
    take it, so the test knows that write is queued behind the snapshot."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.owner: threading.Thread | None = None
        self.other_came = threading.Event()

    def __enter__(self) -> Any:
        if self.owner is not None and threading.current_thread() is not self.owner:
            self.other_came.set()
        return self.real.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.real.__exit__(*exc)


def test_other_collections_are_written_while_a_snapshot_saves_its_indexes(store: Store) -> None:
    snapped, other = store.collection("snapped"), store.collection("other")
    before = answers(snapped)
    saving, release = threading.Event(), threading.Event()
    index = snapped._ensure_index()  # noqa: SLF001
    real_save = index.save

    def held_save(*args: Any, **kw: Any) -> None:  # stand-in: the snapshot's index save, held here until released
        saving.set()
        release.wait(30)
        real_save(*args, **kw)

    index.save = held_save  # type: ignore[method-assign]
    probe = ProbeLock(snapped._lock)  # noqa: SLF001
    snapped._lock = probe  # type: ignore[assignment]  # noqa: SLF001
    try:
        snapping, snap = on_thread(lambda: store.snapshot("snapped"))
        probe.owner = snapping
        assert saving.wait(10), "the snapshot never saved its vector index"

        rng = np.random.default_rng(5)
        vec = rng.standard_normal((1, DIM)).astype(np.float32)
        writing, wrote = on_thread(lambda: other.upsert(ids=[1000], vectors=vec, texts=["a new point of other"]))
        writing.join(10)
        assert len(wrote) == 1 and isinstance(wrote[0], UpsertResult), f"the other write waited: {wrote}"
        described, desc = on_thread(lambda: store.describe("other").count)
        described.join(10)
        assert desc == [201], f"a describe of the other collection waited: {desc}"
        assert snapping.is_alive() and not snap, "the snapshot is still saving its index"

        # a write of the snapped collection itself waits for the snapshot, and is not in it
        same, same_got = on_thread(lambda: snapped.upsert(ids=[2000], vectors=vec, texts=["late point"]))
        assert probe.other_came.wait(10)
    finally:
        release.set()
    snapping.join(30)
    same.join(30)
    assert not snapping.is_alive() and not same.is_alive(), "a deadlock"
    assert len(snap) == 1 and not isinstance(snap[0], BaseException), snap
    assert isinstance(same_got[0], UpsertResult), same_got
    assert snap[0].points == 200 and snapped.count() == 201

    restored = store.restore_snapshot("snapped", snap[0].id, into="restored")
    assert answers(restored) == before
    assert restored.get([2000]).points == [] and len(restored.get([0, 199])) == 2
    again = store.restore_snapshot("snapped", snap[0].id)  # over the live collection, as it was
    assert answers(again) == before
