"""Request slots mean work running, on a real gateway and worker: a request that times out answers 504 at once
but keeps its slot until the worker really finishes; a health check never queues behind busy slots."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway_harness import Gateway, wait_for

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin
GATEWAY_ENV = {"BKG_HEARTBEAT_TIMEOUT_S": "3", "BKG_HUNG_RESTART_S": "6"}  # a silent worker found in seconds


def test_a_timed_out_request_holds_its_slot_until_the_work_ends(gw: Gateway) -> None:
    c = gw.client()
    r = c.put("/api/plugins/sysinfo/config", json={"config": {"request_timeout": 1, "max_concurrent": 1}})
    assert r.status_code == 200 and r.json()["status"]["state"] == "running"
    t0 = time.monotonic()
    r = c.post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 3})
    assert r.status_code == 504 and "did not answer within 1s" in r.json()["error"]["message"]
    # the next request waits for the slot within its own timeout (the wait counts against it): a 504 that says so.
    # The slot is still taken, so the caller above was answered at the timeout, not when the work ended (a call
    # whose work is done gives its slot back before it answers)
    r = c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={})
    assert r.status_code == 504 and "no free request slot for 1s" in r.json()["error"]["message"]
    wait_for(lambda: c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={}).status_code == 200, timeout=15)
    assert time.monotonic() - t0 >= 2.8  # a request ran only once the sleeping one had finished


def test_health_does_not_queue_behind_busy_slots(gw: Gateway) -> None:
    c = gw.client()
    r = c.put("/api/plugins/sysinfo/config", json={"config": {"request_timeout": 30, "max_concurrent": 1}})
    assert r.status_code == 200
    ended: dict[str, Any] = {}

    def busy() -> None:
        ended["sleep"] = gw.client().post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 3}).json()

    t = threading.Thread(target=busy)
    t.start()
    wait_for(lambda: c.get("/api/plugins/sysinfo/telemetry").json()["in_flight"] == 1, every=0.02)  # the only slot
    health = c.get("/api/plugins/sysinfo/health")
    still_sleeping = t.is_alive()  # health answered while the sleep held the slot, not after it
    t.join()
    assert health.status_code == 200 and health.json()["ok"] is True
    assert still_sleeping and ended["sleep"]["slept"] >= 2.9


def test_streams_cancelled_at_random_moments_leave_the_plugin_answering(gw: Gateway) -> None:
    """Hundreds of job streams, each cancelled at a random moment (before, during or after its last chunk):
    no reader thread dies, no slot leaks, and the plugin still answers."""
    c = gw.client()
    c.put("/api/plugins/sysinfo/config", json={"config": {"max_concurrent": 4}}).raise_for_status()
    rng = random.Random(7)
    jobs: list[str] = []

    def one(i: int) -> str:
        cl = gw.client()
        r = cl.post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 3, "every_s": 0.01})
        job_id: str = r.json()["job"]["id"]
        time.sleep(rng.random() * 0.05)
        cl.post(f"/api/jobs/{job_id}/cancel")  # 200, or 409 when it already ended
        return job_id

    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(one, range(200)))
    states = Counter(wait_for(lambda j=j: _ended(c, j)) for j in jobs)
    assert set(states) <= {"done", "cancelled"} and states["cancelled"] > 0, states
    status = c.get("/api/plugins/sysinfo/status").json()
    assert status["state"] == "running"
    assert c.get("/api/plugins/sysinfo/telemetry").json()["in_flight"] == 0
    assert c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={}).status_code == 200


def _ended(c: Any, job_id: str) -> str | None:
    state: str = c.get(f"/api/jobs/{job_id}").json()["state"]
    return state if state in ("done", "cancelled", "failed") else None


def test_a_silent_worker_is_restarted(gw: Gateway) -> None:
    """A worker that stops sending heartbeats (frozen with SIGSTOP) is marked degraded, then killed and started
    again (hung_restart_s, 6 s here; a hung worker gets no grace period to stop)."""
    c = gw.client()
    old = c.get("/api/plugins/sysinfo/status").json()["pid"]
    os.kill(old, signal.SIGSTOP)
    try:
        wait_for(lambda: c.get("/api/plugins/sysinfo/status").json()["state"] == "degraded", timeout=15)
        status = wait_for(
            lambda: (s := c.get("/api/plugins/sysinfo/status").json())["state"] == "running" and s["pid"] != old and s,
            timeout=60,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    assert status["restarts"] >= 1
    lines = c.get("/api/plugins/sysinfo/logs", params={"level": "error"}).json()["lines"]
    assert any("killing the worker" in x["message"] for x in lines)
    assert c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={}).json()["pid"] == status["pid"]
