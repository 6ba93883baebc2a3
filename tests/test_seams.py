"""The seams, through a real gateway: a worker plugin reaches the store over its pipe as the caller of the
call (their scopes, their key in the audit), and the only credential a worker holds, the grant of a running
call, stops working when that call ends and when the worker restarts."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for
from helpers import register_plugins

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER

PROBE = '''
import json
from typing import Any

from pydantic import BaseModel

from bkg_kernel.runtime import calls
from bkg_kernel.runtime.contract import Plugin, capability


class Target(BaseModel):
    collection: str = "probe"
    embed_model: str | None = None
    stop_after: int = 0  # probe.chat: pieces read before it stops reading (0: all)
    pad: str = ""  # ballast: a message bigger than the pipe's buffer


class Out(BaseModel):
    model_config = {"extra": "allow"}


class Probe(Plugin):
    """A worker plugin for the tests: it reaches the store through its context, as its caller."""

    id = "probe"
    name = "probe"
    mode = "worker"

    @capability("probe.count", scope="plugins:read")
    def count(self, inp: Target) -> Out:
        """Count a collection's points through the store handle."""
        return Out(count=self.context.store.count(inp.collection))

    @capability("probe.make", scope="plugins:read")
    def make(self, inp: Target) -> Out:
        """Create a collection and add a point through the store handle."""
        self.context.store.create_collection(inp.collection, 2, metric="l2", embed_model=inp.embed_model)
        return Out(**self.context.store.upsert(inp.collection, [{"id": 1, "vector": [0.0, 1.0]}]))

    @capability("probe.chat", scope="plugins:read")
    def chat(self, inp: Target) -> Out:
        """Read a chat's pieces through the store handle as the model writes them (over the worker's pipe)."""
        body = {"messages": [{"role": "user", "content": "Count from one to forty in words."}], "max_tokens": 120,
                "temperature": 0}
        pieces, last = [], {}
        chunks = self.context.store.chat_stream(body, route="probe.chat")
        for chunk in chunks:
            last = chunk
            pieces += [c["delta"].get("content") for c in chunk.get("choices") or [] if c["delta"].get("content")]
            if inp.stop_after and len(pieces) >= inp.stop_after:
                chunks.close()
                break
        return Out(pieces=pieces, usage=last.get("usage"))

    @capability("probe.whoami", scope="plugins:read")
    def whoami(self, inp: Target) -> Out:
        """Return the caller this call acts for."""
        return Out(**self.context.caller.to_dict())

    @capability("probe.keep", scope="plugins:read")
    def keep(self, inp: Target) -> Out:
        """Write this call's grant to a file (what a plugin that tried to keep a credential would do)."""
        call = calls.current()
        (self.context.work_dir / "grant.json").write_text(json.dumps({"grant": call.grant}))
        return Out(kept=True)

    @capability("probe.replay", scope="plugins:read")
    def replay(self, inp: Target) -> Out:
        """Use the kept grant for a store request."""
        grant = json.loads((self.context.work_dir / "grant.json").read_text())["grant"]
        with calls.running(calls.Call(self.context.caller, grant)):
            return Out(count=self.context.store.count(inp.collection))


    @capability("probe.freeze", scope="plugins:read")
    def freeze(self, inp: Target) -> Out:
        """Hold the GIL for good (a regular expression that backtracks without end): the worker reads nothing."""
        import re

        return Out(matched=bool(re.match(r"(a|aa)+$", "a" * 80 + "!")))


PLUGIN = Probe
'''

PROBE_INLINE = '''
import json
import time

from pydantic import BaseModel

from bkg_kernel.runtime.contract import Plugin, capability


class Late(BaseModel):
    seconds: float = 2.0
    tag: str = "late"


class Out(BaseModel):
    model_config = {"extra": "allow"}


class LateItems(Late):
    model_config = {"extra": "allow"}  # pydantic keeps an extra field's value as it is: the body's own list


class ProbeInline(Plugin):
    """An inline plugin for the tests: work that runs on after its caller stopped waiting."""

    id = "probein"
    name = "probein"
    mode = "inline"

    def _late(self, inp: Late) -> dict:
        time.sleep(inp.seconds)
        try:
            outcome = {"count": self.context.store.count("probe")}
        except Exception as exc:
            outcome = {"refused": str(exc)}
        (self.context.work_dir / f"{inp.tag}.json").write_text(json.dumps(outcome))
        return outcome

    @capability("probein.late", scope="plugins:read")
    def late(self, inp: Late) -> Out:
        """Sleep, then count a collection through the store handle; say how that went in a file."""
        return Out(**self._late(inp))

    @capability("probein.spawn", scope="plugins:read")
    def spawn(self, inp: Late) -> Out:
        """Leave a thread behind (with this call's context) that uses the store after the call has answered."""
        import contextvars
        import threading

        threading.Thread(target=contextvars.copy_context().run, args=(self._late, inp), daemon=True).start()
        return Out(spawned=True)

    @capability("probein.late_items", scope="plugins:read")
    def late_items(self, inp: LateItems) -> Out:
        """Sleep, then say how many `items` the input still holds (after its caller stopped waiting too)."""
        time.sleep(inp.seconds)
        seen = {"items": len((inp.model_extra or {}).get("items", []))}
        (self.context.work_dir / f"{inp.tag}.json").write_text(json.dumps(seen))
        return Out(**seen)

    @capability("probein.late_job", scope="plugins:read", job=True)
    def late_job(self, inp: Late, progress) -> Out:
        """The same as a background job (cancellable)."""
        progress(0.1, "waiting")
        return Out(**self._late(inp))


