"""A plugin on its way back is said so, and a config change always reaches the worker: a real gateway with sysinfo
in a worker. Found by a review: during a restart's stop, and after a worker crash until the supervisor's restart,
a call's 503 had no Retry-After; a config change made while the plugin was starting was saved and shown, but the
worker being started kept the old settings (a pool of the old size)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest
from gateway_harness import Gateway, start_gateway, wait_for


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("runtime") / "data", plugins=["sysinfo"])
    wait_for(lambda: state(g) == "running", 60)
    yield g
    g.stop()


def state(g: Gateway) -> str:
    return str(g.client().get("/api/plugins/sysinfo/status").json()["state"])


def facts(g: Gateway) -> httpx.Response:
    return g.client().post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={})


def test_a_plugin_on_its_way_back_answers_503_with_a_retry_after(gw: Gateway) -> None:
    c = gw.client()
    # a restart asked for, its stop waiting for a call in flight (a stop lets running work end first)
    busy = threading.Thread(target=lambda: gw.client().post("/api/plugins/sysinfo/invoke/sysinfo.sleep",
                                                             json={"seconds": 3}))  # fmt: skip
    busy.start()
    wait_for(lambda: c.get("/api/plugins/sysinfo/telemetry").json()["in_flight"] >= 1, 10, every=0.05)
    restart = threading.Thread(target=lambda: gw.client().post("/api/plugins/sysinfo/restart"))
    restart.start()
    wait_for(lambda: state(gw) == "stopping", 10, every=0.02)
    r = facts(gw)
    assert r.status_code == 503 and "stopping" in r.json()["error"]["message"], r.text
    assert float(r.headers["retry-after"]) > 0 and r.json()["error"]["retry_after"] > 0
    restart.join(30)
    busy.join(30)
    wait_for(lambda: state(gw) == "running", 30)
    # a worker that died, until the supervisor starts it again
    os.kill(c.get("/api/plugins/sysinfo/status").json()["pid"], signal.SIGKILL)
    wait_for(lambda: state(gw) == "error", 10, every=0.02)
    r = facts(gw)
    assert r.status_code == 503 and "restarting in" in r.json()["error"]["message"], r.text
    assert float(r.headers["retry-after"]) >= 1
    wait_for(lambda: state(gw) == "running", 30)
    assert facts(gw).status_code == 200


def test_a_config_change_while_starting_reaches_the_worker(gw: Gateway) -> None:
    c = gw.client()
    base = c.get("/api/plugins/sysinfo/config").json()["config"]
    c.put("/api/plugins/sysinfo/config", json={"config": {**base, "max_concurrent": 1}}).raise_for_status()
    wait_for(lambda: state(gw) == "running", 30)
    c.post("/api/plugins/sysinfo/stop").raise_for_status()
    start = threading.Thread(target=lambda: gw.client().post("/api/plugins/sysinfo/start"))
    start.start()
    wait_for(lambda: state(gw) == "starting", 10, every=0.005)
    # disk_path is the worker's own (it reports that folder's disk); the limits are the gateway's
    new = {**base, "max_concurrent": 3, "request_timeout": 2.5, "disk_path": "/dev/shm"}
    r = c.put("/api/plugins/sysinfo/config", json={"config": new}).json()
    start.join(30)
    assert r["restarted"] is True and r["status"]["state"] == "running", r
    assert shutil.disk_usage("/dev/shm").total != shutil.disk_usage(gw.data_dir).total  # else it shows nothing
    assert facts(gw).json()["disk_total"] == shutil.disk_usage("/dev/shm").total
    # three calls of 1 s at once: three slots (of one, the third would wait 2 s: a 504)
    got: list[int] = []

    def one() -> None:
        got.append(gw.client().post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 1}).status_code)

    calls = [threading.Thread(target=one) for _ in range(3)]
    for t in calls:
        t.start()
    for t in calls:
        t.join(30)
    assert got == [200, 200, 200]
    c.put("/api/plugins/sysinfo/config", json={"config": base}).raise_for_status()
