"""One plugin under supervision: lifecycle state, inline or worker execution, limits, logs and telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import (
    BkgError,
    InvalidInput,
    NotFound,
    Timeout,
    Unavailable,
    from_dict,
    invalid_from_pydantic,
)
from bkg_kernel.runtime import bodyjson, calls
from bkg_kernel.runtime.contract import QUICK_CONCURRENT, USAGE_ROUTE, Capability, Plugin, PluginSettings
from bkg_kernel.runtime.deadlines import DEADLINES
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.inline import _INLINE_POOL, InlineWork, _run_inline_stream
from bkg_kernel.runtime.slots import Slots
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.runtime.telemetry import LogRing, RingHandler, Telemetry
from bkg_kernel.runtime.workerproc import WorkerProcess, _answer, _result_while

STATES = ("stopped", "starting", "running", "stopping", "degraded", "error")
Emit = Callable[[str, str, dict[str, Any]], None]
START_TIMEOUT_S = 120.0
RETRY_STARTING_S = 5.0  # the Retry-After of a call to a plugin still starting


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
        self.restarting = False  # a restart's stop runs: a passing 503 (with a Retry-After), as a start is
        self.restart_at: float | None = None  # (monotonic) when the supervisor restarts a crashed worker
        self._lock = threading.RLock()
        self._starting: WorkerProcess | None = None  # a worker being started: a stop kills it, not waits for it
        self._start_stopped = threading.Event()  # a stop came while the plugin was starting
        self._slots: Slots | None = None
        self._quick_slots: Slots | None = None
        self._slots_lock = threading.Lock()
        self.settings: PluginSettings = PluginSettings()
        if self.cls is not None:
            try:
                self.settings = self.cls.Settings.model_validate(_finite_config(self.cls.Settings, entry.config))
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

    def add_log(self, level: str, t: float, message: str, number: int | None = None) -> None:
        """Record a log line (`number`: its level's, from the logging record) and push it to subscribers."""
        self.emit("logs", self.id, self.logs.add(level, t, message, number))

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the plugin (inline, or in a new worker) and wait until it is running or failed."""
        with self._lock:
            if self.cls is None:
                raise Unavailable(f"plugin {self.id!r} cannot start: {self.reason}")
            if self.state in ("running", "degraded", "starting"):
                return self.status()
            self.want_running = True
            self.restart_at = None
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
        for old in [h for h in plugin.log.handlers if isinstance(h, RingHandler)]:  # the last start's (one logger
            plugin.log.removeHandler(old)  # per plugin id, for the process's life): each line goes to the ring once
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
            self.restart_at = None  # a crashed plugin stopped by hand is not restarted by the supervisor
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
        """Stop (a worker is killed after `stop_timeout` seconds), then start; calls meanwhile are told to retry."""
        self.restarting = True
        try:
            self.stop(stop_timeout)
            return self.start()
        finally:
            self.restarting = False

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
        with self._slots_lock:  # the calls under way give their slots back to the same count, resized
            if self._slots is not None:
                self._slots.resize(settings.max_concurrent, settings.max_queue)
            if self._quick_slots is not None:
                self._quick_slots.resize(QUICK_CONCURRENT, settings.max_queue)
        return settings

    # -- requests ---------------------------------------------------------------------------------
    async def invoke(
        self, capability_id: str, data: Any, caller: Principal, *, owned: bool = False, route: str | None = None
    ) -> Any:
        """Run a capability as `caller` within the plugin's limits: queue, concurrency, timeout.

        `owned`: `data` is this call's own (a big parsed body): an inline plugin's thread frees it a slice at a time
        once the plugin is done with it (`bodyjson.release`), whenever that is (after a timeout too), not the caller
        when it stops waiting. `route`: where the tokens of an answer the caller no longer waited for are booked
        (`_late_usage`)."""
        cap = self._has(capability_id)

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
            late = self._late_usage(cap, caller, route)
            return await self.call(("invoke", capability_id, data), inline, caller, call, on_submit=handed,
                                   quick=cap.quick, on_late=late)  # fmt: skip
        finally:
            if owned and not submitted:  # refused before it ran (a full queue, no slot, not running): freed here
                await asyncio.to_thread(bodyjson.release, data)

    def _has(self, capability_id: str) -> Capability:
        """The capability; 404 unless the plugin has it."""
        cap = self.cls.capabilities().get(capability_id) if self.cls is not None else None
        if cap is None:
            raise NotFound(f"plugin {self.id!r} has no capability {capability_id!r}", field="capability")
        return cap

    def _late_usage(self, cap: Capability, caller: Principal, route: str | None) -> Callable[[Any], None] | None:
        """What books the answer of a call that spends LLM tokens when its caller stopped waiting before it came
        (the client left, the call timed out): the model did the work, and the caller is billed what it did, under
        `route` (else the one `booked_under` set, else the plugin's invoke route). An answered call is booked by
        whoever called (the route that got the answer); None for a call that spends no tokens."""
        auth = self.services.get("auth")
        if not cap.books_usage or auth is None:
            return None
        where = route or USAGE_ROUTE.get() or f"/api/plugins/{self.id}/invoke/{cap.id}"
        return lambda result: auth.book_usage(caller, where, result)

    def _no_answer(self, timeout: float) -> Timeout:
        """The 504 of a call that overran its `timeout` (the settings' `request_timeout` when it began)."""
        return Timeout(f"plugin {self.id!r} did not answer within {timeout:g}s")

    def _ready(self) -> None:
        """503 unless the plugin is running (or degraded); while it starts or restarts (asked for, after a config
        change, or by the supervisor after a crash), with a Retry-After."""
        if self.state not in ("running", "degraded"):
            raise Unavailable(f"plugin {self.id!r} is {self.state}" + (f": {self.reason}" if self.reason else ""),
                              retry_after=self.retry_after())  # fmt: skip

    def retry_after(self) -> float | None:
        """Seconds to wait before a call may find the plugin running, when it is on its way there (None: not)."""
        if self.state in ("starting", "stopping") and (self.want_running or self.restarting):
            return RETRY_STARTING_S
        due = self.restart_at
        if self.state == "error" and self.want_running and due is not None:  # a crashed worker, restarting soon
            return float(max(1, math.ceil(due - time.monotonic())) + RETRY_STARTING_S)
        return None

    @property
    def slots(self) -> Slots:
        """The request slots, made at the first call with the settings of then (a new config resizes them)."""
        slots = self._slots
        if slots is None:
            with self._slots_lock:  # the loop and a call port thread may both be first
                slots = self._slots
                if slots is None:
                    s = self.settings
                    slots = made = self._slots = Slots(self.id, s.max_concurrent, s.max_queue)
                    self.telemetry.queued = lambda: made.queued
        return slots

    @property
    def quick_slots(self) -> Slots:
        """The slots of the `quick` capabilities: `QUICK_CONCURRENT` of them, apart from the request slots (a model
        list does not wait behind the generations that hold those), with the same queue limit."""
        slots = self._quick_slots
        if slots is None:
            with self._slots_lock:
                slots = self._quick_slots
                if slots is None:
                    limit = "QUICK_CONCURRENT"
                    slots = self._quick_slots = Slots(self.id, QUICK_CONCURRENT, self.settings.max_queue, limit)
        return slots

    async def _admit(self, queue_timeout: float | None, quick: bool = False) -> Slots:
        """Wait for a request slot (a quick one for a `quick` call; 429 when the queue is full; 504 after
        `queue_timeout` seconds queued, None: no limit); return the slots to give it back to.

        A plugin that is still starting (a worker importing its libraries) is waited for, not refused.
        """
        deadline = time.monotonic() + min(self.settings.request_timeout, START_TIMEOUT_S)
        while self.state == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ready()
        slots = self.quick_slots if quick else self.slots
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
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads this stream any more
                loop.call_soon_threadsafe(q.put_nowait, item)

        t0 = time.perf_counter()
        tel.begin()
        error: str | None = None
        finished = opened = False
        worker, req_id, cancelled = self.worker, 0, threading.Event()
        call = calls.Call(caller)
        hold = _Held(sem)  # the slot goes back when the caller has stopped reading and the work has ended
        try:
            if worker is not None:
                req_id = worker.open_stream(capability_id, data, caller, sink, hold.drop)
                opened = True
            elif (taken := self._inline.take_stream(cancelled)) is not None:
                plugin, ended = taken

                def done() -> None:
                    ended()
                    hold.drop()

                args = (plugin, capability_id, data, call, cancelled, sink, done)
                try:
                    threading.Thread(target=_run_inline_stream, args=args, daemon=True).start()
                except BaseException:  # no thread to be had: the work never ran
                    ended()
                    raise
                opened = True
            else:
                raise Unavailable(f"plugin {self.id!r} is {self.state}", retry_after=self.retry_after())
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
            if not finished:  # timed out or cancelled: the work stops (at its next chunk or progress)
                if worker is not None and req_id:
                    worker.cancel(req_id)
                cancelled.set()
            if not opened:  # no work ever ran to give the slot back
                hold.drop()
            hold.drop()
            tel.end(time.perf_counter() - t0, error)

    async def health(self, timeout: float = 10.0) -> Any:
        """Ask the running plugin for its health report, outside the request slots (a control-plane call)."""
        if self.state not in ("running", "degraded"):
            raise Unavailable(f"plugin {self.id!r} is {self.state}" + (f": {self.reason}" if self.reason else ""),
                              retry_after=self.retry_after())  # fmt: skip
        try:
            if (worker := self.worker) is not None:  # not cancelled at the timeout: the reader answers it unhindered
                return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(worker.submit(("health",)))), timeout)
            if self.plugin is not None:
                return await asyncio.wait_for(asyncio.to_thread(self.plugin.health), timeout)
        except TimeoutError:
            raise Timeout(f"plugin {self.id!r} did not report its health within {timeout:g}s") from None
        raise Unavailable(f"plugin {self.id!r} is {self.state}", retry_after=self.retry_after())

    async def retune(self, settings: PluginSettings, timeout: float = 10.0) -> bool:
        """Hand new settings to the running plugin (`Plugin.retune`, in its worker too), outside the request slots;
        False when it is not running, or did not take them (said in its log): the caller restarts it then."""
        if self.state not in ("running", "degraded"):
            return False
        try:
            if (worker := self.worker) is not None:
                took = asyncio.wrap_future(worker.submit(("retune", settings.model_dump())))
                await asyncio.wait_for(asyncio.shield(took), timeout)
                return True

            def inline() -> bool:
                plugin = self._inline.take()
                if plugin is None:
                    return False
                try:
                    plugin.retune(settings)
                    return True
                finally:
                    self._inline.done()

            return await asyncio.to_thread(inline)
        except Exception as exc:  # a refusal, a timeout, a worker gone: a restart applies them
            # the error's kind only: a validation error would quote the values, a secret among them
            said = f"new settings not taken while running ({type(exc).__name__}): restarting"
            self.add_log("WARNING", time.time(), said)
            return False

    async def call(
        self,
        msg: tuple[Any, ...],
        inline: Callable[[Plugin], Any],
        caller: Principal | None,
        call: calls.Call | None = None,
        on_submit: Callable[[], None] | None = None,
        *,
        quick: bool = False,
        on_late: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send one request to the worker (or run `inline`, which runs as `call`) as `caller`, honouring the
        plugin's limits; `on_submit()` once the request is handed over (queued for its thread or its worker).
        A `quick` call takes a quick slot (`quick_slots`), not a request slot; `on_late(result)` gets the answer
        that comes after the caller stopped waiting.

        A request that times out answers 504 at once, but its slot stays taken until the plugin really finishes
        the work (a plugin cannot be interrupted mid-call): `max_concurrent` bounds the work running, not only the
        requests waiting. Whenever the caller stops waiting (the timeout, or the request's task cancelled) the
        call's grant ends, so the abandoned work can no longer reach the store as them."""
        asked = time.perf_counter()
        sem = await self._admit(self.settings.request_timeout, quick)
        left = max(0.001, self.settings.request_timeout - (time.perf_counter() - asked))  # the wait counts too
        work: Future[Any] | None = None
        worker = self.worker
        answered = False
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
                    raise Unavailable(f"plugin {self.id!r} is {self.state}", retry_after=self.retry_after())
                if on_submit is not None:  # queued for its thread, or the worker's writer has it
                    on_submit()
                result = await _answer(work, left)
                answered = True
                return result
        finally:
            self._settle(sem, work, worker, call, None if answered else on_late)

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
        `data` is this call's own, freed a slice at a time once the plugin is done with it. The tokens of an answer
        that came after its caller stopped waiting are booked to them (`_late_usage`)."""
        cap = self._has(capability_id)
        asked = time.perf_counter()
        s = self.settings
        deadline = time.monotonic() + min(s.request_timeout, START_TIMEOUT_S)
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        self._ready()
        slots = self.quick_slots if cap.quick else self.slots
        slots.take_blocking(s.request_timeout)
        started = time.perf_counter()
        left = max(0.001, s.request_timeout - (started - asked))
        work: Future[Any] | None = None
        worker = self.worker
        plugin = self._inline.take() if worker is None else None
        taken = plugin is not None  # counted on the instance until `done`
        call = calls.Call(caller)
        on_late = self._late_usage(cap, caller, None)
        try:
            with self._counted():
                if worker is not None:
                    work = worker.submit(("invoke", capability_id, data), caller)
                    answer = _result_while(work, left, gone)
                    on_late = None
                    return answer
                if plugin is None:
                    raise Unavailable(f"plugin {self.id!r} is {self.state}", retry_after=self.retry_after())

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
                    if on_late is not None:
                        on_late(result)
                    raise TimeoutError
                return result
        finally:
            if taken:  # taken, never run
                self._inline.done()
            self._settle(slots, work, worker, call, on_late if work is not None else None)

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
    def _settle(
        slots: Slots,
        work: Future[Any] | None,
        worker: WorkerProcess | None,
        call: calls.Call | None,
        on_late: Callable[[Any], None] | None = None,
    ) -> None:
        """The caller stopped waiting: the slot goes back now, or when work still running really ends (timed out or
        cancelled: the call's grant ends at once, so that work can no longer act for the caller). `on_late`: the
        caller did not get the work's answer; it gets it when (and if) it comes."""
        if work is not None and on_late is not None:
            work.add_done_callback(lambda done: _late_answer(done, on_late))
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


def _late_answer(work: Future[Any], on_late: Callable[[Any], None]) -> None:
    """Hand `on_late` the answer of work its caller no longer waited for (nothing when it failed)."""
    if work.cancelled() or work.exception() is not None:
        return
    try:
        on_late(work.result())
    except Exception:  # the books of an answer nobody reads never fail the thread that delivered it
        logging.getLogger("bkg.gateway").exception("booking a late answer's usage failed")


class _Held:
    """A stream's request slot, given back by the second `drop`: one from the caller's side (it stopped reading),
    one from the work's (the worker's last message or exit, or the inline thread's end). A cancelled stream keeps
    its slot until its work has stopped, as a timed-out call does: `max_concurrent` bounds the work running."""

    __slots__ = ("_left", "_lock", "_slots")

    def __init__(self, slots: Slots) -> None:
        self._slots, self._left, self._lock = slots, 2, threading.Lock()

    def drop(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._slots.release()


def _finite_config(model: type[PluginSettings], config: dict[str, Any]) -> dict[str, Any]:
    """A stored config without the NaN or infinite settings an older gateway took (shown as null, a setting with
    no upper bound such as a keep-alive): those take their defaults, with a warning, and the plugin starts."""
    try:
        model.model_validate(config)
        return config
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e["type"] == "finite_number" and len(e["loc"]) == 1}
    if bad:
        logging.getLogger("bkg.gateway").warning("%s: stored settings %s are not finite: their defaults apply",
                                                 model.__module__, ", ".join(sorted(bad)))  # fmt: skip
    return {k: v for k, v in config.items() if k not in bad}
