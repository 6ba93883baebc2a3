"""Choosing hybrid fusion on the tuning queries only: every fusion method and weight, on the store in this process.

    python bench/fusion.py [--packages stdlib,numpy,scipy,sklearn,pandas]

The corpus is the docstring corpus of `bench/brainml.py`, chunked the same way and embedded with the default
model (vectors cached under ~/.cache/bkg/bench, keyed by the corpus). Quality is measured on `PYDOC_TUNING`, a
query set written for this; `PYDOC_QUERIES` and the code corpus stay held out for `bench/brainml.py`. A row
counts how many queries find fewer relevant documents in their top 10 than the better single mode does.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from brainml import chunked, embedded, embedder

from bkg_kernel.datasets import PYDOC_TUNING, STDLIB, python_docs, retrieval_metrics
from bkg_kernel.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", default="stdlib,numpy,scipy,sklearn,pandas")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    packages: list[str] = []
    for p in args.packages.split(","):
        packages += list(STDLIB) if p == "stdlib" else [p]
    points = chunked(python_docs(packages), 800, 100)
    work = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    atexit.register(shutil.rmtree, work, True)  # its stores and models go when the bench ends
    st = embedder(work)
    vecs = embedded(st, points)
    store = Store(work / "data")
    coll = store.create_collection("pydocs", dim=vecs.shape[1])
    coll.upsert([{**p, "vector": v} for p, v in zip(points, vecs, strict=True)], progress=False)
    qvecs = st.encode([q for q, _ in PYDOC_TUNING], normalize_embeddings=True)

    def run(**kw: Any) -> tuple[float, float, list[int]]:
        nd, rc, found = [], [], []
        for (q, rel), qv in zip(PYDOC_TUNING, qvecs, strict=True):
            mode = kw["mode"]
            hits = coll.query(qv if mode != "text" else None, q if mode != "vector" else None, k=30, **kw)
            ids = [h.payload["doc_id"] for h in hits]
            n, r = retrieval_metrics(ids, rel)
            nd.append(n)
            rc.append(r)
            found.append(round(r * len(rel)))
        return float(np.mean(nd)), float(np.mean(rc)), found

    singles = {m: run(mode=m) for m in ("vector", "text")}
    better = [max(a, b) for a, b in zip(singles["vector"][2], singles["text"][2], strict=True)]
    print(f"tuning queries: {len(PYDOC_TUNING)}, corpus: {len(points)} chunks")
    print("| fusion | vector weight | nDCG@10 | recall@10 | queries below the better single mode |")
    print("|---|---|---|---|---|")
    for m, (n, r, _) in singles.items():
        print(f"| {m} only | - | {n:.3f} | {r:.3f} | - |")
    trials = [("rrf", w, 60) for w in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)]
    trials += [("rrf", w, rk) for rk in (10, 20, 30, 120) for w in (0.7, 0.75, 0.8)]
    trials += [("relative", w, None) for w in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)]
    for fusion, w, rk in trials:
        n, r, found = run(mode="hybrid", fusion=fusion, vector_weight=w, **({"rrf_k": rk} if rk else {}))
        below = sum(f < b for f, b in zip(found, better, strict=True))
        name = f"rrf (k={rk})" if rk else fusion
        print(f"| {name} | {w} | {n:.3f} | {r:.3f} | {below} |")
    store.close()


if __name__ == "__main__":
    main()
