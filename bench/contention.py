"""What one slow call costs everyone else, bkg's store against LanceDB doing the same in one process:

- a slow read: a filter of 1,000 `$contains` conditions over a 10,000-point collection (DuckDB tests each
  condition on every row: seconds) scanned over and over on one thread (another filter each time, so no cache
  answers it; LanceDB: a `LIKE` filter of as many conditions), while this thread times a query of another
  collection and an upsert into it;
- a long write: a collection of 100,000 points with texts, a tenth of them deleted, then compacted (bkg's
  `optimize`: positions renumbered, vector and full-text indexes rebuilt; LanceDB's `optimize`: files compacted,
  deletions materialised, indexes updated), over and over on one thread, while this thread times a query of
  another collection, then a query and an upsert.

    python bench/contention.py [--seconds 20] [--conditions 1000] [--points 100000]

Reported: the other work's p50, p99 and worst, alone and while the slow calls run, and how much slower it got.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.store import Store

N = 10_000
DIM = 64


def timed(work: Callable[[], Any], until: float) -> list[float]:
    out = []
    while time.monotonic() < until:
        t0 = time.perf_counter()
        work()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def under(slow: Callable[[], Any], work: Callable[[], Any], seconds: float) -> tuple[list[float], list[float], int]:
    """`work` timed alone, then while `slow` runs on a thread over and over; how many slow reads ended."""
    alone = timed(work, time.monotonic() + seconds / 2)
    stop, ended = threading.Event(), [0]

    def hog() -> None:
        while not stop.is_set():
            slow()
            ended[0] += 1

    t = threading.Thread(target=hog)
    t.start()
    time.sleep(0.2)  # the first scan is under way
    during = timed(work, time.monotonic() + seconds / 2)
    stop.set()
    t.join()
    return alone, during, ended[0]


def row(system: str, alone: list[float], during: list[float], slow_reads: int) -> str:
    def q(v: list[float], p: float) -> float:
        return float(np.percentile(v, p))

    a, d = statistics.median(alone), statistics.median(during)
    return (
        f"| {system} | {a:.2f} / {q(alone, 99):.2f} / {max(alone):.2f} | {d:.2f} / {q(during, 99):.2f} / "
        f"{max(during):.2f} | {d / a:.1f}x | {max(during) / max(alone):.1f}x | {len(during)} | {slow_reads} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--conditions", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((N, DIM)).astype(np.float32)
    titles = [f"title number {i}" for i in range(N)]
    q = rng.standard_normal(DIM).astype(np.float32)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    atexit.register(shutil.rmtree, work_dir, True)  # its stores and models go when the bench ends
    rows = []

    store = Store(work_dir / "bkg")
    big = store.create_collection("big", dim=DIM)
    big.upsert(ids=list(range(N)), vectors=vecs, payloads=[{"title": t} for t in titles], progress=False)
    small = store.create_collection("small", dim=DIM)
    small.upsert(ids=list(range(1000)), vectors=vecs[:1000], progress=False)
    n, scans = [0], [0]

    def bkg_slow() -> None:  # another filter each time: the store keeps recent filters' matches
        scans[0] += 1
        flt = {"$or": [{"title": {"$contains": f"absent {j}/{scans[0]}"}} for j in range(args.conditions)]}
        big.query(q, k=10, filter=flt)

    def bkg_work() -> None:
        small.query(q, k=10)
        n[0] += 1
        small.upsert(ids=[n[0] % 1000], vectors=vecs[n[0] % 1000 : n[0] % 1000 + 1], progress=False)

    rows.append(row("bkg store", *under(bkg_slow, bkg_work, args.seconds)))

    big_vecs = rng.standard_normal((args.points, DIM)).astype(np.float32)
    big_texts = [f"chunk {i} of document {i // 20} about topic {i % 97}" for i in range(args.points)]
    long = store.create_collection("long", dim=DIM)
    long.upsert(ids=list(range(args.points)), vectors=big_vecs, texts=big_texts, progress=False)
    long.query(text="topic 5", k=1)  # its full-text index built: each compaction rebuilds both indexes
    rounds = [0]

    def bkg_compact() -> None:  # a tenth deleted (then put back for the next round), compacted
        rounds[0] += 1
        gone = list(range(rounds[0] % 10, args.points, 10))
        long.delete(ids=gone)
        long.optimize()
        long.upsert(ids=gone, vectors=big_vecs[gone], texts=[big_texts[i] for i in gone], progress=False)

    long_rows = [
        row("bkg store: query", *under(bkg_compact, lambda: small.query(q, k=10), args.seconds)),
        row("bkg store: query + upsert", *under(bkg_compact, bkg_work, args.seconds)),
    ]
    store.close()

    import lancedb

    db = lancedb.connect(str(work_dir / "lance"))
    lbig = db.create_table("big", [{"id": i, "title": titles[i], "vector": v} for i, v in enumerate(vecs)])
    lsmall = db.create_table("small", [{"id": i, "vector": v} for i, v in enumerate(vecs[:1000])])

    def lance_slow() -> None:
        scans[0] += 1
        where = " OR ".join(f"title LIKE '%absent {j}/{scans[0]}%'" for j in range(args.conditions))
        lbig.search(q).where(where, prefilter=True).limit(10).to_list()

    def lance_work() -> None:
        lsmall.search(q).limit(10).to_list()
        n[0] += 1
        lsmall.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(
            [{"id": n[0] % 1000, "vector": vecs[n[0] % 1000]}]
        )

    rows.append(row("lancedb", *under(lance_slow, lance_work, args.seconds)))

    llong = db.create_table("long", [{"id": i, "text": big_texts[i], "vector": v} for i, v in enumerate(big_vecs)])
    llong.create_fts_index("text")
    llong.search("topic 5", query_type="fts").limit(1).to_list()

    def lance_compact() -> None:
        rounds[0] += 1
        r = rounds[0] % 10
        llong.delete(f"id % 10 = {r}")
        llong.optimize()
        gone = range(r, args.points, 10)
        llong.add([{"id": i, "text": big_texts[i], "vector": big_vecs[i]} for i in gone])

    long_rows += [
        row("lancedb: query", *under(lance_compact, lambda: lsmall.search(q).limit(10).to_list(), args.seconds)),
        row("lancedb: query + upsert", *under(lance_compact, lance_work, args.seconds)),
    ]

    print(f"Another collection's query + upsert (ms: p50 / p99 / worst), alone and while a filter of "
          f"{args.conditions:,} conditions over {N:,} points is scanned on another thread, over and over")  # fmt: skip
    print("| system | alone | during the slow reads | p50 slower | worst slower | timed | slow reads ended |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print()
    print(f"Another collection's work (ms: p50 / p99 / worst), alone and while a collection of {args.points:,} "
          "points with texts has a tenth deleted and is compacted on another thread, over and over")  # fmt: skip
    print("| system: work | alone | during the compactions | p50 slower | worst slower | timed | compactions ended |")
    print("|---|---|---|---|---|---|---|")
    for r in long_rows:
        print(r)


if __name__ == "__main__":
    main()
