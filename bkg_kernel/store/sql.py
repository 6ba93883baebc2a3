"""Tiny DuckDB helpers shared by the store modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    """Run a query that returns one value and return it."""
    row = con.execute(sql, params or []).fetchone()
    if row is None:
        raise RuntimeError(f"query returned no row: {sql}")
    return row[0]


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection, **tables: Any) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on `con`: committed when the block ends, rolled back (and the error raised) when it fails.
    `tables` are Arrow tables registered under their names for the block's statements, and unregistered after it,
    whatever happened."""
    try:
        for name, table in tables.items():
            con.register(name, table)
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a COMMIT that failed may have ended it: its error is the one
                con.execute("ROLLBACK")
            raise
    finally:
        for name in tables:
            with contextlib.suppress(duckdb.Error):  # one whose registration failed was never there
                con.unregister(name)