PLUGIN = ProbeInline
'''


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a gateway that finds the probe plugins."""
    root = tmp_path_factory.mktemp("site")
    (root / "bkg_probe").mkdir()
    (root / "bkg_probe" / "__init__.py").write_text(textwrap.dedent(PROBE))
    (root / "bkg_probe_inline.py").write_text(textwrap.dedent(PROBE_INLINE))
    register_plugins(root, "bkg-probe", {"probe": "bkg_probe", "probein": "bkg_probe_inline"})
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def pgw(tmp_path_factory: pytest.TempPathFactory, probe_env: dict[str, str]) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("seams") / "data", env=probe_env)
    for pid in ("probe", "probein"):
        wait_for(lambda pid=pid: g.client().get(f"/api/plugins/{pid}/status").json()["state"] == "running", 60)
    yield g
    g.stop()


def _invoke(g: Gateway, cap: str, key: str = ADMIN_KEY, **body: Any) -> Any:
    return g.client(key).post(f"/api/plugins/probe/invoke/{cap}", json=body)


def _user_key(g: Gateway, name: str, scopes: list[str]) -> tuple[str, str]:
    admin = g.client()
    assert admin.post("/admin/roles", json={"name": f"{name}-role", "scopes": scopes}).status_code == 201
    user = admin.post("/admin/users", json={"username": name, "role": f"{name}-role"}).json()
    key = admin.post("/admin/keys", json={"name": f"{name}'s", "user_id": user["id"]}).json()
    return key["key"], key["id"]


def test_worker_store_calls_act_as_the_caller(pgw: Gateway) -> None:
    r = _invoke(pgw, "probe.make")
    assert r.status_code == 200, r.text
    assert r.json()["upserted"] == 1
    audit = pgw.client().get("/admin/audit", params={"action": "collection.create"}).json()["entries"]
    made = next(e for e in audit if e["target"] == "probe")
    assert made["actor"] == "admin" and made["detail"]["plugin"] == "probe" and made["detail"]["key"]

    key, key_id = _user_key(pgw, "pat", ["plugins:read"])
    who = _invoke(pgw, "probe.whoami", key).json()
    assert who["username"] == "pat" and who["key_id"] == key_id and who["scopes"] == ["plugins:read"]
    r = _invoke(pgw, "probe.count", key)
    assert r.status_code == 403, r.text
    assert "collections:read" in r.json()["error"]["message"] and "pat" in r.json()["error"]["message"]
    r = _invoke(pgw, "probe.make", key, collection="pats")  # the plugin cannot write for a reader either
    assert r.status_code == 403 and "collections:write" in r.json()["error"]["message"]

    admin = pgw.client()
    assert (
        admin.patch("/admin/roles/pat-role", json={"scopes": ["plugins:read", "collections:read"]}).status_code == 200
    )
    r = _invoke(pgw, "probe.count", key)
    assert r.status_code == 200 and r.json()["count"] == 1


def test_a_plugin_s_collection_gets_its_embed_model_checked_as_the_rest_route_checks_it(pgw: Gateway) -> None:
    """Found by a review: a collection a plugin made through its store handle took any embed_model (one no plugin
    embeds with, or one whose vectors are not as wide as the collection's), found out only at its first text."""
    for spec, words in ((f"candle:{DEFAULT_EMBEDDER}", "384-d"), ("candle:no-such-model", "no model")):
        r = _invoke(pgw, "probe.make", collection="embedded", embed_model=spec)
        assert r.status_code == 422 and r.json()["error"]["field"] == "embed_model", r.text
        assert words in r.json()["error"]["message"], r.text
    assert pgw.client().get("/api/collections/embedded").status_code == 404  # nothing was made


def test_a_worker_reads_a_chat_as_it_is_written_and_stops_it_by_closing(pgw: Gateway) -> None:
    """The store handle's chat_stream over a worker's pipe: the pieces come one by one, the usage is booked to the
    caller; a plugin that stops reading stops the model, and what it wrote is booked all the same."""
    admin = pgw.client()
    wait_for(lambda: admin.get("/api/plugins/llmserver/status").json()["state"] == "running", 120)
    key, key_id = _user_key(pgw, "cho", ["plugins:read", "llm:use"])

    def booked() -> tuple[int, int]:
        rows = admin.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
        mine = [u for u in rows if u["key_id"] == key_id]
        return (mine[0]["requests"], mine[0]["total_tokens"]) if mine else (0, 0)

    r = _invoke(pgw, "probe.chat", key)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert len(whole["pieces"]) > 3 and whole["usage"]["completion_tokens"] >= len(whole["pieces"])
    assert booked() == (1, whole["usage"]["total_tokens"])

    cancelled = admin.get("/api/plugins/llmserver/health").json()["cancelled"]
    r = _invoke(pgw, "probe.chat", key, stop_after=2)
    assert r.status_code == 200 and len(r.json()["pieces"]) == 2 and r.json()["usage"] is None, r.text
    wait_for(lambda: admin.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, 60)
    requests, tokens = wait_for(lambda: (b := booked())[0] == 2 and b, 30)
    assert tokens > whole["usage"]["total_tokens"]  # the prompt again and the pieces written

    r = _invoke(pgw, "probe.chat", *_user_key(pgw, "nochat", ["plugins:read"])[:1])  # not the worker's to grant
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"], r.text


def test_a_grant_dies_with_its_call_and_with_its_worker(pgw: Gateway) -> None:
    assert _invoke(pgw, "probe.make", collection="probe").status_code in (200, 409)  # whichever test runs first
    assert _invoke(pgw, "probe.count").json()["count"] == 1  # the store works within a call
    assert _invoke(pgw, "probe.keep").status_code == 200
    r = _invoke(pgw, "probe.replay")  # the kept grant's call has ended
    assert r.status_code == 401 and "no longer running" in r.json()["error"]["message"], r.text

    assert _invoke(pgw, "probe.keep").status_code == 200
    pid = pgw.client().get("/api/plugins/probe/status").json()["pid"]
    assert pgw.client().post("/api/plugins/probe/restart").json()["state"] == "running"
    assert pgw.client().get("/api/plugins/probe/status").json()["pid"] != pid
    r = _invoke(pgw, "probe.replay")  # a grant from the worker before the restart
    assert r.status_code == 401 and "no longer running" in r.json()["error"]["message"], r.text
    assert _invoke(pgw, "probe.count").json()["count"] == 1  # the new worker's own calls work


def test_inline_work_that_outlives_its_call_cannot_act_for_the_caller(pgw: Gateway) -> None:
    """A worker's grant ends when its caller stops waiting; an inline call (running in the gateway, no grant) ends
    the same way: on the request's timeout, when its job is cancelled, and when it answers (a thread it left behind
    cannot act for the caller afterwards)."""
    c = pgw.client()
    assert _invoke(pgw, "probe.make", collection="probe").status_code in (200, 409)
    outcome = pgw.data_dir / "plugins" / "probein"
    assert c.post("/api/plugins/probein/invoke/probein.late", json={"seconds": 0, "tag": "quick"}).json()["count"] >= 1
    assert c.put("/api/plugins/probein/config", json={"config": {"request_timeout": 1}}).status_code == 200
    try:
        r = c.post("/api/plugins/probein/invoke/probein.late", json={"seconds": 2.5, "tag": "timed_out"})
        assert r.status_code == 504, r.text
        done = wait_for(lambda: (outcome / "timed_out.json").is_file() and (outcome / "timed_out.json"), 30)
        assert "has ended" in json.loads(done.read_text())["refused"]
        # A big body (parsed on a thread, freed a slice at a time once nothing needs it) is the work's until the
        # work has run, not only until its caller stops waiting: with every thread of the inline pool (32) busy,
        # the call waits in the pool's queue past its timeout and runs afterwards, on its whole input.
        config = {"request_timeout": 1, "max_concurrent": 64, "max_queue": 64}
        assert c.put("/api/plugins/probein/config", json={"config": config}).status_code == 200
        fill = {"seconds": 8, "tag": "filler"}
        with ThreadPoolExecutor(32) as pool:
            fillers = [pool.submit(pgw.client().post, "/api/plugins/probein/invoke/probein.late", json=fill)]
            fillers += [pool.submit(pgw.client().post, "/api/plugins/probein/invoke/probein.late", json=fill)
                        for _ in range(31)]  # fmt: skip
            time.sleep(3)  # every filler in the pool (each answers 504 after 1 s; its work sleeps on)
            body = {"seconds": 0, "tag": "big_input", "items": list(range(30_000))}
            r = c.post("/api/plugins/probein/invoke/probein.late_items", json=body)
            assert r.status_code == 504, r.text
            assert all(f.result().status_code == 504 for f in fillers)
        done = wait_for(lambda: (outcome / "big_input.json").is_file() and (outcome / "big_input.json"), 30)
        assert json.loads(done.read_text()) == {"items": 30_000}
    finally:
        c.put("/api/plugins/probein/config", json={"config": {"request_timeout": 60, "max_concurrent": 4}})

    assert c.post("/api/plugins/probein/invoke/probein.spawn", json={"seconds": 1, "tag": "left"}).status_code == 200
    done = wait_for(lambda: (outcome / "left.json").is_file() and (outcome / "left.json"), 30)
    assert "has ended" in json.loads(done.read_text())["refused"]  # the call had answered: it ended then

    job = c.post("/api/plugins/probein/invoke/probein.late_job", json={"seconds": 2, "tag": "cancelled"}).json()
    job_id = job["job"]["id"]
    wait_for(lambda: c.get(f"/api/jobs/{job_id}").json()["state"] == "running", 30)
    assert c.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    done = wait_for(lambda: (outcome / "cancelled.json").is_file() and (outcome / "cancelled.json"), 30)
    assert "has ended" in json.loads(done.read_text())["refused"]


def test_a_job_never_acts_for_a_caller_whose_key_or_user_ended_meanwhile(pgw: Gateway) -> None:
    """A plugin job carries its caller as they were when they asked: one that reaches the store after their key
    was revoked, or their login session ended, is refused there, and one still queued when its user was disabled
    never starts."""
    c = pgw.client()
    assert _invoke(pgw, "probe.make", collection="probe").status_code in (200, 409)
    outcome = pgw.data_dir / "plugins" / "probein"
    key, key_id = _user_key(pgw, "leaver", ["plugins:read", "collections:read"])
    as_leaver = pgw.client(key)
    running = as_leaver.post("/api/plugins/probein/invoke/probein.late_job", json={"seconds": 2, "tag": "revoked"})
    assert running.status_code == 202, running.text
    assert c.post(f"/admin/keys/{key_id}/revoke").status_code == 200
    done = wait_for(lambda: (outcome / "revoked.json").is_file() and (outcome / "revoked.json"), 30)
    assert "revoked" in json.loads(done.read_text())["refused"]

    # the same for a login session that ends (logout) while its job runs
    admin = pgw.client()
    role, pw = {"name": "lou-role", "scopes": ["plugins:read", "collections:read"]}, "a long passphrase"
    assert admin.post("/admin/roles", json=role).is_success
    assert admin.post("/admin/users", json={"username": "lou", "role": "lou-role", "password": pw}).is_success
    login = pgw.client(None).post("/auth/login", json={"username": "lou", "password": pw})
    assert login.status_code == 200, login.text
    as_lou = pgw.client(login.json()["token"])
    assert "session" not in as_lou.get("/auth/me").json()  # the session's id is never shown
    running = as_lou.post("/api/plugins/probein/invoke/probein.late_job", json={"seconds": 2, "tag": "logged-out"})
    assert running.status_code == 202, running.text
    assert as_lou.post("/auth/logout").status_code == 200
    done = wait_for(lambda: (outcome / "logged-out.json").is_file() and (outcome / "logged-out.json"), 30)
    assert "session" in json.loads(done.read_text())["refused"]

    key, _ = _user_key(pgw, "goner", ["plugins:read", "collections:read"])
    assert c.put("/api/plugins/probein/config", json={"config": {"max_concurrent": 1}}).status_code == 200
    try:
        wait_for(lambda: c.get("/api/plugins/probein/status").json()["state"] == "running", 30)
        holder = c.post("/api/plugins/probein/invoke/probein.late_job", json={"seconds": 3, "tag": "holder"}).json()
        queued = pgw.client(key).post(
            "/api/plugins/probein/invoke/probein.late_job", json={"seconds": 0, "tag": "gone"}
        )
        assert queued.status_code == 202, queued.text
        goner = next(u for u in c.get("/admin/users").json()["users"] if u["username"] == "goner")
        assert c.patch(f"/admin/users/{goner['id']}", json={"disabled": True}).status_code == 200
        job = pgw.wait_job(queued.json()["job"]["id"], 60)
        assert job["state"] == "failed" and "disabled" in job["error"], job
        assert pgw.wait_job(holder["job"]["id"], 60)["state"] == "done"
        assert not (outcome / "gone.json").exists()
    finally:
        c.put("/api/plugins/probein/config", json={"config": {"request_timeout": 60, "max_concurrent": 4}})


def test_plugin_routes_are_handed_the_gateway(pgw: Gateway) -> None:
    # llmserver's /v1 and rustyface's /api/faces come from their routes() hooks, under the gateway's auth.
    spec = pgw.client().get("/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in spec and "/api/faces/{capability}" in spec
    assert pgw.client(None).get("/v1/models").status_code == 401
    key, _ = _user_key(pgw, "vic", ["plugins:read"])
    r = pgw.client(key).get("/v1/models")
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"]


def test_no_module_named_secrets_shadows_the_standard_library() -> None:
    root = Path(__file__).resolve().parent.parent / "bkg_kernel"
    assert not list(root.rglob("secrets.py"))


def test_a_worker_that_stops_reading_never_blocks_the_gateway(pgw: Gateway) -> None:
    """A call holds the worker's GIL, so nothing reads its pipe; a 0.9 MB request for it (more than the pipe holds,
    less than the 1 MiB a capability takes) used to be written on the event loop, which then waited for good, and a
    restart waited for the same lock. Now the gateway answers meanwhile, and the restart replaces the frozen
    worker."""
    import threading

    import httpx
    import psutil

    def quietly(cap: str, **body: Any) -> None:
        with contextlib.suppress(httpx.HTTPError):
            pgw.client().post(f"/api/plugins/probe/invoke/{cap}", json=body, timeout=60)

    worker = psutil.Process(pgw.client().get("/api/plugins/probe/status").json()["pid"])
    threading.Thread(target=quietly, args=("probe.freeze",), daemon=True).start()
    wait_for(lambda: worker.cpu_percent(0.2) > 50, 30)  # the freeze runs, holding the worker's GIL
    big = threading.Thread(target=quietly, args=("probe.whoami",), kwargs={"pad": "x" * 900_000}, daemon=True)
    big.start()
    # both calls are in the plugin: the big one is handed to the worker, which reads nothing (a gateway that wrote
    # it on its event loop would be stuck in that write and never answer this)
    telemetry = pgw.client().get
    wait_for(lambda: telemetry("/api/plugins/probe/telemetry", timeout=10).json()["in_flight"] == 2, 30, every=0.02)
    assert httpx.get(pgw.url + "/health", timeout=10).status_code == 200
    assert pgw.client().get("/api/plugins", timeout=10).status_code == 200
    assert big.is_alive()  # answered while the big call still waits on the frozen worker
    r = pgw.client().post("/api/plugins/probe/restart", timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    who = _invoke(pgw, "probe.whoami")
    assert who.status_code == 200 and who.json()["username"] == "admin", who.text


def test_a_frozen_worker_dies_with_its_gateway(tmp_path: Path, probe_env: dict[str, str]) -> None:
    """A worker whose call holds its GIL never reads its pipe, so it never saw its gateway die: one such orphan kept
    a core busy for 13 minutes. Workers now ask the kernel to end them with the gateway (PR_SET_PDEATHSIG)."""
    import signal
    import threading

    import httpx
    import psutil

    g = start_gateway(tmp_path / "data", env=probe_env, plugins=["probe"])
    pid = wait_for(lambda: g.client().get("/api/plugins/probe/status").json()["pid"], 60)
    worker = psutil.Process(pid)
    try:

        def freeze() -> None:
            with contextlib.suppress(httpx.HTTPError):
                g.client().post("/api/plugins/probe/invoke/probe.freeze", json={}, timeout=30)

        threading.Thread(target=freeze, daemon=True).start()
        wait_for(lambda: worker.cpu_percent(0.2) > 50, 30)  # the call is running, holding the worker's GIL
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait(10)
        gone = wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 20)
        assert gone
    finally:
        with contextlib.suppress(psutil.Error):
            worker.kill()  # the old code's orphan: never left spinning
