"""Inline plugins' work: the pool their requests run on, the thread of a stream, and the count of work running on
an instance."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bkg_kernel.errors import Unavailable, error_data
from bkg_kernel.runtime import calls
from bkg_kernel.runtime.contract import Plugin

# Runs inline plugins' requests (their own pool: they never take the event loop's default executor from the
# gateway's own blocking work, and a request that timed out is still tracked until it ends).
_INLINE_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bkg-inline")


def _run_inline_stream(
    plugin: Plugin,
    capability_id: str,
    data: Any,
    call: calls.Call,
    cancelled: threading.Event,
    sink: Callable[[tuple[Any, ...]], None],
    done: Callable[[], None],
) -> None:
    """Run an inline plugin's stream on this thread, chunks and its end to `sink`, then `done()`. Once `cancelled` is
    set, nobody reads it but a plugin stop, which wants to hear so, as from a stopped worker (a 503)."""
    try:
        try:
            with calls.running(call):
                for chunk in plugin.stream(capability_id, data, cancelled):
                    if cancelled.is_set():
                        break
                    sink(("chunk", chunk))
            end: tuple[Any, ...] = ("end", True, None)
        except Exception as exc:
            end = ("end", False, error_data(exc))
        if cancelled.is_set():
            end = ("end", False, error_data(Unavailable(f"plugin {plugin.id} was stopped")))
        sink(end)
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
        self._streams: set[threading.Event] = set()

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

    def take_stream(self, cancelled: threading.Event) -> tuple[Plugin, Callable[[], None]] | None:
        """`take` for a stream, which a stop cancels (sets `cancelled`) if it outlives the drain; the instance and the
        stream's `done` (None: stopped or stopping). One step: a stop cannot come between the two and miss it."""
        with self._cv:
            plugin = self.plugin
            if plugin is None:
                return None
            self.running += 1
            self._streams.add(cancelled)

        def ended() -> None:
            with self._cv:
                self._streams.discard(cancelled)
            self.done()

        return plugin, ended

    def release(self, timeout: float) -> Plugin | None:
        """Take the instance away from new work, then wait up to `timeout` seconds for the work on it to end, and
        cancel the streams still running (a stream may run for ever: it ends at its next chunk, the 503 a stopped
        worker's streams get); return the instance (None: there was none)."""
        with self._cv:
            p, self.plugin = self.plugin, None
            deadline = time.monotonic() + timeout
            while self.running and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            for cancelled in self._streams:
                cancelled.set()
        return p
