"""The supervisor: discovers plugins, autostarts them, watches workers (exit, heartbeat, memory) and samples
telemetry; a worker that dies is marked `error` and restarted with exponential backoff, and a restart that fails is
tried again the same way, `MAX_FAILED_STARTS` times at most, as systemd restarts a failed service."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from bkg_kernel.errors import NotFound, closest
from bkg_kernel.runtime.discovery import Discovered, RegistryFile, discover
from bkg_kernel.runtime.host import Emit, PluginHost

log = logging.getLogger("bkg.supervisor")
HEARTBEAT_TIMEOUT_S = 5.0  # the defaults of settings.heartbeat_timeout_s and hung_restart_s
HUNG_RESTART_S = 15.0  # silent this long (three heartbeat timeouts): the worker is killed and started again
SAMPLE_EVERY_S = 2.0
BACKOFF_MAX_S = 30.0
MAX_FAILED_STARTS = 5  # supervised restarts in a row that fail before the plugin is left in `error`
MEMORY_STRIKES = 3  # restarts for memory in a row, each soon after a start, before the plugin is left in `error`
SOON_S = 30.0  # "soon after a start", for the memory limit
SHUTDOWN_S = 15.0  # stopping every plugin at once: the most the gateway's exit waits for them


class Supervisor:
    """All plugin hosts of one gateway."""

    def __init__(
        self,
        data_dir: Path,
        emit: Emit,
        only: list[str] | None = None,
        services: dict[str, Any] | None = None,
        model_dir: Path | None = None,
        discovered: dict[str, Discovered] | None = None,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        hung_restart_s: float = HUNG_RESTART_S,
    ) -> None:
        self.data_dir = data_dir
        self.heartbeat_timeout_s, self.hung_restart_s = heartbeat_timeout_s, max(hung_restart_s, heartbeat_timeout_s)
        self.registry = RegistryFile(data_dir / "plugins.json")
        self.emit = emit
        self.hosts: dict[str, PluginHost] = {
            pid: PluginHost(found, self.registry.get(pid), data_dir, emit, services, model_dir)
            for pid, found in sorted((discovered if discovered is not None else discover(only)).items())
        }
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.autostarted = False  # set once the boot's autostarts have all started or failed (/readyz)
        self._backoff: dict[str, float] = {}
        self._restart_at: dict[str, float] = {}
        self._restarting: set[str] = set()  # restarted for a silent worker, or for memory, right now
        self._failed_starts: dict[str, int] = {}
        self._memory_strikes: dict[str, int] = {}
        self._gateway = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}  # one per worker pid: cpu_percent measures since the last call
        self._known: frozenset[str] | None = None  # every plugin id discovered, hosted or not (`get`)

    def get(self, plugin_id: str) -> PluginHost:
        """Return the host of a plugin or raise 404 (saying so when the plugin is there but not hosted here)."""
        host = self.hosts.get(plugin_id)
        if host is None:
            if self._known is None:  # on the first miss: every plugin this install has, hosted or not
                self._known = frozenset(discover())
            raise unknown_plugin(plugin_id, self._known | set(self.hosts), hosted=self.hosts)
        return host

    def start(self, wait: bool = True) -> None:
        """Autostart enabled plugins (in parallel) and begin watching them; `wait=False` returns at once."""
        if not wait:
            threading.Thread(target=self.start, name="bkg-autostart", daemon=True).start()
            return
        threads = [
            threading.Thread(target=h.start, daemon=True)
            for h in self.hosts.values()
            if h.cls is not None and h.state == "stopped" and h.entry.enabled and h.entry.autostart
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.autostarted = True  # every plugin meant to start at boot has started, or failed to
        self._monitor = threading.Thread(target=self._watch, name="bkg-supervisor", daemon=True)
        self._monitor.start()

    def abort_starts(self) -> None:
        """End every start in progress (the gateway is going: a model still loading is not waited for)."""
        for h in list(self.hosts.values()):
            h.abort_start()

    def shutdown(self, within: float = SHUTDOWN_S) -> None:
        """Stop watching, then stop every plugin, all at once, waiting `within` seconds at most (a worker still
        starting is killed: `PluginHost.stop`)."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5)

        def stop(h: PluginHost) -> None:
            try:
                h.stop(timeout=5)
            except Exception:
                log.exception("stopping %s failed", h.id)

        threads = [threading.Thread(target=stop, args=(h,), name=f"bkg-stop-{h.id}", daemon=True)
                   for h in self.hosts.values()]  # fmt: skip
        for t in threads:
            t.start()
        end = time.monotonic() + within
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        late = [t.name.removeprefix("bkg-stop-") for t in threads if t.is_alive()]
        if late:
            log.warning("plugins still stopping after %.0fs, left to end with the gateway: %s", within, ", ".join(late))

    def save_registry(self) -> None:
        """Persist enabled / autostart / config of every plugin."""
        self.registry.save()

    # -- watching ---------------------------------------------------------------------------------
    def _watch(self) -> None:
        last_sample = 0.0
        while not self._stop.wait(0.25):
            now = time.monotonic()
            for h in list(self.hosts.values()):
                try:
                    self._check(h, now)
                except Exception:
                    log.exception("watching %s failed", h.id)
            if now - last_sample >= SAMPLE_EVERY_S:
                last_sample = now
                gateway = self._sample_gateway()
                for h in list(self.hosts.values()):
                    try:  # one plugin's sample failing ends neither the others' nor this watch
                        self._sample(h, gateway)
                    except Exception:
                        log.exception("sampling %s failed", h.id)

    def _check(self, h: PluginHost, now: float) -> None:
        w = h.worker
        if w is not None and h.state in ("running", "degraded") and not w.alive():
            code = w.exitcode()
            with h._lock:  # noqa: SLF001
                if h.worker is w:
                    # `error` (with its restart time) before the worker goes: a call in between is told to retry,
                    # not that a plugin "running" has no worker (found by a review: thousands such 503s a crash)
                    delay = self._schedule_restart(h, now)
                    h.telemetry.started_at = None
                    h._set("error", f"worker exited with code {code}; restarting in {delay:.0f}s")  # noqa: SLF001
                    h.worker = None
                    w.fail_in_flight(f"the {h.id} worker died (exit code {code}); it is being restarted")
                    # its pipe, threads and process handle go with it (they stayed, a few per crash, for good)
                    threading.Thread(target=w.stop, args=(0,), name=f"bkg-reap-{h.id}", daemon=True).start()
                    h.add_log("ERROR", time.time(), f"worker exited with code {code}; restart in {delay:.0f}s")
            return
        if w is not None and h.state in ("running", "degraded"):
            silent = now - w.last_beat
            if silent > self.hung_restart_s and h.id not in self._restarting:
                h.add_log("ERROR", time.time(), f"no heartbeat for {silent:.0f}s: killing the worker and starting it")
                self._restart_in_background(h, stop_timeout=0)  # a hung worker cannot stop itself: no grace period
                return
            if silent > self.heartbeat_timeout_s and h.state == "running":
                h._set("degraded", f"no heartbeat for {silent:.0f}s")  # noqa: SLF001
            elif silent <= self.heartbeat_timeout_s and h.state == "degraded":
                h._set("running")  # noqa: SLF001
            if h.state == "running" and h.telemetry.started_at and time.monotonic() - h.telemetry.started_at > 60:
                self._backoff.pop(h.id, None)  # healthy for a minute: the next crash restarts fast again
        due = self._restart_at.get(h.id)
        if due is not None and h.restart_at != due:  # started or stopped by hand since: that restart is void
            self._restart_at.pop(h.id, None)
            return
        if due is not None and now >= due and h.want_running and h.state == "error":
            self._restart_at.pop(h.id, None)
            h.restarts += 1
            h.state = "stopped"
            threading.Thread(target=self._supervised_start, args=(h,), name=f"bkg-restart-{h.id}", daemon=True).start()

    def _supervised_start(self, h: PluginHost) -> None:
        """Start a plugin whose worker died; a start that fails is tried again after the next backoff, until
        `MAX_FAILED_STARTS` in a row have failed (then it stays in `error`, saying so, until started by hand)."""
        status = h.start()
        if status["state"] != "error" or not h.want_running:
            self._failed_starts.pop(h.id, None)
            return
        failed = self._failed_starts[h.id] = self._failed_starts.get(h.id, 0) + 1
        reason = status.get("reason") or "start failed"
        if failed >= MAX_FAILED_STARTS:
            self._failed_starts.pop(h.id, None)
            _still_failed(h, f"{reason} ({failed} restarts in a row failed: start it again once it is fixed)")
            return
        delay = self._schedule_restart(h, time.monotonic())
        _still_failed(h, f"{reason} (restart {failed} of {MAX_FAILED_STARTS} failed; next in {delay:.0f}s)")

    def _sample_gateway(self) -> tuple[float, int]:
        """Return the gateway process's cpu % since the last round and its RSS, what every in-gateway plugin reports.

        Measured once a round: `cpu_percent(None)` measures since its previous call, and a call per inline plugin
        gave the second and later ones the microseconds since the first (0, or thousands of percent)."""
        try:
            return self._gateway.cpu_percent(None), self._gateway.memory_info().rss
        except psutil.Error:
            return 0.0, 0

    def _sample(self, h: PluginHost, gateway: tuple[float, int]) -> None:
        tel = h.telemetry
        worker = h.worker  # read once: a stop may take it meanwhile
        try:
            if worker is not None and (pid := worker.pid) is not None:
                proc = self._procs.get(pid)
                if proc is None:
                    live = {w.pid for x in self.hosts.values() if (w := x.worker) is not None}
                    self._procs = {p: got for p, got in self._procs.items() if p in live}
                    proc = self._procs[pid] = psutil.Process(pid)
                tel.cpu_percent = proc.cpu_percent(None)
                tel.rss_bytes = proc.memory_info().rss
            elif h.plugin is not None:
                tel.cpu_percent, tel.rss_bytes = gateway
            else:
                tel.cpu_percent, tel.rss_bytes = 0.0, 0
        except psutil.Error:
            return
        limit = h.settings.memory_limit_mb
        if limit and h.worker is not None and tel.rss_bytes > limit * 1024 * 1024 and h.id not in self._restarting:
            self._over_memory(h, tel.rss_bytes >> 20, limit)
        tel.sample(time.time())
        self.emit("telemetry", h.id, tel.snapshot())

    def _over_memory(self, h: PluginHost, rss_mb: int, limit: int) -> None:
        """Restart a worker over its memory limit, one restart at a time, counted; one that is over it again soon
        after each of `MEMORY_STRIKES` starts is stopped and left in `error` (it was restarted every 2 s, unseen)."""
        started = h.telemetry.started_at
        soon = started is not None and time.monotonic() - started < SOON_S
        strikes = self._memory_strikes[h.id] = self._memory_strikes.get(h.id, 0) + 1 if soon else 1
        if strikes >= MEMORY_STRIKES:
            self._restarting.add(h.id)
            reason = (f"RSS {rss_mb} MB over memory_limit_mb {limit} within {SOON_S:.0f}s of each of {strikes} "
                      "starts: raise the limit (or load less), then start it again")  # fmt: skip
            h.add_log("ERROR", time.time(), reason)

            def give_up(host: PluginHost = h) -> None:
                try:
                    host.stop(timeout=5)
                    _still_failed(host, reason, also="stopped")
                finally:
                    self._memory_strikes.pop(host.id, None)
                    self._restarting.discard(host.id)

            threading.Thread(target=give_up, name=f"bkg-memory-{h.id}", daemon=True).start()
            return
        h.add_log("WARNING", time.time(), f"RSS {rss_mb} MB over memory_limit_mb {limit}: restarting")
        self._restart_in_background(h)

    def _schedule_restart(self, h: PluginHost, now: float) -> float:
        """Set `h`'s next restart one backoff step (doubled, at most `BACKOFF_MAX_S`) after `now`; return the step."""
        delay = min(self._backoff.get(h.id, 0.5) * 2, BACKOFF_MAX_S)
        self._backoff[h.id] = delay
        # the host's first: a watch tick between the two must not take the new time for one a hand voided
        h.restart_at = self._restart_at[h.id] = now + delay  # (the host tells callers when to retry)
        return delay

    def _restart_in_background(self, h: PluginHost, stop_timeout: float = 10.0) -> None:
        """`h.restart` on a thread of its own, counted; `_restarting` holds `h` until it is done (one at a time)."""
        self._restarting.add(h.id)

        def restart() -> None:
            try:
                h.restarts += 1
                h.restart(stop_timeout=stop_timeout)
            finally:
                self._restarting.discard(h.id)

        threading.Thread(target=restart, name=f"bkg-restart-{h.id}", daemon=True).start()

    def summary(self) -> dict[str, Any]:
        """Return telemetry of every plugin plus totals."""
        per = {pid: {**h.telemetry.snapshot(), "state": h.state} for pid, h in self.hosts.items()}
        return {
            "plugins": per,
            "totals": {
                "running": sum(1 for h in self.hosts.values() if h.state == "running"),
                "requests": sum(p["requests"] for p in per.values()),
                "errors": sum(p["errors"] for p in per.values()),
                "rss_bytes": sum(p["rss_bytes"] for p in per.values()),
            },
        }


