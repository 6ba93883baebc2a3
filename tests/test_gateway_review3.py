"""Review 3 of the gateway, on a real gateway (served as a Hub service too, so its routes also answer under the
service prefix): a 405's `Allow` names every method of the path, and a WebSocket subscription names a plugin (or a
job kind) that events can carry, or is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

PREFIX = "/services/bkg"
HUB_ENV = {  # a Hub service's environment; nothing answers at the Hub's URL (bkg keys never ask it)
    "JUPYTERHUB_SERVICE_NAME": "bkg",
    "JUPYTERHUB_SERVICE_PREFIX": PREFIX + "/",
    "JUPYTERHUB_API_TOKEN": "t" * 32,
    "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("review3") / "data", env=HUB_ENV, plugins=["sysinfo"])
    try:
        yield g
    finally:
        g.stop()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/collections/docs", "DELETE, GET, HEAD, PATCH"),
        ("PUT", "/api/jobs", "GET, HEAD, POST"),
        ("POST", "/api/jobs/schedules/x", "DELETE, GET, HEAD, PATCH"),
        ("GET", "/api/plugins/sysinfo/invoke/sysinfo.facts", "POST"),  # one method (the invoke fast path's route)
    ],
)
def test_a_405_allows_every_method_of_the_path(gw: Gateway, method: str, path: str, allow: str) -> None:
    c = gw.client()
    for prefix in ("", PREFIX):  # as the Hub's proxy forwards it too
        r = c.request(method, prefix + path)
        assert r.status_code == 405, r.text
        assert r.headers["allow"] == allow, (prefix, r.headers)
        error = r.json()["error"]
        assert error["code"] == "method_not_allowed"
        assert error["message"] == f"this route does not take that method: {method} {prefix}{path} (it takes {allow})"
    for other in allow.split(", "):  # each method said is one the path takes
        assert c.request(other, path, json={}).status_code != 405, other


def _answer(ws: ClientConnection) -> dict[str, Any]:
    """The next ack or error on the socket (events in between skipped)."""
    while True:
        msg: dict[str, Any] = json.loads(ws.recv(timeout=10))
        if msg["type"] in ("ack", "error"):
            return msg


def test_a_subscription_names_what_events_carry(gw: Gateway) -> None:
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={ADMIN_KEY}") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "bootstrap"
        for topic, named, words in (
            ("logs", "nope", "this gateway hosts: sysinfo"),
            ("status", "sysinf", "did you mean 'sysinfo'?"),
            ("telemetry", "brainml", "brainml"),  # a plugin this gateway does not host: no event ever names it
            ("jobs", "sysinfo", "did you mean 'sysinfo.survey'?"),  # a job's event names its kind
        ):
            ws.send(json.dumps({"action": "sub", "topic": topic, "plugin": named}))
            msg = _answer(ws)
            assert msg["type"] == "error", (topic, named, msg)
            assert msg["payload"]["field"] == "plugin", msg
            assert msg["payload"]["message"].startswith("plugin: ") and words in msg["payload"]["message"], msg
            # letting go of a name is always fine (a plugin stopped since the socket subscribed is no mistake)
            ws.send(json.dumps({"action": "unsub", "topic": topic, "plugin": named}))
            assert _answer(ws)["type"] == "ack"
        # the socket is still open, and takes what is there
        for topic, named in (("logs", "sysinfo"), ("status", None), ("jobs", "sysinfo.survey")):
            ws.send(json.dumps({"action": "sub", "topic": topic, "plugin": named}))
            assert _answer(ws) == {"type": "ack", "payload": {"action": "sub", "topic": topic, "plugin": named}}
        # and a job of that kind comes on the subscription that names it
        r = gw.client().post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 1, "every_s": 0.01})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg["type"] == "jobs" and msg["payload"]["id"] == job_id:
                assert msg["plugin"] == "sysinfo.survey"
                break
