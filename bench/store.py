"""Store benchmark: bkg (flat, hnsw) side by side with raw FAISS, DuckDB vss, chromadb and lancedb, one run.

    python bench/store.py --n 100000                 # all systems
    python bench/store.py --n 1000000 --systems bkg-flat,faiss-flat,bkg-hnsw,faiss-hnsw

Data: clustered synthetic vectors (dim 384, unit length, anisotropic clusters), never uniform random:
HNSW recall collapses on uniform data and says nothing about real embeddings. Queries are held-out points
from the same distribution. Every system answers the same queries one at a time (k=10); recall@10 is
against exact search. The filtered run keeps a random 10 % of points ({"group": "a"}).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HNSW_M, HNSW_EFC, HNSW_EFS = 32, 100, 64
ROOT = Path(__file__).parent


@dataclass
class Row:
    system: str
    n: int
    ingest_vps: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    qps: float = float("nan")
    recall: float = float("nan")
    f_p50_ms: float = float("nan")
    f_full_k: float = float("nan")
    f_recall: float = float("nan")
    note: str = ""


def make_data(n: int, nq: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, anisotropic vectors, normalised like sentence embeddings."""
    rng = np.random.default_rng(seed)
    n_clusters = max(32, int(np.sqrt(n) * 2))
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    scales = rng.uniform(0.2, 0.8, size=(n_clusters, 1)).astype(np.float32)
    basis = rng.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)
    out = np.empty((n + nq, dim), dtype=np.float32)
    for a in range(0, n + nq, 100_000):
        b = min(a + 100_000, n + nq)
        c = rng.integers(0, n_clusters, b - a)
        noise = rng.normal(size=(b - a, dim)).astype(np.float32) @ basis
        out[a:b] = centers[c] + scales[c] * noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out[:n], out[n:]


def exact(x: np.ndarray, qs: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[set[int]]:
    import faiss

    ids = np.arange(len(x)) if allowed is None else allowed
    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x[ids])
    _, found = idx.search(qs, k)
    return [set(ids[row].tolist()) for row in found]


def timed_queries(
    fn: Callable[[np.ndarray], list[int]], qs: np.ndarray, truth: list[set[int]], k: int
) -> dict[str, float]:
    lat, rec, full = [], [], []
    fn(qs[0])  # warm up
    t_all = time.perf_counter()
    for q, t in zip(qs, truth, strict=True):
        t0 = time.perf_counter()
        got = fn(q)
        lat.append((time.perf_counter() - t0) * 1000)
        rec.append(len(set(got) & t) / k)
        full.append(len(got) == k)
    total = time.perf_counter() - t_all
    lat.sort()
    return {
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "qps": len(qs) / total,
        "recall": float(np.mean(rec)),
        "full": float(np.mean(full)),
    }


# -- systems --------------------------------------------------------------------------------------
def run_bkg(kind: str, x, qs, groups, work: Path) -> tuple[float, Callable, Callable]:  # type: ignore[no-untyped-def]
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    store = Store(work / "bkg", settings=Settings(index_save_interval=3600))
    params = {"m": HNSW_M, "ef_construction": HNSW_EFC, "ef_search": HNSW_EFS} if kind == "hnsw" else {}
    c = store.create_collection("bench", dim=x.shape[1], metric="cosine", index=kind, **params)
    payloads = [{"group": g} for g in groups]
    t0 = time.perf_counter()
    c.upsert(ids=np.arange(len(x)), vectors=x, payloads=payloads, progress=True)
    c.flush()  # persisted: rows committed in DuckDB and the index written to disk
    ingest = len(x) / (time.perf_counter() - t0)
    search = lambda q: c.query(q, k=10).ids  # noqa: E731
    fsearch = lambda q: c.query(q, k=10, filter={"group": "a"}).ids  # noqa: E731
    return ingest, search, fsearch


