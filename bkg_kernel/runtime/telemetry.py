"""Per-plugin logs (a bounded ring) and telemetry (requests, errors, latency percentiles, cpu, memory)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from bkg_kernel.errors import InvalidInput


def level_number(name: str) -> int | None:
    """Return a log level's number: a standard level's, one registered with `logging.addLevelName` (a plugin's
    module does so on import, in the gateway too), logging's own `Level 35`, or a number (None: unknown here)."""
    known = logging.getLevelNamesMapping()
    n = known.get(name, known.get(name.upper()))
    if n is None and name.removeprefix("Level ").isdigit():
        n = int(name.removeprefix("Level "))
    return n


class LogRing:
    """The last `size` log lines of a plugin."""

    def __init__(self, size: int = 2000) -> None:
        # each line with its level's number: a plugin's own level (NOTICE, 25) is ranked as logging ranks it
        self._lines: deque[tuple[int | None, dict[str, Any]]] = deque(maxlen=size)
        self._named: dict[str, int] = {}  # the levels its lines came with (a worker's own NOTICE), by name
        self._lock = threading.Lock()
        self._seq = 0

    def add(self, level: str, t: float, message: str, number: int | None = None) -> dict[str, Any]:
        """Append one line and return it (ranked by `number`, its record's level number, else by its name)."""
        rank = number if isinstance(number, int) else level_number(level)
        with self._lock:
            if isinstance(number, int):
                self._named[level.upper()] = number
            self._seq += 1
            line = {"seq": self._seq, "time": t, "level": level, "message": message}
            self._lines.append((rank, line))
            return line

    def query(self, limit: int = 200, level: str | None = None, search: str | None = None) -> list[dict[str, Any]]:
        """Return the newest lines (oldest first), at or above `level` (a name or a number), containing `search`.

        Each line is ranked by its record's level number (a worker sends it with the line); a line added by name
        alone, of a level this process cannot number, passes every floor: shown rather than lost."""
        floor = None if level is None else level_number(level)
        if level is not None and floor is None:
            with self._lock:
                floor = self._named.get(level.upper())  # a level only the plugin's worker registered
        if level is not None and floor is None:
            raise InvalidInput(
                f"{level!r} is not a log level: DEBUG, INFO, WARNING, ERROR, CRITICAL, a level a plugin named, "
                "or a number",
                field="level",
            )
        with self._lock:
            lines = [x for n, x in self._lines if floor is None or n is None or n >= floor]
        if search:
            lines = [x for x in lines if search.lower() in x["message"].lower()]
        return lines[-limit:] if limit else []


class RingHandler(logging.Handler):
    """Send an inline plugin's log records to its ring (and on to subscribers)."""

    def __init__(self, sink: Any) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(record.levelname, record.created, self.format(record), record.levelno)


HISTORY_POINTS = 1800  # an hour of the supervisor's 2-second samples
HISTORY_FIELDS = ("t", "cpu_percent", "rss_bytes", "latency_p50_ms", "latency_p95_ms", "requests_per_min")


class Telemetry:
    """Counters and samples for one plugin, and a bounded ring of samples over the last hour (so a page opened
    now draws history at once)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.last_error: str | None = None
        self.latencies: deque[float] = deque(maxlen=1000)
        self.started_at: float | None = None  # time.monotonic() of the start: durations only
        self.cpu_percent = 0.0
        self.rss_bytes = 0
        self.in_flight = 0
        self.queued: Callable[[], int] = lambda: 0  # the plugin's request slots say how many calls wait
        self._lock = threading.Lock()  # calls start and end on the event loop and on call port threads
        self._recent: deque[float] = deque(maxlen=100_000)
        # the last snapshot with the sample round it read and when: (round, monotonic time, numbers)
        self._snap: tuple[int, float, dict[str, Any]] | None = None
        self._round = 0  # samples taken: a snapshot of an older round is never served again
        self.history: deque[tuple[Any, ...]] = deque(maxlen=HISTORY_POINTS)
        self._since_sample: list[float] = []

    @property
    def queue_depth(self) -> int:
        return self.queued()

    def begin(self) -> None:
        """A request starts running."""
        with self._lock:
            self.in_flight += 1

    def end(self, seconds: float, error: str | None = None) -> None:
        """A request that `begin` counted has finished."""
        with self._lock:
            self.in_flight -= 1
            self._record(seconds, error)

    def _record(self, seconds: float, error: str | None) -> None:
        self.requests += 1
        self._snap = None
        self.latencies.append(seconds * 1000)
        if len(self._since_sample) < 100_000:  # bounded even if sampling stalls
            self._since_sample.append(seconds * 1000)
        self._recent.append(time.monotonic())
        if error is not None:
            self.errors += 1
            self.last_error = error

    def uptime(self) -> float:
        """Return seconds since the plugin last started (0 when it is not running; a plugin that started a moment
        ago reads 0.001, not 0)."""
        return max(round(time.monotonic() - self.started_at, 3), 0.001) if self.started_at else 0.0

    def snapshot(self) -> dict[str, Any]:
        """Return the current numbers (recomputed at most every 0.25 s, and after every sample: list routes and
        dashboards poll it)."""
        now = time.monotonic()
        rnd = self._round  # read before the numbers: a sample taken meanwhile makes this one stale, not the next
        snap = self._snap
        if snap is not None and snap[0] == rnd and now - snap[1] < 0.25:
            return snap[2]
        lat = np.array(self.latencies) if self.latencies else None
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        per_min = len(self._recent)
        numbers = {
            "cpu_percent": round(self.cpu_percent, 1),
            "rss_bytes": self.rss_bytes,
            "uptime_s": self.uptime(),
            "requests": self.requests,
            "requests_per_min": per_min,
            "errors": self.errors,
            "last_error": self.last_error,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 3) if lat is not None else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 3) if lat is not None else None,
            "queue_depth": self.queue_depth,
            "in_flight": self.in_flight,
        }
        self._snap = (rnd, now, numbers)
        return numbers

    def sample(self, at: float) -> None:
        """Add one point to the history: cpu, memory, and the latency percentiles of the requests since the last.

        The caller has set this round's cpu and memory: the round ends the cached snapshot (a list route's from a
        moment ago held the previous round's, and the history and the next listing repeated them)."""
        self._round += 1
        window, self._since_sample = self._since_sample, []
        p50 = p95 = None
        if window:
            p50, p95 = (round(float(v), 3) for v in np.percentile(np.asarray(window), [50, 95]))
        snap = self.snapshot()
        self.history.append((round(at, 2), snap["cpu_percent"], snap["rss_bytes"], p50, p95, snap["requests_per_min"]))

    def history_columns(self, since: float = 0.0) -> dict[str, list[Any]]:
        """Return the history after `since` (unix seconds) as columns, oldest first."""
        rows = [r for r in list(self.history) if r[0] > since]
        return {name: [r[i] for r in rows] for i, name in enumerate(HISTORY_FIELDS)}
