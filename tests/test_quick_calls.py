"""A short read-only call a dashboard polls answers while long work holds every request slot of its plugin (a
`quick` capability, as llmserver's model list is: `test_llmserver_slots.py`): candle's stats while a run embeds
with its one slot; a real gateway, the real embedding model. (sysinfo's facts stay a plain call: the runtime's
tests use them to probe the slots.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_harness import Gateway, configured, start_gateway
from helpers import on_thread

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("quick") / "data", plugins=["candle"])
    yield g
    g.stop()


def hold_the_slot(gw: Gateway) -> None:
    """Wait until a call of candle runs (its telemetry's `in_flight`), then check it holds the one slot: another
    run is refused (the queue holds none)."""
    deadline = time.monotonic() + 60
    while gw.client().get("/api/plugins/candle/telemetry").json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = gw.client().post("/api/plugins/candle/invoke/candle.run", json={"inputs": ["x"]})
    assert r.status_code == 429, r.text


def test_candle_stats_answer_while_a_run_holds_its_one_slot(gw: Gateway) -> None:
    # long enough to outlast the calls below on a loaded machine (6,000 held the slot ~90 s in CI, 2,000 ~30 s)
    texts = [f"sentence number {i} about a small cat and a diesel engine" for i in range(2000)]
    warm = {"model_id": DEFAULT_EMBEDDER, "inputs": ["warm"]}
    with configured(gw, "candle", max_concurrent=1, max_queue=0), gw.client() as slow:
        assert slow.post("/api/plugins/candle/invoke/candle.run", json=warm).status_code == 200
        slow.timeout = httpx.Timeout(300)
        t, answers = on_thread(
            lambda: slow.post("/api/plugins/candle/invoke/candle.run", json={**warm, "inputs": texts})
        )
        hold_the_slot(gw)
        stats = gw.client().post("/api/plugins/candle/invoke/candle.stats", json={})
        assert stats.status_code == 200, stats.text
        assert DEFAULT_EMBEDDER in [m["model_id"] for m in stats.json()["loaded"]]
        assert t.is_alive(), "the run ended before the stats came: nothing shown"  # answered meanwhile
        t.join(300)
        assert answers[0].status_code == 200 and len(answers[0].json()["embeddings"]) == len(texts)
