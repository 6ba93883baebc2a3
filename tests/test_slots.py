"""Request slots mean work running, on a real gateway and worker: a request that times out answers 504 at once
but keeps its slot until the worker really finishes; a health check never queues behind busy slots."""

from __future__ import annotations

import threading
import time
from typing import Any

from gateway_harness import Gateway


def test_a_timed_out_request_holds_its_slot_until_the_work_ends(gw: Gateway) -> None:
    c = gw.client()
    r = c.put("/api/plugins/sysinfo/config", json={"config": {"request_timeout": 1, "max_concurrent": 1}})
    assert r.status_code == 200 and r.json()["status"]["state"] == "running"
    t0 = time.monotonic()
    r = c.post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 3})
    timed_out = time.monotonic()
    assert r.status_code == 504 and "did not answer within 1s" in r.json()["error"]["message"]
    assert timed_out - t0 < 2.5  # the caller is answered at the timeout, not when the work ends
    r = c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={})
    assert r.status_code == 200
    assert time.monotonic() - t0 >= 2.8  # the next request ran only once the sleeping one had finished


def test_health_does_not_queue_behind_busy_slots(gw: Gateway) -> None:
    c = gw.client()
    r = c.put("/api/plugins/sysinfo/config", json={"config": {"request_timeout": 30, "max_concurrent": 1}})
    assert r.status_code == 200
    ended: dict[str, Any] = {}

    def busy() -> None:
        ended["sleep"] = gw.client().post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 3}).json()
        ended["at"] = time.monotonic()

    t = threading.Thread(target=busy)
    t.start()
    time.sleep(0.5)  # the sleep holds the only slot now
    health = c.get("/api/plugins/sysinfo/health")
    answered = time.monotonic()
    t.join()
    assert health.status_code == 200 and health.json()["ok"] is True
    assert answered < ended["at"] and ended["sleep"]["slept"] >= 2.9
