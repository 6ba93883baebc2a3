"""The team set-up against a real JupyterHub (the shipped deploy/jupyterhub_config.py, with only the test's ports,
dummy authenticator and simple spawner), its configurable-http-proxy from npm (installed by the set-up), the bkg
gateway as the Hub-managed service, and real users' servers: Hub users act as themselves in bkg with the rights
their Hub groups give, the browser logs in through the Hub's OAuth, a user's server and its kernels act as that
user, and the Hub restarts the gateway when it dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gateway_harness import ADMIN_KEY, CHROMIUM, CHROMIUM_ARGS, free_port, http_ok, kernel_connection, wait_for
from helpers import stop_process

from bkg_kernel.hub import hub_command, hub_env, with_hub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "ui"


@dataclass
class Hub:
    proc: subprocess.Popen[bytes]
    url: str
    root: Path

    @property
    def bkg(self) -> str:
        return self.url + "/services/bkg"

    def log(self) -> str:
        return (self.root / "hub.log").read_text(errors="replace")[-4000:]


def start_hub(root: Path, **extra: str) -> Hub:
    """Start the shipped config's JupyterHub as `bkg hub` does (dummy logins; its data, state and log under `root`,
    the environment `extra` besides) and wait for its bkg service to answer."""
    port = free_port()
    env = hub_env(port=port, data_dir=root / "data", state_dir=root / "state", admins=["alice"],
                  developers=["dev", "ana", "ned"], dummy_auth=True)  # fmt: skip
    env.update(BKG_ADMIN_KEY=ADMIN_KEY, BKG_MODEL_DIR=str(root / "models"), BKG_HUB_NOTEBOOK_DIR=str(ROOT), **extra)
    with open(root / "hub.log", "wb") as log:
        proc = subprocess.Popen(hub_command(), env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    h = Hub(proc, f"http://127.0.0.1:{port}", root)
    try:
        wait_for(lambda: proc.poll() is None and http_ok(h.bkg + "/health"), timeout=120, every=0.5)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"the Hub or its bkg service did not come up:\n{h.log()}") from None
    return h


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from test_jobs import make_notebooks

    root = tmp_path_factory.mktemp("hub")
    h = start_hub(root, BKG_HUB_PLUGINS="sysinfo,llmserver", BKG_HUB_POLL_S="2", BKG_JOB_TICK_S="1",
                  BKG_JOB_ROOTS=str(make_notebooks(root / "jobs")))  # fmt: skip
    yield h
    stop_process(h.proc, 30)


def login(hub: Hub, name: str) -> httpx.Client:
    """Log in through the Hub's form (dummy authenticator: any password)."""
    c = httpx.Client(base_url=hub.url, timeout=30)
    c.get("/hub/login")
    r = c.post("/hub/login", data={"username": name, "password": "any-password", "_xsrf": c.cookies.get("_xsrf", "")})
    assert r.status_code in (200, 302), r.text[:500]
    return c


def hub_token(hub: Hub, name: str, scopes: list[str] | None = None) -> str:
    """A Hub API token of `name` (their own, as a user makes one on the Hub's token page)."""
    c = login(hub, name)
    body: dict[str, Any] = {"note": "test"} | ({"scopes": scopes} if scopes is not None else {})
    r = c.post(f"/hub/api/users/{name}/tokens", json=body, headers={"X-XSRFToken": c.cookies.get("_xsrf", "")})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def as_(hub: Hub, token: str) -> httpx.Client:
    return httpx.Client(base_url=hub.bkg, headers={"Authorization": f"token {token}"}, timeout=60)


