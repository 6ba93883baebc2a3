"""How long one big request body holds up everyone else: `/health` latency while big bodies arrive, bkg's gateway
against a plain FastAPI app on uvicorn (the peer: FastAPI reads and parses a JSON body on the event loop before
the route's dependencies, authentication included, run).

    python bench/stall.py [--mb 12] [--rounds 3]

For each case, a prober in its own process asks `GET /health` every 10 ms while this process sends `--rounds`
bodies of about `--mb` MB, one after the other:
- anonymous: a body to a route that needs credentials, sent without any (bkg: `POST /admin/users`; the peer: a
  route whose pydantic body comes before its key check);
- plugin call: an authenticated `sysinfo.sleep` with the big body (bkg: a worker plugin; the peer: a route that
  validates the body with pydantic);
- texts to embed: 2,000,000 numbers as `input` (6 MB; refused) to `/api/embed` (at most 10,000 texts) and to
  llmserver's OpenAI `/v1/embeddings` (one text or at most 2048); the peer: routes with the same pydantic bodies;
- upserts: authenticated points upserts of the same size: 384-d vectors (~1,600 points: what an embedding batch
  looks like), 95,000 small points (4-d: the most objects a body under the 100,000-point limit can make), and
  150,000 small points (over the limit: refused with a 422 after the parse), and ~15,000 points with a text of
  800 characters each (brainml's chunks: bkg indexes them for full-text search as it stores them); the peer: a
  route whose pydantic body is the points (FastAPI parses and validates it on the event loop, and stores nothing);
- a big answer: the 384-d points (with their vectors) fetched back by id (`points/get`); the peer: a plain `def`
  route returning the same points as a dict (FastAPI runs the route on a thread, then encodes its answer on the
  event loop);
- a delete that compacts: 30,000 of a collection's 50,000 points with texts of 800 characters deleted by a
  filter, so that it compacts (positions renumbered, the vector and full-text indexes rebuilt from the 20,000
  left); bkg alone (a plain FastAPI app stores nothing), each round on a collection of its own filled beforehand.
Reported: the probes' p50, p99 and worst, and the worst as a ratio of the peer's for the same case.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, free_port, start_gateway  # noqa: E402

PEER = """
import json
import sys
from typing import Any
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field, field_validator


class Body(BaseModel):
    seconds: float = 0
    pad: list[Any] = []


class Point(BaseModel):
    id: int | str
    vector: list[float]
    payload: dict[str, Any] = {}
    text: str | None = None


class Points(BaseModel):
    points: list[Point]


class Embed(BaseModel):
    model: str
    input: list[str] = Field(..., max_length=10_000)


class OpenAIEmbed(BaseModel):  # the OpenAI shape: one text or a batch of at most 2048
    model: str | None = None
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("input may hold at most 2048 texts")
        return v


def key(authorization: str = Header("")) -> str:
    if authorization != "Bearer peer-key":
        raise HTTPException(401, "missing credentials")
    return authorization


app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/call")
async def call(body: Body, who: str = Depends(key)) -> dict:
    return {"pad": len(body.pad)}


@app.post("/embed")
async def embed(body: Embed, who: str = Depends(key)) -> dict:
    return {"texts": len(body.input)}


@app.post("/v1/embeddings")
async def openai_embed(body: OpenAIEmbed, who: str = Depends(key)) -> dict:
    return {"texts": len(body.input)}


@app.put("/points")
async def points(body: Points, who: str = Depends(key)) -> dict:
    return {"upserted": len(body.points)}


with open(sys.argv[2]) as f:  # the points bkg answers (what a store would hand the route)
    ANSWER = json.load(f)


@app.post("/points/get")
def get_points(who: str = Depends(key)) -> dict:
    return {"points": ANSWER}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

PROBE = """
import json, sys, time
import httpx
c = httpx.Client(base_url=sys.argv[1], timeout=120)
lat, end = [], time.time() + float(sys.argv[2])
while time.time() < end:
    t = time.perf_counter()
    c.get("/health")
    lat.append((time.perf_counter() - t) * 1000)
    time.sleep(0.01)
print(json.dumps(lat))
"""


