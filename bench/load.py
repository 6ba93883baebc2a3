"""Mixed traffic against one real gateway on loopback, with faults injected, bounded in time and count.

    python bench/load.py [--seconds 60] [--clients 32] [--big 200000]

`--clients` concurrent clients (one asyncio task each, one process) send, for `--seconds`: plugin status,
vector and filtered queries, small upserts, `brainml.query`, chat with `max_tokens` 8 and face detection.
Meanwhile: sysinfo is restarted (at 15 % of the run), the llmserver worker is SIGKILLed (at 30 %), and a
`--big`-point upsert runs in batches of 5,000 from its own client (from 45 %), while a prober asks `/health`
every 20 ms. Reported: requests and errors by kind per route (the only acceptable errors are 503s from the
killed plugin while it restarts), p50 / p99 per route, `/health` p99 during the big upsert, the gateway's
RSS before and after (its own process, then with its workers), and whether every acknowledged point is there.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import io
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

from bkg_kernel.datasets import python_docs  # noqa: E402

DIM = 64
WEIGHTS = {"status": 3, "vector": 4, "filtered": 3, "upsert": 2, "brainml": 2, "chat": 1, "detect": 1}


def face_image() -> str:
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize((256, 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def rss(pid: int, children: bool) -> int:
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)] if children else [p]
    return sum(x.memory_info().rss for x in procs if x.is_running())


class Run:
    """What the clients saw: (route, status, error code, latency ms, time) per request; acknowledged ids."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str, float, float]] = []
        self.acked: list[int] = []
        self.health: list[tuple[float, float]] = []
        self.big_window: tuple[float, float] = (0.0, 0.0)
        self.big_acked = 0


async def client(n: int, c: httpx.AsyncClient, run: Run, stop: float, image: str, queries: list[str]) -> None:
    rng = random.Random(n)
    ops, weights = zip(*WEIGHTS.items(), strict=True)
    next_id = 1_000_000 + n * 100_000
    while time.monotonic() < stop:
        op = rng.choices(ops, weights)[0]
        vec = [rng.gauss(0, 1) for _ in range(DIM)]
        ids: list[int] = []
        if op == "status":
            req = c.build_request("GET", "/api/plugins/sysinfo/status")
        elif op in ("vector", "filtered"):
            body: dict[str, Any] = {"vector": vec, "k": 10}
            if op == "filtered":
                body["filter"] = {"group": rng.randrange(10)}
            req = c.build_request("POST", "/api/collections/load/query", json=body)
        elif op == "upsert":
            ids = list(range(next_id, next_id + 10))
            next_id += 10
            pts = [{"id": i, "vector": vec, "payload": {"group": i % 10}} for i in ids]
            req = c.build_request("PUT", "/api/collections/load/points", json={"points": pts})
        elif op == "brainml":
            body = {"collection": "docs", "query": rng.choice(queries), "top_k": 5}
            req = c.build_request("POST", "/api/plugins/brainml/invoke/brainml.query", json=body)
        elif op == "chat":
            body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
            req = c.build_request("POST", "/v1/chat/completions", json=body)
        else:
            req = c.build_request("POST", "/api/plugins/rustyface/invoke/faces.detect", json={"image": image})
        t0 = time.monotonic()
        try:
            r = await c.send(req)
            status = r.status_code
            code = "" if status < 400 else str(r.json().get("error", {}).get("code", ""))
        except httpx.HTTPError as exc:
            status, code = 0, type(exc).__name__
        run.rows.append((op, status, code, (time.monotonic() - t0) * 1000, t0))
        if ids and status == 200:
            run.acked.extend(ids)


async def faults(c: httpx.AsyncClient, run: Run, start: float, seconds: float, big: int) -> None:
    await asyncio.sleep(seconds * 0.15)
    r = await c.post("/api/plugins/sysinfo/restart")
    print(f"  {time.monotonic() - start:5.1f}s sysinfo restarted: {r.json().get('state')}")
    await asyncio.sleep(seconds * 0.15)
    pid = (await c.get("/api/plugins/llmserver/status")).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    print(f"  {time.monotonic() - start:5.1f}s llmserver worker {pid} SIGKILLed")
    await asyncio.sleep(seconds * 0.15)
    print(f"  {time.monotonic() - start:5.1f}s big upsert of {big:,} points starts")
    rng = np.random.default_rng(1)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=str(c.base_url), headers=dict(c.headers), timeout=600) as bulk:
        for a in range(0, big, 5000):
            vecs = rng.standard_normal((min(5000, big - a), DIM)).astype(np.float32).round(4)
            pts = [{"id": a + i, "vector": v.tolist()} for i, v in enumerate(vecs)]
            r = await bulk.put("/api/collections/bulk/points", json={"points": pts})
            if r.status_code == 200:
                run.big_acked += len(pts)
    run.big_window = (t0, time.monotonic())
    print(f"  {time.monotonic() - start:5.1f}s big upsert done in {run.big_window[1] - t0:.1f}s")