def unknown_plugin(plugin_id: str, known: Iterable[str], hosted: Iterable[str] | None = None) -> NotFound:
    """The 404 for a plugin id that is not `hosted` (None: every one of `known` is): a plugin that is there but that
    this gateway does not host says so, and how to host it (it read as one that does not exist); an unknown id is
    `no plugin 'x'`, with a did-you-mean when one is close."""
    known = set(known)
    here = sorted(known if hosted is None else hosted)
    listed = ", ".join(here) or "none"
    if hosted is not None and plugin_id in known:
        return NotFound(
            f"plugin {plugin_id!r} is not hosted by this gateway (it hosts: {listed}); start the gateway with "
            "--plugins including it",
            field="plugin",
        )
    near = closest(plugin_id, known)
    if near is None:
        hint = f"this gateway hosts: {listed}" if hosted is not None else f"plugins here: {listed}"
    elif near in here:
        hint = f"did you mean {near!r}?"
    else:
        hint = f"did you mean {near!r}? this gateway does not host it"
    return NotFound(f"no plugin {plugin_id!r} ({hint})", field="plugin")


def _still_failed(h: PluginHost, reason: str, also: str = "error") -> None:
    """Say why `h` is in `error`, unless someone started it meanwhile (a Start from the API wins)."""
    with h._lock:  # noqa: SLF001
        if h.worker is None and h.plugin is None and h.state in ("error", also):
            h._set("error", reason)  # noqa: SLF001
