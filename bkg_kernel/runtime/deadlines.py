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

    __slots__ = ("at", "seq", "fn")

    def __init__(self, at: float, seq: int, fn: Callable[[], None]) -> None:
        self.at, self.seq = at, seq
        self.fn: Callable[[], None] | None = fn

    def __lt__(self, other: Deadline) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


class Deadlines:
    """`arm(seconds, fn)` runs `fn()` on this object's thread once `seconds` have passed, unless `disarm` came
    first."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fn: Callable[[], None]) -> Deadline:
        entry = Deadline(time.monotonic() + seconds, next(self._seq), fn)
        with self._cv:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bkg-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:  # sooner than what the thread waits for
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
                while self._heap and self._heap[0].fn is None:  # disarmed ones leave as they come up
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0].at - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)
                fn, entry.fn = entry.fn, None
            if fn is not None:
                try:
                    fn()
                except Exception:  # a callback's failure must not stop the deadlines of every other call
                    log.exception("a deadline's callback failed")


DEADLINES = Deadlines()
