"""LLM serving benchmark: raw llama_cpp.Llama vs llama_cpp.server vs bkg's /v1, same GGUF, same threads, one run.

    python bench/llm.py [--rounds 5] [--max-tokens 128] [--clients 4]

Single stream: time to first token, prompt tokens/s (prompt tokens / TTFT) and generation tokens/s (tokens after
the first / time after the first), medians over interleaved rounds. Each round's prompt starts with a new line,
so no system reuses a cached prompt from the round before. Then N concurrent streaming clients: aggregate
generation tokens/s and p95 request latency, bkg vs llama_cpp.server. Also the RSS of bkg's llmserver worker.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, free_port, start_gateway  # noqa: E402

from bkg_kernel.models.defaults import DEFAULT_LLM  # noqa: E402
from bkg_kernel.models.registry import ModelRegistry  # noqa: E402

THREADS = 2
N_CTX = 2048
TOPICS = ["rivers", "bridges", "volcanoes", "libraries", "trains", "forests", "comets", "markets", "castles", "tides"]


def prompt(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Request {i}. You are a concise assistant."},
        {"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} and why they matter."},
    ]


def raw_stream(llm: Any, i: int, max_tokens: int) -> tuple[float, float, int, int]:
    """Return (ttft, total, tokens, prompt_tokens) for raw create_chat_completion(stream=True)."""
    t0 = time.perf_counter()
    first, n = 0.0, 0
    for chunk in llm.create_chat_completion(prompt(i), max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            if n == 0:
                first = time.perf_counter() - t0
            n += 1
    return first, time.perf_counter() - t0, n, 0


_CLIENTS: dict[str, httpx.Client] = {}
_LOCK = threading.Lock()


def _client(url: str) -> httpx.Client:
    """One keep-alive client per server (as a real client holds one): building an httpx client per request
    loads a CA bundle (tens of ms) that would be timed as the server's time to first token."""
    with _LOCK:
        if url not in _CLIENTS:
            _CLIENTS[url] = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=16))
        return _CLIENTS[url]


def http_stream(
    url: str, headers: dict[str, str], model: str, i: int, max_tokens: int
) -> tuple[float, float, int, int]:
    body = {
        "model": model, "messages": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    first, n, ptoks = 0.0, 0, 0
    with _client(url).stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                ptoks = chunk["usage"]["prompt_tokens"]
            if chunk.get("choices") and (chunk["choices"][0].get("delta") or {}).get("content"):
                if n == 0:
                    first = time.perf_counter() - t0
                n += 1
    return first, time.perf_counter() - t0, n, ptoks


def wait_http(url: str, headers: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def concurrent(fn: Any, clients: int, per_client: int) -> tuple[float, float, int]:
    """Run `clients` threads each doing `per_client` streams; return (aggregate tokens/s, p95 latency s, failures)."""
    lat: list[float] = [float("nan")]
    tokens = [0]
    failed = [0]
    lock = threading.Lock()

    def worker(c: int) -> None:
        for j in range(per_client):
            try:
                _, total, n, _ = fn(1000 + c * 100 + j)
            except httpx.HTTPError:
                with lock:
                    failed[0] += 1
                continue
            with lock:
                lat.append(total)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sorted(x for x in lat if x == x)
    p95 = done[min(len(done) - 1, int(0.95 * len(done)))] if done else float("nan")
    return tokens[0] / wall, p95, failed[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=4, help="0 skips the concurrent part")
    args = ap.parse_args()
    # llama.cpp (verbose=False) silences output by redirecting fd 1 while it works: print line by line
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from llama_cpp import Llama

    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    atexit.register(shutil.rmtree, work, True)  # what it made goes when the bench ends
    reg = ModelRegistry(work / "models")
    gguf = str(reg.resolve(DEFAULT_LLM))
    llm = Llama(gguf, n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)

    sport = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(THREADS),
         "--n_threads_batch", str(THREADS), "--n_ctx", str(N_CTX), "--port", str(sport), "--host", "127.0.0.1",
         "--model_alias", DEFAULT_LLM,
         # its default interrupts a running stream when a new request arrives: queue them, as bkg does
         "--interrupt_requests", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server_url = f"http://127.0.0.1:{sport}"
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    head = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cfg = {"n_threads": THREADS, "n_ctx": N_CTX, "max_concurrent": 2}
    httpx.put(
        gw.url + "/api/plugins/llmserver/config", json={"config": cfg}, headers=head, timeout=120
    ).raise_for_status()
    try:
        wait_http(server_url, {})
        wait_http(gw.url, head)
        systems = {
            "raw llama_cpp.Llama": lambda i: raw_stream(llm, i, args.max_tokens),
            "llama_cpp.server": lambda i: http_stream(server_url, {}, DEFAULT_LLM, i, args.max_tokens),
            "bkg /v1": lambda i: http_stream(gw.url, head, DEFAULT_LLM, i, args.max_tokens),
        }
        for fn in systems.values():  # warm-up: load, first allocations
            fn(999)
        res: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in systems}
        for r in range(args.rounds):
            for name, fn in systems.items():
                res[name].append(fn(r))
        ptoks = next(x[3] for x in res["bkg /v1"] if x[3])
        rows = []
        for name, xs in res.items():
            ttft = statistics.median(x[0] for x in xs)
            gen = statistics.median((x[2] - 1) / (x[1] - x[0]) for x in xs if x[2] > 1)
            rows.append((name, ttft * 1000, ptoks / ttft, gen))
        raw = rows[0]
        print(f"\nSingle stream, {args.rounds} rounds, max_tokens {args.max_tokens}, {THREADS} threads, "
              f"{ptoks} prompt tokens, model {DEFAULT_LLM}\n")  # fmt: skip
        print("| system | TTFT ms | TTFT over raw ms | prompt tok/s | generation tok/s | generation vs raw |")
        print("|---|---|---|---|---|---|")
        for name, ttft_ms, pps, gen in rows:
            print(f"| {name} | {ttft_ms:.1f} | {ttft_ms - raw[1]:+.1f} | {pps:.0f} | {gen:.1f} | {gen / raw[3]:.2f}x |")

        if args.clients == 0:
            return
        print(f"\n{args.clients} concurrent streaming clients, 2 requests each\n")
        print("| system | aggregate tok/s | p95 latency s | failed requests | tok/s vs llama_cpp.server |")
        print("|---|---|---|---|---|")
        conc = {name: concurrent(systems[name], args.clients, 2) for name in ("llama_cpp.server", "bkg /v1")}
        base = conc["llama_cpp.server"][0]
        for name, (tps, p95, failed) in conc.items():
            print(f"| {name} | {tps:.1f} | {p95:.2f} | {failed} of {args.clients * 2} | {tps / base:.2f}x |")

        proc = psutil.Process(gw.proc.pid)
        workers = {c.pid: c for c in proc.children(recursive=True)}
        status = httpx.get(gw.url + "/api/plugins/llmserver/status", headers=head).json()
        rss = workers[status["pid"]].memory_info().rss / 2**20 if status["pid"] in workers else float("nan")
        here = psutil.Process().memory_info().rss / 2**20
        print(f"\nllmserver worker RSS with {DEFAULT_LLM} loaded ({cfg['max_concurrent']} slots): {rss:.0f} MB; "
              f"this process (raw llama_cpp.Llama + the benchmark): {here:.0f} MB")  # fmt: skip
    finally:
        gw.stop()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
