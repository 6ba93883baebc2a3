"""A worker's pipe and the requests on it, where threads race. The pipe is closed by the last of its two threads to
end, never by a stop while a thread may still use it. Found in a fresh-clone CI run: a config change while sysinfo
was starting stopped the worker being started, and the stop closed the pipe while its writer thread was about to
send that worker ("stop",). The next worker's pipe took the freed descriptor number, the old writer's message
reached the new worker, and it exited under the three calls just sent to it (each a 503 "the sysinfo worker exited
while handling the request"). And, found by a review: a request the reader's end failed first was failed again (a
500); a health check's timeout cancelled its request under the reader, which died of it; a body nested too deep to
pickle was a 500 and left its request booked; a stop during the supervisor's sampling raised in its watch thread; a
call just after a crash was told the plugin was "running" with no worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import InvalidInput, Timeout, Unavailable
from bkg_kernel.plugins.sysinfo.plugin import SysInfo
from bkg_kernel.runtime import supervisor as supervisor_mod
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.host import PluginHost
from bkg_kernel.runtime.supervisor import Supervisor

CALLER = Principal("u1", "ann", "editor", frozenset({"plugins:read", "plugins:write"}), None, "key")


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _same(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def test_a_stop_leaves_the_pipe_to_a_writer_still_sending_then_it_closes(tmp_path: Path) -> None:
    host = PluginHost(Discovered("sysinfo", "test", SysInfo), Entry(config={}), tmp_path, lambda *a: None)
    assert host.start()["state"] == "running"
    w = host.worker
    assert w is not None
    fd = w.conn.fileno()
    inode = os.fstat(fd).st_ino
    sending, go_on = threading.Event(), threading.Event()
    send = w.conn.send_bytes

    def held(frame: Any) -> None:  # the writer, about to write: it holds the descriptor's number
        sending.set()
        go_on.wait(30)
        send(frame)

    w.conn.send_bytes = held  # type: ignore[method-assign]
    host.worker = None  # stopped as the supervisor's reaper and a start ended by a stop do: the worker alone
    stopping = threading.Thread(target=w.stop, args=(0,))
    stopping.start()
    assert sending.wait(10)
    stopping.join(30)
    assert not stopping.is_alive()
    # stopped (the process killed), yet its writer is still in a send: the descriptor is still the pipe's, so a
    # new pipe cannot take its number and get what the old writer sends
    assert _same(fd, inode)
    a, b = socket.socketpair()
    try:
        assert fd not in (a.fileno(), b.fileno())
    finally:
        a.close()
        b.close()
    go_on.set()
    # the writer's send fails (the pipe is shut down), it ends, and the last of the two threads closes the pipe
    assert _wait(lambda: not _same(fd, inode))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[PluginHost]:
    h = PluginHost(Discovered("sysinfo", "test", SysInfo), Entry(config={}), tmp_path, lambda *a: None)
    assert h.start()["state"] == "running"
    yield h
    h.stop(timeout=5)


def test_a_request_the_pipes_end_failed_first_is_not_failed_again(host: PluginHost) -> None:
    w = host.worker
    assert w is not None

    class Grants(dict[str, Any]):  # the pipe's end lands as the request is being booked, before it is sent
        def __setitem__(self, key: str, value: Any) -> None:
            super().__setitem__(key, value)
            w._broken = True  # noqa: SLF001
            w.fail_in_flight("the sysinfo worker exited while handling the request")

    w.grants = Grants()
    fut = w.submit(("invoke", "sysinfo.facts", {}), CALLER)  # raised InvalidStateError (a 500) before
    with pytest.raises(Unavailable, match="exited while handling"):
        fut.result(1)
    assert w.futures == {} and w.grants == {}
    w._broken = False  # noqa: SLF001  # (the pipe is fine: the stop below asks the worker to end, not waits 5 s)


def test_a_health_check_that_times_out_leaves_its_request_to_the_answer(host: PluginHost) -> None:
    w = host.worker
    assert w is not None
    asked: list[Any] = []
    submit = w.submit
    w.submit = lambda *a, **k: asked.append(submit(*a, **k)) or asked[-1]  # type: ignore[method-assign]
    with pytest.raises(Timeout):
        asyncio.run(host.health(timeout=0.000001))
    # not cancelled under the reader (it died of a cancel landing as it answered): answered when the worker is
    assert not asked[0].cancelled()
    assert isinstance(asked[0].result(10), dict)
    w.submit = submit  # type: ignore[method-assign]
    assert asyncio.run(host.health())["ok"] is True


def test_a_body_too_deep_to_pickle_is_a_422_and_leaves_nothing_booked(host: PluginHost) -> None:
    w = host.worker
    assert w is not None
    deep = {"x": json.loads("[" * 700 + "]" * 700)}  # parses, but pickling on a call's deeper stack recurses past

    async def calls() -> None:
        with pytest.raises(InvalidInput, match="nests too deeply"):
            await host.invoke("sysinfo.facts", deep, CALLER)
        with pytest.raises(InvalidInput, match="nests too deeply"):
            async for _ in host.stream("sysinfo.facts", deep, CALLER):
                pass

    asyncio.run(calls())
    assert w.futures == {} and w.grants == {} and w.streams == {}
    assert host.slots.free == host.settings.max_concurrent


def test_a_stop_while_the_supervisor_samples_raises_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"sysinfo": Discovered("sysinfo", "test", SysInfo)})
    h = sup.hosts["sysinfo"]
    assert h.start()["state"] == "running"
    try:
        made = psutil.Process

        def process(pid: int) -> psutil.Process:  # a stop lands as the worker's process handle is made
            h.worker = None
            return made(pid)

        monkeypatch.setattr(supervisor_mod.psutil, "Process", process)
        w = h.worker
        sup._sample(h, (0.0, 0))  # noqa: SLF001  # raised AttributeError in the watch thread before
        h.worker = w
    finally:
        h.stop(timeout=5)


def test_a_call_after_a_crash_is_told_to_retry(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"sysinfo": Discovered("sysinfo", "test", SysInfo)})
    h = sup.hosts["sysinfo"]
    assert h.start()["state"] == "running"
    try:
        w = h.worker
        assert w is not None and w.pid is not None
        seen: list[tuple[str, bool]] = []
        h.emit = lambda kind, *a: seen.append((h.state, h.worker is None)) if kind == "status" else None
        os.kill(w.pid, signal.SIGKILL)
        assert _wait(lambda: not w.alive())
        sup._check(h, time.monotonic())  # noqa: SLF001
        # when the state said `error`, the worker was still there: no moment of "running" without a worker
        assert seen and seen[0] == ("error", False), seen
        with pytest.raises(Unavailable) as got:
            asyncio.run(h.invoke("sysinfo.facts", {}, CALLER))
        assert got.value.retry_after is not None and got.value.retry_after > 0
    finally:
        h.stop(timeout=5)
