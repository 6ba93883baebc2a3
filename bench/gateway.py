"""Gateway benchmark against the targets of the issue (and the seed's own), one run, as ratios.

    python bench/gateway.py [--plugins all]   # wrk when installed (apt-get install wrk), else a bounded httpx load

Measures: cold start of `bkg serve` to /health OK, idle RSS of the gateway process (and of its workers together,
separately), GET /api/plugins latency (sequential keep-alive requests) and throughput under load, and how long
a status change takes to reach a WebSocket subscriber.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from websockets.sync.client import connect as ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, free_port  # noqa: E402

HEAD = {"Authorization": f"Bearer {ADMIN_KEY}"}


PLUGINS: list[str] = []  # --plugins: the hosted set (the targets are for a gateway without model plugins)


def start(data: Path, port: int, until: str = "up") -> tuple[subprocess.Popen[bytes], float]:
    """Start `bkg serve`; return when /health answers 200 ("up") or reports every plugin running ("ok")."""
    env = {**os.environ, "BKG_ADMIN_KEY": ADMIN_KEY}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bkg_kernel.cli", "serve", "--data-dir", str(data), "--port", str(port)]
        + (["--plugins", ",".join(PLUGINS)] if PLUGINS else []),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # http.client, not httpx.get: a fresh httpx client costs tens of ms per poll, which would be timed too
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            r = conn.getresponse()
            body = r.read()
            conn.close()
            if r.status == 200 and (until == "up" or json.loads(body)["status"] == "ok"):
                return proc, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.005)


def load_wrk(url: str, seconds: int, conns: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-H", f"Authorization: Bearer {ADMIN_KEY}", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed responses under load")
    return float(m.group(1)) if m else float("nan")


async def load_httpx(url: str, seconds: int, conns: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(headers=HEAD, limits=httpx.Limits(max_connections=conns)) as c:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                (await c.get(url)).raise_for_status()
                done += 1

        await asyncio.gather(*[worker() for _ in range(conns)])
    return done / seconds


BASELINE = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get("/api/plugins")
async def plugins():
    return {"plugins": [{"id": "a", "state": "running"}, {"id": "b", "state": "running"}]}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def baseline_rps(seconds: int) -> float:
    """The ceiling on this machine: a bare FastAPI + uvicorn app with one constant route, same load."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(port)])
    try:
        url = f"http://127.0.0.1:{port}/api/plugins"
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        return load_wrk(url, seconds, 32) if shutil.which("wrk") else asyncio.run(load_httpx(url, seconds, 32))
    finally:
        proc.terminate()
        proc.wait()


def ws_latency(base: str, n_restarts: int) -> list[float]:
    lat: list[float] = []
    with ws_connect(base.replace("http", "ws") + f"/ws?token={ADMIN_KEY}") as ws:
        ws.recv(10)
        ws.send(json.dumps({"action": "sub", "topic": "status", "plugin": "sysinfo"}))
        ws.recv(10)
        for _ in range(n_restarts):
            threading.Thread(
                target=lambda: httpx.post(base + "/api/plugins/sysinfo/restart", headers=HEAD, timeout=60)
            ).start()
            while True:
                msg = json.loads(ws.recv(60))
                if msg["type"] != "status":
                    continue
                lat.append((time.time() - msg["time"]) * 1000)
                if msg["payload"]["state"] == "running":
                    break
    return lat


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--plugins", default="apikeys,sysinfo", help="plugins to host ('all': every one; default: no model plugins)"
    )
    args = ap.parse_args()
    if args.plugins != "all":
        PLUGINS[:] = args.plugins.split(",")
    print(f"plugins: {args.plugins}")
    work = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    port = free_port()
    starts, readies = [], []
    for i in range(3):  # cold start, fresh data dir each time
        proc, took = start(work / f"cold{i}", port)
        starts.append(took)
        proc.terminate()
        proc.wait()
        proc, took = start(work / f"ready{i}", port, until="ok")
        readies.append(took)
        proc.terminate()
        proc.wait()
    proc, _ = start(work / "main", port, until="ok")
    base = f"http://127.0.0.1:{port}"
    try:
        time.sleep(5)
        gw = psutil.Process(proc.pid)
        rss = gw.memory_info().rss
        worker_rss = sum(c.memory_info().rss for c in gw.children(recursive=True))
        with httpx.Client(headers=HEAD) as c:
            for _ in range(50):
                c.get(base + "/api/plugins")
            lat = []
            for _ in range(1000):
                t0 = time.perf_counter()
                c.get(base + "/api/plugins").raise_for_status()
                lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        if shutil.which("wrk"):
            rps, tool = load_wrk(base + "/api/plugins", 10, 32), "wrk -t1 -c32 10s"
        else:
            rps, tool = asyncio.run(load_httpx(base + "/api/plugins", 10, 32)), "httpx 32 conns 10s"
        ws = sorted(ws_latency(base, 15))
        ceiling = baseline_rps(10)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    def p(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * q))]

    rows = [
        ("cold start to /health OK (s, median of 3)", statistics.median(starts), 1.5, 2.0, "lower"),
        ("cold start to every plugin running (s, median of 3)", statistics.median(readies), None, None, "lower"),
        ("idle RSS, gateway process (MB)", rss / 2**20, 150, 500, "lower"),
        ("idle RSS, worker processes together (MB)", worker_rss / 2**20, None, None, "lower"),
        ("GET /api/plugins p50 (ms)", p(lat, 0.5), 5, 100, "lower"),
        ("GET /api/plugins p99 (ms)", p(lat, 0.99), None, 100, "lower"),
        (f"GET /api/plugins throughput (req/s, {tool})", rps, 2000, None, "higher"),
        ("same load on a bare FastAPI route (req/s, the ceiling here)", ceiling, None, None, "higher"),
        ("WebSocket status event latency p50 (ms)", p(ws, 0.5), None, 50, "lower"),
        ("WebSocket status event latency p95 (ms)", p(ws, 0.95), 50, 50, "lower"),
    ]
    print("| measure | bkg | target | bkg vs target | seed target |\n|---|---|---|---|---|")
    for name, value, target, seed, better in rows:
        ratio = ""
        if target:
            ratio = f"{(target / value if better == 'lower' else value / target):.2f}x"
        print(f"| {name} | {value:,.2f} | {target or ''} | {ratio} | {seed or ''} |")
    print(f"\n(bkg vs target > 1.00x means the target is met; bkg throughput / bare FastAPI = {rps / ceiling:.2f}x)")


if __name__ == "__main__":
    main()