def run_faiss(kind: str, x, qs, groups, work: Path) -> tuple[float, Callable, Callable]:  # type: ignore[no-untyped-def]
    import faiss

    d = x.shape[1]
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = HNSW_EFC
        idx.hnsw.efSearch = HNSW_EFS
    else:
        idx = faiss.IndexFlatIP(d)
    t0 = time.perf_counter()
    idx.add(x)
    ingest = len(x) / (time.perf_counter() - t0)
    mask = np.packbits(groups == "a", bitorder="little")
    sel = faiss.IDSelectorBitmap(len(x), faiss.swig_ptr(mask))
    if kind == "hnsw":
        fparams = faiss.SearchParametersHNSW(sel=sel, efSearch=HNSW_EFS * 4)
    else:
        fparams = faiss.SearchParameters(sel=sel)

    def search(q: np.ndarray) -> list[int]:
        return idx.search(q.reshape(1, -1), 10)[1][0].tolist()

    def fsearch(q: np.ndarray, _keep: Any = mask) -> list[int]:
        return [i for i in idx.search(q.reshape(1, -1), 10, params=fparams)[1][0].tolist() if i >= 0]

    return ingest, search, fsearch


def run_duckdb_vss(x, qs, groups, work: Path) -> tuple[float, Callable, Callable]:  # type: ignore[no-untyped-def]
    import duckdb
    import duckdb_extension_vss
    import pyarrow as pa

    ext = Path(duckdb_extension_vss.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "vss.duckdb_extension"
    con = duckdb.connect(str(work / "vss.duckdb"))
    con.execute(f"LOAD '{ext}'")
    con.execute("SET hnsw_enable_experimental_persistence = true")
    d = x.shape[1]
    con.execute(f"CREATE TABLE t (id BIGINT, grp VARCHAR, vec FLOAT[{d}])")
    t0 = time.perf_counter()
    tbl = pa.table(
        {
            "id": np.arange(len(x)),
            "grp": groups,
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
        }
    )
    con.register("tbl", tbl)
    con.execute("INSERT INTO t SELECT * FROM tbl")
    con.unregister("tbl")  # the connection would keep the Arrow copy (1.5 GB at 1M) alive
    del tbl
    con.execute(
        "CREATE INDEX h ON t USING HNSW (vec) WITH "
        f"(metric = 'cosine', M = {HNSW_M}, ef_construction = {HNSW_EFC}, ef_search = {HNSW_EFS})"
    )
    con.execute("CHECKPOINT")
    ingest = len(x) / (time.perf_counter() - t0)
    sql = f"SELECT id FROM t ORDER BY array_cosine_distance(vec, ?::FLOAT[{d}]) LIMIT 10"
    fsql = f"SELECT id FROM t WHERE grp = 'a' ORDER BY array_cosine_distance(vec, ?::FLOAT[{d}]) LIMIT 10"
    search = lambda q: [r[0] for r in con.execute(sql, [q.tolist()]).fetchall()]  # noqa: E731
    fsearch = lambda q: [r[0] for r in con.execute(fsql, [q.tolist()]).fetchall()]  # noqa: E731
    return ingest, search, fsearch


def run_chroma(x, qs, groups, work: Path) -> tuple[float, Callable, Callable]:  # type: ignore[no-untyped-def]
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    client = chromadb.PersistentClient(path=str(work / "chroma"), settings=ChromaSettings(anonymized_telemetry=False))
    coll = client.create_collection(
        "bench",
        metadata={
            "hnsw:space": "cosine",
            "hnsw:M": HNSW_M,
            "hnsw:construction_ef": HNSW_EFC,
            "hnsw:search_ef": HNSW_EFS,
        },
    )
    ids = [str(i) for i in range(len(x))]
    metas = [{"group": g} for g in groups]
    step = min(5000, client.get_max_batch_size())
    t0 = time.perf_counter()
    for a in range(0, len(x), step):
        coll.add(ids=ids[a : a + step], embeddings=x[a : a + step], metadatas=metas[a : a + step])
    ingest = len(x) / (time.perf_counter() - t0)
    search = lambda q: [int(i) for i in coll.query(query_embeddings=[q], n_results=10)["ids"][0]]  # noqa: E731
    fsearch = lambda q: [  # noqa: E731
        int(i) for i in coll.query(query_embeddings=[q], n_results=10, where={"group": "a"})["ids"][0]
    ]
    return ingest, search, fsearch


def run_lance(indexed: bool, x, qs, groups, work: Path) -> tuple[float, Callable, Callable]:  # type: ignore[no-untyped-def]
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(work / ("lance-idx" if indexed else "lance")))
    d = x.shape[1]
    t0 = time.perf_counter()
    tbl = db.create_table(
        "bench",
        pa.table(
            {
                "id": np.arange(len(x)),
                "grp": groups,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
            }
        ),
    )
    if indexed:
        tbl.create_index(metric="cosine", index_type="IVF_HNSW_SQ", vector_column_name="vector")
        tbl.create_scalar_index("grp")
    ingest = len(x) / (time.perf_counter() - t0)

    def search(q: np.ndarray) -> list[int]:
        return tbl.search(q).distance_type("cosine").limit(10).select(["id"]).to_arrow()["id"].to_pylist()

    def fsearch(q: np.ndarray) -> list[int]:
        s = tbl.search(q).distance_type("cosine").where("grp = 'a'", prefilter=True).limit(10).select(["id"])
        return s.to_arrow()["id"].to_pylist()

    return ingest, search, fsearch


