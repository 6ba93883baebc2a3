"""A stream's request slot is given back when its work has really stopped, not when its caller stops reading: a
cancelled job or a closed stream used to free its slot at once while the plugin's thread still ran it, so with
`max_concurrent` 1 the next call was sent into a worker whose only thread was busy (a 504 from inside, and the
call ran after it). And a stop ends an inline plugin's streams that outlive its drain, with the 503 a stopped
worker's streams get, instead of leaving them running on a stopped instance."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import on_thread
from pydantic import BaseModel

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import Unavailable
from bkg_kernel.plugins.sysinfo.plugin import SysInfo
from bkg_kernel.runtime.contract import Plugin, Progress, capability
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.host import PluginHost

CALLER = Principal("u1", "ann", "editor", frozenset({"plugins:read", "plugins:write"}), None, "key")


class _Nothing(BaseModel):
    pass


class _Count(BaseModel):
    ticks: int


class _Ticker(Plugin):
    """An inline plugin whose job ticks each time the test lets it, and a stream that ticks until it is stopped."""

    id = "ticker"
    name = "Ticker"
    mode = "inline"
    tick = threading.Semaphore(0)
    ended = threading.Event()

    @capability("ticker.job", scope="plugins:read", job=True)
    def job(self, inp: _Nothing, progress: Progress) -> _Count:
        """Tick when let."""
        try:
            for n in range(1000):
                progress(n / 1000, "tick")
                assert _Ticker.tick.acquire(timeout=60)
            return _Count(ticks=1000)
        finally:
            _Ticker.ended.set()

    @capability("ticker.forever", scope="plugins:read")
    def forever(self, inp: _Nothing) -> _Count:
        """Tick until stopped (streamed; called, no ticks)."""
        return _Count(ticks=0)

    def stream(self, capability_id: str, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        if capability_id != "ticker.forever":
            yield from super().stream(capability_id, data, cancelled)
            return
        try:
            while not cancelled.is_set():
                yield {"tick": True}
                time.sleep(0.01)
        finally:
            _Ticker.ended.set()


def _wait(check: Any, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def _first_chunk_then_leave(host: PluginHost, capability: str, data: dict[str, Any]) -> int:
    """Read one chunk of a stream, close it as a client that goes away does; the slots free right after."""
    chunks = host.stream(capability, data, CALLER)
    await chunks.__anext__()
    await chunks.aclose()
    return host.slots.free


@pytest.fixture
def ticker(tmp_path: Path) -> Iterator[PluginHost]:
    _Ticker.ended.clear()
    entry = Entry(config={"request_timeout": 60, "max_concurrent": 1})
    host = PluginHost(Discovered("ticker", "test", _Ticker), entry, tmp_path, lambda *a: None)
    host.start()
    yield host
    for _ in range(5):
        _Ticker.tick.release()
    host.stop(timeout=1)


def test_a_closed_inline_stream_keeps_its_slot_until_its_thread_has_stopped(ticker: PluginHost) -> None:
    free = asyncio.run(_first_chunk_then_leave(ticker, "ticker.job", {}))
    assert free == 0  # the job's thread still waits for its next tick: it holds the only slot
    assert not _Ticker.ended.is_set()
    _Ticker.tick.release()  # its next progress sees the cancel
    assert _Ticker.ended.wait(30)
    assert _wait(lambda: ticker.slots.free == 1)
    assert ticker._inline.running == 0  # noqa: SLF001 - the instance has no work counted on it any more


def test_a_stop_ends_an_inline_stream_that_outlives_the_drain_with_a_503(ticker: PluginHost) -> None:
    got: list[Any] = []

    async def read() -> None:
        try:
            async for chunk in ticker.stream("ticker.forever", {}, CALLER):
                if not got:
                    got.append(chunk)
        except Unavailable as exc:
            got.append(exc)

    reading, _ = on_thread(lambda: asyncio.run(read()))
    assert _wait(lambda: bool(got))
    t0 = time.monotonic()
    ticker.stop(timeout=0.2)  # waits its 0.2 s for the stream to end, then stops it
    assert time.monotonic() - t0 < 10
    reading.join(30)
    assert not reading.is_alive() and _Ticker.ended.is_set()
    assert isinstance(got[-1], Unavailable) and "ticker was stopped" in got[-1].message
    # the work's thread ends just after the plugin says it ended: its count goes then
    assert _wait(lambda: ticker._inline.running == 0)  # noqa: SLF001


def test_a_closed_worker_stream_keeps_its_slot_until_the_worker_has_stopped_it(tmp_path: Path) -> None:
    entry = Entry(config={"request_timeout": 60, "max_concurrent": 1})
    host = PluginHost(Discovered("sysinfo", "test", SysInfo), entry, tmp_path, lambda *a: None)
    assert host.start()["state"] == "running"
    try:
        worker = host.worker
        assert worker is not None
        survey = {"samples": 100, "every_s": 1.5}  # a progress chunk every 1.5 s: the worker sleeps in between
        free = asyncio.run(_first_chunk_then_leave(host, "sysinfo.survey", survey))
        assert free == 0  # its only thread still sleeps in the survey until its next progress
        assert worker.grants == {}  # but the cancelled work can no longer act as its caller
        t0 = time.monotonic()
        assert asyncio.run(host.invoke("sysinfo.sleep", {"seconds": 0}, CALLER))["slept"] < 1
        assert time.monotonic() - t0 < 10  # it waited at the gateway for the survey to stop (<= 1.5 s), then ran
        assert _wait(lambda: host.slots.free == 1) and worker.streams == {}
    finally:
        host.stop(timeout=5)
