"""One plugin under supervision: lifecycle state, inline or worker execution, limits, logs and telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import multiprocessing
import os
import queue
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import (
    BkgError,
    ClientGone,
    InvalidInput,
    NotFound,
    Timeout,
    Unauthorized,
    Unavailable,
    error_data,
    from_dict,
    invalid_from_pydantic,
)
from bkg_kernel.runtime import bodyjson, calls, pipe, worker
from bkg_kernel.runtime.contract import Plugin, PluginSettings
from bkg_kernel.runtime.deadlines import DEADLINES
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.slots import Slots
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.runtime.telemetry import LogRing, RingHandler, Telemetry

log = logging.getLogger("bkg.supervisor")
# Serves workers' store requests (a store call may wait on another plugin, e.g. an embedding in candle): never
# on a pipe reader thread, which must keep delivering results.
_STORE_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="bkg-store")
# Runs inline plugins' requests (their own pool: they never take the event loop's default executor from the
# gateway's own blocking work, and a request that timed out is still tracked until it ends).
_INLINE_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bkg-inline")
# Every worker is started by this one thread, which lives as long as the gateway process. A worker asks the kernel to
# kill it when the thread that started it ends (PR_SET_PDEATHSIG): so when the gateway dies, however it dies, its
# workers go too, even one whose threads are stuck holding its GIL (the signal's default action needs no Python).
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bkg-spawn")
STATES = ("stopped", "starting", "running", "stopping", "degraded", "error")
Emit = Callable[[str, str, dict[str, Any]], None]
START_TIMEOUT_S = 120.0
RETRY_STARTING_S = 5.0  # the Retry-After of a call to a plugin still starting


class _Request(Future[Any]):
    """A request sent to a worker: the future of its answer, its id, and the grant it carries (None: no caller)."""

    grant: str | None = None
    req_id: int = 0


class WorkerProcess:
    """A spawned worker and the thread that reads its pipe."""

    def __init__(self, host: PluginHost) -> None:
        assert host.cls is not None
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker.main,
            args=(
                child,
                host.cls.__module__,
                host.cls.__name__,
                host.settings.model_dump(),
                str(host.data_dir),
                str(host.model_dir),
                os.getpid(),
            ),
            name=f"bkg-plugin-{host.id}",
            daemon=True,
        )
        self.host = host
        self.ready = threading.Event()
        self.failed: str | None = None
        self.pid: int | None = None
        self.last_beat = time.monotonic()
        self.futures: dict[int, Future[Any]] = {}
        self.streams: dict[int, Callable[[tuple[Any, ...]], None]] = {}
        # grant -> caller, for the requests in flight: a store request from the worker acts as that caller
        self.grants: dict[str, Principal] = {}
        self._ids = itertools.count(1)
        # Messages to the worker, pickled by the sender and written by one thread in order: the event loop never
        # writes to the pipe itself (a worker that stops reading, or a message bigger than the pipe's buffer,
        # would block it until the worker reads again, and stop() could not kill it meanwhile).
        self._outbox: queue.SimpleQueue[list[bytes | memoryview] | None] = queue.SimpleQueue()
        self._broken = False
        _SPAWNER.submit(self.proc.start).result()
        child.close()
        threading.Thread(target=self._read, name=f"bkg-pipe-{host.id}", daemon=True).start()
        threading.Thread(target=self._write, name=f"bkg-pipe-out-{host.id}", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "chunk":
                sink = self.streams.get(msg[1])
                if sink is not None:
                    sink(("chunk", msg[2]))
            elif kind == "result":
                sink = self.streams.pop(msg[1], None)  # one pop: a cancel may race this reader
                if sink is not None:
                    sink(("end", msg[2], msg[3]))
                    continue
                fut = self.futures.pop(msg[1], None)
                if fut is not None and not fut.done():
                    if msg[2]:
                        fut.set_result(msg[3])
                    else:
                        fut.set_exception(from_dict(msg[3]))
            elif kind == "store":
                self._store_request(msg[1], msg[2], msg[3], msg[4])
            elif kind == "heartbeat":
                self.last_beat = time.monotonic()
            elif kind == "log":
                self.host.add_log(msg[1], msg[2], msg[3])
            elif kind == "ready":
                self.pid = msg[1]
                self.last_beat = time.monotonic()
                self.ready.set()
            elif kind == "failed":
                self.failed = msg[1]
                self.ready.set()
        self.ready.set()
        self.fail_in_flight(f"the {self.host.id} worker exited while handling the request")

    def _store_request(self, store_id: int, grant: str, op: str, args: dict[str, Any]) -> None:
        caller = self.grants.get(grant)
        if caller is None:
            err = Unauthorized(f"the {self.host.id} worker sent a store request for a call that is no longer running")
            self._send(("store_result", store_id, False, err.to_dict()["error"]))
            return
        _STORE_POOL.submit(self._serve_store, store_id, caller, op, args)

    def _serve_store(self, store_id: int, caller: Principal, op: str, args: dict[str, Any]) -> None:
        try:
            reply: tuple[Any, ...] = ("store_result", store_id, True, self.host.store_op(caller, op, args))
        except Exception as exc:
            reply = ("store_result", store_id, False, error_data(exc))
        self._send(reply)

    def _send(self, msg: tuple[Any, ...]) -> bool:
        """Queue a message for the worker (False once the pipe is known broken: the worker is gone)."""
        if self._broken:
            return False
        self._outbox.put(pipe.frames(msg))  # pickled here: errors are the caller's; a big body's bytes out of band
        return True

    def _write(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                for frame in data:  # one writer: a message's frames go out together, in order
                    self.conn.send_bytes(frame)
            except (OSError, ValueError):  # the worker is gone: what waits on it gets its 503 now, not a timeout
                self._broken = True
                self.fail_in_flight(f"the {self.host.id} worker is not reachable")
                return

    def grant(self, caller: Principal) -> dict[str, Any]:
        """Make a grant for one request of `caller`; the message data that carries it into the worker."""
        token = secrets.token_urlsafe(18)
        self.grants[token] = caller
        return {"caller": caller.to_dict(), "grant": token}

    def fail_in_flight(self, message: str) -> None:
        """Answer every request still waiting on this worker with a 503 (streams get it as their last event)."""
        for req_id in list(self.streams):
            sink = self.streams.pop(req_id, None)
            if sink is not None:
                sink(("end", False, Unavailable(message).to_dict()["error"]))
        for req_id in list(self.futures):
            fut = self.futures.pop(req_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(Unavailable(message))
        self.grants.clear()

    def submit(self, msg: tuple[Any, ...], caller: Principal | None = None) -> Future[Any]:
        """Send a request (as `caller`); the future resolves when the worker answers (or dies). The request's
        grant ends with it."""
        fut = _Request()
        req_id = next(self._ids)
        fut.req_id = req_id
        self.futures[req_id] = fut
        if caller is not None:
            call = self.grant(caller)
            fut.grant = call["grant"]
            fut.add_done_callback(lambda _: self.end_grant(fut))
            msg = (*msg, call)
        if not self._send((msg[0], req_id, *msg[1:])):
            self.futures.pop(req_id, None)
            fut.set_exception(Unavailable(f"the {self.host.id} worker is not reachable"))
        return fut

    def end_grant(self, fut: Future[Any]) -> None:
        """End the grant of a request: when it is answered, or when its caller stopped waiting (it timed out; its
        work may run on, but can no longer act in the store as that caller)."""
        grant = getattr(fut, "grant", None)
        if grant is not None:
            self.grants.pop(grant, None)

    def abandon(self, fut: Future[Any]) -> None:
        """Nobody waits for a request's answer any more (its caller timed out or went away): end its grant, and tell
        the worker, whose call's `stop` is set then (work that looks at it, a generation, ends early)."""
        self.end_grant(fut)
        req_id = getattr(fut, "req_id", 0)
        if req_id and not fut.done():
            self._send(("cancel", req_id))

    def open_stream(
        self, capability_id: str, data: Any, caller: Principal, sink: Callable[[tuple[Any, ...]], None]
    ) -> int:
        """Start a streaming request as `caller`; `sink` gets ("chunk", data)... then ("end", ok, data). The
        request's grant ends with the stream (its end, its cancel, or the worker's exit)."""
        req_id = next(self._ids)
        call = self.grant(caller)

        def ending(item: tuple[Any, ...]) -> None:
            if item[0] != "chunk":
                self.grants.pop(call["grant"], None)
            if item[0] != "cancelled":
                sink(item)

        self.streams[req_id] = ending
        if not self._send(("stream", req_id, capability_id, data, call)):
            self.streams.pop(req_id, None)
            ending(("end", False, Unavailable(f"the {self.host.id} worker is not reachable").to_dict()["error"]))
        return req_id

    def cancel(self, req_id: int) -> None:
        """Tell the worker to stop a stream now (its client went away); its slot frees at once."""
        sink = self.streams.pop(req_id, None)
        if sink is not None:
            sink(("cancelled",))  # ends its grant
        self._send(("cancel", req_id))

    def alive(self) -> bool:
        """Return whether the process is still running."""
        try:
            return self.proc.is_alive()
        except ValueError:  # its handle was closed: it was stopped
            return False

    def exitcode(self) -> int | None:
        """The process's exit code (None while it runs, or once its handle was closed)."""
        try:
            return self.proc.exitcode
        except ValueError:
            return None

    def kill(self) -> None:
        """Kill the worker at once (one still starting: nothing of it is worth a graceful stop); its pipe's reader
        then ends, and whoever waits for it to be ready stops waiting."""
        with contextlib.suppress(ValueError, OSError):  # closed, or gone already
            self.proc.kill()

    def stop(self, timeout: float) -> None:
        """Ask the worker to stop; kill it if it has not exited within `timeout` seconds. A request sent from now on
        gets its 503 at once (it would wait behind the writer's end for its whole timeout)."""
        self._send(("stop",))
        self._broken = True
        self._outbox.put(None)  # the writer ends after it
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("worker %s did not stop in %.0fs: killing it", self.host.id, timeout)
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
        with contextlib.suppress(ValueError):  # still running after the kill: its handle stays
            self.proc.close()
        self.fail_in_flight(f"the {self.host.id} worker stopped")  # what slipped in while it stopped


WATCH_S = 0.25  # how often a call port's thread, waiting on a worker, looks whether its client left


def _result_while(work: Future[Any], timeout: float, gone: Callable[[], bool] | None) -> Any:
    """`work`'s result within `timeout` (else TimeoutError), given up (`ClientGone`) once `gone()` says nobody
    waits for it any more."""
    if gone is None:
        return work.result(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            return work.result(min(WATCH_S, max(0.0, end - time.monotonic())))
        except TimeoutError:
            if work.done():  # the work's own TimeoutError, not the wait's
                raise
            if time.monotonic() >= end:
                raise
            if gone():
                raise ClientGone("the client went away before its answer was ready") from None


async def _answer(work: Future[Any], timeout: float) -> Any:
    """The result of `work` (a worker's or an inline thread's future), awaited on the event loop for at most
    `timeout` seconds (then TimeoutError). The work itself is not cancelled here: the caller's `_settle` ends its
    call (work that looks at the call's `stop` ends early; other work runs on), and its slot frees when it really
    ends. One hand-over to the loop per answer (`wait_for(shield(wrap_future()))`
    chains three futures for the same)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def deliver(done: Future[Any]) -> None:
        if waiter.done():  # the caller timed out or went away
            return
        if done.cancelled():
            waiter.cancel()
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def wake(done: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits any more
            loop.call_soon_threadsafe(deliver, done)

    work.add_done_callback(wake)
    async with asyncio.timeout(timeout):
        return await waiter


def _run_inline_stream(
    plugin: Plugin,
    capability_id: str,
    data: Any,
    call: calls.Call,
    cancelled: threading.Event,
    sink: Callable[[tuple[Any, ...]], None],
    done: Callable[[], None],
) -> None:
    try:
        with calls.running(call):
            for chunk in plugin.stream(capability_id, data, cancelled):
                if cancelled.is_set():
                    break
                sink(("chunk", chunk))
        sink(("end", True, None))
    except Exception as exc:
        sink(("end", False, error_data(exc)))
    finally:
        done()


class InlineWork:
    """The work running on an inline plugin's instance, so that a stop lets it finish before the instance stops
    (as a web server drains its requests): a restart for a new setting used to stop brainml under an index still
    writing, whose statistics then overwrote the new instance's. Work is counted from when it is handed the
    instance (`take`, which a stop's `release` excludes: nothing is handed an instance that is stopping) until it
    ends (`done`)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.plugin: Plugin | None = None
        self.running = 0

    def take(self) -> Plugin | None:
        """The instance to run on (None: stopped or stopping), counted until `done`."""
        with self._cv:
            if self.plugin is not None:
                self.running += 1
            return self.plugin

    def done(self) -> None:
        with self._cv:
            self.running -= 1
            self._cv.notify_all()

    def release(self, timeout: float) -> Plugin | None:
        """Take the instance away from new work, then wait up to `timeout` seconds for the work on it to end;
        return it (None: there was none)."""
        with self._cv:
            p, self.plugin = self.plugin, None
            deadline = time.monotonic() + timeout
            while self.running and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
        return p


class PluginHost:
    """Lifecycle `stopped -> starting -> running -> stopping -> stopped`, plus `degraded` and `error(reason)`."""

    def __init__(
        self,
        found: Discovered,
        entry: Entry,
        data_dir: Path,
        emit: Emit,
        services: dict[str, Any] | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self.id = found.id
        self.model_dir = model_dir if model_dir is not None else data_dir.parent / "models"
        self.services = services or {}
        self.found = found
        self.cls = found.cls
        self.source = found.source
        self.entry = entry
        self.data_dir = data_dir
        self.emit = emit
        self.state = "error" if found.cls is None else "stopped"
        self.reason: str | None = found.error
        self.logs = LogRing()
        self.telemetry = Telemetry()
        self._inline = InlineWork()  # `plugin`, with the work running on it
        self.worker: WorkerProcess | None = None
        self.restarts = 0
        self.want_running = False
        self._lock = threading.RLock()
        self._starting: WorkerProcess | None = None  # a worker being started: a stop kills it, not waits for it
        self._start_stopped = threading.Event()  # a stop came while the plugin was starting
        self._slots: Slots | None = None
        self._slots_lock = threading.Lock()
        self.settings: PluginSettings = PluginSettings()
        if self.cls is not None:
            try:
                self.settings = self.cls.Settings.model_validate(entry.config)
            except ValidationError as exc:
                self.state, self.reason = "error", f"stored config is invalid: {invalid_from_pydantic(exc, 'config')}"

    # -- description ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.cls.mode if self.cls is not None else "unknown"

    def status(self) -> dict[str, Any]:
        """Return the plugin's state, reason, pid and uptime."""
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "mode": self.mode,
            "pid": self.worker.pid if self.worker is not None else None,
            "restarts": self.restarts,
            "enabled": self.entry.enabled,
            "autostart": self.entry.autostart,
            "uptime_s": self.telemetry.uptime() if self.state in ("running", "degraded") else 0.0,
        }

    def describe(self) -> dict[str, Any]:
        """Return the declaration plus status and the current config."""
        base = (
            self.cls.describe()
            if self.cls is not None
            else {"id": self.id, "name": self.id, "version": "", "description": "", "capabilities": []}
        )
        return {**base, "source": self.source, "status": self.status(), "config": self.settings.public()}

    def store_op(self, caller: Principal, op: str, args: dict[str, Any]) -> Any:
        """Run one store-handle operation of this plugin as `caller` (the gateway's `plugin_store` service)."""
        serve = self.services.get("plugin_store")
        if serve is None:
            raise Unavailable(f"plugin {self.id!r} runs without a gateway: it cannot reach the store")
        return serve(self.id, caller, op, args)

    def _inline_store(self, op: str, args: dict[str, Any]) -> Any:
        return self.store_op(calls.for_store().caller, op, args)

    @property
    def plugin(self) -> Plugin | None:
        """The inline plugin's instance while it runs (None: stopped, stopping, or a worker's plugin)."""
        return self._inline.plugin

    def _set(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason = state, reason
        self.emit("status", self.id, self.status())

    def add_log(self, level: str, t: float, message: str) -> None:
        """Record a log line and push it to subscribers."""
        self.emit("logs", self.id, self.logs.add(level, t, message))

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the plugin (inline, or in a new worker) and wait until it is running or failed."""
        with self._lock:
            if self.cls is None:
                raise Unavailable(f"plugin {self.id!r} cannot start: {self.reason}")
            if self.state in ("running", "degraded", "starting"):
                return self.status()
            self.want_running = True
            self._start_stopped.clear()
            self._set("starting")
            self.add_log("INFO", time.time(), f"starting {self.id} ({self.mode})")
            try:
                if self.cls.mode == "inline":
                    self._start_inline()
                else:
                    self._start_worker()
            except Exception as exc:
                self._set("error", f"start failed: {exc}")
                self.add_log("ERROR", time.time(), f"start failed: {exc}")
                return self.status()
            self.telemetry.started_at = time.monotonic()  # for uptime: a clock step moves no duration
            self._set("running")
            self.add_log("INFO", time.time(), f"{self.id} running")
            return self.status()

    def _start_inline(self) -> None:
        assert self.cls is not None
        plugin = self.cls.create(
            self.settings, self.data_dir, self.services, self.model_dir, StoreHandle(self._inline_store)
        )
        handler = RingHandler(self.add_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        plugin.log.addHandler(handler)
        plugin.log.setLevel(logging.INFO)
        plugin.log.propagate = False
        plugin.start()
        self._inline.plugin = plugin

    def _start_worker(self) -> None:
        w = WorkerProcess(self)
        self._starting = w
        try:
            if self._start_stopped.is_set():  # stopped while the worker was being spawned
                w.kill()
            came = w.ready.wait(START_TIMEOUT_S)
        finally:
            self._starting = None
        if self._start_stopped.is_set():
            w.stop(0)  # ready meanwhile or not, it goes
            raise RuntimeError("stopped while it was starting")
        if not came or w.failed or w.pid is None:
            reason = w.failed or "the worker did not become ready"
            w.stop(2)
            raise RuntimeError(reason)
        self.worker = w

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop gracefully (kill after `timeout` seconds). A worker still starting (loading a model, say) is killed
        at once, as `ollama stop` ends a load: the stop does not wait up to `START_TIMEOUT_S` for it."""
        self.abort_start()
        with self._lock:
            self.want_running = False
            if self.state in ("stopped",) or (self.state == "error" and self.worker is None and self.plugin is None):
                if self.cls is not None and self.state == "error":
                    self._set("stopped")
                return self.status()
            self._set("stopping")
            try:
                if self.worker is not None:
                    w, self.worker = self.worker, None
                    w.stop(timeout)
                    w.fail_in_flight(f"plugin {self.id} was stopped")
                p = self._inline.release(timeout)  # the calls running on it end first (a while)
                if p is not None:
                    p.stop()
            finally:
                self.telemetry.started_at = None
                self._set("stopped")
                self.add_log("INFO", time.time(), f"{self.id} stopped")
            return self.status()

    def abort_start(self) -> None:
        """End a start in progress (its worker killed; the start then fails saying so, and nothing restarts it);
        nothing happens when the plugin is not starting. Takes no lock: the start holds it."""
        if self.state != "starting":
            return
        self.want_running = False
        self._start_stopped.set()
        starting = self._starting
        if starting is not None:
            starting.kill()

    def restart(self, stop_timeout: float = 10.0) -> dict[str, Any]:
        """Stop (a worker is killed after `stop_timeout` seconds), then start."""
        self.stop(stop_timeout)
        return self.start()

    def checked_config(self, config: Any) -> PluginSettings:
        """A new config validated against the settings model (422 names the field); nothing changes yet."""
        if self.cls is None:
            raise Unavailable(f"plugin {self.id!r} is not loaded: {self.reason}")
        if not isinstance(config, dict):
            raise InvalidInput("config must be a JSON object", field="config")
        try:  # `new`: a validator may check what only a new value must (a folder that exists now)
            return self.cls.Settings.model_validate(config, context={"new": True})
        except ValidationError as exc:
            raise invalid_from_pydantic(exc, "config") from None

    def configure(self, config: dict[str, Any] | PluginSettings) -> PluginSettings:
        """Validate a new config (422 names the field) and keep it."""
        settings = config if isinstance(config, PluginSettings) else self.checked_config(config)
        self.settings = settings
        self.entry.config = settings.model_dump(exclude_defaults=True)
        self._slots = None
        return settings

    # -- requests ---------------------------------------------------------------------------------
    async def invoke(self, capability_id: str, data: Any, caller: Principal, *, owned: bool = False) -> Any:
        """Run a capability as `caller` within the plugin's limits: queue, concurrency, timeout.

        `owned`: `data` is this call's own (a big parsed body): an inline plugin's thread frees it a slice at a time
        once the plugin is done with it (`bodyjson.release`), whenever that is (after a timeout too), not the caller
        when it stops waiting."""
        self._has(capability_id)

        call = calls.Call(caller)
        submitted = False

        def inline(p: Plugin) -> Any:
            try:
                with calls.running(call):
                    return p.invoke(capability_id, data)
            finally:
                if owned:
                    bodyjson.release(data)

        def handed() -> None:
            nonlocal submitted
            submitted = True

        try:
            return await self.call(("invoke", capability_id, data), inline, caller, call, on_submit=handed)
        finally:
            if owned and not submitted:  # refused before it ran (a full queue, no slot, not running): freed here
                await asyncio.to_thread(bodyjson.release, data)

    def _has(self, capability_id: str) -> None:
        """404 unless the plugin has the capability."""
        if self.cls is None or capability_id not in self.cls.capabilities():
            raise NotFound(f"plugin {self.id!r} has no capability {capability_id!r}", field="capability")

    def _no_answer(self, timeout: float) -> Timeout:
        """The 504 of a call that overran its `timeout` (the settings' `request_timeout` when it began)."""
        return Timeout(f"plugin {self.id!r} did not answer within {timeout:g}s")

    def _ready(self) -> None:
        """503 unless the plugin is running (or degraded); while it starts or restarts, with a Retry-After."""
        if self.state not in ("running", "degraded"):
            passing = self.state in ("starting", "stopping") and self.want_running
            raise Unavailable(f"plugin {self.id!r} is {self.state}" + (f": {self.reason}" if self.reason else ""),
                              retry_after=RETRY_STARTING_S if passing else None)  # fmt: skip

    @property
    def slots(self) -> Slots:
        """The request slots of the current settings (a new config brings new ones; calls holding the old ones give
        them back there)."""
        slots = self._slots
        if slots is None:
            with self._slots_lock:  # the loop and a call port thread may both be first
                slots = self._slots
                if slots is None:
                    s = self.settings
                    slots = made = self._slots = Slots(self.id, s.max_concurrent, s.max_queue)
                    self.telemetry.queued = lambda: made.queued
        return slots

    async def _admit(self, queue_timeout: float | None) -> Slots:
        """Wait for a request slot (429 when the queue is full; 504 after `queue_timeout` seconds queued, None: no
        limit); return the slots to give it back to.

        A plugin that is still starting (a worker importing its libraries) is waited for, not refused.
        """
        deadline = time.monotonic() + min(self.settings.request_timeout, START_TIMEOUT_S)
        while self.state == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ready()
        slots = self.slots
        await slots.take(queue_timeout)
        return slots

    async def stream(
        self, capability_id: str, data: Any, caller: Principal, *, queued: bool = False
    ) -> AsyncGenerator[Any, None]:
        """Run a streaming capability as `caller` within the plugin's limits; yield its chunks.

        `request_timeout` bounds the wait for a request slot and then for each chunk; a background job
        (`queued`) waits for its slot as long as it takes, like a batch queue. Closing the iterator early (the
        client went away) cancels the work in the plugin at once and frees the slot.
        """
        self._has(capability_id)
        sem = await self._admit(None if queued else self.settings.request_timeout)
        auth = self.services.get("auth")
        if auth is not None:  # a job that waited for its slot starts as its caller is now, or not at all
            try:
                caller = auth.as_now(caller)
            except BaseException:
                sem.release()
                raise
        s, tel = self.settings, self.telemetry
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def sink(item: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        t0 = time.perf_counter()
        tel.begin()
        error: str | None = None
        finished = False
        worker, req_id, cancelled = self.worker, 0, threading.Event()
        call = calls.Call(caller)
        try:
            if worker is not None:
                req_id = worker.open_stream(capability_id, data, caller, sink)
            elif (plugin := self._inline.take()) is not None:
                args = (plugin, capability_id, data, call, cancelled, sink, self._inline.done)
                threading.Thread(target=_run_inline_stream, args=args, daemon=True).start()
            else:
                raise Unavailable(f"plugin {self.id!r} is {self.state}")
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), s.request_timeout)
                except TimeoutError:
                    error = f"timed out after {s.request_timeout:g}s"
                    raise Timeout(f"plugin {self.id!r} sent nothing for {s.request_timeout:g}s") from None
                if item[0] == "chunk":
                    yield item[1]
                    continue
                finished = True
                if not item[1]:
                    exc = from_dict(item[2])
                    error = exc.message if exc.status >= 500 else None
                    raise exc
                return
        finally:
            call.end()  # whatever the plugin still runs for this stream can no longer act for the caller
            if not finished:  # timed out or cancelled: the work stops
                if worker is not None and req_id:
                    worker.cancel(req_id)
                cancelled.set()
            sem.release()
            tel.end(time.perf_counter() - t0, error)

    async def health(self, timeout: float = 10.0) -> Any:
        """Ask the running plugin for its health report, outside the request slots (a control-plane call)."""
        if self.state not in ("running", "degraded"):
            raise Unavailable(f"plugin {self.id!r} is {self.state}" + (f": {self.reason}" if self.reason else ""))
        try:
            if self.worker is not None:
                return await asyncio.wait_for(asyncio.wrap_future(self.worker.submit(("health",))), timeout)
            if self.plugin is not None:
                return await asyncio.wait_for(asyncio.to_thread(self.plugin.health), timeout)
        except TimeoutError:
            raise Timeout(f"plugin {self.id!r} did not report its health within {timeout:g}s") from None
        raise Unavailable(f"plugin {self.id!r} is {self.state}")

    async def call(
        self,
        msg: tuple[Any, ...],
        inline: Callable[[Plugin], Any],
        caller: Principal | None,
        call: calls.Call | None = None,
        on_submit: Callable[[], None] | None = None,
    ) -> Any:
        """Send one request to the worker (or run `inline`, which runs as `call`) as `caller`, honouring the
        plugin's limits; `on_submit()` once the request is handed over (queued for its thread or its worker).

        A request that times out answers 504 at once, but its slot stays taken until the plugin really finishes
        the work (a plugin cannot be interrupted mid-call): `max_concurrent` bounds the work running, not only the
        requests waiting. Whenever the caller stops waiting (the timeout, or the request's task cancelled) the
        call's grant ends, so the abandoned work can no longer reach the store as them."""
        asked = time.perf_counter()
        sem = await self._admit(self.settings.request_timeout)
        left = max(0.001, self.settings.request_timeout - (time.perf_counter() - asked))  # the wait counts too
        work: Future[Any] | None = None
        worker = self.worker
        try:
            with self._counted():
                if worker is not None:
                    work = worker.submit(msg, caller)
                elif (plugin := self._inline.take()) is not None:
                    try:
                        work = _INLINE_POOL.submit(contextvars.copy_context().run, inline, plugin)
                    except BaseException:
                        self._inline.done()
                        raise
                    work.add_done_callback(lambda _: self._inline.done())
                    if call is not None:  # threads the plugin started for it cannot act for the caller afterwards
                        work.add_done_callback(lambda _: call.end())
                else:
                    raise Unavailable(f"plugin {self.id!r} is {self.state}")
                if on_submit is not None:  # queued for its thread, or the worker's writer has it
                    on_submit()
                return await _answer(work, left)
        finally:
            self._settle(sem, work, worker, call)

    def invoke_here(
        self,
        capability_id: str,
        data: Any,
        caller: Principal,
        on_timeout: Callable[[Timeout], None] | None = None,
        owned: bool = False,
        gone: Callable[[], bool] | None = None,
    ) -> Any:
        """`invoke` from a thread that serves this one caller (a call port's connection), not from the event loop:
        the same slots, queue, timeout, telemetry and errors.

        An inline plugin runs on this very thread, in a context of its own (no hand-over to another thread, ~0.1
        ms). If it overruns `request_timeout`, then at that moment the call ends (it can no longer act for the
        caller) and `on_timeout(err)` gets the 504 to answer with; when the plugin returns, its result is dropped
        and the 504 raised. A worker's answer is waited for at most the timeout, as over HTTP, and given up once
        `gone()` says the caller left (looked at every `WATCH_S`: the worker's call is told to stop then). `owned`:
        `data` is this call's own, freed a slice at a time once the plugin is done with it."""
        self._has(capability_id)
        asked = time.perf_counter()
        s = self.settings
        deadline = time.monotonic() + min(s.request_timeout, START_TIMEOUT_S)
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        self._ready()
        slots = self.slots
        slots.take_blocking(s.request_timeout)
        started = time.perf_counter()
        left = max(0.001, s.request_timeout - (started - asked))
        work: Future[Any] | None = None
        worker = self.worker
        plugin = self._inline.take() if worker is None else None
        taken = plugin is not None  # counted on the instance until `done`
        call = calls.Call(caller)
        try:
            with self._counted():
                if worker is not None:
                    work = worker.submit(("invoke", capability_id, data), caller)
                    return _result_while(work, left, gone)
                if plugin is None:
                    raise Unavailable(f"plugin {self.id!r} is {self.state}")

                def overran() -> None:
                    call.end()
                    if on_timeout is not None:
                        on_timeout(self._no_answer(s.request_timeout))

                def run() -> Any:
                    with calls.running(call):
                        return plugin.invoke(capability_id, data)

                armed = DEADLINES.arm(left, overran)
                try:
                    result = contextvars.copy_context().run(run)
                finally:
                    late = DEADLINES.disarm(armed)
                    self._inline.done()
                    taken = False
                    if owned:
                        bodyjson.release(data)
                if late or time.perf_counter() - started > left:  # overran, whether or not the deadline fired yet
                    raise TimeoutError
                return result
        finally:
            if taken:  # taken, never run
                self._inline.done()
            self._settle(slots, work, worker, call)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count a running call in the telemetry with its latency and, when the plugin's side failed, its error: a
        timeout becomes the 504, an exception that is not a BkgError the plugin's 500."""
        s, tel = self.settings, self.telemetry
        t0 = time.perf_counter()
        tel.begin()
        error: str | None = None
        try:
            yield
        except TimeoutError:
            error = f"timed out after {s.request_timeout:g}s"
            raise self._no_answer(s.request_timeout) from None
        except BkgError as exc:
            error = exc.message if exc.status >= 500 else None
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise BkgError(f"plugin {self.id!r} failed: {error}") from exc
        finally:
            tel.end(time.perf_counter() - t0, error)

    @staticmethod
    def _settle(slots: Slots, work: Future[Any] | None, worker: WorkerProcess | None, call: calls.Call | None) -> None:
        """The caller stopped waiting: the slot goes back now, or when work still running really ends (timed out or
        cancelled: the call's grant ends at once, so that work can no longer act for the caller)."""
        if work is not None and not work.done():
            if call is not None:
                call.end()
            if worker is not None:
                worker.abandon(work)
            work.add_done_callback(lambda _: slots.release())
        else:
            if call is not None and work is None:
                call.end()
            slots.release()