SYSTEMS: dict[str, Callable[..., tuple[float, Callable, Callable]]] = {
    "bkg-flat": lambda *a: run_bkg("flat", *a),
    "faiss-flat": lambda *a: run_faiss("flat", *a),
    "bkg-hnsw": lambda *a: run_bkg("hnsw", *a),
    "faiss-hnsw": lambda *a: run_faiss("hnsw", *a),
    "duckdb-vss-hnsw": run_duckdb_vss,
    "chromadb-hnsw": run_chroma,
    "lancedb-flat": lambda *a: run_lance(False, *a),
    "lancedb-ivf-hnsw-sq": lambda *a: run_lance(True, *a),
}


def table(rows: list[Row]) -> str:
    """Markdown table with ratios against raw FAISS of the same index kind."""
    ref = {r.system.split("-")[-1]: r for r in rows if r.system.startswith("faiss-")}
    head = (
        "| system | n | ingest vec/s | ingest vs faiss | p50 ms | p99 ms | QPS | QPS vs faiss | recall@10 "
        "| filtered p50 ms | filtered full k | filtered recall@10 | note |\n" + "|---" * 13 + "|\n"
    )
    lines = []
    for r in rows:
        base = ref.get("hnsw" if "hnsw" in r.system else "flat")
        iv = f"{r.ingest_vps / base.ingest_vps:.2f}x" if base and base.ingest_vps == base.ingest_vps else ""
        qv = f"{r.qps / base.qps:.2f}x" if base and base.qps == base.qps else ""
        lines.append(
            f"| {r.system} | {r.n:,} | {r.ingest_vps:,.0f} | {iv} | {r.p50_ms:.3f} | {r.p99_ms:.3f} "
            f"| {r.qps:,.0f} | {qv} | {r.recall:.3f} | {r.f_p50_ms:.3f} | {r.f_full_k:.2f} | {r.f_recall:.3f} "
            f"| {r.note} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="vectors to index")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved query rounds per system")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    x, qs = make_data(args.n, args.queries, args.dim)
    rng = np.random.default_rng(1)
    groups = np.where(rng.random(args.n) < 0.10, "a", "b")
    allowed = np.flatnonzero(groups == "a")
    truth = exact(x, qs, 10)
    ftruth = exact(x, qs, 10, allowed)
    # Build every system first, then time the queries in interleaved rounds (system A, B, ..., A, B, ...),
    # so a slow spell of this shared machine hits all systems alike; QPS is the median over rounds.
    rows, built, works = [], {}, []
    for name in args.systems.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        works.append(work)
        row = Row(name, args.n)
        rows.append(row)
        try:
            print(f"== building {name}", flush=True)
            row.ingest_vps, search, fsearch = SYSTEMS[name](x, qs, groups, work)
            built[name] = (search, fsearch)
        except Exception as exc:  # a peer that fails to install or run is reported, not fatal
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    plain: dict[str, list[dict[str, float]]] = {n: [] for n in built}
    filtered: dict[str, list[dict[str, float]]] = {n: [] for n in built}
    for r in range(args.rounds):
        print(f"== query round {r + 1}/{args.rounds}", flush=True)
        for name, (search, fsearch) in built.items():
            plain[name].append(timed_queries(search, qs, truth, 10))
            filtered[name].append(timed_queries(fsearch, qs, ftruth, 10))
    for row in rows:
        if row.system not in built:
            continue
        m, f = plain[row.system], filtered[row.system]
        row.p50_ms = statistics.median(x["p50"] for x in m)
        row.p99_ms = statistics.median(x["p99"] for x in m)
        row.qps = statistics.median(x["qps"] for x in m)
        row.recall = m[0]["recall"]
        row.f_p50_ms = statistics.median(x["p50"] for x in f)
        row.f_full_k, row.f_recall = f[0]["full"], f[0]["recall"]
    for work in works:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"store-{args.n}-{stamp}.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
