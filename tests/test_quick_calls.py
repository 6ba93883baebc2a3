"""A short read-only call a dashboard polls answers while long work holds every request slot of its plugin (a
`quick` capability, as llmserver's model list is: `test_llmserver_slots.py`): candle's stats while a run embeds
with its one slot; a real gateway, the real embedding model. (sysinfo's facts stay a plain call: the runtime's
tests use them to probe the slots.)"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import Gateway, start_gateway

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("quick") / "data", plugins=["candle"])
    yield g
    g.stop()


@contextlib.contextmanager
def configured(gw: Gateway, plugin: str, **changes: Any) -> Iterator[None]:
    """A plugin's settings changed for a while (its worker starts again with them, and again after)."""
    c = gw.client()
    cfg = c.get(f"/api/plugins/{plugin}/config").json()["config"]
    c.put(f"/api/plugins/{plugin}/config", json={"config": {**cfg, **changes}}).raise_for_status()
    try:
        yield
    finally:
        c.put(f"/api/plugins/{plugin}/config", json={"config": cfg}).raise_for_status()


def in_background(gw: Gateway, path: str, body: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    """POST `body` to `path` on a thread of its own; the answer lands in the list."""
    answers: list[Any] = []

    def call() -> None:
        with gw.client() as c:
            c.timeout = 300
            answers.append(c.post(path, json=body))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    return t, answers


def hold_every_slot(gw: Gateway, plugin: str, calls: int) -> None:
    """Wait until `calls` calls of `plugin` run (its telemetry's `in_flight`), then check they hold every slot: one
    more call of the long kind is refused (the queue holds none)."""
    deadline = time.monotonic() + 60
    while gw.client().get(f"/api/plugins/{plugin}/telemetry").json()["in_flight"] < calls:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = gw.client().post(f"/api/plugins/{plugin}/invoke/candle.run", json={"inputs": ["x"]})
    assert r.status_code == 429, r.text


def test_candle_stats_answer_while_a_run_holds_its_one_slot(gw: Gateway) -> None:
    texts = [f"sentence number {i} about a small cat and a diesel engine" for i in range(6000)]
    warm = {"model_id": DEFAULT_EMBEDDER, "inputs": ["warm"]}
    with configured(gw, "candle", max_concurrent=1, max_queue=0):
        assert gw.client().post("/api/plugins/candle/invoke/candle.run", json=warm).status_code == 200
        t, answers = in_background(gw, "/api/plugins/candle/invoke/candle.run", {**warm, "inputs": texts})
        hold_every_slot(gw, "candle", 1)
        stats = gw.client().post("/api/plugins/candle/invoke/candle.stats", json={})
        assert stats.status_code == 200, stats.text
        assert DEFAULT_EMBEDDER in [m["model_id"] for m in stats.json()["loaded"]]
        assert t.is_alive(), "the run ended before the stats came: nothing shown"  # answered meanwhile
        t.join(300)
        assert answers[0].status_code == 200 and len(answers[0].json()["embeddings"]) == len(texts)
