"""brainml retrieval: indexing speed, index build and update cost, query latency and quality per mode, bkg vs the
same work done directly and vs LanceDB, on two corpora in one run.

    python bench/brainml.py [--packages stdlib,numpy,scipy,sklearn,pandas] [--chunk 800] [--overlap 100]

Corpora, both chunked as brainml chunks (800 characters, 100 overlap) and ranked as documents from the top 30
chunks (nDCG@10, recall@10):
- docstrings: the docstrings of the standard library + numpy, scipy, scikit-learn and pandas
  (`bkg_kernel.datasets.python_docs`, ~11k chunks), with `PYDOC_QUERIES` (46 hand-labelled queries, never used
  for tuning: fusion was chosen on `PYDOC_TUNING`, see bench/fusion.py).
- code: the standard library's own source, function by function, queried by the first sentence of each
  docstring (`python_code`, CodeSearchNet's construction: labelled by the code's authors, not by us).

Rows:
- bkg: `brainml.query` through a real gateway, asked the way a notebook asks (`wb.brain.query`, bkg's client);
  candle embeds the query with all-MiniLM-L6-v2. The chunks go in through the gateway's points route with the
  vectors below (so the corpus is embedded once per machine); `brainml.index` itself (`wb.brain.index`),
  embedding included, is timed against direct on a sample of documents.
- direct: sentence-transformers + the bkg store in this process (no gateway, no worker): the floor for bkg. It
  does the work whose answer `brainml.query` returns: the hits with their texts (`with_text`) and highlights.
- lancedb: the same vectors and texts in LanceDB (its native FTS; hybrid = its RRF reranker).
- socket floor (text mode): direct's work and answer in a bare process of its own with its own copy of the store,
  asked over a raw TCP socket (`bench/floor.py`: no HTTP, no framework, no authentication, no plugin host): what
  any call from one process to another costs on this machine, for the 1.3x target to be read against.
All get the same vectors, computed once by sentence-transformers (cached under ~/.cache/bkg/bench).

Query latency: the three systems run each labelled query in turn (bkg, direct, lancedb, next query), `--repeat`
times, so all three see the machine in the same state (a shared 2-core VM drifts by a quarter within minutes).
Build and update: 10,000 docstring chunks with their vectors into an empty bkg store and an empty LanceDB table
(until a text and a vector query answer and the rows are in the database files: bkg's build includes DuckDB's
checkpoint), then 100 of them changed (until both indexes hold the change).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import multiprocessing
import os
import shutil
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
from gateway_harness import ADMIN_KEY, free_port, start_gateway  # noqa: E402

from bkg_kernel.client import Workbench  # noqa: E402
from bkg_kernel.datasets import PYDOC_QUERIES, STDLIB, python_code, python_docs, retrieval_metrics  # noqa: E402
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER  # noqa: E402
from bkg_kernel.models.registry import ModelRegistry  # noqa: E402
from bkg_kernel.plugins.brainml.plugin import BrainSettings, Marks, chunk, highlights  # noqa: E402
from bkg_kernel.plugins.candle.runners import SentenceRunner  # noqa: E402
from bkg_kernel.store import Store  # noqa: E402

warnings.filterwarnings("ignore")
MODES = ("vector", "text", "hybrid", "hybrid+rerank")
Queries = list[tuple[str, list[str]]]


def chunked(docs: list[dict[str, Any]], size: int, overlap: int) -> list[dict[str, Any]]:
    """Points as brainml makes them: one per chunk, the payload naming the document and the chunk's place."""
    points = []
    for d in docs:
        for n, (a, b) in enumerate(chunk(d["text"], size, overlap)):
            payload = {"doc_id": d["id"], "chunk": n, "start": a, "end": b, **d["metadata"]}
            points.append({"id": f"{d['id']}#{n}", "text": d["text"][a:b], "payload": payload})
    return points


