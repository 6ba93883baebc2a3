"""Searching a collection: vector search in FAISS, BM25 text search (`fulltext`), and both fused.

The functions here work on a `Collection`'s state and are called only by its methods; `query` checks its
arguments, scans for a filter's points (`Matching`), then takes the collection's lock (not the store's: another
collection's write goes on meanwhile) to rank.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store import validate
from bkg_kernel.store.filters import compile_filter
from bkg_kernel.store.results import EXPLAIN_SIDES, QueryResult

if TYPE_CHECKING:
    from bkg_kernel.store.collection import Collection

MODES = ("vector", "text", "hybrid")
FUSIONS = ("rrf", "relative")
FILTER_CACHE_SIZE = 32
TEXT_CACHE_SIZE = 20_000  # texts of recent hits, by position (a few MB)
DEPTH = 100  # how deep each ranking is read for hybrid fusion, and to place a hit in it (`explain`)


def query(
    c: Collection,
    vector: Any,
    text: str | None,
    k: int,
    filter: dict[str, Any] | None,
    mode: str | None,
    rrf_k: float,
    ef_search: int | None,
    with_text: bool,
    vector_weight: float,
    explain: bool = False,
    fusion: str = "rrf",
    score_threshold: float | None = None,
    offset: int = 0,
    with_payload: bool | list[str] = True,
    with_vectors: bool = False,
) -> QueryResult:
    """Check a query, rank the points (see `Collection.query`) and return the best k after `offset`."""
    t0 = time.perf_counter()
    k = validate.k_value(k)
    offset = validate.offset_value(offset, k)
    threshold = validate.score_threshold(score_threshold)
    selected = validate.with_payload(with_payload)
    if not isinstance(with_vectors, bool):
        raise InvalidInput(f"with_vectors must be true or false, got {with_vectors!r}", field="with_vectors")
    mode = mode or ("hybrid" if vector is not None and text is not None else "text" if text is not None else "vector")
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})", field="mode")
    q = None
    if mode in ("vector", "hybrid"):
        if vector is None:
            raise InvalidInput(f"{mode} search needs a query vector", field="vector")
        q = validate.query_vector(vector, c.dim, c.name)
    most = validate.MAX_QUERY_CHARS
    if mode in ("text", "hybrid") and (not isinstance(text, str) or not text.strip() or len(text) > most):
        raise InvalidInput(f"{mode} search needs a query text of 1 to {most} characters", field="text")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or rrf_k < 0:  # noqa: UP038
        raise InvalidInput("rrf_k must be a number >= 0", field="rrf_k")
    if isinstance(vector_weight, bool) or not isinstance(vector_weight, (int, float)) or not 0 <= vector_weight <= 1:  # noqa: UP038
        raise InvalidInput("vector_weight must be a number from 0 to 1", field="vector_weight")
    if fusion not in FUSIONS:
        raise InvalidInput(f"unknown fusion {fusion!r} (expected one of {', '.join(FUSIONS)})", field="fusion")
    if ef_search is not None and (not isinstance(ef_search, int) or not 1 <= ef_search <= 4096):
        raise InvalidInput("ef_search must be an integer from 1 to 4096", field="ef_search")
    where, params = compile_filter(filter)
    n = k + offset  # ranked this deep, the first `offset` skipped
    depth = max(n, DEPTH)
    rankings: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # each side's (positions, scores), `depth` deep

    def ranking(side: str) -> tuple[np.ndarray, np.ndarray]:
        """Return one side's ranking `depth` deep, read once per query (hybrid and `explain` share it)."""
        if side not in rankings:
            if side == "vector":
                assert q is not None
                vf, raw = index.search(q, depth, allowed, ef_search)
                rankings[side] = (vf, index.score(raw))
            else:
                rankings[side] = c._ensure_text().search(str(text), depth, allowed)
        return rankings[side]

    found = Matching(c, filter, where, params) if filter else None  # the scan, outside the collection's lock
    with c._searching():  # noqa: SLF001 - its own lock, not the store's: another collection's write goes on
        index = c._ensure_index()
        allowed = found.now() if found is not None else None
        if mode == "vector":
            assert q is not None
            fids, raw = index.search(q, n, allowed, ef_search)
            scores = index.score(raw)
        elif mode == "text":
            fids, scores = c._ensure_text().search(str(text), n, allowed)
        else:
            w = float(vector_weight)
            if fusion == "rrf":
                fids, scores = rrf(
                    [ranking("vector")[0], ranking("text")[0]], float(rrf_k), n, weights=[2 * w, 2 * (1 - w)]
                )
            else:
                vf, vs = ranking("vector")
                fids, scores = relative_score(
                    [(vf, -vs if c.metric == "l2" else vs), ranking("text")], n, weights=[w, 1 - w]
                )
        fl, sl = fids.tolist()[offset:], scores.tolist()[offset:]
        if not all(map(math.isfinite, sl)):  # scores must serialise as JSON
            sl = [x if math.isfinite(x) else 0.0 for x in sl]
        if threshold is not None:  # best first: the hits past the threshold are a tail
            closer = (lambda s: s <= threshold) if mode == "vector" and c.metric == "l2" else (lambda s: s >= threshold)
            keep = next((i for i, s in enumerate(sl) if not closer(s)), len(sl))
            fl, sl = fl[:keep], sl[:keep]
        ids, payloads = c._ids, c._payloads
        chosen = [payloads[f] for f in fl] if selected is not False else [None] * len(fl)
        result = QueryResult(None, 0.0, mode, ids=[ids[f] for f in fl], scores=sl, payloads=chosen)
        if explain:
            asked = {"vector": q is not None, "text": isinstance(text, str) and bool(text.strip())}
            result.explain = _explain(fl, {side: ranking(side) for side, yes in asked.items() if yes})
        if with_text and fl:
            texts = _texts(c, fl)
            for h, f in zip(result.hits, fl, strict=True):
                h.text = texts.get(f)
        if with_vectors and fl:
            vectors = _vectors(c, fl)
            for h, f in zip(result.hits, fl, strict=True):
                h.vector = vectors.get(f)
    if isinstance(selected, list):  # the fields asked for, picked outside the collection's lock
        for h, raw_payload in zip(result.hits, chosen, strict=True):
            h.payload = pick(json.loads(raw_payload), selected) if raw_payload is not None else None
    result.took_ms = (time.perf_counter() - t0) * 1000
    return result


