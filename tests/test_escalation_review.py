"""Found by a security review, each reproduced against a real gateway: a key named like a notebook run's made what
it scheduled outlive it; a key that expires re-enabled a user, whose login outlived it; an auditor without a run's
scopes read what the run printed (its failed cell's error and traceback) and a background job's result; and a
read-only key of a job's owner stopped the job's work."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_for, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"
RUN_NAME = "job run run-000000000000"
# what the failing cell prints: made as it runs, so only its error value and traceback hold it (not its parameters)
LEAK = "import hashlib\nprinted = hashlib.sha256(b'row 7').hexdigest()[:16]\nraise ValueError(f'row 7 is {printed}')"
PRINTED = __import__("hashlib").sha256(b"row 7").hexdigest()[:16]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobroots")
    notebook(root / "ok.ipynb", "n = 1", "print(n)")
    notebook(root / "leak.ipynb", "n = 1", LEAK)
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, roots: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("review") / "data", env={"BKG_JOB_ROOTS": str(roots)},
                      plugins=["sysinfo"])  # fmt: skip
    yield g
    g.stop()


def _user(gw: Gateway, name: str, role: str, password: str | None = None) -> dict[str, Any]:
    body = {"username": name, "role": role, **({"password": password} if password else {})}
    r = gw.client().post("/admin/users", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _key(gw: Gateway, user_id: str, by: str = ADMIN_KEY, **body: Any) -> dict[str, Any]:
    r = gw.client(by).post("/admin/keys", json={"name": "k", "user_id": user_id, **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _login(gw: Gateway, username: str) -> int:
    return httpx.post(gw.url + "/auth/login", json={"username": username, "password": PASSWORD}).status_code


def _field(r: httpx.Response) -> str | None:
    return r.json()["error"].get("field")


def test_no_caller_names_a_key_as_a_runs_and_a_run_key_is_marked_as_one(gw: Gateway) -> None:
    """A key was taken for a notebook run's by its name alone, which anyone making a key could give: a schedule
    made with such a key lived by its parent (or as the user, for good). The name is refused to every caller (422
    naming `name`); a run's key is marked with its run's id when the gateway makes it."""
    admin = gw.client()
    dele = _user(gw, "rk-dele", "admin")
    val = _user(gw, "rk-val", "developer")
    bounded = _key(gw, dele["id"], expires_in_days=1, rate_limit_per_min=100)["key"]
    for by, owner, name in [
        (ADMIN_KEY, None, RUN_NAME),
        (bounded, val["id"], RUN_NAME),
        (ADMIN_KEY, None, " Job run x"),
    ]:
        r = gw.client(by).post("/admin/keys", json={"name": name, **({"user_id": owner} if owner else {})})
        assert r.status_code == 422 and _field(r) == "name", r.text
    assert RUN_NAME not in {k["name"] for k in admin.get("/admin/keys").json()["keys"]}
    ordinary = _key(gw, val["id"], by=bounded, scopes=["jobs:run", "plugins:read"])
    assert ordinary["run_id"] is None
    s = gw.client(ordinary["key"]).post("/api/jobs/schedules", json={"notebook": "ok.ipynb", "cron": "0 3 * * *"})
    assert s.status_code == 201 and s.json()["key_id"] == ordinary["id"], s.text  # lives by the key that made it
    run = wait_run(gw, submit(gw, {"notebook": "ok.ipynb"})["id"])
    keys = {k["name"]: k for k in admin.get("/admin/keys").json()["keys"]}
    assert keys[f"job run {run['id']}"]["run_id"] == run["id"] and keys[f"job run {run['id']}"]["state"] == "revoked"


def test_a_key_named_like_a_run_key_before_the_mark_is_an_ordinary_key(tmp_path: Path, roots: Path) -> None:
    """A key named like a run's before such names were refused is no run key: what it schedules lives by it (a
    run key's schedule lives by the key that started the run, none here: for good), so revoking it turns the
    schedule off at its next fire; and the next start revokes it, as a dead gateway's run keys."""
    from bkg_kernel.auth import AuthService
    from bkg_kernel.jobs.service import JobService
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    auth = AuthService(store)
    now = [1_800_000_000.0]
    svc = JobService(Settings(job_roots=[roots]), store, auth, lambda *a: None, "http://127.0.0.1:9",
                     clock=lambda: now[0])  # fmt: skip
    try:
        u = auth.create_user("ann", "developer", actor="test")
        rec, token = auth.create_key(u["id"], "ann's", ["jobs:run", "plugins:read"], actor="test")
        with auth.mutex:  # named so before the name was refused: nothing marks it
            auth.con.execute("UPDATE api_keys SET name = ? WHERE id = ?", [RUN_NAME, rec["id"]])
        auth.key_ids[rec["id"]].name = RUN_NAME
        made, _ = auth.create_key(u["id"], "job run run-111111111111", actor="jobs")  # the gateway's own: marked
        assert made["run_id"] == "run-111111111111" and auth.key_ids[rec["id"]].run_id is None

        async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            svc.queue = asyncio.Queue()  # no dispatcher: a fired run stays queued
            s = await svc.add_schedule(auth.authenticate(token), {"notebook": "ok.ipynb", "cron": "* * * * *"})
            auth.revoke_key(rec["id"], actor="test")
            now[0] += 61
            return s, await svc.tick()

        s, fired = asyncio.run(scenario())
        assert s["key_id"] == rec["id"], s  # the key that made it, not "its run's parent" (None: the user, for good)
        assert fired[0]["state"] == "failed" and fired[0]["error"]["ename"] == "KeyGone", fired
        assert svc.history.schedule(s["id"])["enabled"] is False
        legacy, _ = auth.create_key(u["id"], "old", actor="test")
        with auth.mutex:
            auth.con.execute("UPDATE api_keys SET name = ? WHERE id = ?", ["job run run-222222222222", legacy["id"]])
        auth.key_ids[legacy["id"]].name = "job run run-222222222222"
        svc._revoke_stale_keys()  # noqa: SLF001 (what a start does)
        assert auth.live_key(legacy["id"]) is None and auth.live_key(made["id"]) is None
    finally:
        auth.close()
        store.close()


