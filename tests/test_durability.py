"""The gateway SIGKILLed at random moments during ingest, snapshot and restore (a bounded run of
bench/durability.py): it opens every time, every acknowledged point is there, a restore happened whole or not
at all, and nothing is orphaned."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import durability  # noqa: E402


def test_sigkilled_gateway_loses_nothing_acknowledged_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    durability.setup(data_dir)
    rng, acked, next_id = random.Random(3), set[int](), [1_000_000]
    totals = {"upserts": 0, "snapshots": 0, "restores": 0}
    for _ in range(3):
        done = durability.round_(data_dir, rng, acked, next_id)
        totals = {k: totals[k] + done[k] for k in totals}
        r = durability.check(data_dir, acked)
        assert r["missing"] == 0 and r["fixed"] == durability.FIXED, r
        assert not r["leftovers"] and r["index_tables"] <= 2, r
    assert totals["upserts"] > 0 and acked  # the kills came while work was being acknowledged


def test_open_sweeps_what_a_killed_process_left(tmp_path: Path) -> None:
    from bkg_kernel.store import Store

    data_dir = tmp_path / "data"
    with Store(data_dir) as s:
        s.create_collection("keep", dim=4).upsert(ids=[1], vectors=[[1, 0, 0, 0]])
        staged = s._new_points_table()  # noqa: SLF001 - a restore's staged table, never swapped in
        (data_dir / "indexes").mkdir(exist_ok=True)
        (data_dir / "indexes" / f"{staged}.faiss").write_bytes(b"x")
    (data_dir / ".restore-abc").mkdir()
    (data_dir / "snapshots" / "keep" / ".tmp-xyz").mkdir(parents=True)
    (data_dir / "indexes" / "points_1.tmp").write_bytes(b"half")
    with Store(data_dir) as s:
        tables = {r[0] for r in s._con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}  # noqa: SLF001
        assert staged not in tables and s["keep"].count() == 1
    assert not list(data_dir.glob(".restore-*")) and not list(data_dir.glob("snapshots/*/.tmp-*"))
    indexes = data_dir / "indexes"
    assert not (indexes / f"{staged}.faiss").exists() and not (indexes / "points_1.tmp").exists()
