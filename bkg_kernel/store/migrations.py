"""Versioned SQL migrations, applied on open and recorded in `schema_migrations`."""

from __future__ import annotations

import re
from importlib import resources

import duckdb

from bkg_kernel.errors import SchemaTooNew
from bkg_kernel.store.sql import transaction

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def available() -> list[tuple[int, str, str]]:
    """Return (version, name, sql) for every migration shipped with this bkg, in order."""
    found = []
    for entry in resources.files("bkg_kernel.store").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found)


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """Return the highest applied migration, 0 for a new database."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection, path: str = "") -> list[int]:
    """Apply every pending migration, each in its own transaction; refuse a database newer than this code."""
    have = current_version(con)
    known = available()
    newest = known[-1][0] if known else 0
    if have > newest:
        raise SchemaTooNew(
            f"database {path or '(memory)'} has schema version {have}, but this bkg only knows up to {newest}: "
            "upgrade bkg-kernel to open it",
            field="data_dir",
        )
    applied = []
    for version, name, sql in known:
        if version <= have:
            continue
        with transaction(con):
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
        if path:
            # Schema changes go straight into the database file: DuckDB 1.5.5 cannot replay a WAL that holds
            # an ALTER TABLE after the CREATE TABLEs of earlier migrations (a kill before the next automatic
            # checkpoint would leave a database that does not open).
            con.execute("CHECKPOINT")
        applied.append(version)
    return applied