def test_a_key_that_expires_or_is_limited_does_not_enable_a_user(gw: Gateway) -> None:
    """Enabling a disabled user gives back their login (a password) and their keys for good: like raising a role
    or setting a password, it is refused to a key that expires or is rate-limited (403 naming `disabled`)."""
    admin = gw.client()
    ops = _user(gw, "en-ops", "admin", password=PASSWORD)
    ana = _user(gw, "en-ana", "admin")
    assert admin.patch(f"/admin/users/{ops['id']}", json={"disabled": True}).status_code == 200
    for bounds in ({"expires_in_days": 1 / 24}, {"rate_limit_per_min": 100}):
        k = gw.client(_key(gw, ana["id"], **bounds)["key"])
        r = k.patch(f"/admin/users/{ops['id']}", json={"disabled": False})
        assert r.status_code == 403 and _field(r) == "disabled" and "expires or is rate-limited" in r.text, r.text
        assert _login(gw, "en-ops") == 401
        other = _user(gw, f"en-v{len(str(bounds))}", "viewer")
        assert k.patch(f"/admin/users/{other['id']}", json={"disabled": True}).status_code == 200  # taking away: yes
    whole = gw.client(_key(gw, ana["id"])["key"])  # no expiry, no limit: it may
    assert whole.patch(f"/admin/users/{ops['id']}", json={"disabled": False}).status_code == 200
    assert _login(gw, "en-ops") == 200


