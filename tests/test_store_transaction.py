"""The store's one transaction helper, on a real DuckDB file: what its block writes is committed together or not at
all, and the Arrow tables it registers for the block are gone afterwards either way (every write path of the store
runs through it: upserts, deletes, payload edits, compaction, snapshot swaps, drops and migrations)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from bkg_kernel.store.sql import scalar, transaction


def _registered(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def test_a_block_commits_together_and_a_failing_one_leaves_nothing(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    con.execute("CREATE TABLE t (k INTEGER, v VARCHAR)")
    with transaction(con, _new=pa.table({"k": [1, 2], "v": ["a", "b"]})) as c:
        c.execute("INSERT INTO t SELECT k, v FROM _new")
        c.execute("UPDATE t SET v = 'z' WHERE k = 2")
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "a"), (2, "z")]
    assert "_new" not in _registered(con)
    with pytest.raises(duckdb.ConstraintException), transaction(con, _more=pa.table({"k": [3]})) as c:
        c.execute("INSERT INTO t SELECT k, 'c' FROM _more")
        c.execute("DELETE FROM t WHERE k = 1")
        c.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        c.execute("INSERT INTO u VALUES (1), (1)")  # fails: the insert, the delete and the table before it go too
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "a"), (2, "z")]
    assert scalar(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'u'") == 0
    assert "_more" not in _registered(con)
    con.close()
    again = duckdb.connect(str(tmp_path / "t.duckdb"))  # what was committed is in the file
    assert again.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "a"), (2, "z")]
    again.close()


def test_a_table_that_cannot_be_registered_leaves_none_registered(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    with pytest.raises(Exception), transaction(con, _ok=pa.table({"k": [1]}), _bad=object()):  # noqa: B017
        pass
    assert not {"_ok", "_bad"} & _registered(con)
    with transaction(con) as c:  # and the connection works on: no transaction was left open
        c.execute("CREATE TABLE t (k INTEGER)")
    con.close()
