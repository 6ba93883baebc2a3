"""A collection as a picture: a repeatable sample of its points (matching a filter) projected to a few
dimensions by PCA, the first two for a 2-D map and more for a finer projection (UMAP) on the client.

Like Nomic Atlas or Embedding Projector, but the gateway sends coordinates, not vectors: 20,000 points of a
384-d collection are 31 MB of vectors and under 1 MB of coordinates.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store.filters import compile_filter
from bkg_kernel.store.sql import scalar
from bkg_kernel.store.validate import INT64_MAX, INT64_MIN

if TYPE_CHECKING:
    from bkg_kernel.store.collection import Collection

MAX_SAMPLE = 50_000
MAX_COMPONENTS = 64


def sample(c: Collection, n: int, filter: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Return up to `n` points matching `filter`, the same ones for the same seed (ids, vectors, payloads, texts)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLE:
        raise InvalidInput(f"sample must be from 1 to {MAX_SAMPLE}", field="sample")
    if isinstance(seed, bool) or not isinstance(seed, int) or not INT64_MIN <= seed <= INT64_MAX:
        raise InvalidInput(f"seed must be an integer from {INT64_MIN} to {INT64_MAX}", field="seed")
    where, params = compile_filter(filter)
    with c._reading() as con:  # noqa: SLF001 - both reads on one snapshot
        con.begin()
        try:
            total = int(scalar(con, f"SELECT count(*) FROM {c.table} WHERE {where}", params))
            rows = con.execute(
                f"SELECT pk, vec, CAST(payload AS VARCHAR), text FROM {c.table} WHERE {where} "
                "ORDER BY hash(pk, ?::BIGINT), fid LIMIT ?",
                [*params, seed, n],
            ).fetchall()
        finally:
            con.rollback()
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), c.dim)
    return {
        "total": total,
        "ids": [json.loads(r[0]) for r in rows],
        "vectors": matrix,
        "payloads": [json.loads(r[2]) if r[2] else None for r in rows],
        "texts": [r[3] for r in rows],
    }


def pca(x: np.ndarray, components: int) -> tuple[np.ndarray, list[float]]:
    """Return `x` projected on its first principal components, with the share of variance each explains."""
    n, d = x.shape
    k = max(1, min(components, d, n))
    if n < 2:
        return np.zeros((n, components), dtype=np.float32), [0.0] * components
    centred = x.astype(np.float64) - x.mean(axis=0)
    if d <= 1024:  # the d x d covariance is small: an exact eigendecomposition
        values, vectors = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(values)[::-1][:k]
        values, basis = values[order], vectors[:, order]
    else:
        from sklearn.decomposition import PCA

        fit = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(centred)
        basis, values = fit.components_.T, fit.explained_variance_ * (n - 1)
    total = float((centred**2).sum()) or 1.0
    coords = np.zeros((n, components), dtype=np.float32)
    coords[:, :k] = centred @ basis
    shares = [round(float(v) / total, 4) for v in values] + [0.0] * (components - k)
    return coords, shares


def project(
    c: Collection,
    sample_size: int = 5000,
    filter: dict[str, Any] | None = None,
    components: int = 2,
    seed: int = 0,
    text_chars: int = 200,
) -> dict[str, Any]:
    """Return a sample of the collection as 2-D PCA coordinates with ids, payloads and the start of each text;
    with `components` > 2, also that many PCA coordinates per point (float32, base64) for UMAP."""
    if isinstance(components, bool) or not isinstance(components, int) or not 2 <= components <= MAX_COMPONENTS:
        raise InvalidInput(f"components must be from 2 to {MAX_COMPONENTS}", field="components")
    s = sample(c, sample_size, filter, seed)
    coords, shares = pca(s["vectors"], components)
    out: dict[str, Any] = {
        "collection": c.name,
        "total": s["total"],
        "sampled": len(s["ids"]),
        "ids": s["ids"],
        "x": [round(float(v), 5) for v in coords[:, 0]],
        "y": [round(float(v), 5) for v in coords[:, 1]],
        "explained_variance": shares[:2],
        "payloads": s["payloads"],
        "texts": [t[:text_chars] if t else None for t in s["texts"]],
    }
    if components > 2:
        out["components"] = components
        out["reduced"] = base64.b64encode(np.ascontiguousarray(coords, dtype=np.float32).tobytes()).decode()
    return out