def probed(url: str, send: Any, rounds: int, each_s: float = 3.0) -> list[float]:
    """/health latencies (ms) while `send()` runs `rounds` times, 0.5 s apart, with 1 s of quiet around (the probe
    runs for `each_s` a round)."""
    seconds = 2.0 + rounds * each_s
    probe = subprocess.Popen([sys.executable, "-c", PROBE, url, str(seconds)], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    for _ in range(rounds):
        send()
        time.sleep(0.5)
    out, _ = probe.communicate()
    lat: list[float] = json.loads(out)
    return lat


COMPACTS = "a delete that compacts 50,000 texts"


def compacting(bkg: httpx.Client, rounds: int, chunk: Callable[[], str]) -> None:
    """The `COMPACTS` case: `rounds` collections of 50,000 points with texts (their full-text index in use),
    then /health probed while each has 60% of its points deleted (which compacts it)."""
    texts = [chunk() for _ in range(50_000)]
    for r in range(rounds):
        bkg.post("/api/collections", json={"name": f"compact{r}", "dim": 2}).raise_for_status()
        for a in range(0, len(texts), 10_000):
            pts = [{"id": i, "vector": [1.0, 0.5], "text": texts[i], "payload": {"n": i}} for i in range(a, a + 10_000)]
            bkg.put(f"/api/collections/compact{r}/points", json={"points": pts}).raise_for_status()
        bkg.post(
            f"/api/collections/compact{r}/query", json={"text": "topic 5", "mode": "text", "k": 1}
        ).raise_for_status()
    done = iter(range(rounds))

    def delete() -> None:
        r = next(done)
        bkg.post(
            f"/api/collections/compact{r}/points/delete", json={"filter": {"n": {"$lt": 30_000}}}
        ).raise_for_status()
        assert bkg.get(f"/api/collections/compact{r}").json()["count"] == 20_000

    print(row(COMPACTS, "bkg", probed(str(bkg.base_url).rstrip("/"), delete, rounds, each_s=6.0), None))


def row(name: str, system: str, lat: list[float], peer_worst: float | None) -> str:
    q = statistics.quantiles(lat, n=100)
    vs = f"{max(lat) / peer_worst:.2f}x" if peer_worst else "-"
    return f"| {name} | {system} | {statistics.median(lat):.1f} | {q[98]:.1f} | {max(lat):.1f} | {vs} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = ap.parse_args()
    n = int(args.mb * 2**20 / 42)  # one pad element is ~42 bytes of JSON
    pad = [{"a": i, "b": "y" * 20} for i in range(n)]
    call = json.dumps({"seconds": -1, "pad": pad}).encode()
    anon = json.dumps({"username": "x", "role": "viewer", "pad": pad}).encode()
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((int(args.mb * 2**20 / 7900), 384)).astype(np.float32).tolist()  # ~7.9 KB each

    def small(n: int, pad: int) -> list[dict[str, Any]]:
        return [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"b": "y" * pad}} for i in range(n)]

    vocab = [f"w{i}" + "x" * int(rng.integers(0, 8)) for i in range(20_000)]

    def chunk() -> str:  # ~800 characters of words, as brainml chunks a document
        return " ".join(rng.choice(vocab, 100))[:800]

    chunks = int(args.mb * 2**20 / 900)
    upserts = {  # collection dimension, body
        "384-d": (384, [{"id": i, "vector": v, "payload": {"b": "y" * 20}} for i, v in enumerate(wide)]),
        "95,000 small": (4, small(95_000, 80)),
        "150,000 small (refused)": (4, small(150_000, 20)),
        f"{chunks:,} texts": (2, [{"id": i, "vector": [0.1, 0.2], "text": chunk()} for i in range(chunks)]),
    }
    bodies = {name: (dim, json.dumps({"points": pts}).encode()) for name, (dim, pts) in upserts.items()}
    numbers = json.dumps({"model": "candle:all-minilm-l6-v2", "input": [1] * 2_000_000}).encode()
    sizes = {"call": call, "anonymous": anon, "embed": numbers, **{f"upsert {k}": v for k, (_, v) in bodies.items()}}
    print("bodies: " + ", ".join(f"{k} {len(v) / 2**20:.1f} MB" for k, v in sizes.items()))

    answer = [{"id": p["id"], "vector": p["vector"], "payload": p["payload"]} for p in upserts["384-d"][1]]
    answer_file = Path(tempfile.mkdtemp(prefix="bench-stall-answer-")) / "answer.json"
    atexit.register(shutil.rmtree, answer_file.parent, True)
    answer_file.write_text(json.dumps(answer))
    port = free_port()
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port), str(answer_file)])
    work = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    atexit.register(shutil.rmtree, work, True)  # its store goes when the bench ends
    gw = start_gateway(work / "data", plugins=["sysinfo", "llmserver"])
    try:
        peer_url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(peer_url + "/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        bkg = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        for dim in {dim for dim, _ in bodies.values()}:
            bkg.post("/api/collections", json={"name": f"big{dim}", "dim": dim}).raise_for_status()
        bkg.post("/api/collections", json={"name": "answers", "dim": 384}).raise_for_status()
        bkg.put(
            "/api/collections/answers/points", content=bodies["384-d"][1], headers={"content-type": "application/json"}
        ).raise_for_status()
        ids = json.dumps({"ids": [p["id"] for p in answer], "with_vectors": True}).encode()
        json_type = {"content-type": "application/json"}
        peer_key = {**json_type, "Authorization": "Bearer peer-key"}
        cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
            "anonymous body": (
                lambda: httpx.post(gw.url + "/admin/users", content=anon, headers=json_type, timeout=120),
                lambda: httpx.post(peer_url + "/call", content=anon, headers=json_type, timeout=120),
            ),
            "plugin call": (
                lambda: bkg.post("/api/plugins/sysinfo/invoke/sysinfo.sleep", content=call, headers=json_type),
                lambda: httpx.post(peer_url + "/call", content=call, headers=peer_key, timeout=120),
            ),
        }
        for route in ("/api/embed", "/v1/embeddings"):
            cases[f"{route}, 2,000,000 numbers (refused)"] = (
                functools.partial(bkg.post, route, content=numbers, headers=json_type),
                functools.partial(
                    httpx.post, peer_url + ("/embed" if route == "/api/embed" else route), content=numbers,
                    headers=peer_key, timeout=120,
                ),
            )  # fmt: skip
        for name, (dim, body) in bodies.items():
            cases[f"points upsert, {name}"] = (
                functools.partial(bkg.put, f"/api/collections/big{dim}/points", content=body, headers=json_type),
                functools.partial(httpx.put, peer_url + "/points", content=body, headers=peer_key, timeout=120),
            )
        cases[f"answer: {len(answer):,} points with 384-d vectors"] = (
            functools.partial(bkg.post, "/api/collections/answers/points/get", content=ids, headers=json_type),
            functools.partial(httpx.post, peer_url + "/points/get", headers=peer_key, timeout=120),
        )
        print("\n| body | system | /health p50 ms | p99 ms | worst ms | worst vs peer |")
        print("|---|---|---|---|---|---|")
        if args.only in COMPACTS:
            compacting(bkg, args.rounds, chunk)
        for name, (ours, theirs) in cases.items():
            if args.only not in name:
                continue
            peer_lat = probed(peer_url, theirs, args.rounds)
            our_lat = probed(gw.url, ours, args.rounds)
            print(row(name, "bkg", our_lat, max(peer_lat)))
            print(row(name, "FastAPI (peer)", peer_lat, max(peer_lat)))
    finally:
        gw.stop()
        peer.terminate()
        peer.wait(10)


if __name__ == "__main__":
    main()
