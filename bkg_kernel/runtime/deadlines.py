"""Deadlines for calls that run on their caller's own thread (the call port's): one thread for all of them runs a
callback when a call overruns its timeout, so that no call needs a timer thread (or a hand-over to another
thread, ~0.1 ms) of its own. Arming and disarming one costs a heap push and a lock."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("bkg.supervisor")


class Deadline:
    """One armed deadline; `fn` is None once it fired or was disarmed."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn


class Deadlines:
    """`arm(seconds, fn)` runs `fn()` on this object's thread once `seconds` have passed, unless `disarm` came
    first."""

    def __init__(self) -> None:
        # (when, sequence, deadline): ordered by the tuples' first two items, compared in C. Disarmed deadlines stay
        # until they come up, so under load the heap holds every call of the last `request_timeout` seconds
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fn: Callable[[], None]) -> Deadline:
        entry = Deadline(fn)
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bkg-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is entry:  # sooner than what the thread waits for
                self._cv.notify()
        return entry

    def disarm(self, entry: Deadline) -> bool:
        """Stop `entry` from firing; return whether it had fired already."""
        with self._cv:
            fired = entry.fn is None
            entry.fn = None
            return fired

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][2].fn is None:  # disarmed ones leave as they come up
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)[2]
                fn, entry.fn = entry.fn, None
            if fn is not None:
                try:
                    fn()
                except Exception:  # a callback's failure must not stop the deadlines of every other call
                    log.exception("a deadline's callback failed")


DEADLINES = Deadlines()