def test_hub_users_act_as_themselves_with_their_groups_rights(hub: Hub) -> None:
    dev, vic, alice = (as_(hub, hub_token(hub, n)) for n in ("dev", "vic", "alice"))
    me = {n: c.get("/auth/me").json() for n, c in (("dev", dev), ("vic", vic), ("alice", alice))}
    assert (me["dev"]["username"], me["dev"]["role"]) == ("dev@hub", "developer"), me
    assert (me["vic"]["username"], me["vic"]["role"]) == ("vic@hub", "viewer")
    assert (me["alice"]["username"], me["alice"]["role"]) == ("alice@hub", "admin")
    seen = [[p["id"] for p in c.get("/api/plugins").json()["plugins"]] for c in (dev, vic)]
    assert seen[0] == seen[1] and "sysinfo" in seen[0]  # one shared gateway: the same plugins for everyone
    assert dev.post("/api/collections", json={"name": "team_notes", "dim": 4}).status_code == 201
    refused = vic.post("/api/collections", json={"name": "vic_notes", "dim": 4})
    assert refused.status_code == 403 and "collections:write" in refused.json()["error"]["message"]
    assert "team_notes" in [c["name"] for c in vic.get("/api/collections").json()["collections"]]
    # a plugin call under the service prefix acts as the Hub user too (sysinfo.sleep needs plugins:write)
    assert dev.post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 0}).status_code == 200
    denied = vic.post("/api/plugins/sysinfo/invoke/sysinfo.sleep", json={"seconds": 0})
    assert denied.status_code == 403 and "plugins:write" in denied.json()["error"]["message"]
    metrics = dev.get("/metrics").text  # calls under the service prefix are labelled by their route
    assert 'route="/api/plugins/{plugin_id}/invoke/{capability_id}",status="200"' in metrics
    # a big body is read only for a token the Hub knows (any other token is a 401 before the body is read)
    points = [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"pad": "x" * 200}} for i in range(500)]
    assert dev.put("/api/collections/team_notes/points", json={"points": points}).status_code == 200
    junk = as_(hub, "not-a-hub-token").put("/api/collections/team_notes/points", json={"points": points})
    assert junk.status_code == 401 and "checked before it is read" in junk.json()["error"]["message"], junk.text
    audit = alice.get("/admin/audit", params={"limit": 200}).json()["entries"]
    made = [e for e in audit if e["action"] == "collection.create" and e["target"] == "team_notes"]
    assert made and made[0]["actor"] == "dev@hub"
    users = {u["username"]: u["role"] for u in alice.get("/admin/users").json()["users"]}
    assert users["dev@hub"] == "developer" and users["vic@hub"] == "viewer"
    # a bkg key still works beside Hub tokens (at the service prefix and at the root)
    assert httpx.get(hub.bkg + "/auth/me", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["role"] == "admin"
    # as a Hub service the gateway opens no call port (Hub tokens go through the Hub's proxy, over HTTP)
    assert httpx.get(hub.bkg + "/health").json()["call_port"] is None


def test_llm_usage_is_booked_to_each_hub_user(hub: Hub) -> None:
    from bkg_kernel.models.defaults import DEFAULT_LLM

    wait_for(lambda: httpx.get(hub.bkg + "/health").json()["plugins"].get("llmserver") == "running", 120, 0.5)
    ask = {"model": DEFAULT_LLM, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    for name in ("dev", "alice"):
        r = as_(hub, hub_token(hub, name)).post("/v1/chat/completions", json=ask)
        assert r.status_code == 200, r.text
    refused = as_(hub, hub_token(hub, "vic")).post("/v1/chat/completions", json=ask)
    assert refused.status_code == 403  # a viewer holds no llm:use
    alice = as_(hub, hub_token(hub, "alice"))
    rows = {r["username"]: r for r in alice.get("/admin/usage", params={"group_by": "user"}).json()["usage"]}
    assert rows["dev@hub"]["requests"] == 1 and rows["alice@hub"]["requests"] == 1 and "vic@hub" not in rows
    assert rows["dev@hub"]["completion_tokens"] > 0


def test_a_new_users_first_requests_at_once_all_succeed(hub: Hub) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = as_(hub, hub_token(hub, "newcomer"))
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: c.get("/auth/me").status_code, range(8)))
    assert codes == [200] * 8  # one bkg user made, no 409 from a race to make it


