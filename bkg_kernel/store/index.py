"""One FAISS index per collection, addressed by position ("fid"): append-only, with tombstones for deletes.

HNSW cannot remove vectors, so no index kind does: a delete or a replace marks the old position dead in a
bitmap, every search excludes dead positions through an `IDSelectorBitmap`, and a compaction renumbers the
live points when too many are dead. IVF starts as an exact flat index and trains itself once it holds
`ivf_train_min` vectors.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import CorruptData

METRICS = ("cosine", "l2", "ip")
KINDS = ("flat", "hnsw", "ivf")
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"m": 32, "ef_construction": 100, "ef_search": 64},
    "ivf": {"nlist": 0, "nprobe": 16, "ivf_train_min": 10_000},
}
# Each index parameter's range (what FAISS takes and a sane build needs; nlist 0: chosen from the data).
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "m": (2, 256),
    "ef_construction": (1, 4096),
    "ef_search": (1, 4096),
    "nlist": (0, 65_536),
    "nprobe": (1, 65_536),
    "ivf_train_min": (0, 100_000_000),
}
# A filter that leaves at most this many points, or this small a share, is answered by exact search over
# the matches (Qdrant's "full scan threshold"); above it a filtered HNSW / IVF search is faster and, with
# its beam widened by the selectivity, as accurate.
EXACT_FILTER_MAX = 5_000
EXACT_FILTER_SHARE = 0.02


_FAISS: Any = None


def _faiss() -> Any:
    global _FAISS
    if _FAISS is None:
        import faiss  # heavy: imported where first needed, not with bkg_kernel

        _FAISS = faiss
    return _FAISS


class VectorIndex:
    """A FAISS index plus the alive bitmap over its positions."""

    def __init__(self, dim: int, metric: str, kind: str, params: dict[str, Any]) -> None:
        self.dim, self.metric, self.kind = dim, metric, kind
        self.params = {**DEFAULT_PARAMS[kind], **params}
        self.alive = np.zeros(0, dtype=bool)
        self.n_dead = 0
        self.index = self._new_index()
        self._index_ef = int(self.params.get("ef_search", 0))  # efSearch set on the faiss index itself

    # -- building ---------------------------------------------------------------------------------
    def _faiss_metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def _new_index(self) -> Any:
        faiss = _faiss()
        if self.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, int(self.params["m"]), self._faiss_metric())
            idx.hnsw.efConstruction = int(self.params["ef_construction"])
            idx.hnsw.efSearch = int(self.params["ef_search"])
            return idx
        return faiss.IndexFlat(self.dim, self._faiss_metric())

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def trained_ivf(self) -> bool:
        return self.kind == "ivf" and hasattr(self.index, "nprobe")

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Return vectors as contiguous float32 (a copy), unit length for cosine."""
        if self.metric != "cosine":
            return np.ascontiguousarray(vectors, dtype=np.float32)
        x = np.array(vectors, dtype=np.float32, order="C", copy=True)
        _faiss().normalize_L2(x)  # in place, in C; zero vectors stay zero
        return x

    def prepare_query(self, query: np.ndarray) -> np.ndarray:
        """Return one query vector as a (1, dim) float32 row, unit length for cosine (`prepare` for one row).

        numpy's dot and scale cost a fraction of a round trip through faiss's wrappers, and a query pays
        this on every call.
        """
        q = query.reshape(1, -1)
        if self.metric == "cosine":
            norm = math.sqrt(float(np.dot(q[0], q[0])))
            if norm > 0:
                return q * np.float32(1.0 / norm)
        return self.prepare(q)

    def add(self, vectors: np.ndarray, alive: np.ndarray | None = None) -> None:
        """Append vectors at positions ntotal.. ; `alive` marks placeholders that are born dead."""
        if len(vectors) == 0:
            return
        self.index.add(self.prepare(vectors))
        born = np.ones(len(vectors), dtype=bool) if alive is None else alive.astype(bool)
        self.alive = np.concatenate([self.alive, born])
        self.n_dead += int((~born).sum())
        if self.kind == "ivf" and not self.trained_ivf and self.ntotal >= int(self.params["ivf_train_min"]):
            self._train_ivf()

    def _train_ivf(self) -> None:
        faiss = _faiss()
        xb = self.reconstruct(np.arange(self.ntotal))
        nlist = int(self.params["nlist"]) or max(1, min(int(4 * math.sqrt(len(xb))), len(xb) // 39))
        nlist = min(nlist, len(xb))  # FAISS cannot train more lists than vectors (a collection made before the check)
        quantizer = faiss.IndexFlat(self.dim, self._faiss_metric())
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric())
        ivf.train(xb)
        ivf.add(xb)
        ivf.make_direct_map()
        ivf.nprobe = int(self.params["nprobe"])
        self.params["nlist"] = nlist
        self.index = ivf

    def mark_dead(self, fids: np.ndarray) -> None:
        """Tombstone positions (deleted or replaced points)."""
        fids = np.asarray(fids, dtype=np.int64)
        fids = fids[(fids >= 0) & (fids < len(self.alive))]
        self.n_dead += int(self.alive[fids].sum())
        self.alive[fids] = False

    def reconstruct(self, fids: np.ndarray) -> np.ndarray:
        """Return the stored (prepared) vectors at these positions."""
        if len(fids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(np.asarray(fids, dtype=np.int64)), dtype=np.float32)

    # -- searching --------------------------------------------------------------------------------
    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (fids, raw faiss distances) of the k nearest live positions, optionally only among `allowed`."""
        q = self.prepare_query(query)
        mask: np.ndarray | None
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            allowed = allowed[self.alive[allowed]] if self.n_dead else allowed
            if len(allowed) == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            small = len(allowed) <= max(EXACT_FILTER_MAX, k) or len(allowed) < EXACT_FILTER_SHARE * self.ntotal
            if self.kind != "flat" and small:
                return self._exact(q, k, allowed)
            mask = np.zeros(self.ntotal, dtype=bool)
            mask[allowed] = True
            n_candidates = len(allowed)
        else:
            mask = self.alive if self.n_dead else None
            n_candidates = len(self.alive) - self.n_dead  # == ntotal - dead, without a SWIG call
        k_eff = min(k, n_candidates)
        if k_eff <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        fids, dist = self._search(q, k_eff, mask, n_candidates, ef_search)
        if len(fids) < k_eff and self.kind != "flat":
            # A graph or IVF search can come back short under a tight filter: fall back to exact.
            cand = np.flatnonzero(mask) if mask is not None else np.arange(self.ntotal)
            return self._exact(q, k, cand)
        return fids, dist

    def _search(
        self, q: np.ndarray, k: int, mask: np.ndarray | None, n_candidates: int, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        sel = bitmap = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if self.kind == "hnsw":
            ef = max(int(ef_search or self.params["ef_search"]), k)
            if mask is None and ef == self._index_ef:
                params = None  # the common case: no per-query parameters to build
            elif mask is not None:
                # Fewer allowed nodes means a wider beam to find k of them (capped).
                ef = min(max(ef, ef * self.ntotal // (4 * max(n_candidates, 1))), 4096)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
            else:
                params = faiss.SearchParametersHNSW(efSearch=ef)
        elif self.trained_ivf:
            nprobe = int(self.params["nprobe"])
            if mask is not None:
                nprobe = min(int(self.index.nlist), nprobe * 2)  # the lists it has (a setting may say 0: auto)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        dist, ids = self.index.search(q, k, params=params)
        del bitmap  # the selector points into it: keep it alive until here
        if ids[0, -1] >= 0:  # faiss pads a short answer with -1 at the end
            return ids[0], dist[0]
        keep = ids[0] >= 0
        return ids[0][keep], dist[0][keep]

    def _exact(self, q: np.ndarray, k: int, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        storage = self.index if self.kind == "flat" else getattr(self.index, "storage", None)
        if storage is not None:  # flat vectors at hand: distances to just the candidates, no copies
            storage = faiss.downcast_index(storage)
            labels = np.ascontiguousarray(cand, dtype=np.int64).reshape(1, -1)
            d = np.empty((1, len(cand)), dtype=np.float32)
            storage.compute_distance_subset(1, faiss.swig_ptr(q), len(cand), faiss.swig_ptr(d), faiss.swig_ptr(labels))
            d = d[0]
        else:
            xb = self.reconstruct(cand)
            d = ((xb - q) ** 2).sum(axis=1) if self.metric == "l2" else xb @ q[0]
        order_key = d if self.metric == "l2" else -d
        k = min(k, len(cand))
        top = np.argpartition(order_key, k - 1)[:k] if k < len(cand) else np.arange(len(cand))
        top = top[np.argsort(order_key[top], kind="stable")]
        return cand[top], d[top].astype(np.float32)

    def score(self, raw: np.ndarray) -> np.ndarray:
        """Turn faiss distances into the scores users see: similarity for cosine/ip, distance for l2."""
        return np.sqrt(np.maximum(raw, 0)) if self.metric == "l2" else raw

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write index + meta atomically (tmp file, rename); the meta carries a CRC of the index file."""
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        crc = _crc(tmp)
        # No fsync: the index is rebuildable from DuckDB, and a torn file fails its CRC on the next open.
        os.replace(tmp, path)
        full = {**meta, "ntotal": self.ntotal, "crc32": crc, "params": self.params}
        mtmp = path.with_suffix(".meta.tmp")
        mtmp.write_text(json.dumps(full))
        os.replace(mtmp, meta_path(path))

    @classmethod
    def load(cls, path: Path, dim: int, metric: str, kind: str) -> tuple[VectorIndex, dict[str, Any]]:
        """Read an index saved by `save`; raise `CorruptData` if it is missing, damaged or not what it claims."""
        faiss = _faiss()
        try:
            meta = json.loads(meta_path(path).read_text())
            if _crc(path) != meta["crc32"]:
                raise CorruptData(f"index file {path} fails its checksum")
            raw = faiss.read_index(str(path))
        except CorruptData:
            raise
        except Exception as exc:  # missing, truncated, unreadable
            raise CorruptData(f"index file {path} cannot be read: {exc}") from exc
        if raw.d != dim or raw.ntotal != meta.get("ntotal"):
            raise CorruptData(f"index file {path} does not match its collection")
        self = cls(dim, metric, kind, meta.get("params", {}))
        self.index = raw
        if self.kind == "hnsw":
            raw.hnsw.efSearch = self._index_ef
        self.alive = np.ones(raw.ntotal, dtype=bool)
        return self, meta


def meta_path(path: Path) -> Path:
    """Return the sidecar JSON path of an index file."""
    return path.with_suffix(".meta.json")


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc
