"""The gateway never waits for the store's lock on its event loop: while a long store operation runs (a snapshot
of a big collection; a long write holds the lock), session logins, audited changes and /health still answer; at the
unit level, auth's hot paths (key and session checks, audit, usage, logout) never take the lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gateway_harness import Gateway

from bkg_kernel.auth import AuthService
from bkg_kernel.store import Store


def test_auth_hot_paths_never_take_the_store_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    auth = AuthService(store)
    u = auth.create_user("sam", "developer", "long enough pw")
    _, key = auth.create_key(u["id"], "k")
    session, _ = auth.login("sam", "long enough pw", "10.0.0.1")
    p = auth.authenticate(key)
    done: list[str] = []

    def hot() -> None:
        for _ in range(3):
            auth.authenticate(key)
            auth.authenticate(session)
            auth.audit("sam", "probe", "x")
            auth.record_usage(p, "/v1/chat/completions", "m", 3, 4)
            auth._flush(auth.keys[next(iter(auth.keys))])  # noqa: SLF001 - a last-used flush
        auth.logout(session)
        done.append("ok")

    with store._mutex:  # noqa: SLF001 - a long store operation holds the lock
        t = threading.Thread(target=hot)
        t.start()
        t.join(10)  # a deadlock guard, not a timing assertion: the calls must not wait for the lock at all
        assert done == ["ok"], "an auth hot path waited for the store lock"
    rows = auth.list_audit(100, "probe")  # the writer thread wrote them once the lock was free, in order
    assert len(rows) == 3 and [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert auth.usage_report("key")[0]["requests"] == 3
    auth.close()
    store.close()


def test_sessions_and_audited_changes_answer_while_a_big_snapshot_is_made(gw: Gateway) -> None:
    admin = gw.client()
    admin.post("/admin/users", json={"username": "stella", "role": "admin", "password": "long enough pw"})
    session = httpx.post(gw.url + "/auth/login", json={"username": "stella", "password": "long enough pw"}).json()
    s = gw.client(session["token"])
    admin.post("/api/collections", json={"name": "big", "dim": 128}).raise_for_status()
    rng = np.random.default_rng(0)
    for a in range(0, 60_000, 10_000):
        vecs = rng.standard_normal((10_000, 128)).astype(np.float32).round(4)
        pts = [{"id": a + i, "vector": v.tolist(), "payload": {"n": a + i}} for i, v in enumerate(vecs)]
        admin.put("/api/collections/big/points", json={"points": pts}).raise_for_status()
    finished: dict[str, float] = {}

    def snapshot() -> None:
        r = admin.post("/api/collections/big/snapshots")
        finished["snapshot"] = time.monotonic()
        finished["status"] = r.status_code

    t = threading.Thread(target=snapshot)
    t.start()
    answered: list[tuple[float, int]] = []
    while t.is_alive():
        for r in (
            s.get("/auth/me"),  # a session check
            s.put("/api/plugins/sysinfo/config", json={"autostart": True}),  # an audited change
            httpx.get(gw.url + "/health"),
        ):
            answered.append((time.monotonic(), r.status_code))
    t.join()
    assert finished["status"] == 201
    during = [code for at, code in answered if at < finished["snapshot"]]
    assert len(during) >= 6 and set(during) == {200}, answered[:10]
    entries: list[dict[str, Any]] = admin.get("/admin/audit", params={"action": "plugin.config"}).json()["entries"]
    assert sum(e["actor"] == "stella" for e in entries) >= len(during) // 3