def test_the_login_cookie_only_opens_the_gateways_page(hub: Hub) -> None:
    cookie = {"bkg-hub-token": hub_token(hub, "dev")}
    assert httpx.get(hub.bkg + "/api/plugins", cookies=cookie).status_code == 401  # never the API
    page = httpx.get(hub.bkg + "/", cookies=cookie)
    assert page.status_code == 200 and "dev@hub" in page.text
    assert page.headers["content-security-policy"] == "frame-ancestors 'none'"
    fetched = httpx.get(hub.bkg + "/", cookies=cookie, headers={"Sec-Fetch-Mode": "cors"})
    assert fetched.status_code == 302  # a script's fetch from another page on this origin does not count
    stale = httpx.get(hub.bkg + "/", cookies={"bkg-hub-token": "revoked-or-made-up"})
    assert stale.status_code == 302 and "/hub/api/oauth2/authorize" in stale.headers["location"]
    assert 'bkg-hub-token=""' in stale.headers.get("set-cookie", "")  # the stale cookie goes
    assert httpx.get(hub.bkg + "/oauth_callback").status_code == 422
    assert httpx.get(hub.bkg + "/oauth_callback", params={"code": "x", "state": "y"}).status_code == 401
    # a trailing slash is a 404 in the error shape, not a redirect (that once left the service's prefix)
    moved = httpx.get(hub.bkg + "/api/collections/", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert moved.status_code == 404 and "no such route" in moved.json()["error"]["message"], moved.text


def test_a_flood_of_anonymous_visits_never_spoils_a_login_in_progress(hub: Hub) -> None:
    """Each anonymous `GET /` starts a login. The gateway kept every pending login's state (a capped list, oldest
    out): 1,000 anonymous visits between a user's start and the Hub's answer pushed the user's login out. Now the
    state lives in the user's browser, signed, and the gateway keeps nothing per login."""
    c = login(hub, "dev")  # logged in at the Hub, not yet at the gateway
    start = c.get(hub.bkg + "/")
    assert start.status_code == 302 and "/hub/api/oauth2/authorize" in start.headers["location"]
    answer = c.get(start.headers["location"])
    while answer.status_code == 302 and "/oauth_callback" not in answer.headers["location"]:
        answer = c.get(answer.headers["location"])
    callback = answer.headers["location"]
    assert "/oauth_callback" in callback and "code=" in callback, answer.text[:500]
    with httpx.Client() as anon:
        for _ in range(1100):
            assert anon.get(hub.bkg + "/").status_code == 302
    done = c.get(callback)
    assert done.status_code == 302 and "bkg-hub-token" in done.headers.get("set-cookie", ""), done.text
    assert "dev@hub" in c.get(hub.bkg + "/").text
    url = callback if callback.startswith("http") else hub.url + callback
    replayed = httpx.get(url, cookies={"bkg-hub-oauth-state": "forged." + "0" * 64})
    assert replayed.status_code == 401 and "not started in this browser" in replayed.json()["error"]["message"]


def test_hub_users_stay_apart_and_nobody_poses_as_one(hub: Hub) -> None:
    from bkg_kernel.gateway.jupyterhub import bkg_name

    assert len({bkg_name(n) for n in ("ana b", "ana-b", "_ana", "ana", "a" * 80, "a" * 81)}) == 6
    alice = as_(hub, hub_token(hub, "alice"))
    local = alice.post("/admin/users", json={"username": "dev@hub", "role": "admin"})
    assert local.status_code == 422 and local.json()["error"]["field"] == "username"
    me = alice.get("/auth/me").json()
    key = alice.post("/admin/keys", json={"name": "my key", "user_id": me["user_id"]})
    assert key.status_code == 403 and "Hub token" in key.json()["error"]["message"]  # rights follow the Hub
    gateway = json.loads((hub.root / "data" / "gateway.json").read_text())["url"]
    assert httpx.get(gateway + "/auth/me", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["role"] == "admin"


def test_a_token_without_access_to_the_service_is_told_what_is_missing(hub: Hub) -> None:
    narrow = hub_token(hub, "vic", scopes=["read:users:activity!user"])
    r = as_(hub, narrow).get("/api/plugins")
    assert r.status_code == 403 and "access:services!service=bkg" in r.json()["error"]["message"], r.text
    assert as_(hub, "not-a-token").get("/api/plugins").status_code == 401
    big = {"points": [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"pad": "x" * 200}} for i in range(500)]}
    r = as_(hub, narrow).put("/api/collections/x/points", json=big)  # said before the body is read, not a 401
    assert r.status_code == 403 and "access:services!service=bkg" in r.json()["error"]["message"], r.text
    r = as_(hub, "x" * 300).put("/api/collections/x/points", json=big)  # not shaped like a Hub token: no Hub call
    assert r.status_code == 401 and "checked before it is read" in r.json()["error"]["message"], r.text


def test_a_hub_users_job_belongs_to_them_and_runs_as_them(hub: Hub) -> None:
    dev = as_(hub, hub_token(hub, "dev"))
    r = dev.post("/api/jobs", json={"notebook": "writes.ipynb", "parameters": {"collection": "from_dev_job"}})
    assert r.status_code == 202, r.text
    run = wait_for(lambda: (j := dev.get(f"/api/jobs/{r.json()['id']}").json())["finished_at"] and j, 120)
    assert run["state"] == "succeeded" and run["owner"] == "dev@hub", run
    assert dev.get("/api/collections/from_dev_job").status_code == 200


