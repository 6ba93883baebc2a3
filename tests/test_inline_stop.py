"""A stop drains an inline plugin: the calls running on its instance end before it stops (a restart for a new
setting stopped brainml under an index still writing, whose statistics then overwrote the new instance's), nothing
new is handed an instance that is stopping, and a call that never ends holds the stop up only for its timeout."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import on_thread
from pydantic import BaseModel

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import Unavailable
from bkg_kernel.runtime.contract import Plugin, Progress, capability
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.host import PluginHost

CALLER = Principal("u1", "ann", "viewer", frozenset({"plugins:read"}), None, "key")


class _Nothing(BaseModel):
    pass


class _Done(BaseModel):
    stopped_before_the_end: bool


class _Held(Plugin):
    """An inline plugin whose call waits until the test lets it go, and that notes what happened in which order."""

    id = "held"
    name = "Held"
    mode = "inline"
    inside = threading.Event()
    let_go = threading.Event()
    events: list[str] = []

    @capability("held.work", scope="plugins:read")
    def work(self, inp: _Nothing) -> _Done:
        """Wait to be let go."""
        self.events.append("call began")
        _Held.inside.set()
        assert _Held.let_go.wait(60)
        self.events.append("call ended")
        return _Done(stopped_before_the_end="stopped" in self.events)

    @capability("held.job", scope="plugins:read", job=True)
    def job(self, inp: _Nothing, progress: Progress) -> _Done:
        """The same, as a background job (streamed)."""
        progress(0.0, "waiting")
        return self.work(inp)

    def stop(self) -> None:
        self.events.append("stopped")


@pytest.fixture
def host(tmp_path: Path) -> Any:
    _Held.inside.clear()
    _Held.let_go.clear()
    _Held.events.clear()
    h = PluginHost(Discovered("held", "test", _Held), Entry(config={"request_timeout": 60}), tmp_path, lambda *a: None)
    h.start()
    yield h
    _Held.let_go.set()
    h.stop(timeout=1)


async def _streamed(host: PluginHost) -> Any:
    """A job's chunks, as the jobs service reads them; its result."""
    async for chunk in host.stream("held.job", {}, CALLER, queued=True):
        if "result" in chunk:
            return chunk["result"]
    return None


@pytest.mark.parametrize("path", ["call port", "http", "stream"])
def test_a_stop_lets_the_calls_running_on_the_instance_end_first(host: PluginHost, path: str) -> None:
    if path == "call port":  # on the caller's own thread
        call, answer = on_thread(lambda: host.invoke_here("held.work", {}, CALLER))
    elif path == "http":  # from the event loop, on the inline pool
        call, answer = on_thread(lambda: asyncio.run(host.invoke("held.work", {}, CALLER)))
    else:  # a background job's stream, on a thread of its own
        call, answer = on_thread(lambda: asyncio.run(_streamed(host)))
    assert _Held.inside.wait(60)
    stopping, _ = on_thread(lambda: host.stop(timeout=60))
    while host.plugin is not None and host.state != "stopped":  # the instance is taken from new work first
        threading.Event().wait(0.001)
    assert host.state == "stopping"  # and it stays so while the call runs
    assert host._inline.take() is None  # noqa: SLF001 - nothing new is handed the instance
    with pytest.raises(Unavailable, match="stopping"):
        host.invoke_here("held.work", {}, CALLER)
    assert _Held.events == ["call began"]  # the stop waits for the call
    _Held.let_go.set()
    call.join(60)
    stopping.join(60)
    assert answer == [{"stopped_before_the_end": False}]
    assert _Held.events == ["call began", "call ended", "stopped"] and host.state == "stopped"


def test_a_call_that_never_ends_holds_the_stop_up_only_for_its_timeout(host: PluginHost) -> None:
    call, _ = on_thread(lambda: host.invoke_here("held.work", {}, CALLER))
    assert _Held.inside.wait(60)
    host.stop(timeout=0.2)  # returns, the call still running
    assert host.state == "stopped" and _Held.events == ["call began", "stopped"]
    _Held.let_go.set()
    call.join(60)
    host.start()  # a new instance, as after a restart, takes calls
    _Held.events.clear()
    assert host.invoke_here("held.work", {}, CALLER) == {"stopped_before_the_end": False}
