"""Read paths honour scopes, on a real gateway: a job and its result are its owner's and an auditor's (REST and
the WebSocket `jobs` topic); loading or unloading an LLM is models:write; a route or a plugin that runs an
embedding model needs llm:use, whichever way it asks."""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from gateway_harness import Gateway, wait_for
from websockets.sync.client import connect as ws_connect


def _key(gw: Gateway, username: str, role: str) -> httpx.Client:
    admin = gw.client()
    u = admin.post("/admin/users", json={"username": username, "role": role}).json()
    return gw.client(admin.post("/admin/keys", json={"name": username, "user_id": u["id"]}).json()["key"])


def _job_events(gw: Gateway, token: str, seconds: float) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={token}") as ws:
        ws.recv(timeout=10)  # bootstrap
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = json.loads(ws.recv(timeout=max(0.05, deadline - time.monotonic())))
            except TimeoutError:
                break
            if msg["type"] == "jobs":
                seen.append(msg["payload"])
    return seen


def test_a_job_is_its_owners_and_an_auditors(gw: Gateway) -> None:
    ann, bob = _key(gw, "ann", "developer"), _key(gw, "bob", "developer")
    admin = gw.client()
    r = ann.post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 3, "every_s": 0.3})
    assert r.status_code == 202
    job = r.json()["job"]
    assert job["owner"] == "ann"
    bob_token = bob.headers["authorization"][7:]
    with ThreadPoolExecutor(2) as pool:  # bob and the admin watch the jobs topic while ann's job runs
        bob_events = pool.submit(_job_events, gw, bob_token, 2.0)
        admin_events = pool.submit(_job_events, gw, admin.headers["authorization"][7:], 2.0)
        done = wait_for(lambda: ann.get(f"/api/jobs/{job['id']}").json()["state"] == "done", timeout=30)
        assert done
        assert not [e for e in bob_events.result() if e["id"] == job["id"]]
        assert [e for e in admin_events.result() if e["id"] == job["id"]]
    assert len(ann.get(f"/api/jobs/{job['id']}").json()["result"]["cpu_percent"]) == 3
    r = bob.get(f"/api/jobs/{job['id']}")
    assert r.status_code == 404 and job["id"] in r.json()["error"]["message"]
    assert bob.post(f"/api/jobs/{job['id']}/cancel").status_code == 404
    assert job["id"] not in {j["id"] for j in bob.get("/api/jobs").json()["jobs"]}
    assert job["id"] in {j["id"] for j in ann.get("/api/jobs").json()["jobs"]}
    assert admin.get(f"/api/jobs/{job['id']}").json()["owner"] == "ann"  # admin:audit sees every job


def test_loading_a_model_is_models_write(gw: Gateway) -> None:
    user = _key(gw, "lena", "developer")
    admin = gw.client()
    admin.post("/admin/roles", json={"name": "chatter", "scopes": ["llm:use", "plugins:read"]}).raise_for_status()
    chatter = _key(gw, "carl", "chatter")
    for cap in ("llm.load", "llm.unload"):
        r = chatter.post(f"/api/plugins/llmserver/invoke/{cap}", json={"model": "any"})
        assert r.status_code == 403 and "models:write" in r.json()["error"]["message"], r.text
    r = user.post("/api/plugins/llmserver/invoke/llm.unload", json={"model": "not-loaded"})
    # a developer holds models:write, so the plugin itself answers: there is no such model to unload
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"], r.text


def test_embedding_needs_llm_use_whichever_way_it_asks(gw: Gateway) -> None:
    admin = gw.client()
    admin.post(
        "/api/plugins/brainml/invoke/brainml.index",
        json={"collection": "emb", "documents": [{"text": "basalt is a volcanic rock"}]},
    ).raise_for_status()
    admin.post("/admin/roles", json={"name": "reader", "scopes": ["collections:read", "plugins:read"]})
    reader = _key(gw, "rita", "reader")
    r = reader.post("/api/collections/emb/query", json={"text": "volcanic", "mode": "vector"})
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"]
    r = reader.post("/api/plugins/brainml/invoke/brainml.query", json={"collection": "emb", "query": "volcanic"})
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"]
    r = reader.post("/api/collections/emb/query", json={"text": "volcanic", "mode": "text"})  # no model runs
    assert r.status_code == 200 and r.json()["results"]
    r = reader.post(
        "/api/plugins/brainml/invoke/brainml.query", json={"collection": "emb", "query": "volcanic", "mode": "text"}
    )
    assert r.status_code == 200 and r.json()["results"]


def _next(ws: Any, want: Any, seconds: float = 30) -> dict[str, Any]:
    return _until(ws, want, seconds)[-1]


def _until(ws: Any, want: Any, seconds: float = 30) -> list[dict[str, Any]]:
    """Every message up to and including the first that `want` accepts: none is dropped, so a leak is seen."""
    deadline = time.monotonic() + seconds
    got: list[dict[str, Any]] = []
    while not got or not want(got[-1]):
        got.append(json.loads(ws.recv(timeout=max(0.05, deadline - time.monotonic()))))
    return got


