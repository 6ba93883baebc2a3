"""llmserver's slots and books, through a real gateway with the real SmolLM2 GGUF: the model list answers while
generations hold every request slot (its `quick` capability takes none), and a caller who stopped waiting (its
client left, or its request timed out) is booked the tokens the model spent on it, whole answers and embeddings as
streams already were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, configured, start_gateway, wait_for

from bkg_kernel.models.defaults import DEFAULT_LLM

MODEL = DEFAULT_LLM
# a grammar that wants 300 numbers: no end-of-text token until then (tens of seconds of generating on one thread)
COUNT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count."}],
    "max_tokens": 1500,
    "temperature": 0,
    "response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "array", "items": {"type": "integer"}, "minItems": 300}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("llm-slots") / "data", plugins=["llmserver"],
                      env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    yield g
    g.stop()


def health(gw: Gateway) -> dict[str, Any]:
    return dict(gw.client().get("/api/plugins/llmserver/health").json())


def key_usage(gw: Gateway, key_id: str) -> dict[str, Any] | None:
    rows = gw.client().get("/admin/usage", params={"group_by": "key"}).json()["usage"]
    return next((row for row in rows if row["key_id"] == key_id), None)


def new_key(gw: Gateway, name: str) -> dict[str, Any]:
    made: dict[str, Any] = gw.client().post("/admin/keys", json={"name": name, "scopes": ["llm:use"]}).json()
    return made


@pytest.mark.parametrize("slots", [1, 2])
def test_the_model_list_answers_while_every_slot_generates(gw: Gateway, slots: int) -> None:
    """Found by a review: `GET /v1/models` waited for a request slot behind the generations holding all of
    llmserver's `max_concurrent` (the worker's request threads too), as Ollama's `/api/tags` and llama-cpp-python's
    server never make it wait. `llm.models` is now `quick`: it takes no request slot and runs on threads of its
    own, while `max_concurrent` still bounds the generations (one more is refused: the queue holds none)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with (
        configured(gw, "llmserver", max_concurrent=slots, max_queue=0),
        contextlib.ExitStack() as streams,
        gw.client() as c,
    ):
        reading = []  # kept: a line iterator dropped closes its connection (the generation stops)
        for _ in range(slots):  # every slot generating, until its client leaves
            s = streams.enter_context(httpx.Client(base_url=gw.url, headers=headers, timeout=120))
            r = streams.enter_context(s.stream("POST", "/v1/chat/completions", json={**COUNT, "stream": True}))
            assert r.status_code == 200
            reading.append(lines := r.iter_lines())
            assert any('"finish_reason": null' in line for line in lines)  # its first token is out
        busy = c.post("/v1/chat/completions", json={**COUNT, "max_tokens": 2})
        assert busy.status_code == 429, busy.text  # the slots are all taken
        listed = c.get("/v1/models")
        assert listed.status_code == 200 and MODEL in [m["id"] for m in listed.json()["data"]], listed.text
        assert c.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        direct = c.post("/api/plugins/llmserver/invoke/llm.models", json={})
        assert direct.status_code == 200 and MODEL in [m["id"] for m in direct.json()["models"]]
        # answered while the generations still run, not after them
        assert [m["busy"] for m in health(gw)["loaded"] if not m["embedding"]] == [slots]


def test_a_new_max_concurrent_or_timeout_restarts_the_worker_that_reads_them(gw: Gateway) -> None:
    """llmserver's worker makes llama.cpp's contexts per model for `max_concurrent` and times its calls upstream by
    `request_timeout`: a new value of either restarts it (found by a review: taken by the gateway alone, the worker
    kept the old ones); the queue alone, which only the gateway reads, restarts nothing."""
    c = gw.client()
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    pid = c.get("/api/plugins/llmserver/status").json()["pid"]
    try:
        r = c.put("/api/plugins/llmserver/config", json={"config": {**cfg, "max_queue": 5}}).json()
        assert r["restarted"] is False and c.get("/api/plugins/llmserver/status").json()["pid"] == pid, r
        for change in ({"max_concurrent": 3}, {"request_timeout": 100}):
            r = c.put("/api/plugins/llmserver/config", json={"config": {**cfg, **change}}).json()
            assert r["restarted"] is True, (change, r)
            wait_for(lambda: c.get("/api/plugins/llmserver/status").json()["state"] == "running", 120)
            assert c.get("/api/plugins/llmserver/status").json()["pid"] != pid
            pid = c.get("/api/plugins/llmserver/status").json()["pid"]
    finally:
        c.put("/api/plugins/llmserver/config", json={"config": cfg}).raise_for_status()


