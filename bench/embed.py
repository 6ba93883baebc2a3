"""Embedding throughput: the library directly vs the same model through bkg, one run, as ratios.

    python bench/embed.py [--n 2048] [--n-llm 128] [--batch 256] [--rounds 3]

candle path: sentence-transformers (all-MiniLM-L6-v2) in this process vs `candle.run` through the gateway.
llmserver path: llama_cpp.Llama(embedding=True) on the default GGUF in this process vs `/v1/embeddings`, on
fewer sentences: a decoder evaluates every token (~200 tokens/s here), so it embeds ~13 sentences/s.
Rounds are interleaved; the table shows the best round of each (the VM is noisy). Also the workers' RSS.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER, DEFAULT_LLM  # noqa: E402
from bkg_kernel.models.registry import ModelRegistry  # noqa: E402

warnings.filterwarnings("ignore")
SUBJECTS = ["The committee", "A small dog", "Our new model", "The river", "My neighbour", "The market", "A comet"]
VERBS = ["approved", "chased", "predicted", "flooded", "painted", "rewarded", "lit up"]
OBJECTS = ["the budget", "a red ball", "the weather", "the valley", "the fence", "patient investors", "the sky"]


def sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % 7], VERBS[(i // 7) % 7], OBJECTS[(i // 49) % 7]
        out.append(f"{s} {v} {o} on day {i}.")
    return out


def rate(fn: Any, texts: list[str], batch: int) -> float:
    t0 = time.perf_counter()
    for a in range(0, len(texts), batch):
        fn(texts[a : a + batch])
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--n-llm", type=int, default=128, help="sentences for the llama.cpp pair")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    # llama.cpp (verbose=False) silences output by redirecting fd 1 while it works: print line by line
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = sentences(args.n)

    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama
    from sentence_transformers import SentenceTransformer

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    atexit.register(shutil.rmtree, work, True)  # its stores and models go when the bench ends
    reg = ModelRegistry(work / "models")
    st = SentenceTransformer(str(reg.resolve(DEFAULT_EMBEDDER)), device="cpu")
    llm = Llama(
        str(reg.resolve(DEFAULT_LLM)), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=2048,
        n_batch=512, n_ubatch=512, n_threads=os.cpu_count(), verbose=False,
    )  # fmt: skip
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
    try:

        def candle(batch: list[str]) -> None:
            c.post("/api/plugins/candle/invoke/candle.run", json={"inputs": batch}).raise_for_status()

        def llmserver(batch: list[str]) -> None:
            c.post("/v1/embeddings", json={"model": DEFAULT_LLM, "input": batch}).raise_for_status()

        systems = {
            "sentence-transformers (direct)": lambda b: st.encode(b, batch_size=args.batch, normalize_embeddings=True),
            "bkg candle.run": candle,
            "llama_cpp.Llama.embed (direct)": lambda b: llm.embed(b, normalize=True),
            "bkg /v1/embeddings (llmserver)": llmserver,
        }
        sizes = dict.fromkeys(systems, args.n)
        sizes["llama_cpp.Llama.embed (direct)"] = sizes["bkg /v1/embeddings (llmserver)"] = args.n_llm
        for fn in systems.values():
            fn(texts[:16])  # warm-up: model load
        best = dict.fromkeys(systems, 0.0)
        for _ in range(args.rounds):
            for name, fn in systems.items():
                best[name] = max(best[name], rate(fn, texts[: sizes[name]], args.batch))
        print(f"\nbatches of {args.batch}, best of {args.rounds} interleaved rounds\n")
        print("| path | model | sentences | sentences/s | vs direct |\n|---|---|---|---|---|")
        pairs = [
            ("sentence-transformers (direct)", "bkg candle.run", DEFAULT_EMBEDDER),
            ("llama_cpp.Llama.embed (direct)", "bkg /v1/embeddings (llmserver)", DEFAULT_LLM),
        ]
        for direct, bkg, model in pairs:
            print(f"| {direct} | {model} | {sizes[direct]} | {best[direct]:,.1f} | 1.00x |")
            print(f"| {bkg} | {model} | {sizes[bkg]} | {best[bkg]:,.1f} | {best[bkg] / best[direct]:.2f}x |")
        proc = psutil.Process(gw.proc.pid)
        pids = {c.pid: c for c in proc.children(recursive=True)}
        for plugin in ("candle", "llmserver"):
            pid = c.get(f"/api/plugins/{plugin}/status").json()["pid"]
            if pid in pids:
                print(f"\n{plugin} worker RSS with its model loaded: {pids[pid].memory_info().rss / 2**20:,.0f} MB")
    finally:
        c.close()
        gw.stop()


if __name__ == "__main__":
    main()