def _restarted(m: dict[str, Any]) -> bool:
    # the restart's last status event: published before its POST returns, so after every event of a job done earlier
    return m["type"] == "status" and m["payload"]["state"] == "running"


def test_an_open_socket_follows_its_caller_s_role_and_key(gw: Gateway) -> None:
    """What a WebSocket sends is decided by who its caller is now, not when it connected: a role that loses
    admin:audit stops seeing others' jobs, and a revoked key's socket is closed at the next event."""
    from websockets.exceptions import ConnectionClosed

    from bkg_kernel.gateway.routes.live import RECHECK_S

    admin = gw.client()
    assert admin.post("/admin/roles", json={"name": "watcher", "scopes": ["plugins:read", "admin:audit"]}).is_success
    user = admin.post("/admin/users", json={"username": "wendy", "role": "watcher"}).json()
    key = admin.post("/admin/keys", json={"name": "wendy", "user_id": user["id"]}).json()
    ann = _key(gw, "annie", "developer")

    def survey() -> str:
        r = ann.post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 2, "every_s": 0.2})
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job"]["id"]
        wait_for(lambda: ann.get(f"/api/jobs/{job_id}").json()["state"] == "done", timeout=30)
        return job_id

    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={key['key']}") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "bootstrap"
        for topic in ("jobs", "status"):
            ws.send(json.dumps({"action": "sub", "topic": topic}))
            assert json.loads(ws.recv(timeout=10))["type"] == "ack"
        first = survey()  # an auditor sees annie's job
        assert admin.post("/api/plugins/sysinfo/restart").is_success
        shown = _until(ws, _restarted)
        assert [m for m in shown if m["type"] == "jobs" and m["payload"]["id"] == first], shown

        assert admin.patch("/admin/roles/watcher", json={"scopes": ["plugins:read"]}).is_success
        time.sleep(RECHECK_S + 0.3)  # past the recheck, so the socket's next event looks at her role again
        second = survey()
        assert admin.post("/api/plugins/sysinfo/restart").is_success  # status events reach her still
        shown = _until(ws, _restarted)
        with contextlib.suppress(TimeoutError):
            while True:
                shown.append(json.loads(ws.recv(timeout=1.0)))
        assert not [m for m in shown if m["type"] == "jobs" and m["payload"]["id"] == second], shown

        assert admin.post(f"/admin/keys/{key['id']}/revoke").is_success
        time.sleep(RECHECK_S + 0.3)
        assert admin.post("/api/plugins/sysinfo/restart").is_success
        with pytest.raises(ConnectionClosed) as closed:
            _next(ws, lambda m: False, seconds=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401, closed.value


def test_the_socket_answers_bad_frames_and_bounds_what_it_holds(gw: Gateway) -> None:
    from websockets.exceptions import ConnectionClosed

    url = gw.url.replace("http", "ws") + f"/ws?token={gw.client().headers['authorization'][7:]}"
    with ws_connect(url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "bootstrap"
        for frame, words in (
            (b"\x00\x01", "binary frames"),
            ("[1, 2]", "JSON object"),
            ('"sub"', "JSON object"),
            ("{nope", "not JSON"),
            (json.dumps({"action": "sub", "topic": "logs", "plugin": [1]}), "plugin must be"),
            (json.dumps({"action": "sub", "topic": "logs", "plugin": "x" * 5000}), "plugin must be"),
            (json.dumps({"action": "drop", "topic": "logs"}), "action: sub|unsub"),
        ):
            ws.send(frame)
            msg = _next(ws, lambda m: m["type"] in ("error", "ack"), seconds=10)
            assert msg["type"] == "error" and words in msg["payload"]["message"], (frame, msg)
        # what a socket holds is bounded by what the gateway has: a made-up name is refused, never held (a cap of
        # 64 names bounded it before, and would have refused a gateway's own plugins and job kinds past the 64th)
        for i in range(100):
            ws.send(json.dumps({"action": "sub", "topic": "logs", "plugin": f"p{i}"}))
            msg = _next(ws, lambda m: m["type"] in ("error", "ack"), seconds=10)
            assert msg["type"] == "error" and msg["payload"]["field"] == "plugin", msg
        for action in ("sub", "unsub", "sub"):
            ws.send(json.dumps({"action": action, "topic": "logs", "plugin": "sysinfo"}))
            assert _next(ws, lambda m: m["type"] in ("error", "ack"), seconds=10)["type"] == "ack"
    with ws_connect(url, max_size=None) as ws:  # a frame over the limit closes that socket, nothing else
        ws.recv(timeout=10)
        ws.send("x" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            _next(ws, lambda m: False, seconds=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert gw.client().get("/health").status_code == 200