def test_a_run_outlives_its_owners_server(hub: Hub) -> None:
    token = hub_token(hub, "ana")
    hubapi = httpx.Client(base_url=hub.url + "/hub/api", headers={"Authorization": f"token {token}"}, timeout=60)
    assert hubapi.post("/users/ana/server").status_code in (201, 202)
    wait_for(lambda: hubapi.get("/users/ana").json()["servers"].get("", {}).get("ready"), 120, 0.5)
    r = as_(hub, token).post("/api/jobs", json={"notebook": "sleepy.ipynb", "parameters": {"seconds": 4.0}})
    assert r.status_code == 202, r.text
    assert hubapi.delete("/users/ana/server").status_code in (202, 204)  # ana logs off: her server is stopped
    wait_for(lambda: not hubapi.get("/users/ana").json()["servers"], 60, 0.5)
    done = wait_for(lambda: (j := as_(hub, token).get(f"/api/jobs/{r.json()['id']}").json())["finished_at"] and j, 120)
    assert done["state"] == "succeeded" and done["owner"] == "ana@hub", done


def test_a_scheduled_run_acts_with_the_rights_its_owner_has_on_the_hub_now(hub: Hub) -> None:
    """A schedule's run acts as its owner with no token of theirs: before it starts, the gateway asks the Hub
    whether the owner is still what they were when their role was last derived. ned leaves bkg-developers and zed
    leaves the Hub after making their schedules, and neither ever sends another request: their runs fail before
    they start (ned becomes a viewer, zed is disabled), while dev's run, whose groups did not change, succeeds."""
    hub_admin = httpx.Client(base_url=hub.url + "/hub/api", timeout=60,
                             headers={"Authorization": f"token {hub_token(hub, 'alice')}"})  # fmt: skip
    assert hub_admin.post("/users/zed", json={}).status_code == 201
    assert hub_admin.post("/groups/bkg-developers/users", json={"users": ["zed"]}).status_code == 200
    while time.time() % 60 > 35:  # the schedules' first fire (the next minute) comes after the Hub's changes
        time.sleep(1)
    made = {}
    for name in ("dev", "ned", "zed"):
        me = as_(hub, hub_token(hub, name))
        assert me.get("/auth/me").json()["role"] == "developer"
        r = me.post("/api/jobs/schedules", json={"notebook": "ok.ipynb", "cron": "* * * * *"})
        assert r.status_code == 201, r.text
        made[r.json()["id"]] = name
    r = hub_admin.request("DELETE", "/groups/bkg-developers/users", json={"users": ["ned"]})
    assert r.status_code == 200, r.text
    assert hub_admin.delete("/users/zed").status_code == 204
    bkg = httpx.Client(base_url=hub.bkg, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def first_runs() -> dict[str, dict[str, Any]] | None:
        runs = {made[j["schedule_id"]]: j for j in bkg.get("/api/jobs").json()["jobs"] if j.get("schedule_id") in made}
        return runs if len(runs) == 3 and all(j["finished_at"] for j in runs.values()) else None

    try:
        runs = wait_for(first_runs, 120, 1)
    finally:
        for sid in made:
            bkg.delete(f"/api/jobs/schedules/{sid}")
    assert runs["dev"]["state"] == "succeeded", runs["dev"]
    assert runs["ned"]["state"] == "failed" and runs["ned"]["started_at"] is None
    said = runs["ned"]["error"]["evalue"]
    assert "'ned' changed on JupyterHub" in said and "groups left: bkg-developers" in said and "viewer" in said, said
    assert runs["zed"]["state"] == "failed" and "JupyterHub has no user 'zed'" in runs["zed"]["error"]["evalue"]
    users = {u["username"]: u for u in bkg.get("/admin/users").json()["users"]}
    assert users["ned@hub"]["role"] == "viewer" and users["zed@hub"]["disabled"]
    audit = bkg.get("/admin/audit", params={"limit": 500}).json()["entries"]
    changed = [e for e in audit if e["action"] == "user.hub_changed" and e["target"] == "ned@hub"]
    assert changed and changed[0]["detail"]["before"]["groups"] == {"bkg-developers": ["bkg-developer"]}
    # ned's next request derives his role again (a viewer now); back in the group, his runs start again
    assert as_(hub, hub_token(hub, "ned")).get("/auth/me").json()["role"] == "viewer"
    assert hub_admin.post("/groups/bkg-developers/users", json={"users": ["ned"]}).status_code == 200
    ned = as_(hub, hub_token(hub, "ned"))
    assert ned.get("/auth/me").json()["role"] == "developer"
    r = ned.post("/api/jobs", json={"notebook": "ok.ipynb"})
    assert r.status_code == 202, r.text
    done = wait_for(lambda: (j := ned.get(f"/api/jobs/{r.json()['id']}").json())["finished_at"] and j, 120)
    assert done["state"] == "succeeded", done


def test_a_run_of_a_hub_user_never_seen_with_a_view_does_not_start(hub: Hub, tmp_path: Path) -> None:
    """A Hub user last seen by a gateway from before the Hub's view was recorded (or whose record is gone): the
    gateway cannot tell whether their role still stands, so it lowers them to viewer and their run does not start."""
    import asyncio

    from bkg_kernel.auth import AuthService
    from bkg_kernel.errors import Forbidden
    from bkg_kernel.gateway.jupyterhub import HubTrust
    from bkg_kernel.settings import Settings
    from bkg_kernel.store import Store

    hub_env = {"JUPYTERHUB_SERVICE_NAME": "bkg", "JUPYTERHUB_API_URL": hub.url + "/hub/api",
               "JUPYTERHUB_API_TOKEN": hub_token(hub, "alice")}  # fmt: skip
    settings = Settings(**hub_env)
    with Store(tmp_path / "data") as store:
        auth = AuthService(store)
        trust = HubTrust(settings, auth)
        old = auth.create_user("dev@hub", "developer", actor="jupyterhub")
        local = auth.create_user("dev", "developer", actor="test")
        assert asyncio.run(trust.hub_view("dev")) == {"admin": False, "roles": ["user"],
                                                      "groups": {"bkg-developers": ["bkg-developer"]}}  # fmt: skip
        assert asyncio.run(trust.hub_view("nobody-by-that-name")) is None
        asyncio.run(trust.confirm_owner(auth.user(local["id"])))  # a local user is not the Hub's to vouch for
        with pytest.raises(Forbidden, match="has not been confirmed with JupyterHub"):
            asyncio.run(trust.confirm_owner(auth.user(old["id"])))
        assert auth.user(old["id"])["role"] == "viewer"
        auth.close()


def test_the_browser_logs_in_through_the_hub_and_a_users_server_acts_as_them(hub: Hub) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        try:
            page.goto(hub.url + "/hub/login")
            page.fill("input[name=username]", "dev")
            page.fill("input[name=password]", "any-password")
            page.click("input[type=submit], button[type=submit]")
            page.wait_for_url("**/user/dev/**", timeout=120_000)  # the Hub spawned dev's server
            # dev's JupyterLab: the bkg sidebar lists the shared plugins, its server side forwarding as dev
            page.locator('li[data-id="bkg-sidebar"]').wait_for(timeout=120_000)
            row = page.locator('tr[data-plugin="sysinfo"]')
            for _ in range(60):  # the lab may restore its layout after the tab appears: open the sidebar until shown
                if row.is_visible():
                    break
                if not page.locator("#bkg-sidebar").is_visible():
                    page.click('li[data-id="bkg-sidebar"]')
                page.wait_for_timeout(1000)
            row.wait_for(timeout=10_000)
            page.wait_for_timeout(1500)  # the live WebSocket (relayed as dev) is up, not reconnecting
            assert "Lost the bkg gateway" not in page.locator("#bkg-sidebar").inner_text()
            page.screenshot(path=str(ARTIFACTS / "hub-lab-sidebar.png"))
            me = page.goto(hub.url + "/user/dev/bkg/api/auth/me")
            assert me is not None and me.json()["username"] == "dev@hub", me and me.text()
            page.goto(hub.bkg + "/")  # the gateway: Hub OAuth, no confirmation, no second password
            page.locator("text=Logged in as").wait_for(timeout=60_000)
            assert "dev@hub" in page.content() and "(developer)" in page.content()
            # a dashboard in dev's own server: its kernel's bkg.connect() acts as dev, through dev's Hub token
            # Voila answers once the notebook has run (a kernel start and the overview's cells): more than 30 s on a
            # busy machine
            page.goto(hub.url + "/user/dev/voila/render/dashboards/overview.ipynb", timeout=120_000)
            page.locator("text=Logged in as").wait_for(timeout=120_000)
            assert "dev@hub" in page.content() and page.locator("input[type=password]").count() == 0  # no login box
            page.screenshot(path=str(ARTIFACTS / "hub-dashboard-overview.png"), full_page=True)
            # that kernel (in dev's server) listens on Unix sockets in a private folder, not on TCP ports
            kernels = [c for c in map(_cmdline, psutil.Process(hub.proc.pid).children(recursive=True))
                       if "ipykernel_launcher" in c]  # fmt: skip
            assert kernels, "no kernel under the Hub"
            for cmd in kernels:
                info = kernel_connection(cmd)
                assert info["transport"] == "ipc" and "/bkg-kernels-" in info["ip"], info
        except Exception as exc:
            page.screenshot(path=str(ARTIFACTS / "hub-stuck.png"), full_page=True)
            raise AssertionError(f"{exc!r}\n{hub.log()}") from None
        finally:
            browser.close()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # ended since it was listed
        return []


def test_the_hub_restarts_the_gateway_when_it_dies(hub: Hub) -> None:
    state = hub.root / "data" / "gateway.json"
    old = json.loads(state.read_text())["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: state.exists() and json.loads(state.read_text() or "{}").get("pid") not in (None, old), 120, 0.5)
    wait_for(lambda: http_ok(hub.bkg + "/health"), 60, 0.5)
    assert as_(hub, hub_token(hub, "vic")).get("/auth/me").json()["username"] == "vic@hub"


def test_the_gateway_and_the_proxy_go_when_the_hub_is_killed(tmp_path: Path) -> None:
    """The Hub starts its proxy and the gateway in sessions of their own and stops them only on a clean exit: a Hub
    SIGKILLed (or crashed, or OOM-killed) left both running, the gateway holding the data dir (a new `bkg hub` or
    `bkg serve` on it failed) and the proxy the public port. Now they follow the Hub within seconds."""
    from bkg_kernel.store.lock import DataDirLock

    h = start_hub(tmp_path, BKG_HUB_PLUGINS="sysinfo")
    started = psutil.Process(h.proc.pid).children(recursive=True)
    gateway = json.loads((tmp_path / "data" / "gateway.json").read_text())["pid"]
    assert gateway in [p.pid for p in started], h.log()
    assert any("configurable-http-proxy" in " ".join(_cmdline(p)) for p in started), h.log()
    try:
        h.proc.kill()  # nothing of the Hub's own clean-up runs
        h.proc.wait()
        deadline = time.monotonic() + 20
        while (left := [p for p in started if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running 20 s after the Hub was killed: {[_cmdline(p) for p in left]}"
    finally:
        for p in started:
            if _running(p):
                p.kill()
    lock = DataDirLock(tmp_path / "data")
    lock.acquire()  # the data dir is free for the next gateway
    lock.release()
    with socket.socket() as s:  # a server's bind, as the proxy's: only a listener is in the way, not a TIME_WAIT
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(h.url.rsplit(":", 1)[1])))  # and the public port for the next Hub


def _running(p: psutil.Process) -> bool:
    """Whether `p` still runs (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_the_follower_hands_on_the_hubs_signals_and_its_commands_status() -> None:
    """The Hub stops its proxy (SIGTERM) and its services (SIGINT, then SIGTERM, then SIGKILL) by signalling what it
    started, now the follower: the command gets the signal, the Hub its exit status, and a follower SIGKILLed takes
    its command with it. (This test process stands for the Hub.)"""
    script = ("import os, signal, sys, time; signal.signal(signal.SIGINT, lambda *_: sys.exit(3)); "
              "print(os.getpid(), flush=True); time.sleep(60)")  # fmt: skip

    def follower() -> tuple[subprocess.Popen[bytes], psutil.Process]:
        proc = subprocess.Popen(with_hub([sys.executable, "-c", script]), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return proc, psutil.Process(int(proc.stdout.readline()))

    for sig, status in ((signal.SIGINT, 3), (signal.SIGTERM, 128 + signal.SIGTERM)):
        proc, command = follower()
        proc.send_signal(sig)
        assert proc.wait(10) == status
        assert not _running(command)
    proc, command = follower()
    proc.kill()
    proc.wait()
    wait_for(lambda: not _running(command), 10, 0.1)
