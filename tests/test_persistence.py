"""Reopen, lost / stale / corrupt index files, migrations and data-dir ownership, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
from helpers import clustered

from bkg_kernel.errors import DataDirLocked, SchemaTooNew
from bkg_kernel.store import Store, migrations


def _fill(data_dir: Path, kind: str = "hnsw", n: int = 3000) -> np.ndarray:
    x = clustered(n, 16, seed=7)
    with Store(data_dir) as s:
        c = s.create_collection("docs", dim=16, index=kind)
        c.upsert(
            ids=[f"p{i}" for i in range(n)],
            vectors=x,
            payloads=[{"i": i} for i in range(n)],
            texts=[f"doc {i}" for i in range(n)],
        )
    return x


def _index_file(data_dir: Path) -> Path:
    (path,) = (data_dir / "indexes").glob("*.faiss")
    return path


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_reopen_gives_identical_results(data_dir: Path, kind: str) -> None:
    x = _fill(data_dir, kind)
    saved = _index_file(data_dir).stat()
    with Store(data_dir) as s:
        before = [s["docs"].query(x[i], k=10).ids for i in range(0, 3000, 300)]
    with Store(data_dir) as s:
        assert s["docs"]._ensure_index().ntotal == 3000
        after = [s["docs"].query(x[i], k=10).ids for i in range(0, 3000, 300)]
        assert before == after
        assert before[0][0] == "p0"
    # loaded from the file, not rebuilt: a rebuild gives the same answers but writes the file again
    now = _index_file(data_dir).stat()
    assert (now.st_ino, now.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "meta"])
def test_missing_or_corrupt_index_is_rebuilt(data_dir: Path, damage: str) -> None:
    x = _fill(data_dir)
    path = _index_file(data_dir)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        raw = bytearray(path.read_bytes())
        raw[5000:5100] = b"\xff" * 100
        path.write_bytes(bytes(raw))
    else:
        path.with_suffix(".meta.json").write_text("{not json")
    with Store(data_dir) as s:
        c = s["docs"]
        assert c.count() == 3000
        assert c.query(x[123], k=1).ids == ["p123"]
        assert c.query(x[123], k=1)[0].payload == {"i": 123}
    assert path.exists()  # written again
    json.loads(path.with_suffix(".meta.json").read_text())


def test_stale_index_catches_up_from_duckdb(data_dir: Path) -> None:
    x = _fill(data_dir, "flat")
    path = _index_file(data_dir)
    stale = path.read_bytes(), path.with_suffix(".meta.json").read_text()
    y = clustered(500, 16, seed=99)
    with Store(data_dir) as s:
        s["docs"].upsert(ids=[f"new{i}" for i in range(500)], vectors=y)
        s["docs"].delete(["p5"])
        s["docs"].upsert(ids=["p6"], vectors=[y[0] * 3])
    # Put the older index file back, as if the process died before saving the newer one.
    path.write_bytes(stale[0])
    path.with_suffix(".meta.json").write_text(stale[1])
    with Store(data_dir) as s:
        c = s["docs"]
        assert c.count() == 3499
        assert c.query(y[10], k=1).ids == ["new10"]
        assert "p5" not in c.query(x[5], k=20).ids
        assert c.query(x[6], k=1).ids != ["p6"]  # p6 moved: its old vector is gone
        assert c._ensure_index().n_dead == 2


def test_migrations_recorded_and_newer_database_refused(data_dir: Path) -> None:
    Store(data_dir).close()
    con = duckdb.connect(str(data_dir / "bkg.duckdb"))
    rows = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(v, n) for v, n, _ in migrations.available()]
    newest = rows[-1][0]
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, 'from_the_future')", [newest + 1])
    con.close()
    with pytest.raises(SchemaTooNew) as err:
        Store(data_dir)
    assert f"schema version {newest + 1}" in err.value.message and "upgrade" in err.value.message
    # the refusal released the data dir and changed nothing
    con = duckdb.connect(str(data_dir / "bkg.duckdb"))
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == newest + 1
    con.close()


def test_migrations_apply_once(data_dir: Path) -> None:
    Store(data_dir).close()
    con = duckdb.connect(":memory:")
    assert migrations.migrate(con) == [v for v, _, _ in migrations.available()]
    assert migrations.migrate(con) == []


def test_second_owner_refused_in_same_process(data_dir: Path) -> None:
    with Store(data_dir):
        with pytest.raises(DataDirLocked) as err:
            Store(data_dir)
        import os

        assert f"pid {os.getpid()}" in err.value.message
    Store(data_dir).close()  # released on close


def test_second_owner_refused_across_processes(data_dir: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from bkg_kernel.store import Store
            s = Store({str(data_dir)!r})
            print("ready", flush=True)
            sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(DataDirLocked) as err:
            Store(data_dir)
        assert f"pid {holder.pid}" in err.value.message
        assert err.value.status == 409
    finally:
        holder.kill()
        holder.wait()
    Store(data_dir).close()  # the kernel drops the lock of a dead holder: never stale


def test_no_other_user_may_enter_the_data_dir(tmp_path: Path) -> None:
    """Its files are written with the default umask (0644): the folder's mode keeps other OS users out of the
    users table, plugin secrets, collections and runs, for a new data dir and for one made before."""
    new = tmp_path / "new"
    with Store(new):
        pass
    assert new.stat().st_mode & 0o777 == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    with Store(old):
        assert old.stat().st_mode & 0o777 == 0o700


def test_duckdb_full_text_indexes_of_older_data_dirs_are_removed(data_dir: Path) -> None:
    """Found by a review: data dirs from before bkg kept its own full-text index hold DuckDB FTS schemas (a row per
    word of every text), read by nothing, kept through upgrades, drops and reopens."""
    _fill(data_dir, n=200)
    con = duckdb.connect(str(data_dir / "bkg.duckdb"))
    table = con.execute("SELECT points_table FROM collections").fetchone()[0]  # type: ignore[index]
    con.execute(f"CREATE SCHEMA fts_main_{table}")  # what `PRAGMA create_fts_index` made, in its shape
    con.execute(f"CREATE TABLE fts_main_{table}.terms AS SELECT 'word' AS term, range AS docid FROM range(1000)")
    con.execute(f"CREATE MACRO fts_main_{table}.match_bm25(docid, q) AS 0.0")
    con.close()
    with Store(data_dir) as s:
        assert s["docs"].count() == 200
        left = s._con.execute("SELECT schema_name FROM duckdb_schemas() WHERE schema_name LIKE 'fts_%'").fetchall()  # noqa: SLF001
        assert left == []