def prober(url: str, stop: Any, out: Any) -> None:
    """Ask /health every 20 ms from a process of its own (the clients' JSON work must not delay its clock)."""
    rows = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            c.get("/health")
            rows.append((t0, (time.monotonic() - t0) * 1000))
            time.sleep(0.02)
    out.put(rows)


async def main_async(args: argparse.Namespace, url: str, image: str, queries: list[str], run: Run) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
        start = time.monotonic()
        stop = start + args.seconds
        tasks = [client(n, c, run, stop, image, queries) for n in range(args.clients)]
        await asyncio.gather(*tasks, faults(c, run, start, args.seconds, args.big))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--big", type=int, default=200_000)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    atexit.register(shutil.rmtree, work, True)  # what it made goes when the bench ends
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    try:
        c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
        for name in ("load", "bulk"):
            c.post("/api/collections", json={"name": name, "dim": DIM}).raise_for_status()
        rng = np.random.default_rng(0)
        seed = [
            {"id": i, "vector": v.tolist(), "payload": {"group": i % 10}}
            for i, v in enumerate(rng.standard_normal((10_000, DIM)))
        ]
        c.put("/api/collections/load/points", json={"points": seed}).raise_for_status()
        docs = python_docs(["json", "csv", "pathlib", "argparse", "logging"])
        c.post(
            "/api/plugins/brainml/invoke/brainml.index", json={"collection": "docs", "documents": docs}
        ).raise_for_status()
        queries = ["parse command line arguments", "read a csv file", "join paths", "log a warning", "dump json"]
        image = face_image()
        c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).raise_for_status()
        c.post("/api/plugins/rustyface/invoke/faces.detect", json={"image": image}).raise_for_status()
        before = (rss(gw.proc.pid, False), rss(gw.proc.pid, True))
        print(f"set up: {len(docs)} documents in brainml, 10,000 points; gateway RSS {before[0] / 2**20:.0f} MB")
        run = Run()
        ctx = multiprocessing.get_context("spawn")
        health_rows, stop_probe = ctx.Queue(), ctx.Event()
        probe = ctx.Process(target=prober, args=(gw.url, stop_probe, health_rows))
        probe.start()
        asyncio.run(main_async(args, gw.url, image, queries, run))
        stop_probe.set()
        run.health = health_rows.get(timeout=60)
        probe.join()
        time.sleep(2)
        after = (rss(gw.proc.pid, False), rss(gw.proc.pid, True))
        present = 0
        for a in range(0, len(run.acked), 5000):
            chunk = run.acked[a : a + 5000]
            got = c.post("/api/collections/load/points/get", json={"ids": chunk, "with_vectors": False}).json()
            present += len(got["points"])
        bulk_count = c.get("/api/collections/bulk").json()["count"]
        llm_state = c.get("/api/plugins/llmserver/status").json()["state"]
    finally:
        gw.stop()

    by_route: dict[str, list[tuple[int, str, float, float]]] = defaultdict(list)
    for op, status, code, ms, t0 in run.rows:
        by_route[op].append((status, code, ms, t0))
    total = len(run.rows)
    print()
    print(f"{args.clients} clients for {args.seconds:.0f} s: {total:,} requests ({total / args.seconds:.0f}/s)")
    print("| route | requests | errors | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    bad = Counter()
    for op in WEIGHTS:
        rows = by_route.get(op, [])
        errs = Counter(f"{s} {code}".strip() for s, code, _, _ in rows if s >= 400 or s == 0)
        for k, v in errs.items():
            acceptable = op == "chat" and k.startswith("503")
            if not acceptable:
                bad[f"{op}: {k}"] += v
        ok = [ms for s, _, ms, _ in rows if 0 < s < 400]
        err_text = ", ".join(f"{v} x {k}" for k, v in errs.items()) or "0"
        print(f"| {op} | {len(rows):,} | {err_text} | {pct(ok, 50):.1f} | {pct(ok, 99):.1f} |")
    a, b = run.big_window
    during = [ms for t0, ms in run.health if a <= t0 <= b]
    print()
    p50, p99 = pct(during, 50), pct(during, 99)
    print(f"/health during the big upsert: {len(during)} probes, p50 {p50:.1f} ms, p99 {p99:.1f} ms (target < 50)")
    print(f"/health over the whole run: p99 {pct([ms for _, ms in run.health], 99):.1f} ms")
    print(f"big upsert: {run.big_acked:,} points acknowledged, {bulk_count:,} in the collection")
    print(f"small upserts: {len(run.acked):,} points acknowledged, {present:,} present afterwards")
    mb = [x / 2**20 for x in (*before, *after)]
    print(f"gateway RSS: {mb[0]:.0f} MB -> {mb[2]:.0f} MB (with its workers {mb[1]:.0f} -> {mb[3]:.0f} MB)")
    print(f"llmserver after its SIGKILL: {llm_state}")
    print("unacceptable errors: " + (", ".join(f"{v} x {k}" for k, v in bad.items()) if bad else "none"))


if __name__ == "__main__":
    main()