def embedder(work: Path) -> Any:
    """The default embedding model, in this process."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(ModelRegistry(work / "models").resolve(DEFAULT_EMBEDDER)), device="cpu")


def embedded(st: Any, points: list[dict[str, Any]]) -> np.ndarray:
    """The points' vectors, from the cache when these texts were embedded before on this machine."""
    key = hashlib.sha256("\0".join(p["text"] for p in points).encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "bkg" / "bench" / f"vectors-{key}.npy"
    if cache.exists():
        return np.load(cache)
    print(f"embedding {len(points)} chunks (once; cached in {cache})")
    vecs = st.encode([p["text"] for p in points], batch_size=64, normalize_embeddings=True, show_progress_bar=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return np.asarray(vecs, dtype=np.float32)


def evaluate(runs: dict[str, Any], mode: str, queries: Queries, repeat: int) -> dict[str, dict[str, float]]:
    """Run every labelled query through each system's `run(query, mode) -> [doc ids]`, the systems interleaved
    query by query (each sees the machine in the same state), `repeat` times; latency p50 and mean quality.

    Who goes first turns with each query: a system that always ran right after the same other one would always
    meet what that one leaves behind (LanceDB's worker threads still spinning, caches filled with its data)."""
    lat: dict[str, list[float]] = {name: [] for name in runs}
    quality: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for rnd in range(repeat):
        for i, (q, rel) in enumerate(queries):
            turn = (i + rnd) % len(names)
            for name in names[turn:] + names[:turn]:
                run = runs[name]
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


def lance_rows(points: list[dict[str, Any]], vecs: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"id": p["id"], "doc_id": p["payload"]["doc_id"], "text": p["text"], "vector": v}
        for p, v in zip(points, vecs, strict=True)
    ]


def lance_table(work: Path, name: str, points: list[dict[str, Any]], vecs: np.ndarray) -> Any:
    """The same vectors and texts in LanceDB with its native FTS index (None when lancedb is not installed)."""
    try:
        import lancedb
    except ImportError:
        print("lancedb is not installed: its rows are left out")
        return None
    table = lancedb.connect(str(work / "lance")).create_table(name, data=lance_rows(points, vecs))
    table.create_fts_index("text", use_tantivy=False)
    return table


def build_and_update(
    work: Path, points: list[dict[str, Any]], vecs: np.ndarray, st: Any
) -> dict[str, dict[str, float]]:
    """Seconds to index 10,000 chunks from empty, then to change 100 of them, until queries see the change."""
    n, changed = min(10_000, len(points)), 100
    pts, v = points[:n], vecs[:n]
    picks = list(range(0, n, n // changed))[:changed]
    new = [{**pts[i], "text": pts[i]["text"] + " zyzzyva"} for i in picks]
    qv = st.encode(["read a file"], normalize_embeddings=True)[0]
    out: dict[str, dict[str, float]] = {}
    with Store(work / "build") as store:
        t0 = time.perf_counter()
        coll = store.create_collection("build", dim=v.shape[1])
        coll.upsert([{**p, "vector": x} for p, x in zip(pts, v, strict=True)], progress=False)
        assert len(coll.query(text="read a file", k=10)) and len(coll.query(qv, k=10))
        store._con.execute("CHECKPOINT")  # the rows into the database file, as LanceDB's are (not left in the WAL)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        coll.upsert([{**p, "vector": v[i]} for p, i in zip(new, picks, strict=True)], progress=False)
        assert len(coll.query(text="zyzzyva", k=200)) == changed
        out["bkg store"] = {"build": build, "update": time.perf_counter() - t0}
    try:
        import lancedb
    except ImportError:
        return out
    t0 = time.perf_counter()
    table = lancedb.connect(str(work / "lance-build")).create_table("build", data=lance_rows(pts, v))
    table.create_fts_index("text", use_tantivy=False)
    assert len(table.search("read a file", query_type="fts").limit(10).to_list())
    assert len(table.search(qv).distance_type("cosine").limit(10).to_list())
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = lance_rows(new, v[picks])
    table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
    written = time.perf_counter() - t0
    table.optimize()  # brings the FTS index up to date with the new rows
    assert len(table.search("zyzzyva", query_type="fts").limit(200).to_list()) == changed
    out["lancedb"] = {"build": build, "update": time.perf_counter() - t0, "write_only": written}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", default="stdlib,numpy,scipy,sklearn,pandas")
    ap.add_argument("--chunk", type=int, default=800)
    ap.add_argument("--overlap", type=int, default=100)
    ap.add_argument("--batch-docs", type=int, default=200)
    ap.add_argument("--rate-docs", type=int, default=600, help="documents in each indexing-speed round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="vector,text,hybrid", help="query modes (hybrid+rerank is slow)")
    ap.add_argument("--repeat", type=int, default=3, help="times each labelled query is timed, per system")
    ap.add_argument("--code-queries", type=int, default=200)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    packages: list[str] = []
    for p in args.packages.split(","):
        packages += list(STDLIB) if p == "stdlib" else [p]
    docs = python_docs(packages)
    code_docs, code_queries = python_code(STDLIB, queries=args.code_queries)
    corpora: dict[str, tuple[list[dict[str, Any]], Queries]] = {
        "docstrings": (docs, PYDOC_QUERIES),
        "code": (code_docs, code_queries),
    }
    points = {name: chunked(d, args.chunk, args.overlap) for name, (d, _) in corpora.items()}
    for name, (d, qs) in corpora.items():
        chars = sum(len(p["text"]) for p in points[name])
        print(f"{name}: {len(d)} documents, {len(points[name])} chunks, {chars:,} characters, {len(qs)} queries")

    work = Path(tempfile.mkdtemp(prefix="bench-brainml-"))
    atexit.register(shutil.rmtree, work, True)  # its stores and models go when the bench ends
    st = embedder(work)
    vecs = {name: embedded(st, pts) for name, pts in points.items()}
    rows: dict[str, Any] = {}

    # -- index build and update, in one process each ---------------------------------------------------------
    rows["build"] = build_and_update(work, points["docstrings"], vecs["docstrings"], st)

    # -- indexing speed: the same documents through bkg and directly, interleaved rounds, best of each ---------
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=1200)
    wb = Workbench(gw.url, ADMIN_KEY, timeout=1200)  # what a notebook holds after bkg.connect()
    chunking = {"size": args.chunk, "overlap": args.overlap}
    sample = docs[:: max(1, len(docs) // args.rate_docs)][: args.rate_docs]
    sample_points = [p for p in points["docstrings"] if p["payload"]["doc_id"] in {d["id"] for d in sample}]
    speed: dict[str, dict[str, float]] = {}
    try:
        wb.brain.index("warm", [{"text": "warm up"}])
        st.encode(["warm up"])
        for rnd in range(args.rounds):
            t0 = time.perf_counter()
            for a in range(0, len(sample), args.batch_docs):
                wb.brain.index(f"rate{rnd}", sample[a : a + args.batch_docs], chunking=chunking)
            took = time.perf_counter() - t0
            if took < speed.setdefault("bkg", {"index_s": float("inf")})["index_s"]:
                speed["bkg"] = {"index_s": took, "docs_s": len(sample) / took, "chunks_s": len(sample_points) / took}
            t0 = time.perf_counter()
            # the same model run the way candle runs it (batches of about equal work on a CPU)
            texts = [p["text"] for p in sample_points]
            v = np.asarray(SentenceRunner("direct", st, "cpu").run(texts, {})["embeddings"])
            with Store(work / f"direct{rnd}") as store:
                store.create_collection("rate", dim=v.shape[1]).upsert(
                    [{**p, "vector": x} for p, x in zip(sample_points, v, strict=True)], progress=False
                )
            took = time.perf_counter() - t0
            if took < speed.setdefault("direct", {"index_s": float("inf")})["index_s"]:
                speed["direct"] = {"index_s": took, "docs_s": len(sample) / took, "chunks_s": len(sample_points) / took}
            print(f"round {rnd + 1}: bkg {speed['bkg']['docs_s']:.1f} docs/s, direct {speed['direct']['docs_s']:.1f}")
        rows["speed"] = speed

        # -- each corpus in all the systems, then the labelled queries in every mode -------------------------
        settings = BrainSettings()
        floor_port = free_port()
        floor_proc = multiprocessing.get_context("spawn").Process(
            target=serve_floor, args=(floor_port, work / "floor", points), daemon=True
        )
        floor_proc.start()  # builds its store while the others fill theirs (nothing is timed meanwhile)
        direct_store = Store(work / "direct")
        ask_floor: Any = None
        for name, (_, queries) in corpora.items():
            pts, vv = points[name], vecs[name]
            body = {"name": name, "dim": int(vv.shape[1]), "embed_model": f"candle:{DEFAULT_EMBEDDER}"}
            c.post("/api/collections", json=body).raise_for_status()
            for a in range(0, len(pts), 2000):
                batch = [{**p, "vector": x.tolist()} for p, x in zip(pts[a : a + 2000], vv[a : a + 2000], strict=True)]
                c.put(f"/api/collections/{name}/points", json={"points": batch}).raise_for_status()
            coll = direct_store.create_collection(name, dim=vv.shape[1])
            coll.upsert([{**p, "vector": x} for p, x in zip(pts, vv, strict=True)], progress=False)
            table = lance_table(work, name, pts, vv)
            ask_floor = ask_floor or floor.client(floor_port, wait_s=1800)
            systems = make_runs(wb, name, coll, table, st, settings, ask_floor)
            for mode in args.modes.split(","):
                runs = {s: fn for s, fn in systems.items() if s == "bkg" or mode in ("vector", "text", "hybrid")}
                runs = {s: fn for s, fn in runs.items() if s != "socket floor" or mode == "text"}
                for system, r in evaluate(runs, mode, queries, args.repeat).items():
                    rows.setdefault(name, {}).setdefault(system, {})[mode] = r
        direct_store.close()
        rows["client"] = client_share(c, wb, corpora["code"][1], args.repeat)
    finally:
        gw.stop()
        if "floor_proc" in locals():
            floor_proc.terminate()
    report(rows, corpora, points, len(sample), len(sample_points), args.rounds, settings)


def client_share(c: httpx.Client, wb: Workbench, queries: Queries, repeat: int) -> dict[str, dict[str, float]]:
    """The same `brainml.query` (code corpus) sent by bkg's client and by httpx, interleaved: the client's share."""
    lat: dict[str, dict[str, list[float]]] = {}
    for mode in ("text", "vector"):
        body = {"collection": "code", "top_k": 30, "mode": mode}
        t = lat[mode] = {"bkg client": [], "httpx": []}
        for _ in range(repeat):
            for q, _ in queries:
                t0 = time.perf_counter()
                wb.brain.query("code", q, top_k=30, mode=mode)
                t1 = time.perf_counter()
                r = c.post("/api/plugins/brainml/invoke/brainml.query", json={**body, "query": q})
                r.raise_for_status()
                r.json()
                t["bkg client"].append((t1 - t0) * 1000)
                t["httpx"].append((time.perf_counter() - t1) * 1000)
    return {mode: {k: statistics.median(v) for k, v in t.items()} for mode, t in lat.items()}


def answer(q: str, hits: Any) -> list[dict[str, Any]]:
    """The answer `brainml.query` gives, computed directly from a store query's hits: their texts and highlights
    (what to mark worked out once per query, as brainml does)."""
    marks = Marks(q)
    return [{"doc_id": h.payload["doc_id"], "chunk": h.text, "marks": highlights(q, h.text or "", marks)} for h in hits]


def text_answer(coll: Any, q: str) -> list[dict[str, Any]]:
    """`answer` in text mode: 30 hits with their texts and highlights."""
    return answer(q, coll.query(None, q, k=30, mode="text", with_text=True))


def serve_floor(port: int, data: Path, points: dict[str, list[dict[str, Any]]]) -> None:
    """The socket floor's process: every corpus in a store of its own (random vectors: text mode reads none), then
    `text_answer` for `{"corpus", "query"}` over `floor.serve`."""
    colls = {}
    store = Store(data)
    for name, pts in points.items():
        vecs = np.random.default_rng(0).standard_normal((len(pts), 384)).astype(np.float32)
        colls[name] = store.create_collection(name, dim=384)
        colls[name].upsert([{**p, "vector": v} for p, v in zip(pts, vecs, strict=True)], progress=False)
    floor.serve(port, lambda r: text_answer(colls[r["corpus"]], r["query"]))


def make_runs(
    wb: Workbench, name: str, coll: Any, table: Any, st: Any, settings: Any, ask_floor: Any
) -> dict[str, Any]:
    """Each system's `run(query, mode) -> ranked doc ids` over one corpus."""

    def bkg(q: str, mode: str) -> list[str]:
        opts = {"rerank": True} if mode.endswith("rerank") else {}
        r = wb.brain.query(name, q, top_k=30, mode=mode.split("+")[0], **opts)
        return [h["doc_id"] for h in r["results"]]

    def direct(q: str, mode: str) -> list[str]:  # brainml's defaults for the fusion
        if mode == "text":
            return [a["doc_id"] for a in text_answer(coll, q)]
        qv = st.encode([q], normalize_embeddings=True)[0]
        kw = {"vector_weight": settings.vector_weight, "fusion": settings.fusion, "rrf_k": settings.rrf_k}
        kw = kw if mode == "hybrid" else {}
        r = coll.query(qv, q if mode != "vector" else None, k=30, mode=mode, with_text=True, **kw)
        return [a["doc_id"] for a in answer(q, r)]

    def lance(q: str, mode: str) -> list[str]:
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

    def socket_floor(q: str, mode: str) -> list[str]:
        return [a["doc_id"] for a in ask_floor({"corpus": name, "query": q})]

    systems = {"bkg": bkg, "direct": direct, **({"lancedb": lance} if table is not None else {})}
    return {**systems, "socket floor": socket_floor}


def report(
    rows: dict[str, Any],
    corpora: dict[str, tuple[list[dict[str, Any]], Queries]],
    points: dict[str, list[dict[str, Any]]],
    n_docs: int,
    n_chunks: int,
    rounds: int,
    settings: Any,
) -> None:
    print()
    print("Index build (10,000 chunks with their vectors, from empty until text and vector queries answer) and")
    print("update (100 of them changed, until both indexes hold the change)")
    print("| system | build s | update s | update vs bkg |")
    print("|---|---|---|---|")
    for name, r in rows["build"].items():
        extra = f" (write alone {r['write_only']:.2f})" if "write_only" in r else ""
        ratio = r["update"] / rows["build"]["bkg store"]["update"]
        print(f"| {name} | {r['build']:.2f} | {r['update']:.3f}{extra} | {ratio:.1f}x |")
    print()
    print(
        f"Indexing {n_docs} documents / {n_chunks} chunks through brainml.index (embedding included; best of {rounds})"
    )
    print("| system | seconds | docs/s | chunks/s | vs direct |")
    print("|---|---|---|---|---|")
    speed = rows["speed"]
    for name in ("bkg", "direct"):
        r = speed[name]
        print(
            f"| {name} | {r['index_s']:.0f} | {r['docs_s']:.1f} | {r['chunks_s']:.1f} | "
            f"{r['docs_s'] / speed['direct']['docs_s']:.2f}x |"
        )
    print()
    print("The client's share: the same brainml.query (code corpus) sent by bkg's client and by httpx, interleaved")
    print("| mode | bkg client p50 ms | httpx p50 ms | httpx vs bkg client |")
    print("|---|---|---|---|")
    for mode, r in rows["client"].items():
        print(f"| {mode} | {r['bkg client']:.1f} | {r['httpx']:.1f} | {r['httpx'] / r['bkg client']:.2f}x |")
    for corpus, (docs, queries) in corpora.items():
        print()
        print(
            f"Queries, {corpus}: {len(docs)} documents / {len(points[corpus])} chunks, {len(queries)} labelled "
            f"queries, top 30 chunks ranked as documents; hybrid = {settings.fusion} fusion (k {settings.rrf_k:g}), "
            f"vector weight {settings.vector_weight}"
        )
        print("| system | mode | p50 ms | p50 vs direct | nDCG@10 | recall@10 |")
        print("|---|---|---|---|---|---|")
        for name, r in rows[corpus].items():
            for mode in MODES:
                if mode in r:
                    m, d = r[mode], rows[corpus]["direct"].get(mode)
                    ratio = f"{m['p50'] / d['p50']:.2f}x" if d else "-"
                    p50 = f"{m['p50']:.2f}" if m["p50"] < 10 else f"{m['p50']:.1f}"
                    print(f"| {name} | {mode} | {p50} | {ratio} | {m['ndcg']:.3f} | {m['recall']:.3f} |")


if __name__ == "__main__":
    main()
