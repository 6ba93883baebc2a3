"""Test oracles and data generators."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Clustered synthetic vectors (HNSW recall on uniform random data is meaningless)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32)


def brute_force(
    x: np.ndarray, q: np.ndarray, k: int, metric: str = "cosine", allowed: np.ndarray | None = None
) -> list[int]:
    """Exact top-k row numbers for the test oracle."""
    idx = np.arange(len(x)) if allowed is None else np.asarray(allowed)
    xs = x[idx]
    if metric == "cosine":
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        qq = q / np.linalg.norm(q)
        order = np.argsort(-(xs @ qq), kind="stable")
    elif metric == "ip":
        order = np.argsort(-(xs @ q), kind="stable")
    else:
        order = np.argsort(((xs - q) ** 2).sum(1), kind="stable")
    return idx[order[:k]].tolist()
