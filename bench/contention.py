"""What one slow read costs everyone else: a filter of 1,000 `$contains` conditions over a 10,000-point collection
(DuckDB tests each condition on every row: seconds) scanned over and over on one thread (another filter each
time, so no cache answers it), while this thread times
a query of another collection and an upsert into it; bkg's store against LanceDB doing the same in one process
(a `LIKE` filter of as many conditions, and a vector search of another table).

    python bench/contention.py [--seconds 20] [--conditions 1000]

Reported: the other work's p50, p99 and worst, alone and while the slow reads run, and how much slower it got.
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

    print(f"Another collection's query + upsert (ms: p50 / p99 / worst), alone and while a filter of "
          f"{args.conditions:,} conditions over {N:,} points is scanned on another thread, over and over")  # fmt: skip
    print("| system | alone | during the slow reads | p50 slower | worst slower | timed | slow reads ended |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