@pytest.mark.parametrize("way", ["client leaves", "request times out"])
def test_a_whole_answer_nobody_waited_for_is_booked_with_the_tokens_generated(gw: Gateway, way: str) -> None:
    """Found by a review: a non-streamed chat whose client left before the answer (or whose request timed out) was
    stopped and booked nothing, while a stream cut short booked what it had generated. The worker now answers the
    abandoned call with what it generated until it stopped, and the gateway books that to the caller."""
    made = new_key(gw, f"whole-{way}")
    headers = {"Authorization": f"Bearer {made['key']}"}
    warm = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert gw.client().post("/v1/chat/completions", json=warm).status_code == 200  # loaded first (another key)
    cancelled = health(gw)["cancelled"]
    if way == "client leaves":
        with (
            httpx.Client(base_url=gw.url, headers=headers, timeout=2) as gone,
            pytest.raises(httpx.ReadTimeout),  # the client gives up: its connection closes
        ):
            gone.post("/v1/chat/completions", json=COUNT)
    else:
        with (
            configured(gw, "llmserver", request_timeout=2),
            httpx.Client(base_url=gw.url, headers=headers, timeout=60) as c,
        ):
            assert gw.client().post("/v1/chat/completions", json=warm).status_code == 200  # the new worker's too
            cancelled = health(gw)["cancelled"]
            late = c.post("/api/plugins/llmserver/invoke/llm.chat", json=COUNT)
            assert late.status_code == 504, late.text
            row = booked_once_stopped(gw, made["id"], cancelled)  # before the worker restarts with the old settings
    if way == "client leaves":
        row = booked_once_stopped(gw, made["id"], cancelled)
    assert row["requests"] == 1 and row["prompt_tokens"] > 0
    assert 0 < row["completion_tokens"] < 1500  # what was generated until it stopped, not max_tokens


def booked_once_stopped(gw: Gateway, key_id: str, cancelled: int) -> dict[str, Any]:
    """The key's usage, once the worker has stopped the generation (`cancelled` is its count before)."""
    wait_for(lambda: health(gw)["cancelled"] > cancelled, timeout=60)
    row: dict[str, Any] = wait_for(lambda: key_usage(gw, key_id), timeout=30, every=0.25)
    return row


def test_an_embedding_its_client_leaves_is_booked_with_the_tokens_embedded(gw: Gateway) -> None:
    """Found by a review: an abandoned `/v1/embeddings` call booked nothing (it stopped between two batches, or its
    answer came with nobody to book it). What was embedded until it stopped is booked to the caller now."""
    made = new_key(gw, "embed-leaves")
    with configured(gw, "llmserver", n_batch=64), gw.client() as c:
        assert c.post("/v1/embeddings", json={"model": MODEL, "input": "warm"}).status_code == 200  # loaded first
        cancelled = health(gw)["cancelled"]
        texts = [f"text number {i} about apples" for i in range(400)]  # ~a minute of embedding on one thread
        with (
            httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {made['key']}"}, timeout=1.5) as gone,
            pytest.raises(httpx.ReadTimeout),
        ):
            gone.post("/v1/embeddings", json={"model": MODEL, "input": texts})
        wait_for(lambda: health(gw)["cancelled"] > cancelled, timeout=60)
        row = wait_for(lambda: key_usage(gw, made["id"]), timeout=30, every=0.25)
        assert row["requests"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] == 0


def test_a_stream_books_its_usage_once_wherever_it_comes() -> None:
    """Found by a review: the one booking helper both streamed routes share booked only a usage chunk without
    choices, so an upstream server that sends `usage` with its last choice (as some OpenAI-compatible servers do)
    booked nothing. Each way a stream ends books once: the exact usage chunk, else the last usage a chunk carried,
    else the running count of a local generation cut short."""
    from bkg_kernel.runtime.contract import RUNNING_USAGE, StreamUsage

    def run(chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        booked: list[dict[str, Any]] = []
        usage = StreamUsage(booked.append, "m")
        shown = [s for c in chunks if (s := usage.read(dict(c))) is not None]
        usage.close()
        usage.close()  # a second end books nothing more
        return shown, booked

    piece = {"model": "m", "choices": [{"delta": {"content": "a"}, "finish_reason": None}]}
    exact = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    last = {"model": "m", "choices": [{"delta": {}, "finish_reason": "stop"}], "usage": exact}
    shown, booked = run([piece, last])  # an upstream's: usage with the last choice
    assert booked == [{"model": "m", "usage": exact}] and shown[-1]["usage"] == exact
    _, booked = run([piece, {"model": "m", "choices": [], "usage": exact}])  # llmserver's own last chunk
    assert booked == [{"model": "m", "choices": [], "usage": exact}]
    so_far = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    shown, booked = run([{**piece, RUNNING_USAGE: so_far}, {RUNNING_USAGE: so_far}])  # cut short, a count alone
    assert booked == [{"model": "m", "usage": so_far}] and shown == [piece]  # the count never reaches the client