def test_an_auditor_without_a_jobs_scopes_does_not_read_what_it_printed(gw: Gateway) -> None:
    """An auditor sees every job, but what a run printed (its failed cell's source, error value and traceback, and
    the message holding them) and a background job's result, error and messages are for its owner and who holds
    the scopes it ran with: over GET /api/jobs/{id}, GET /api/jobs and the WebSocket topic `jobs`."""
    from websockets.sync.client import connect as ws_connect

    admin = gw.client()
    assert admin.post("/admin/roles", json={"name": "auditor", "scopes": ["admin:audit", "plugins:read"]}).is_success
    dev = _user(gw, "au-dev", "developer")
    dk = _key(gw, dev["id"])["key"]
    ak = _key(gw, _user(gw, "au-aud", "auditor")["id"])["key"]
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={ak}") as ws:
        assert json.loads(ws.recv(10))["type"] == "bootstrap"
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "ack"
        run = submit(gw, {"notebook": "leak.ipynb"}, key=dk)
        job = gw.client(dk).post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 2, "every_s": 0.05})
        assert job.status_code == 202, job.text
        job_id = job.json()["job"]["id"]
        events: dict[str, list[dict[str, Any]]] = {run["id"]: [], job_id: []}
        deadline = time.monotonic() + 120
        while not all(e and e[-1]["finished"] for e in events.values()):
            assert time.monotonic() < deadline, events
            msg = json.loads(ws.recv(120))
            if msg["type"] == "jobs" and msg["payload"]["id"] in events:
                events[msg["payload"]["id"]].append(msg["payload"])
    owners = {c: gw.client(c).get(f"/api/jobs/{run['id']}").json() for c in (dk, ADMIN_KEY)}
    for seen in owners.values():  # its owner, and an admin holding every scope it ran with
        assert seen["state"] == "failed" and PRINTED in seen["error"]["evalue"] and "hashlib" in seen["error"]["source"]
    aud = gw.client(ak)
    r = aud.get(f"/api/jobs/{run['id']}").json()
    assert r["error"]["ename"] == "ValueError" and r["error"]["cell_index"] == owners[dk]["error"]["cell_index"]
    assert r["error"]["evalue"] == "" and r["error"]["traceback"] == "" and r["error"]["source"] is None, r
    assert r["message"] == "failed: ValueError"
    assert aud.get(f"/api/jobs/{run['id']}/output").status_code == 403
    listed = aud.get("/api/jobs").text
    assert run["id"] in listed and job_id in listed
    wait_for(lambda: gw.client(dk).get(f"/api/jobs/{job_id}").json()["finished"], 60)
    mine = gw.client(dk).get(f"/api/jobs/{job_id}").json()
    assert mine["state"] == "done" and len(mine["result"]["cpu_percent"]) == 2
    theirs = aud.get(f"/api/jobs/{job_id}").json()
    assert theirs["state"] == "done" and theirs["result"] is None and theirs["message"] == "", theirs
    text = json.dumps(events) + aud.get("/api/jobs").text + json.dumps(theirs)
    assert PRINTED not in text and "hashlib" not in text and "% CPU" not in text and "cpu_percent" not in text
    assert all("scopes" not in e and "owner_id" not in e for e in events[run["id"]])
    assert events[run["id"]][-1]["state"] == "failed" and events[job_id][-1]["state"] == "done"


def test_a_read_only_key_does_not_cancel_its_owners_background_job(gw: Gateway) -> None:
    """Cancelling a background job stops its work: it takes the scope that work needs (sysinfo.survey's
    plugins:write), the owner's read-only key too (403 naming it), as a notebook run takes jobs:run."""
    dana = _user(gw, "cx-dana", "developer")
    dev = gw.client(_key(gw, dana["id"])["key"])
    ro = gw.client(_key(gw, dana["id"], scopes=["plugins:read"])["key"])
    job = dev.post("/api/plugins/sysinfo/invoke/sysinfo.survey", json={"samples": 100, "every_s": 0.2}).json()["job"]
    r = ro.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 403 and "plugins:write" in r.text, r.text
    assert ro.get(f"/api/jobs/{job['id']}").json()["state"] in ("queued", "running")
    assert dev.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    assert (
        wait_for(lambda: (j := dev.get(f"/api/jobs/{job['id']}").json())["finished"] and j, 30)["state"] == "cancelled"
    )
