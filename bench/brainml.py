"""brainml retrieval: indexing speed, query latency and quality per mode, bkg vs the same work done directly
and vs LanceDB's hybrid search, on one corpus in one run.

    python bench/brainml.py [--packages stdlib,numpy,scipy,sklearn,pandas] [--chunk 800] [--overlap 100]

Corpus: the docstrings of the standard library + numpy, scipy, scikit-learn and pandas (`bkg_kernel.datasets.
python_docs`), chunked as brainml does (~11k chunks). Quality: nDCG@10 and recall@10 on `PYDOC_QUERIES` (46 hand-
labelled queries; documents, not chunks, are ranked). Rows:

- bkg: `brainml.index` / `brainml.query` through a real gateway (candle embeds with all-MiniLM-L6-v2).
- direct: sentence-transformers + the bkg store in this process (no gateway, no worker): the floor for bkg.
  Indexing speed is compared on a sample of documents (interleaved rounds); the whole corpus is embedded
  once, by bkg, and the direct store and LanceDB get those same vectors.
- lancedb: the same vectors and texts in LanceDB (its native FTS; hybrid = its RRF reranker), queries embedded
  with the same model in this process.

Query latency: the three systems run each labelled query in turn (bkg, direct, lancedb, next query), `--repeat`
times, so all three see the machine in the same state (a shared 2-core VM drifts by a quarter within minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

from bkg_kernel.datasets import PYDOC_QUERIES, STDLIB, python_docs, retrieval_metrics  # noqa: E402
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER  # noqa: E402
from bkg_kernel.models.registry import ModelRegistry  # noqa: E402
from bkg_kernel.plugins.brainml.plugin import chunk  # noqa: E402
from bkg_kernel.store import Store  # noqa: E402

warnings.filterwarnings("ignore")
MODES = ("vector", "text", "hybrid", "hybrid+rerank")


def evaluate(runs: dict[str, Any], mode: str, repeat: int) -> dict[str, dict[str, float]]:
    """Run every labelled query through each system's `run(query, mode) -> [doc ids]`, the systems interleaved
    query by query (each sees the machine in the same state), `repeat` times; latency p50 and mean quality."""
    lat: dict[str, list[float]] = {name: [] for name in runs}
    quality: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for rnd in range(repeat):
        for q, rel in PYDOC_QUERIES:
            for name, run in runs.items():
                t0 = time.perf_counter()
                ids = run(q, mode)
                lat[name].append((time.perf_counter() - t0) * 1000)
                if rnd == 0:
                    quality[name].append(retrieval_metrics(ids, rel))
    return {
        name: {
            "p50": statistics.median(lat[name]),
            "ndcg": float(np.mean([n for n, _ in quality[name]])),
            "recall": float(np.mean([r for _, r in quality[name]])),
        }
        for name in runs
    }


def lance_table(work: Path, points: list[dict[str, Any]], vecs: np.ndarray) -> Any:
    """The same vectors and texts in LanceDB with its native FTS index (None when lancedb is not installed)."""
    try:
        import lancedb
    except ImportError:
        print("lancedb is not installed: its row is left out")
        return None
    t0 = time.perf_counter()
    db = lancedb.connect(str(work / "lance"))
    table = db.create_table(
        "pydocs",
        data=[
            {"id": p["id"], "doc_id": p["payload"]["doc_id"], "text": p["text"], "vector": v}
            for p, v in zip(points, vecs, strict=True)
        ],
    )
    table.create_fts_index("text", use_tantivy=False)
    print(f"lancedb: stored and indexed precomputed vectors in {time.perf_counter() - t0:.1f}s")
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", default="stdlib,numpy,scipy,sklearn,pandas")
    ap.add_argument("--chunk", type=int, default=800)
    ap.add_argument("--overlap", type=int, default=100)
    ap.add_argument("--batch-docs", type=int, default=200)
    ap.add_argument("--rate-docs", type=int, default=600, help="documents in each indexing-speed round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help="bkg query modes to measure (hybrid+rerank is slow)")
    ap.add_argument("--repeat", type=int, default=3, help="times each labelled query is timed, per system")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    packages: list[str] = []
    for p in args.packages.split(","):
        packages += list(STDLIB) if p == "stdlib" else [p]
    docs = python_docs(packages)
    points = []
    for d in docs:
        for n, (a, b) in enumerate(chunk(d["text"], args.chunk, args.overlap)):
            payload = {"doc_id": d["id"], "chunk": n, "start": a, "end": b, **d["metadata"]}
            points.append({"id": f"{d['id']}#{n}", "text": d["text"][a:b], "payload": payload})
    print(f"corpus: {len(docs)} documents, {len(points)} chunks, {sum(len(p['text']) for p in points):,} characters")

    work = Path(tempfile.mkdtemp(prefix="bench-brainml-"))
    reg = ModelRegistry(work / "models")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(reg.resolve(DEFAULT_EMBEDDER)), device="cpu")
    rows: dict[str, dict[str, Any]] = {}

    # -- indexing speed: the same documents through bkg and directly, interleaved rounds, best of each ---------
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=1200)
    inv = "/api/plugins/brainml/invoke/"
    chunking = {"size": args.chunk, "overlap": args.overlap}
    sample = docs[:: max(1, len(docs) // args.rate_docs)][: args.rate_docs]
    sample_points = [p for p in points if p["payload"]["doc_id"] in {d["id"] for d in sample}]
    try:
        c.post(inv + "brainml.index", json={"collection": "warm", "documents": [{"text": "warm up"}]})
        st.encode(["warm up"])
        for rnd in range(args.rounds):
            t0 = time.perf_counter()
            for a in range(0, len(sample), args.batch_docs):
                body = {"collection": f"rate{rnd}", "documents": sample[a : a + args.batch_docs], "chunking": chunking}
                c.post(inv + "brainml.index", json=body).raise_for_status()
            took = time.perf_counter() - t0
            if took < rows.setdefault("bkg", {"index_s": float("inf")})["index_s"]:
                rows["bkg"] = {"index_s": took, "docs_s": len(sample) / took, "chunks_s": len(sample_points) / took}
            t0 = time.perf_counter()
            v = st.encode([p["text"] for p in sample_points], batch_size=64, normalize_embeddings=True)
            with Store(work / f"direct{rnd}") as store:
                store.create_collection("rate", dim=v.shape[1]).upsert(
                    [{**p, "vector": x} for p, x in zip(sample_points, v, strict=True)], progress=False
                )
            took = time.perf_counter() - t0
            if took < rows.setdefault("direct", {"index_s": float("inf")})["index_s"]:
                rows["direct"] = {"index_s": took, "docs_s": len(sample) / took, "chunks_s": len(sample_points) / took}
            print(
                f"round {rnd + 1}: bkg {rows['bkg']['docs_s']:.1f} docs/s, direct {rows['direct']['docs_s']:.1f} docs/s"
            )

        # -- the whole corpus through bkg, then the labelled queries in every mode ---------------------------
        t0 = time.perf_counter()
        for a in range(0, len(docs), args.batch_docs):
            body = {"collection": "pydocs", "documents": docs[a : a + args.batch_docs], "chunking": chunking}
            c.post(inv + "brainml.index", json=body).raise_for_status()
            print(f"  bkg indexed {min(a + args.batch_docs, len(docs))}/{len(docs)} documents", end="\r")
        full = time.perf_counter() - t0
        print(f"bkg: whole corpus indexed in {full:.0f}s ({len(docs) / full:.1f} docs/s)" + " " * 30)
        rows["bkg"]["full_s"] = full
        # the same vectors, for the direct store and LanceDB (no second embedding of the corpus)
        stored: dict[str, Any] = {}
        offset: int | None = 0
        while offset is not None:
            body = {"limit": 10_000, "offset": offset, "with_vectors": True}
            page = c.post("/api/collections/pydocs/points/scroll", json=body).json()
            stored.update({p["id"]: p["vector"] for p in page["points"]})
            offset = page["next_offset"]
        vecs = np.asarray([stored[p["id"]] for p in points], dtype=np.float32)
        store = Store(work / "direct")
        coll = store.create_collection("pydocs", dim=vecs.shape[1])
        coll.upsert([{**p, "vector": v} for p, v in zip(points, vecs, strict=True)], progress=False)
        table = lance_table(work, points, vecs)

        def bkg(q: str, mode: str) -> list[str]:
            body = {"collection": "pydocs", "query": q, "top_k": 30, "mode": mode.split("+")[0]}
            if mode.endswith("rerank"):
                body["rerank"] = True
            r = c.post(inv + "brainml.query", json=body)
            r.raise_for_status()
            return [h["doc_id"] for h in r.json()["results"]]

        weights = {"vector": None, "text": None, "hybrid": 0.75}

        def direct(q: str, mode: str) -> list[str]:
            qv = st.encode([q], normalize_embeddings=True)[0] if mode != "text" else None
            kw: dict[str, Any] = {"vector_weight": weights[mode]} if weights[mode] is not None else {}
            r = coll.query(qv, q if mode != "vector" else None, k=30, mode=mode, **kw)
            return [h.payload["doc_id"] for h in r]

        def lance(q: str, mode: str) -> list[str]:
            assert table is not None
            if mode == "text":
                res = table.search(q, query_type="fts").limit(30).to_list()
            else:
                from lancedb.rerankers import RRFReranker

                qv = st.encode([q], normalize_embeddings=True)[0]
                if mode == "vector":
                    res = table.search(qv).distance_type("cosine").limit(30).to_list()
                else:
                    res = table.search(query_type="hybrid").vector(qv).text(q).rerank(RRFReranker()).limit(30).to_list()
            return [r["doc_id"] for r in res]

        systems = {"bkg": bkg, "direct": direct, **({"lancedb": lance} if table is not None else {})}
        for mode in args.modes.split(","):
            runs = {name: fn for name, fn in systems.items() if name == "bkg" or mode in ("vector", "text", "hybrid")}
            for name, r in evaluate(runs, mode, args.repeat).items():
                rows.setdefault(name, {})[mode] = r
        store.close()
    finally:
        gw.stop()

    # -- table ---------------------------------------------------------------------------------------------
    print()
    n_sample = len(sample_points)
    print(f"Indexing {len(sample)} documents / {n_sample} chunks (embedding included; best of {args.rounds} rounds)")
    print("| system | seconds | docs/s | chunks/s | vs direct |")
    print("|---|---|---|---|---|")
    for name in ("bkg", "direct"):
        r = rows[name]
        print(
            f"| {name} | {r['index_s']:.0f} | {r['docs_s']:.1f} | {r['chunks_s']:.1f} | "
            f"{r['docs_s'] / rows['direct']['docs_s']:.2f}x |"
        )
    print()
    print(f"Queries: {len(PYDOC_QUERIES)} labelled queries, top 30 chunks ranked as documents")
    print("| system | mode | p50 ms | p50 vs direct | nDCG@10 | recall@10 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        for mode in MODES:
            if mode in r:
                m, d = r[mode], rows["direct"].get(mode)
                ratio = f"{m['p50'] / d['p50']:.2f}x" if d else "-"
                print(f"| {name} | {mode} | {m['p50']:.1f} | {ratio} | {m['ndcg']:.3f} | {m['recall']:.3f} |")


if __name__ == "__main__":
    main()
