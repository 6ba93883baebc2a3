"""Where a `brainml.query` in text mode spends its time: each layer of the gateway timed against the same answer
computed in one process, interleaved query by query, one run.

    python bench/hop.py [--packages stdlib,numpy,scipy,sklearn,pandas] [--repeat 2]

The docstrings corpus of `bench/brainml.py` (chunked the same way; text mode needs no vectors, so the points get
random ones), in a real gateway and in a store in this process. For each labelled query, in turn:
- `GET /health` and `GET /auth/me`: the HTTP floor of bkg's client, without and with authentication;
- the REST query route (`POST /api/collections/{name}/query`, text mode, 30 hits with their texts);
- `brainml.query` read as raw bytes over HTTP, through bkg's client over HTTP (`call_port=False`), and through
  bkg's client as it runs by default, over the gateway's call port (`wb.brain.query`, decoded);
- the plugin's own `latency_ms` (search, texts and highlights, inside the gateway);
- direct: the store's `query` with texts and brainml's highlights in this process (bench/brainml.py's direct row);
- the bound: a bare ASGI app on uvicorn (no framework, no authentication, no plugin host) in its own process with
  its own copy of the store, answering the same work as JSON (orjson) from a thread (as the gateway must: nothing
  that blocks runs on its event loop) and, for the floor of the HTTP exchange alone, on its event loop;
- the floor of any process boundary: the same process answering over a raw TCP socket on loopback (no HTTP at
  all: a 4-byte length and the JSON each way), from a thread that waits on the socket itself, so a query costs
  the two wake-ups every request and answer between two processes cost (the server's, then the client's).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import http.client
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
from brainml import chunked  # noqa: E402
from brainml import text_answer as answer  # noqa: E402
from gateway_harness import ADMIN_KEY, free_port, start_gateway  # noqa: E402

from bkg_kernel.client import Workbench  # noqa: E402
from bkg_kernel.datasets import PYDOC_QUERIES, STDLIB, python_docs  # noqa: E402
from bkg_kernel.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", default="stdlib,numpy,scipy,sklearn,pandas")
    ap.add_argument("--repeat", type=int, default=2, help="times each labelled query is timed, per layer")
    args = ap.parse_args()
    packages: list[str] = []
    for p in args.packages.split(","):
        packages += list(STDLIB) if p == "stdlib" else [p]
    points, vecs = corpus(packages)
    print(f"{len(points)} chunks, {len(PYDOC_QUERIES)} queries x {args.repeat}")

    work = Path(tempfile.mkdtemp(prefix="bench-hop-"))
    atexit.register(shutil.rmtree, work, True)  # its stores and models go when the bench ends
    port, raw_port = free_port(), free_port()
    bare = multiprocessing.get_context("spawn").Process(
        target=serve_bare, args=(port, raw_port, work / "bare", packages)
    )
    bare.start()
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    wb = Workbench(gw.url, ADMIN_KEY)
    try:
        wb.call("POST", "/api/collections", json={"name": "d", "dim": 384})
        for a in range(0, len(points), 2000):
            batch = [{**p, "vector": v.tolist()} for p, v in zip(points[a : a + 2000], vecs[a : a + 2000], strict=True)]
            wb.call("PUT", "/api/collections/d/points", json={"points": batch})
        with Store(work / "direct") as store:
            coll = filled(store, points, vecs)
            rows = measure(wb, coll, bare_client(port), raw_client(raw_port), args.repeat)
    finally:
        gw.stop()
        bare.terminate()
        bare.join()
    direct = rows["direct (one process)"]
    print("\n| layer | p50 ms | vs direct |")
    print("|---|---|---|")
    for name, p50 in rows.items():
        print(f"| {name} | {p50:.2f} | {p50 / direct:.2f}x |")


def corpus(packages: list[str]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The docstrings corpus's chunks and random unit vectors for them (the same in every process: seeded)."""
    points = chunked(python_docs(packages), 800, 100)
    vecs = np.random.default_rng(0).standard_normal((len(points), 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return points, vecs


def filled(store: Store, points: list[dict[str, Any]], vecs: np.ndarray) -> Any:
    coll = store.create_collection("d", dim=384)
    coll.upsert([{**p, "vector": v} for p, v in zip(points, vecs, strict=True)], progress=False)
    return coll


def serve_bare(port: int, raw_port: int, data: Path, packages: list[str]) -> None:
    """The bound: `answer` behind nothing but uvicorn, from a thread (`/thread`) or on the event loop (`/loop`);
    and behind a raw socket on `raw_port`, served by a thread while the event loop idles."""
    import orjson
    import uvicorn

    sys.setswitchinterval(0.0005)  # as the gateway sets it
    coll = filled(Store(data), *corpus(packages))
    pool = ThreadPoolExecutor(1)

    threading.Thread(target=floor.serve, args=(raw_port, lambda r: answer(coll, r["query"])), daemon=True).start()

    async def on_thread(q: str) -> Any:  # one wake-up of the loop per answer, as the gateway's plugin host does
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pool.submit(lambda: loop.call_soon_threadsafe(done.set_result, answer(coll, q)))
        return await done

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        q = json.loads(body)["query"]
        hits = answer(coll, q) if scope["path"] == "/loop" else await on_thread(q)
        out = orjson.dumps({"results": hits})
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": out})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def bare_client(port: int) -> Callable[[str, str], Any]:
    """`ask(path, query)` against the bare app on one keep-alive connection, once it answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def ask(path: str, q: str) -> Any:
        conn.request("POST", path, body=json.dumps({"query": q}), headers={"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())

    deadline = time.monotonic() + 300
    while True:
        try:
            ask("/loop", "ready")
            return ask
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def raw_client(port: int) -> Callable[[str], Any]:
    """`ask(query)` over the raw socket (connected once the bare process listens)."""
    ask = floor.client(port)
    return lambda q: ask({"query": q})


def measure(
    wb: Workbench, coll: Any, bare: Callable[[str, str], Any], raw: Callable[[str], Any], repeat: int
) -> dict[str, float]:
    """Each layer's p50 over the labelled queries, the layers interleaved query by query."""
    inside: list[float] = []
    body = {"collection": "d", "top_k": 30, "mode": "text"}

    def direct(q: str) -> Any:
        return answer(coll, q)

    def brain(q: str) -> Any:
        r = wb.brain.query("d", q, top_k=30, mode="text")
        inside.append(r["latency_ms"])
        return r

    over_http = Workbench(wb.url, wb.api_key, call_port=False)

    layers: dict[str, Callable[[str], Any]] = {
        "GET /health": lambda q: wb.call("GET", "/health"),
        "GET /auth/me (authenticated)": lambda q: wb.call("GET", "/auth/me"),
        "REST query route, text, 30 hits with texts": lambda q: wb.call(
            "POST", "/api/collections/d/query", json={"text": q, "k": 30, "mode": "text", "with_text": True}
        ),
        "brainml.query, raw bytes": lambda q: (
            wb.http.request("POST", "/api/plugins/brainml/invoke/brainml.query", json={**body, "query": q}).content
        ),
        "brainml.query, bkg's client over HTTP": lambda q: over_http.brain.query("d", q, top_k=30, mode="text"),
        "brainml.query, bkg's client (the call port)": brain,
        "bound: bare ASGI app, the same work on a thread": lambda q: bare("/thread", q),
        "floor: bare ASGI app, the same work on its event loop": lambda q: bare("/loop", q),
        "floor: a raw socket, no HTTP, the same work on a thread waiting on it": raw,
        "direct (one process)": direct,
    }
    queries = [q for q, _ in PYDOC_QUERIES]
    for q in queries[:5]:  # warm every path
        for run in layers.values():
            run(q)
    inside.clear()
    lat: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeat):
        for q in queries:
            for name, run in layers.items():
                t0 = time.perf_counter()
                run(q)
                lat[name].append((time.perf_counter() - t0) * 1000)
    rows = {name: statistics.median(v) for name, v in lat.items()}
    rows["brainml.query's own latency_ms (inside the gateway)"] = statistics.median(inside)
    return rows


if __name__ == "__main__":
    main()
