"""The call port: plugin calls over a plain TCP socket beside HTTP, on a real gateway (brainml inline, sysinfo in a
worker). The same answers, errors, checks of who calls and request slots as the HTTP invoke route; HTTP whenever
the port cannot serve a call; hostile frames answered without harm. And the slots both ways share, on their own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, free_port, start_gateway, wait_for
from pydantic import BaseModel

from bkg_kernel.auth.principal import Principal
from bkg_kernel.client import Workbench
from bkg_kernel.client.transport import misdirected
from bkg_kernel.errors import Timeout, TooManyRequests, Unauthorized, Unavailable
from bkg_kernel.runtime import calls
from bkg_kernel.runtime.contract import Plugin, capability
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.host import PluginHost
from bkg_kernel.runtime.slots import Slots

PLUGINS = ["brainml", "sysinfo"]
INVOKE = "/api/plugins/{}/invoke/{}"
FINE = b'{"collection": "notes", "query": "bread", "mode": "text"}'  # a query that answers 200


def _port(gw: Gateway) -> int:
    info = gw.client().get("/health").json()["call_port"]
    assert info["protocol"] == "bkg-call/1" and info["max_input"] == 2**20
    return int(info["port"])


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(len(data).to_bytes(4, "big") + data)


def _recv(conn: socket.socket) -> tuple[int, Any] | None:
    """One answer (status, JSON), or None when the gateway closed the connection."""
    head = b""
    while len(head) < 4:
        got = conn.recv(4 - len(head))
        if not got:
            return None
        head += got
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        got = conn.recv(size - len(body))
        assert got, "closed inside a frame"
        body += got
    top, _, rest = body.partition(b"\n")
    return json.loads(top)["status"], json.loads(rest)


def _answer(conn: socket.socket) -> tuple[int, Any]:
    answer = _recv(conn)
    assert answer is not None, "the gateway closed the connection without an answer"
    return answer


def _closed(conn: socket.socket) -> bool:
    conn.settimeout(5)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def conn(gw: Gateway) -> Iterator[socket.socket]:
    """A connection greeted with the admin key."""
    c = _open(gw, ADMIN_KEY)
    yield c
    c.close()


def _open(gw: Gateway, key: str) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", _port(gw)), timeout=30)
    _send(c, json.dumps({"hello": "bkg-call/1", "key": key}).encode())
    answer = _recv(c)
    assert answer is not None and answer[0] == 200, answer
    return c


def _call(conn: socket.socket, plugin: str, cap: str, body: bytes) -> tuple[int, Any]:
    _send(conn, json.dumps({"plugin": plugin, "capability": cap}).encode() + b"\n" + body)
    return _answer(conn)


def _calls(gw: Gateway, method: str) -> int:
    """Requests of the invoke route counted in the metrics under `method` (CALL: the call port's)."""
    text = gw.client().get("/metrics").text
    prefix = f'bkg_http_requests_total{{method="{method}",route="/api/plugins/{{plugin_id}}/invoke/{{capability_id}}"'
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def notes(gw: Gateway) -> str:
    c = gw.client()
    assert c.post("/api/collections", json={"name": "notes", "dim": 3}).status_code == 201
    texts = ["sourdough bread rises slowly", "rye bread is dense", "a bicycle has two wheels"]
    points = [
        {"id": i, "vector": [1.0, float(i), 0.0], "text": t, "payload": {"doc_id": f"d{i}", "lang": "en"}}
        for i, t in enumerate(texts)
    ]
    assert c.put("/api/collections/notes/points", json={"points": points}).is_success
    return "notes"


def test_the_client_calls_plugins_over_the_port_with_the_answers_of_http(gw: Gateway, notes: str) -> None:
    wb = Workbench(gw.url, ADMIN_KEY)
    calls, posts = _calls(gw, "CALL"), _calls(gw, "POST")
    got = dict(wb.brain.query(notes, "bread", mode="text", top_k=3))
    assert _calls(gw, "CALL") == calls + 1 and _calls(gw, "POST") == posts  # it went by the port, not HTTP
    body = {"collection": notes, "query": "bread", "mode": "text", "top_k": 3}
    over_http = gw.client().post(INVOKE.format("brainml", "brainml.query"), json=body).json()
    got.pop("latency_ms"), over_http.pop("latency_ms")
    assert got == over_http and {r["doc_id"] for r in got["results"]} == {"d0", "d1"}
    # a worker plugin too; and the port's calls count in the plugin's telemetry like any other
    before = gw.client().get("/api/plugins/sysinfo/telemetry").json()["requests"]
    assert wb.plugin("sysinfo").invoke("sysinfo.sleep", seconds=0)["slept"] >= 0
    assert gw.client().get("/api/plugins/sysinfo/telemetry").json()["requests"] == before + 1
    assert _calls(gw, "CALL") == calls + 2


@pytest.mark.parametrize(
    ("plugin", "cap", "body"),
    [
        ("nope", "nope.x", b"{}"),  # no such plugin
        ("brainml", "brainml.nope", b"{}"),  # no such capability
        ("brainml", "brainml.query", b'{"collection": "notes", "query": "x", "top_k": 0}'),  # a bad field
        ("brainml", "brainml.query", b'{"collection": "missing", "query": "x", "mode": "text"}'),  # no such collection
        ("brainml", "brainml.query", b"not json"),
        ("brainml", "brainml.query", b"[1, 2]"),  # not an object
        ("brainml", "brainml.query", b"[" * 100_000 + b"]" * 100_000),  # nested past any parser's limit
        # over 64 KiB: an inline plugin's input parsed here and freed in slices, a worker's sent as its bytes
        ("brainml", "brainml.query", json.dumps({"collection": "notes", "query": "x" * 70_000, "top_k": 0}).encode()),
        ("sysinfo", "sysinfo.sleep", json.dumps({"seconds": "long", "pad": "x" * 70_000}).encode()),
    ],
)
def test_errors_are_those_of_http(
    gw: Gateway, conn: socket.socket, notes: str, plugin: str, cap: str, body: bytes
) -> None:
    status, answer = _call(conn, plugin, cap, body)
    r = gw.client().post(INVOKE.format(plugin, cap), content=body, headers={"Content-Type": "application/json"})
    assert 400 <= status < 500 and (status, answer) == (r.status_code, r.json()), (status, answer, r.text)
    assert _call(conn, "brainml", "brainml.query", FINE)[0] == 200  # the connection goes on serving


def test_who_calls_is_checked_on_every_call(gw: Gateway, notes: str) -> None:
    """A role narrowed or a key revoked takes effect on the next call of a connection already open."""
    admin = gw.client()
    assert admin.post("/admin/roles", json={"name": "porter", "scopes": ["collections:read"]}).status_code == 201
    user = admin.post("/admin/users", json={"username": "pat", "role": "porter"}).json()
    key = admin.post("/admin/keys", json={"name": "pat's", "user_id": user["id"]}).json()
    c = _open(gw, key["key"])
    query = json.dumps({"collection": notes, "query": "bread", "mode": "text"}).encode()
    assert _call(c, "brainml", "brainml.query", query)[0] == 200
    status, answer = _call(c, "sysinfo", "sysinfo.sleep", b'{"seconds": 0}')  # not pat's scope
    assert status == 403 and "plugins:write" in answer["error"]["message"]
    assert admin.patch("/admin/roles/porter", json={"scopes": ["plugins:read"]}).status_code == 200
    status, answer = _call(c, "brainml", "brainml.query", query)
    assert status == 403 and "collections:read" in answer["error"]["message"], answer
    assert admin.patch("/admin/roles/porter", json={"scopes": ["collections:read"]}).status_code == 200
    assert _call(c, "brainml", "brainml.query", query)[0] == 200
    assert admin.post(f"/admin/keys/{key['id']}/revoke").is_success
    status, answer = _call(c, "brainml", "brainml.query", query)
    assert status == 401 and answer["error"]["code"] == "unauthorized", answer
    c.close()


def test_a_key_the_port_does_not_take_goes_over_http(gw: Gateway, notes: str) -> None:
    port = _port(gw)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        _send(c, json.dumps({"hello": "bkg-call/1", "key": "bkg_0123456789ab_" + "B" * 40}).encode())
        assert _recv(c) == (401, {"error": {"status": 401, "code": "unauthorized", "message": "invalid API key"}})
        assert _closed(c)
    bad = Workbench(gw.url, "bkg_0123456789ab_" + "B" * 40)
    with pytest.raises(Unauthorized):  # HTTP's answer, after the port refused the hello
        bad.brain.query(notes, "bread", mode="text")
    port_of_bad = bad._port
    assert port_of_bad is not None and port_of_bad.refused and bad.call_port() is None
    # a token that is not bkg's (a Hub token) is never sent to the port: its calls go over HTTP
    hub_like = Workbench(gw.url, "a1b2c3d4e5f6")
    assert hub_like.call_port() is None
    with pytest.raises(Unauthorized):
        hub_like.brain.query(notes, "bread", mode="text")


def test_hostile_frames_are_answered_and_harm_nothing(gw: Gateway, conn: socket.socket, notes: str) -> None:
    port = _port(gw)
    status, answer = _call(conn, "brainml", "brainml.query", b"{}")  # fine so far: a 422 naming a field
    assert status == 422
    _send(conn, b"not a header\n{}")
    status, answer = _answer(conn)
    assert status == 400 and answer["error"]["field"] == "call"
    _send(conn, b'{"plugin": 1, "capability": []}\n{}')
    assert _answer(conn)[0] == 400
    assert _call(conn, "brainml", "brainml.query", FINE)[0] == 200  # still serving
    conn.sendall((2**31).to_bytes(4, "big"))  # announces 2 GiB: refused before a byte is read, then closed
    status, answer = _answer(conn)
    assert status == 413 and "at most" in answer["error"]["message"]
    assert _closed(conn)
    for hello in (
        b"not json",
        b'{"hello": "http/1.1"}',
        b'{"hello": "bkg-call/1"}',
        b'{"hello": "bkg-call/1", "key": 5}',
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            _send(c, hello)
            answer = _recv(c)
            assert answer is not None and answer[0] == 400, (hello, answer)
            assert _closed(c)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:  # a hello over its limit
        c.sendall((64 * 1024).to_bytes(4, "big"))
        assert _answer(c)[0] == 413
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:  # an HTTP request sent to the port
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " read as a length of ~1.2 GB: refused
        assert _answer(c)[0] == 413
    assert gw.client().get("/health").json()["status"] in ("ok", "starting")


def test_connections_past_the_limits_are_refused_and_the_client_uses_http(gw: Gateway, notes: str) -> None:
    """At most 8 connections wait for their hello at once (anyone can open one), at most 16 are one user's; past
    either the port answers 503, and the client, refused there, sends its calls over HTTP."""
    port = _port(gw)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
    try:
        time.sleep(0.5)  # every one accepted, waiting for its hello
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            status, answer = _answer(extra)
            assert status == 503 and "waiting for their hello" in answer["error"]["message"], answer
        wb = Workbench(gw.url, ADMIN_KEY)
        posts = _calls(gw, "POST")
        assert wb.brain.query(notes, "bread", mode="text")["results"]  # over HTTP this time
        assert _calls(gw, "POST") == posts + 1
    finally:
        for c in silent:
            c.close()
    wait_for(lambda: _hello_ok(port), timeout=10)
    mine = [_open(gw, ADMIN_KEY) for _ in range(16)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            _send(extra, json.dumps({"hello": "bkg-call/1", "key": ADMIN_KEY}).encode())
            status, answer = _answer(extra)
            assert status == 503 and "16 call port connections" in answer["error"]["message"], answer
            assert _closed(extra)
    finally:
        for c in mine:
            c.close()
    wait_for(lambda: _hello_ok(port), timeout=10)


def test_a_hello_sent_slowly_is_cut_off(gw: Gateway) -> None:
    """The hello must be in as a whole within 10 s, however its bytes trickle in (one every 2 s keeps each read
    short of any per-read timeout)."""
    with socket.create_connection(("127.0.0.1", _port(gw)), timeout=30) as c:
        hello = json.dumps({"hello": "bkg-call/1", "key": ADMIN_KEY}).encode()
        frame = len(hello).to_bytes(4, "big") + hello
        t0 = time.monotonic()
        sent = 0
        with contextlib.suppress(OSError):
            while sent < len(frame) and time.monotonic() - t0 < 30:
                if select.select([c], [], [], 0)[0]:  # the gateway closed it
                    break
                c.sendall(frame[sent : sent + 1])
                sent += 1
                time.sleep(2)
        assert sent < len(frame) and _closed(c)
        assert time.monotonic() - t0 < 16  # cut off at 10 s (checked every 2 s here)


def _hello_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        _send(c, json.dumps({"hello": "bkg-call/1", "key": ADMIN_KEY}).encode())
        return _answer(c)[0] == 200


def test_a_background_job_goes_over_http(gw: Gateway, conn: socket.socket) -> None:
    status, answer = _call(conn, "sysinfo", "sysinfo.survey", b'{"samples": 1, "every_s": 0.01}')
    assert status == 421 and answer["error"]["code"] == "misdirected"
    wb = Workbench(gw.url, ADMIN_KEY)
    job = wb.invoke("sysinfo", "sysinfo.survey", {"samples": 1, "every_s": 0.01})["job"]  # the client's fallback
    assert wb.wait_job(job["id"], progress=False)  # its result
    assert gw.client().get(f"/api/jobs/{job['id']}").json()["state"] == "done"


def test_the_port_and_http_share_the_plugins_slots(gw: Gateway, conn: socket.socket) -> None:
    """A call on the port that times out answers 504 and keeps its slot until the worker is done; HTTP calls
    meanwhile find no slot."""
    c = gw.client()
    r = c.put(
        "/api/plugins/sysinfo/config", json={"config": {"request_timeout": 1, "max_concurrent": 1, "max_queue": 0}}
    )
    assert r.status_code == 200, r.text
    try:
        wait_for(lambda: c.get("/api/plugins/sysinfo/status").json()["state"] == "running")
        answers: list[tuple[int, Any]] = []
        busy = threading.Thread(
            target=lambda: answers.append(_call(conn, "sysinfo", "sysinfo.sleep", b'{"seconds": 3}'))
        )
        busy.start()
        wait_for(lambda: c.get("/api/plugins/sysinfo/telemetry").json()["in_flight"] == 1, every=0.02)
        r = c.post(INVOKE.format("sysinfo", "sysinfo.sleep"), json={"seconds": 0})
        assert r.status_code == 429 and "max_queue 0" in r.json()["error"]["message"], r.text
        busy.join()
        assert answers[0][0] == 504, answers
        # answered at the timeout, not when the work ended: the work still runs, its slot still taken (a slot goes
        # back before the answer to a call whose work is done)
        r = c.post(INVOKE.format("sysinfo", "sysinfo.sleep"), json={"seconds": 0})
        assert r.status_code == 429, r.text
        wait_for(lambda: c.post(INVOKE.format("sysinfo", "sysinfo.sleep"), json={"seconds": 0}).status_code == 200)
        assert _call(conn, "sysinfo", "sysinfo.sleep", b'{"seconds": 0}')[0] == 200
    finally:
        c.put("/api/plugins/sysinfo/config", json={"config": {}})


def test_the_port_can_be_turned_off(tmp_path: Path) -> None:
    g = start_gateway(tmp_path / "data", env={"BKG_CALL_PORT": "-1"}, plugins=["sysinfo"])
    try:
        assert g.client().get("/health").json()["call_port"] is None
        wb = Workbench(g.url, ADMIN_KEY)
        assert wb.plugin("sysinfo").invoke("sysinfo.sleep", seconds=0)["slept"] >= 0
        assert wb.call_port() is None
    finally:
        g.stop()


# -- the slots, on their own ----------------------------------------------------------------------------------


def test_slots_go_first_come_first_served_to_the_loop_and_to_threads() -> None:
    async def scenario() -> list[str]:
        slots = Slots("p", 1, 10)
        order: list[str] = []
        await slots.take(1)  # held

        def thread_waiter(name: str) -> None:
            slots.take_blocking(5)
            order.append(name)
            slots.release()

        async def loop_waiter(name: str) -> None:
            await slots.take(5)
            order.append(name)
            slots.release()

        t1 = threading.Thread(target=thread_waiter, args=("thread-1",))
        t1.start()
        await asyncio.to_thread(wait_for, lambda: slots.queued == 1)
        task = asyncio.create_task(loop_waiter("loop-2"))
        await asyncio.to_thread(wait_for, lambda: slots.queued == 2)
        t3 = threading.Thread(target=thread_waiter, args=("thread-3",))
        t3.start()
        await asyncio.to_thread(wait_for, lambda: slots.queued == 3)
        slots.release()
        await task
        await asyncio.to_thread(t1.join)
        await asyncio.to_thread(t3.join)
        assert slots.free == 1 and slots.queued == 0
        return order

    assert asyncio.run(scenario()) == ["thread-1", "loop-2", "thread-3"]


def test_a_full_queue_is_refused_and_a_wait_times_out() -> None:
    slots = Slots("p", 1, 1)
    slots.take_blocking(1)
    timed_out: list[Timeout] = []

    def wait() -> None:
        try:
            slots.take_blocking(0.5)
        except Timeout as exc:
            timed_out.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for(lambda: slots.queued == 1)
    with pytest.raises(TooManyRequests, match="max_queue 1"):
        slots.take_blocking(1)
    waiter.join()
    assert len(timed_out) == 1 and slots.queued == 0  # the waiter that timed out left the queue
    with pytest.raises(Timeout, match="no free request slot for 0.1s"):
        slots.take_blocking(0.1)
    slots.release()
    slots.take_blocking(0)  # free again
    assert slots.free == 0


def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    async def scenario() -> int:
        slots = Slots("p", 1, 5)
        await slots.take(1)
        task = asyncio.create_task(slots.take(None))
        await asyncio.sleep(0.05)
        assert slots.queued == 1
        slots.release()  # handed to the waiter ...
        task.cancel()  # ... which is cancelled before it runs: the slot is passed on, not lost
        with pytest.raises(asyncio.CancelledError):
            await task
        await slots.take(0.5)
        slots.release()
        return slots.free

    assert asyncio.run(scenario()) == 1


def test_a_connection_idle_too_long_is_not_reused(gw: Gateway, notes: str) -> None:
    """The client never sends a call on a connection the gateway may be closing (idle past the client's limit),
    nor on one it closed (readable while idle): it opens another."""
    wb = Workbench(gw.url, ADMIN_KEY)
    assert wb.brain.query(notes, "bread", mode="text")["results"]
    port = wb.call_port()
    assert port is not None and len(port._idle) == 1
    old, _ = port._idle[0]
    port._idle[0] = (old, time.monotonic() - 3600)  # idle for an hour
    assert wb.brain.query(notes, "bread", mode="text")["results"]
    assert port._idle[0][0] is not old and old.sock.fileno() == -1  # a new one; the old one closed
    current, since = port._idle[0]
    current.sock.shutdown(socket.SHUT_WR)  # the gateway sees it end and closes its side: readable while idle
    wait_for(lambda: bool(select.select([current.sock], [], [], 0)[0]))
    assert wb.brain.query(notes, "bread", mode="text")["results"]
    assert port._idle[0][0] is not current


# -- a call on its caller's thread, on its own ---------------------------------------------------------------------


class _Wait(BaseModel):
    tenths: int


class _Waited(BaseModel):
    acting: bool
    seen: str | None


_MARK: contextvars.ContextVar[str | None] = contextvars.ContextVar("mark", default=None)


class _Slow(Plugin):
    """An inline plugin whose call takes `tenths` of a second, then says whether it may still act for its caller
    and what a context variable set by an earlier call holds."""

    id = "slow"
    name = "Slow"
    mode = "inline"

    @capability("slow.wait", scope="plugins:read")
    def wait(self, inp: _Wait) -> _Waited:
        """Wait, then look."""
        seen = _MARK.get()
        _MARK.set("left behind")
        time.sleep(inp.tenths / 10)
        try:
            calls.for_store()
            acting = True
        except Unavailable:
            acting = False
        self.looked = (time.monotonic(), acting)  # when it finished, and whether it could act for its caller
        return _Waited(acting=acting, seen=seen)


def test_an_inline_call_that_overruns_ends_at_its_deadline(tmp_path: Path) -> None:
    """On the caller's own thread an inline call still times out as over HTTP: at the deadline its caller is
    answered (504) and it can no longer act for them; its slot frees when it really ends; a context variable one
    call sets is not seen by the next."""
    entry = Entry(config={"request_timeout": 0.3, "max_concurrent": 1})
    host = PluginHost(Discovered("slow", "test", _Slow), entry, tmp_path, lambda *a: None)
    host.start()
    caller = Principal("u1", "ann", "viewer", frozenset({"plugins:read"}), None, "key")
    try:
        assert host.invoke_here("slow.wait", {"tenths": 0}, caller) == {"acting": True, "seen": None}
        told: list[tuple[float, Timeout]] = []

        def tell(err: Timeout) -> None:
            told.append((time.monotonic(), err))

        with pytest.raises(Timeout, match="did not answer within 0.3s"):
            host.invoke_here("slow.wait", {"tenths": 8}, caller, on_timeout=tell)
        plugin = host.plugin
        assert isinstance(plugin, _Slow) and len(told) == 1 and told[0][1].status == 504
        finished, acting = plugin.looked
        assert told[0][0] < finished  # answered at the deadline, before the work ended
        assert not acting  # when it looked, after its deadline, it could no longer act for ann
        assert host.slots.free == 1 and host.telemetry.snapshot()["in_flight"] == 0  # the slot came back at its end
        # nothing the overrun call set in its context leaks into the next call on this thread
        assert host.invoke_here("slow.wait", {"tenths": 0}, caller) == {"acting": True, "seen": None}
    finally:
        host.stop()


def test_the_client_sends_its_key_to_the_port_only_in_plain_http_to_the_gateway_itself() -> None:
    key = "bkg_0123456789ab_" + "C" * 40
    assert Workbench("http://127.0.0.1:9", key)._use_port
    assert not Workbench("https://bkg.example.com", key)._use_port  # TLS ends before the gateway: no key in clear
    assert not Workbench("http://hub.example.com/services/bkg", key)._use_port  # behind a proxy's prefix
    assert not Workbench("http://127.0.0.1:9", "hub-token-abc")._use_port  # not bkg's: HTTP only
    assert not Workbench("http://127.0.0.1:9", key, call_port=False)._use_port


def test_only_the_ports_own_421_sends_a_call_over_http() -> None:
    ours = json.dumps({"error": {"status": 421, "code": "misdirected", "message": "x.y runs as a job"}}).encode()
    theirs = json.dumps({"error": {"status": 421, "code": "upstream_error", "message": "misdirected"}}).encode()
    assert misdirected(421, ours) and not misdirected(421, theirs) and not misdirected(404, ours)
    assert not misdirected(421, b"not json")


def test_a_port_that_stops_answering_is_looked_up_again(gw: Gateway, notes: str) -> None:
    """A port that cannot be reached (a gateway started anew has another) is never tried again by number: the
    call goes over HTTP and the next lookup asks /health."""
    wb = Workbench(gw.url, ADMIN_KEY)
    port = wb.call_port()
    assert port is not None and port.port == _port(gw)
    port.close()
    port.port = free_port()  # nothing listens there
    posts = _calls(gw, "POST")
    assert wb.brain.query(notes, "bread", mode="text")["results"]
    assert _calls(gw, "POST") == posts + 1 and port.stale  # over HTTP; that port number is done with
    assert wb.call_port() is None  # looked up at most every 30 s
    wb._port_checked -= 60
    again = wb.call_port()
    assert again is not None and again is not port and again.port == _port(gw)


def test_a_call_that_overruns_is_answered_504_and_its_connection_closed_if_it_runs_on(gw: Gateway) -> None:
    """brainml asked for 1,000 hits with their texts and highlights (tens of ms) under a 0.1 ms timeout: the
    deadline (at least 1 ms after the call starts) always fires while the plugin runs on."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "heap", "dim": 3}).status_code == 201
    words = ["bread", "flour", "water", "salt", "yeast", "oven", "crust", "crumb", "rise", "proof"]
    points = [
        {"id": i, "vector": [1.0, 0.0, 0.0], "text": " ".join(words[(i + j) % 10] for j in range(120))}
        for i in range(3000)
    ]
    assert c.put("/api/collections/heap/points", json={"points": points}).is_success
    heavy = json.dumps({"collection": "heap", "query": "bread crust", "mode": "text", "top_k": 1000}).encode()
    assert c.put("/api/plugins/brainml/config", json={"config": {"request_timeout": 0.0001}}).status_code == 200
    try:
        wait_for(lambda: c.get("/api/plugins/brainml/status").json()["state"] == "running")
        for _ in range(2):
            conn = _open(gw, ADMIN_KEY)
            _send(conn, json.dumps({"plugin": "brainml", "capability": "brainml.query"}).encode() + b"\n" + heavy)
            size = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
            top, _, body = conn.recv(size, socket.MSG_WAITALL).partition(b"\n")
            head = json.loads(top)
            assert head["status"] == 504 and json.loads(body)["error"]["code"] == "timeout", (head, body)
            # answered at the deadline while the plugin ran on: this connection is done, its late answer never sent
            assert head.get("close") is True and _closed(conn), head
            conn.close()
        wb = Workbench(gw.url, ADMIN_KEY)
        with pytest.raises(Timeout):
            wb.brain.query("heap", "bread crust", mode="text", top_k=1000)
        with pytest.raises(Timeout):  # again: the client opened a new connection, or used the one still open
            wb.brain.query("heap", "bread crust", mode="text", top_k=1000)
    finally:
        assert c.put("/api/plugins/brainml/config", json={"config": {}}).status_code == 200
        wait_for(lambda: c.get("/api/plugins/brainml/status").json()["state"] == "running")
    assert Workbench(gw.url, ADMIN_KEY).brain.query("heap", "bread crust", mode="text", top_k=1000)["results"]


def test_a_jobs_call_counts_once_against_the_keys_rate_limit(gw: Gateway) -> None:
    """The port answers a job's call 421 without counting it; the client then starts it over HTTP, which counts:
    a key allowed one request a minute still starts its job."""
    made = gw.client().post("/admin/keys", json={"name": "one a minute", "rate_limit_per_min": 1})
    assert made.status_code == 201, made.text
    wb = Workbench(gw.url, made.json()["key"])
    job = wb.invoke("sysinfo", "sysinfo.survey", {"samples": 1, "every_s": 0.01})["job"]
    assert job["id"]
    with pytest.raises(TooManyRequests):  # and that was its one request
        wb.invoke("sysinfo", "sysinfo.sleep", {"seconds": 0})
