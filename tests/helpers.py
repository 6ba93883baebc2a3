"""Test oracles and data generators."""

from __future__ import annotations

from typing import Any

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


def write_gguf(path: Any, *, arch: str = "llama", n: int = 8, name: str = "tiny") -> Any:
    """Write a small but whole GGUF v3 file: two metadata keys and one F32 tensor of `n` values."""
    import struct
    from pathlib import Path

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    head += s("general.architecture") + struct.pack("<I", 8) + s(arch)
    head += s("general.name") + struct.pack("<I", 8) + s(name)
    head += s("t") + struct.pack("<I", 1) + struct.pack("<Q", n) + struct.pack("<IQ", 0, 0)
    head += b"\0" * (-len(head) % 32)
    p = Path(path)
    p.write_bytes(head + struct.pack(f"<{n}f", *range(n)))
    return p