def pick(payload: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """The fields of a payload that `paths` name (each a list of keys from the top), nested as they are there;
    a field the payload lacks is left out."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = payload
        for key in path:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            node = out
            for key in path[:-1]:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node[path[-1]] = value
    return out


def _vectors(c: Collection, fids: list[int]) -> dict[int, list[float]]:
    """Return the stored vectors of these positions (as upserted: not the normalised copies a cosine index holds),
    in one read of DuckDB, the rows outside their positions' range skipped by their zone maps."""
    with c._reading() as con:  # noqa: SLF001
        rows = con.execute(
            f"SELECT fid, vec FROM {c.table} WHERE fid BETWEEN ? AND ? AND list_contains(?::BIGINT[], fid)",
            [min(fids), max(fids), fids],
        ).fetchall()
    return {f: np.frombuffer(vec, dtype=np.float32).tolist() for f, vec in rows}


def _explain(fids: list[int], rankings: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """Each hit's place in the vector ranking and in the BM25 ranking (rank from 1, and score; None past the
    rankings' depth or when that side has no query), whatever the mode: why hybrid put it where it is."""
    places = {
        side: {f: (r, float(s)) for r, (f, s) in enumerate(zip(fs.tolist(), ss.tolist(), strict=True), 1)}
        for side, (fs, ss) in rankings.items()
    }
    out = []
    for f in fids:
        e: dict[str, Any] = {}
        for side in EXPLAIN_SIDES:
            rank, score = places.get(side, {}).get(f, (None, None))
            e[f"{side}_rank"] = rank
            e[f"{side}_score"] = score if score is None or math.isfinite(score) else 0.0
        out.append(e)
    return out


def _texts(c: Collection, fids: list[int]) -> dict[int, str | None]:
    """Return the texts of these positions: from the collection's cache, the rest in one read (then cached).

    A position's text never changes (an upsert writes a new position; compaction renumbers and clears the cache),
    so the cache needs no invalidation on writes."""
    cache = c._text_cache
    missing = [f for f in fids if f not in cache]
    if missing:
        with c._reading() as con:  # noqa: SLF001
            sql = f"SELECT fid, text FROM {c.table} WHERE list_contains(?::BIGINT[], fid)"
            rows = con.execute(sql, [missing]).fetchall()
        for f, text in rows:
            cache[f] = text
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
    out = {}
    for f in fids:
        if f in cache:
            cache.move_to_end(f)
            out[f] = cache[f]
    return out


class Matching:
    """The positions of the points a filter matches, found in two steps so that the scan of every point runs
    outside the collection's lock (a filter of a thousand conditions takes seconds on a large collection, and every
    other call to it would wait that long): made without the lock, it reads them as they were when it
    began, on a connection of its own (`Collection._reading`); `now()`, holding the lock, adds the points written
    since, or scans again when a compaction renumbered the positions, or a payload was changed in place (`set_payload`),
    meanwhile (rare). Points deleted since stay
    in the list: the indexes leave dead positions out, and a delete by position finds nothing there. Recent
    filters' positions are kept (any write clears them)."""

    def __init__(self, c: Collection, flt: dict[str, Any], where: str, params: list[Any]) -> None:
        self.c, self.where, self.params = c, where, params
        self.key = json.dumps(flt, sort_keys=True, default=str)
        with c._searching():
            cache = c._filter_cache
            hit = cache.get(self.key)
            if hit is not None:
                cache.move_to_end(self.key)
            self.epoch, self.upto, self.edits = c._epoch, c._next_fid, c._payload_edits
        if hit is not None:
            self.fids = hit
            return
        with c._reading() as con:
            self.fids = self._select(con, "fid < ?", [self.upto])

    def now(self) -> np.ndarray:
        """The positions matching now; call holding the collection's lock."""
        c = self.c
        if c._epoch != self.epoch or c._payload_edits != self.edits:  # renumbered, or payloads changed in place
            with c._reading() as con:
                fids = self._select(con, "TRUE", [])
        elif c._next_fid > self.upto:
            with c._reading() as con:
                fids = np.concatenate([self.fids, self._select(con, "fid >= ?", [self.upto])])
        else:
            fids = self.fids
        if FILTER_CACHE_SIZE:
            cache = c._filter_cache
            cache[self.key] = fids
            while len(cache) > FILTER_CACHE_SIZE:
                cache.popitem(last=False)
        return fids

    def _select(self, con: Any, bound: str, bound_params: list[Any]) -> np.ndarray:
        sql = f"SELECT fid FROM {self.c.table} WHERE {bound} AND ({self.where})"
        fids = con.execute(sql, [*bound_params, *self.params]).fetchnumpy()["fid"]
        return np.asarray(fids, dtype=np.int64)


def relative_score(
    rankings: list[tuple[np.ndarray, np.ndarray]], k: int, weights: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse scored lists by a convex combination of their min-max normalised scores (Weaviate's relativeScore
    fusion; Bruch et al., TOIS 2023): each list's best gets 1, its last 0, a point missing from a list 0 from it.
    Unlike RRF it keeps how far apart the scores are, so a clear vector winner is not outvoted by rank alone."""
    scores: dict[int, float] = {}
    for (fids, raw), weight in zip(rankings, weights, strict=True):
        if weight == 0 or len(fids) == 0:
            continue
        lo, hi = float(raw.min()), float(raw.max())
        norm = (raw - lo) / (hi - lo) if hi > lo else np.ones(len(raw))
        for fid, s in zip(fids.tolist(), (weight * norm).tolist(), strict=True):
            scores[fid] = scores.get(fid, 0.0) + s
    return _best(scores, k)


def rrf(
    rankings: list[np.ndarray], rrf_k: float, k: int, weights: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked id lists: score(d) = sum over lists of weight / (rrf_k + rank of d), rank from 1."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        if weight == 0:
            continue
        for rank, fid in enumerate(ranking.tolist(), start=1):
            scores[fid] = scores.get(fid, 0.0) + weight / (rrf_k + rank)
    return _best(scores, k)


def _best(scores: dict[int, float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best fused scores as (positions, scores), best first, ties by position."""
    best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return np.array([b[0] for b in best], dtype=np.int64), np.array([b[1] for b in best])
