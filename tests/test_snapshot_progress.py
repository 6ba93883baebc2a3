"""A snapshot and a restore show progress (a 100,000-point snapshot takes seconds): a function of (fraction,
message) is told each step, `progress=True` shows a tqdm bar, as an upsert's; left out, a small collection shows
none. Real stores, real DuckDB and FAISS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store import Store

DIM = 8


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "data")
    c = s.create_collection("docs", dim=DIM)
    rng = np.random.default_rng(3)
    c.upsert(
        ids=list(range(300)),
        vectors=rng.standard_normal((300, DIM)).astype(np.float32),
        texts=[f"document {i} about {'cats' if i % 2 else 'dogs'}" for i in range(300)],
    )
    yield s
    s.close()


def _steps(seen: list[tuple[float, str]], *parts: str) -> None:
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions), f"progress went back: {seen}"
    said = " | ".join(m for _, m in seen)
    for part in parts:
        assert part in said, f"no step {part!r} in {said!r}"


def test_a_snapshot_and_its_restore_report_each_step(store: Store) -> None:
    seen: list[tuple[float, str]] = []
    snap = store.collection("docs").snapshot(progress=lambda f, m: seen.append((f, m)))
    _steps(seen, "indexes saved", "exporting 300 points", "rows exported", "parts hashed", f"snapshot {snap.id}")

    seen.clear()
    copy = store.restore_snapshot("docs", snap.id, into="copy", progress=lambda f, m: seen.append((f, m)))
    _steps(seen, "archive verified", "points loaded", "indexes saved", "restored as 'copy'")
    assert copy.count() == 300 and copy.query(text="cats", k=3).ids == store["docs"].query(text="cats", k=3).ids


def test_progress_true_shows_a_bar_and_a_small_collection_none_by_default(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    snap = store.snapshot("docs", progress=True)
    err = capsys.readouterr().err
    assert "snapshot docs" in err and "100%" in err and snap.id in err
    store.restore_snapshot("docs", snap.id, progress=True)
    err = capsys.readouterr().err
    assert "restore docs" in err and "100%" in err and "restored as 'docs'" in err

    again = store.snapshot("docs")  # 300 points: no bar unless asked
    store.restore_snapshot("docs", again.id, into="quiet")
    assert capsys.readouterr().err == ""


def test_a_progress_that_is_neither_a_flag_nor_a_function_is_a_422_naming_it(store: Store) -> None:
    with pytest.raises(InvalidInput) as exc:
        store.snapshot("docs", progress="yes")  # type: ignore[arg-type]
    assert exc.value.field == "progress"
    assert len(store.list_snapshots("docs")) == 0
    snap = store.snapshot("docs", progress=False)
    with pytest.raises(InvalidInput) as exc:
        store.restore_snapshot("docs", snap.id, into="x", progress=3)  # type: ignore[arg-type]
    assert exc.value.field == "progress" and "x" not in store


def test_a_cancel_that_comes_once_the_work_is_done_is_too_late(store: Store) -> None:
    """Found by a review: a job's progress raises once the job is cancelled; raised by the last report, the call
    failed though the archive was kept (or the restore swapped in). Done is done: the call says what it did."""
    from bkg_kernel.errors import Cancelled

    def cancelled_at_the_end(fraction: float, message: str) -> None:
        if fraction >= 1.0:
            raise Cancelled("job-x was cancelled")

    snap = store.snapshot("docs", progress=cancelled_at_the_end)
    assert [s.id for s in store.list_snapshots("docs")] == [snap.id]
    copy = store.restore_snapshot("docs", snap.id, into="late", progress=cancelled_at_the_end)
    assert copy.count() == 300

    def cancelled_midway(fraction: float, message: str) -> None:
        if 0 < fraction < 1.0:
            raise Cancelled("job-y was cancelled")

    with pytest.raises(Cancelled):
        store.snapshot("docs", progress=cancelled_midway)  # cancelled in time: no archive
    assert [s.id for s in store.list_snapshots("docs")] == [snap.id]
