"""Where runs execute: the local pool of job workers (default), or a Dask cluster (`executor = dask://host:port`).

Both take a run spec and an `on_event` callback, and return the run's outcome (the worker's `done` event). Neither
runs a notebook in the gateway process: a local run goes to a long-lived worker (`jobs/worker.py`) that keeps a
warm kernel; `kill(run_id)` kills the run's kernel process group, which ends the run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bkg_kernel.logfiles import open_log

log = logging.getLogger("bkg.jobs")
OnEvent = Callable[[dict[str, Any]], None]


class Executor(Protocol):
    """Runs notebooks somewhere other than the gateway."""

    name: str
    capacity: int

    async def start(self) -> None: ...
    async def run(self, spec: dict[str, Any], on_event: OnEvent) -> dict[str, Any]: ...
    async def kill(self, run_id: str) -> None: ...
    def forget(self, run_id: str) -> None: ...
    async def close(self) -> None: ...


def failure(run_id: str, ename: str, evalue: str) -> dict[str, Any]:
    """An outcome for a run that ended without a notebook error to report (worker died, kernel killed)."""
    return {
        "event": "done",
        "id": run_id,
        "ok": False,
        "cells_done": 0,
        "cells_total": 0,
        "duration_s": 0.0,
        "output": None,
        "error": {"cell_index": None, "source": None, "ename": ename, "evalue": evalue, "traceback": ""},
    }


def kill_group(pid: int | None) -> None:
    """Kill a process group (a kernel and whatever it started)."""
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@dataclass(eq=False)
class _Worker:
    proc: asyncio.subprocess.Process
    run_id: str | None = None
    kernel_pid: int | None = None
    done: asyncio.Future[dict[str, Any]] | None = None
    on_event: OnEvent | None = None
    reader: asyncio.Task[None] | None = field(default=None, repr=False)
    ready: bool = False  # it has been ready once (a worker that never was counts as a failed start)


_BROKEN: Any = object()  # in the idle queue when workers cannot start


class LocalPool:
    """`capacity` job worker processes, each running one notebook at a time on a kernel it started beforehand."""

    name = "local"

    def __init__(self, capacity: int, env: dict[str, str], log_path: Path) -> None:
        self.capacity, self.env, self.log_path = capacity, env, log_path
        self.idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self.workers: set[_Worker] = set()
        self.rendering: dict[str, OnEvent] = {}  # run id -> who hears of its HTML rendering
        self.cancelled: set[str] = set()  # runs cancelled before a worker took them
        self.starting = asyncio.Lock()
        self.failures = 0  # workers in a row that exited before they were ever ready
        self.broken: str | None = None  # set after too many: runs fail at once, saying why
        self.closing = False

    async def start(self) -> None:
        """Nothing yet: the workers start with the first run (a gateway that runs no jobs pays nothing)."""

    async def _ensure(self) -> None:
        async with self.starting:  # runs submitted together start the pool once
            if not self.workers and not self.closing:
                for _ in range(self.capacity):
                    await self._spawn()

    async def _spawn(self) -> None:
        with open_log(self.log_path) as err:  # rotated past 10 MB
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bkg_kernel.jobs.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=self.env,
                limit=2**24,
            )
        w = _Worker(proc)
        self.workers.add(w)
        w.reader = asyncio.get_running_loop().create_task(self._read(w))

    async def _read(self, w: _Worker) -> None:
        assert w.proc.stdout is not None
        while True:
            line = await w.proc.stdout.readline()
            if not line:
                break
            try:  # a long line (a notebook's parameters, its error) is parsed on a thread, not on the loop
                ev = await asyncio.to_thread(json.loads, line) if len(line) > 65536 else json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "ready":
                w.run_id, w.kernel_pid, w.on_event, w.ready = None, None, None, True
                self.failures, self.broken = 0, None
                self.idle.put_nowait(w)
                continue
            if kind == "started":
                w.kernel_pid = ev.get("kernel_pid")
            if kind == "html":  # rendered after the run, maybe after the worker took the next one
                listener = self.rendering.pop(ev.get("id", ""), None)
                if listener is not None:
                    listener(ev)
            elif kind == "done" and w.done is not None and not w.done.done():
                if not ev.get("output"):
                    self.rendering.pop(ev.get("id", ""), None)  # nothing to render: no html event follows
                w.done.set_result(ev)
            elif w.on_event is not None:
                w.on_event(ev)
        await w.proc.wait()
        self.workers.discard(w)
        if w.run_id is not None:
            self.rendering.pop(w.run_id, None)
        if w.done is not None and not w.done.done():
            w.done.set_result(failure(w.run_id or "", "WorkerDied", f"the job worker exited ({w.proc.returncode})"))
        kill_group(w.kernel_pid)
        if self.closing:
            return
        if not w.ready:
            self.failures += 1
        if self.failures >= 5:
            self.broken = f"job workers exit before they are ready ({self.failures} in a row): see {self.log_path}"
            log.error(self.broken)
            while not self.idle.empty():  # nothing waits on a worker that will not come
                self.idle.get_nowait()
            self.idle.put_nowait(_BROKEN)
        delay = min(30.0, 0.5 * 2**self.failures) if self.failures else 0.0
        log.warning("job worker %s exited with %s: another in %.1f s", w.proc.pid, w.proc.returncode, delay)
        await asyncio.sleep(delay)
        await self._spawn()

    async def run(self, spec: dict[str, Any], on_event: OnEvent) -> dict[str, Any]:
        """Run on the next worker with a warm kernel; return the outcome."""
        await self._ensure()
        while True:
            w = await self.idle.get()
            if w is _BROKEN:
                if self.broken:
                    self.idle.put_nowait(_BROKEN)  # the next waiter hears it too
                    return failure(spec["id"], "JobWorkersDown", self.broken)
                continue  # workers came back since: drop the marker
            if w.proc.returncode is None and w in self.workers:
                break
        if spec["id"] in self.cancelled:  # cancelled while it waited: give the worker back untouched
            self.cancelled.discard(spec["id"])
            self.idle.put_nowait(w)
            return failure(spec["id"], "Cancelled", "cancelled before it started")
        loop = asyncio.get_running_loop()
        w.run_id, w.on_event, w.done = spec["id"], on_event, loop.create_future()
        if spec.get("html"):
            self.rendering[spec["id"]] = on_event
        assert w.proc.stdin is not None
        w.proc.stdin.write((json.dumps({"op": "run", **spec}) + "\n").encode())
        await w.proc.stdin.drain()
        return await w.done

    async def kill(self, run_id: str) -> None:
        """End a run now: kill its kernel's process group (the worker reports the run and warms anew); a run not
        on a worker yet is dropped when one takes it."""
        for w in self.workers:
            if w.run_id == run_id:
                kill_group(w.kernel_pid)
                return
        self.cancelled.add(run_id)

    def forget(self, run_id: str) -> None:
        """Drop what a kill left for a run that will never be handed over (cancelled before it started)."""
        self.cancelled.discard(run_id)

    async def close(self) -> None:
        """Stop the workers and their kernels."""
        self.closing = True
        for w in list(self.workers):
            kill_group(w.kernel_pid)
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in list(self.workers):
            try:
                await asyncio.wait_for(w.proc.wait(), 10)
            except TimeoutError:  # still warming its next kernel: killed, and reaped while the loop can see it go
                w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                w.reader.cancel()
