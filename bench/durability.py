"""Durability: the gateway SIGKILLed at random moments during ingest, snapshot and restore, then reopened.

    python bench/durability.py [--kills 20] [--seed 1]

Each round starts the gateway on the same data dir, runs three clients at once (upserts of 2,000 points into
`ingest`, recording every acknowledged batch; snapshots of `fixed`; restores of `fixed` from its snapshots) and
SIGKILLs the gateway after a random 0.5-3 s. After each kill the gateway must open again, and then: every
acknowledged point of `ingest` is there, `fixed` holds its 10,000 points (a restore either happened whole or not
at all), and nothing is orphaned (no snapshot or restore work folder, no points table or index file that no
collection names, no half-written index). One line per round, then a summary.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, Gateway, start_gateway  # noqa: E402

DIM = 32
FIXED = 10_000


def _client(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def setup(data_dir: Path) -> None:
    """Create `ingest` and `fixed` (10,000 points) on a new data dir."""
    gw = start_gateway(data_dir, plugins=["sysinfo"])
    try:
        c = _client(gw)
        for name in ("ingest", "fixed"):
            c.post("/api/collections", json={"name": name, "dim": DIM}).raise_for_status()
        vecs = np.random.default_rng(0).standard_normal((FIXED, DIM)).round(4)
        pts = [{"id": i, "vector": v.tolist(), "payload": {"i": i}} for i, v in enumerate(vecs)]
        c.put("/api/collections/fixed/points", json={"points": pts}).raise_for_status()
        c.post("/api/collections/fixed/snapshots").raise_for_status()
    finally:
        gw.stop()


def round_(data_dir: Path, rng: random.Random, acked: set[int], next_id: list[int]) -> dict[str, Any]:
    """One kill: traffic, SIGKILL after a random moment; the counts of what each client got acknowledged."""
    gw = start_gateway(data_dir, plugins=["sysinfo"])
    stop = threading.Event()
    done = {"upserts": 0, "snapshots": 0, "restores": 0}

    def ingest() -> None:
        c = _client(gw)
        while not stop.is_set():
            ids = list(range(next_id[0], next_id[0] + 2000))
            next_id[0] += 2000
            vecs = np.random.default_rng(ids[0]).standard_normal((2000, DIM)).round(4)
            try:
                r = c.put("/api/collections/ingest/points", json={"points": [
                    {"id": i, "vector": v.tolist()} for i, v in zip(ids, vecs, strict=True)]})  # fmt: skip
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acked.update(ids)
                done["upserts"] += 1

    def snapshots() -> None:
        c = _client(gw)
        while not stop.is_set():
            try:
                if c.post("/api/collections/fixed/snapshots").status_code == 201:
                    done["snapshots"] += 1
                snaps = c.get("/api/collections/fixed/snapshots").json()["snapshots"]
                if snaps and c.post(f"/api/collections/fixed/snapshots/{rng.choice(snaps)['id']}/restore").is_success:
                    done["restores"] += 1
            except httpx.HTTPError:
                return

    threads = [threading.Thread(target=f) for f in (ingest, snapshots)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.5, 3.0))
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    return done


def check(data_dir: Path, acked: set[int]) -> dict[str, Any]:
    """Open the data dir again; return what is there and what is orphaned."""
    gw = start_gateway(data_dir, plugins=["sysinfo"])
    try:
        c = _client(gw)
        missing = 0
        ids = sorted(acked)
        for a in range(0, len(ids), 10_000):
            chunk = ids[a : a + 10_000]
            got = c.post("/api/collections/ingest/points/get", json={"ids": chunk, "with_vectors": False}).json()
            missing += len(chunk) - len(got["points"])
        fixed = c.get("/api/collections/fixed").json()["count"]
        snaps = c.get("/api/collections/fixed/snapshots").json()["snapshots"]
    finally:
        gw.stop()
    leftovers = [*data_dir.glob(".restore-*"), *data_dir.glob("snapshots/*/.tmp-*"), *data_dir.glob("indexes/*.tmp")]
    index_tables = {f.name.split(".", 1)[0] for f in (data_dir / "indexes").glob("points_*")}
    return {"missing": missing, "fixed": fixed, "snapshots": len(snaps), "leftovers": leftovers,
            "index_tables": len(index_tables)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-durability-")) / "data"
    atexit.register(shutil.rmtree, data_dir.parent, True)  # its store goes when the bench ends
    setup(data_dir)
    rng, acked, next_id = random.Random(args.seed), set[int](), [1_000_000]
    bad = 0
    for k in range(args.kills):
        done = round_(data_dir, rng, acked, next_id)
        r = check(data_dir, acked)
        ok = r["missing"] == 0 and r["fixed"] == FIXED and not r["leftovers"] and r["index_tables"] <= 2
        bad += not ok
        print(
            f"kill {k + 1:2d}: acknowledged {done['upserts']} upserts, {done['snapshots']} snapshots, "
            f"{done['restores']} restores; reopened: {len(acked):,} acked points, {r['missing']} missing, "
            f"fixed {r['fixed']:,}, {r['snapshots']} snapshots, leftovers {len(r['leftovers'])}, "
            f"index tables {r['index_tables']} -> {'ok' if ok else 'FAIL'}"
        )
    print(f"\n{args.kills} SIGKILLs: {args.kills - bad} clean reopens, {bad} with a loss or an orphan")


if __name__ == "__main__":
    main()
