"""A plugin's limits (request_timeout, max_concurrent, max_queue, memory_limit_mb) change without a restart: the
gateway holds them, so the worker and the models it has loaded stay; a setting the plugin itself reads still
restarts it. The request slots resize in place, counting the calls already running. A real gateway with sysinfo
in a worker, and the slots on real threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_harness import Gateway, start_gateway, wait_for
from helpers import on_thread

from bkg_kernel.errors import TooManyRequests
from bkg_kernel.runtime.slots import Slots


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("live") / "data", plugins=["sysinfo"])
    wait_for(lambda: status(g)["state"] == "running", 60)
    yield g
    g.stop()


def status(g: Gateway) -> dict[str, object]:
    return dict(g.client().get("/api/plugins/sysinfo/status").json())


def put(g: Gateway, **changes: object) -> dict[str, object]:
    c = g.client()
    cfg = c.get("/api/plugins/sysinfo/config").json()["config"]
    r = c.put("/api/plugins/sysinfo/config", json={"config": {**cfg, **changes}})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sleep(g: Gateway, seconds: float) -> httpx.Response:
    return g.client().post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": seconds})


def running(g: Gateway, n: int) -> None:
    wait_for(lambda: g.client().get("/api/plugins/sysinfo/telemetry").json()["in_flight"] >= n, 20, every=0.02)


def test_limits_apply_at_once_and_restart_nothing(gw: Gateway) -> None:
    pid = status(gw)["pid"]
    r = put(gw, max_concurrent=1, max_queue=0, request_timeout=20)
    assert r["restarted"] is False and r["config"]["max_concurrent"] == 1, r  # type: ignore[index]
    t1, first = on_thread(lambda: sleep(gw, 5))
    running(gw, 1)
    refused = sleep(gw, 0)
    assert refused.status_code == 429 and "1 request slots" in refused.json()["error"]["message"], refused.text
    # one more slot, while the first call still holds its own: the next call runs beside it
    assert put(gw, max_concurrent=2)["restarted"] is False
    t0 = time.monotonic()
    assert sleep(gw, 0.2).status_code == 200 and t1.is_alive(), "waited for the first call"
    assert time.monotonic() - t0 < 2.5
    # a shorter request_timeout holds for the next call
    assert put(gw, request_timeout=1)["restarted"] is False
    slow = sleep(gw, 2.5)
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout", slow.text
    t1.join(30)
    assert first[0].status_code == 200
    wait_for(lambda: gw.client().get("/api/plugins/sysinfo/telemetry").json()["in_flight"] == 0, 20)
    st = status(gw)
    assert st["pid"] == pid and st["state"] == "running" and st["restarts"] == 0, st
    put(gw, max_concurrent=4, max_queue=64, request_timeout=30)


def test_fewer_slots_count_the_calls_already_running(gw: Gateway) -> None:
    put(gw, max_concurrent=2, max_queue=0, request_timeout=20)
    calls = [on_thread(lambda s=s: sleep(gw, s)) for s in (1.0, 4.0)]
    running(gw, 2)
    assert put(gw, max_concurrent=1)["restarted"] is False
    calls[0][0].join(30)  # one of the two has ended; the other still holds the one slot left
    assert calls[0][1][0].status_code == 200 and calls[1][0].is_alive()
    refused = sleep(gw, 0)
    assert refused.status_code == 429, refused.text
    calls[1][0].join(30)
    assert calls[1][1][0].status_code == 200
    assert sleep(gw, 0).status_code == 200  # and now the slot is free
    put(gw, max_concurrent=4, max_queue=64, request_timeout=30)


def test_a_setting_the_plugin_reads_restarts_its_worker(gw: Gateway) -> None:
    pid = status(gw)["pid"]
    r = put(gw, disk_path="/dev/shm", max_concurrent=3)
    assert r["restarted"] is True, r
    wait_for(lambda: status(gw)["state"] == "running", 30)
    assert status(gw)["pid"] != pid
    put(gw, disk_path=".", max_concurrent=4)


def test_slots_resize_in_place() -> None:
    slots = Slots("p", 2, 5)
    asyncio.run(slots.take(None))
    asyncio.run(slots.take(None))
    woken: list[str] = []

    def wait(name: str) -> None:
        slots.take_blocking(10)
        woken.append(name)

    waiters = [threading.Thread(target=wait, args=(n,)) for n in ("a", "b")]
    for i, t in enumerate(waiters, 1):
        t.start()
        wait_for(lambda: slots.queued == i, 5, every=0.01)  # noqa: B023 (called at once)
    slots.resize(3, 5)  # one more slot: the first in the queue gets it at once
    wait_for(lambda: woken == ["a"], 5, every=0.01)
    slots.resize(1, 5)  # three taken, one allowed: two releases free nothing, the third hands one to "b"
    slots.release()
    slots.release()
    time.sleep(0.1)
    assert woken == ["a"] and slots.queued == 1
    slots.release()
    wait_for(lambda: woken == ["a", "b"], 5, every=0.01)
    slots.resize(1, 0)  # "b" holds the one slot; the queue takes none now
    with pytest.raises(TooManyRequests):
        slots.take_blocking(1)
    slots.release()
    assert slots.free == 1
    for t in waiters:
        t.join(5)
