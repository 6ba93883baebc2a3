"""Full-text search: a DuckDB FTS (BM25) index over a collection's texts, rebuilt when they have changed.

The functions here work on a `Collection`'s state and are called only by `search`, under the store's mutex.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bkg_kernel.store.sql import scalar

if TYPE_CHECKING:
    from bkg_kernel.store.collection import Collection


def text_search(c: Collection, text: str, k: int, where: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Return the positions and BM25 scores of the k best text matches among the points matching `where`."""
    if not ensure_index(c):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    rows = c._con.execute(
        f"SELECT fid, score FROM (SELECT fid, fts_main_{c.table}.match_bm25(fid, ?) AS score "
        f"FROM {c.table} WHERE {where}) sq WHERE score IS NOT NULL ORDER BY score DESC, fid LIMIT ?",
        [text, *params, k],
    ).fetchnumpy()
    return rows["fid"].astype(np.int64), rows["score"].astype(np.float64)


def ensure_index(c: Collection) -> bool:
    """(Re)build the BM25 index when the collection's text changed since it was built; say whether one exists."""
    if c._fts_version == c._text_version:
        if c._fts_exists is None:  # asked once per open collection, not on every query
            c._fts_exists = c._fts_version >= 0 and _has_index(c)
        return c._fts_exists
    con = c._con
    has_text = scalar(con, f"SELECT count(*) FROM {c.table} WHERE text IS NOT NULL") > 0
    if has_text:
        con.execute(
            f"PRAGMA create_fts_index('{c.table}', 'fid', 'text', stemmer='porter', stopwords='english', "
            "ignore='[^\\p{L}\\p{N}]+', strip_accents=1, lower=1, overwrite=1)"
        )
    else:
        con.execute(f"DROP SCHEMA IF EXISTS fts_main_{c.table} CASCADE")
    con.execute("UPDATE collections SET fts_version = ? WHERE name = ?", [c._text_version, c.name])
    c._fts_version, c._fts_exists = c._text_version, bool(has_text)
    return bool(has_text)


def _has_index(c: Collection) -> bool:
    sql = "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = ?"
    return bool(scalar(c._con, sql, [f"fts_main_{c.table}"]))
