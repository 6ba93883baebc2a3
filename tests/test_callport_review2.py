"""Found by a review, with real parts: over the call port an inline call that overran its timeout could be answered
twice. The deadline thread answers such a call with its 504; but once it has fired, the connection's own thread,
whose plugin returns just then, answers the call with a 504 of its own. Whichever got out first, the other went out
too if the deadline thread was paused between firing and answering (the OS or the GIL may pause any thread
anywhere): a second answer to one call, which the client read as the answer to its next call on that connection.
Now each answer names its call on the gateway's side, and a call already answered gets no second one.

A real gateway, the real client and a real inline plugin; the one fake is that pause, made to order: the plugin
module holds the deadline thread right after it fires (in `Call.end`, the first thing it does then) until the
plugin's `late.hold` lets it go on."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator

import orjson
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for
from helpers import register_plugins

from bkg_kernel.client.callport import CallPort

LATE = '''
    import threading

    from pydantic import BaseModel

    from bkg_kernel.runtime import calls
    from bkg_kernel.runtime.contract import Plugin, capability
    from bkg_kernel.runtime.deadlines import DEADLINES

    FIRED = threading.Event()  # the deadline thread fired a deadline (and is held)
    GO = threading.Event()  # it may go on
    _end = calls.Call.end


    def _held_end(self: calls.Call) -> None:
        # the fake: the deadline thread paused between firing and answering (once)
        if threading.current_thread().name == "bkg-deadlines" and not GO.is_set():
            FIRED.set()
            GO.wait(60)
        _end(self)


    calls.Call.end = _held_end


    class Nothing(BaseModel):
        pass


    class Done(BaseModel):
        done: str


    class Late(Plugin):
        """Returns just after its deadline fired; lets the deadline thread go on."""

        id = "late"
        name = "Late"
        version = "0.1.0"
        description = "Calls that return as their deadline fires."
        mode = "inline"

        @capability("late.finish", scope="plugins:read")
        def finish(self, inp: Nothing) -> Done:
            """Return once the deadline fired (while the deadline thread is held)."""
            FIRED.wait(60)
            return Done(done="finish")

        @capability("late.hold", scope="plugins:read")
        def hold(self, inp: Nothing) -> Done:
            """Let the held deadline thread go on; return once it has done what it had to."""
            GO.set()
            flushed = threading.Event()
            DEADLINES.arm(0, flushed.set)  # runs after the held callback, on the same one thread
            flushed.wait(60)
            return Done(done="hold")


    PLUGIN = Late
'''


@pytest.fixture
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    site = tmp_path_factory.mktemp("site")
    (site / "bkg_late.py").write_text(textwrap.dedent(LATE))
    register_plugins(site, "bkg-late", {"late": "bkg_late"})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    g = start_gateway(tmp_path_factory.mktemp("late") / "data", env=env, plugins=["late", "sysinfo"])
    try:
        yield g
    finally:
        g.stop()


def test_a_call_the_deadline_and_its_thread_both_answer_gets_one_answer(gw: Gateway) -> None:
    c = gw.client()
    r = c.put("/api/plugins/late/config", json={"config": {"request_timeout": 2}})
    assert r.status_code == 200, r.text
    wait_for(lambda: c.get("/api/plugins/late/status").json()["state"] == "running")
    info = c.get("/health").json()["call_port"]
    port = CallPort("127.0.0.1", int(info["port"]), ADMIN_KEY, timeout=60, max_input=int(info["max_input"]))
    try:
        # the plugin returns once its deadline fired: the connection's thread answers the 504 (the deadline thread
        # is held before it does), and the connection stays open
        answer = port.call("late", "late.finish", b"{}")
        assert answer is not None
        status, body, _ = answer
        assert status == 504 and orjson.loads(body)["error"]["code"] == "timeout", body
        # the next call, on that same connection, lets the deadline thread go on: its answer to the call before
        # must not come as this call's
        answer = port.call("late", "late.hold", b"{}")
        assert answer is not None
        status, body, _ = answer
        assert (status, orjson.loads(body)) == (200, {"done": "hold"}), (status, body)
        answer = port.call("sysinfo", "sysinfo.facts", b"{}")
        assert answer is not None and answer[0] == 200 and "python" in orjson.loads(answer[1]), answer
    finally:
        port.close()
