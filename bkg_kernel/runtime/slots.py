"""A plugin's request slots, taken from the event loop (HTTP calls) or from a thread (the call port's).

`max_concurrent` calls run at once; up to `max_queue` more wait their turn, first come first served whichever
side they came from; past that a call is refused at once (429). An `asyncio.Semaphore` can be taken from the event
loop only, and a call port's connection thread must not hop onto the loop and back for its slot (two wake-ups,
~0.3 ms on this machine, where a text query takes ~0.7 ms), so both sides share this one count under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from bkg_kernel.errors import Timeout, TooManyRequests


class _Waiter:
    """One queued call: `wake()` tells it a slot is its own now."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.granted = False  # set under the slots' lock


class Slots:
    """`max_concurrent` slots and a queue of at most `max_queue` waiters (the errors name `plugin_id`, and `limit`:
    the setting or constant that sets `max_concurrent`)."""

    def __init__(self, plugin_id: str, max_concurrent: int, max_queue: int, limit: str = "max_concurrent") -> None:
        self.plugin_id, self.max_concurrent, self.max_queue = plugin_id, max_concurrent, max_queue
        self.limit = limit
        self.free = max_concurrent
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _enqueue(self, waker: Callable[[], Callable[[], None]]) -> _Waiter | None:
        """Take a free slot (None), or queue a waiter woken by what `waker()` makes (429 when the queue is full)."""
        with self._lock:
            if self.free > 0 and not self._waiters:
                self.free -= 1
                return None
            if len(self._waiters) >= self.max_queue:
                raise TooManyRequests(
                    f"plugin {self.plugin_id!r} is busy: its {self.max_concurrent} request slots ({self.limit}) are "
                    f"taken and {len(self._waiters)} requests are queued (max_queue {self.max_queue}); try again later"
                )
            waiter = _Waiter(waker())
            self._waiters.append(waiter)
            return waiter

    def _give_up(self, waiter: _Waiter) -> bool:
        """The waiter stops waiting: False when a slot had already been handed to it (it holds one now)."""
        with self._lock:
            if waiter.granted:
                return False
            self._waiters.remove(waiter)
            return True

    def _timed_out(self, timeout: float | None) -> Timeout:
        return Timeout(
            f"plugin {self.plugin_id!r} had no free request slot for {timeout:g}s ({self.limit} "
            f"{self.max_concurrent} busy): the request was not run"
        )

    async def take(self, timeout: float | None) -> None:
        """Take a slot from the event loop, waiting at most `timeout` seconds (None: as long as it takes)."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[None] = loop.create_future()

        def grant() -> None:
            if not got.done():
                got.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody waits any more
                loop.call_soon_threadsafe(grant)

        waiter = self._enqueue(lambda: wake)
        if waiter is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(got), timeout)
        except BaseException as exc:  # timed out, or the request's task was cancelled
            if not self._give_up(waiter):
                self.release()  # the slot came as it gave up: passed on
            if isinstance(exc, TimeoutError):
                raise self._timed_out(timeout) from None
            raise

    def take_blocking(self, timeout: float | None) -> None:
        """Take a slot from a thread, waiting at most `timeout` seconds."""
        event: threading.Event | None = None

        def waker() -> Callable[[], None]:  # only a call that must wait makes an Event
            nonlocal event
            event = threading.Event()
            return event.set

        waiter = self._enqueue(waker)
        if waiter is None:
            return
        assert event is not None
        if event.wait(timeout):
            return
        if self._give_up(waiter):
            raise self._timed_out(timeout)
        # handed over as the wait ended: it is ours

    def resize(self, max_concurrent: int, max_queue: int) -> None:
        """New limits (a config change, applied without a restart): the calls running keep their slots, so with
        fewer slots the next call waits until enough of them have ended; with more, queued calls start at once."""
        woken: list[_Waiter] = []
        with self._lock:
            self.free += max_concurrent - self.max_concurrent  # below 0 while more run than the new count allows
            self.max_concurrent, self.max_queue = max_concurrent, max_queue
            while self.free > 0 and self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self.free -= 1
                woken.append(waiter)
        for waiter in woken:
            waiter.wake()

    def release(self) -> None:
        """Give a slot back: to the first waiter, or to the free count (also while fewer slots than calls running
        are left after a `resize`). Any thread may call it."""
        with self._lock:
            if self._waiters and self.free >= 0:
                waiter = self._waiters.popleft()
                waiter.granted = True
            else:
                self.free += 1
                return
        waiter.wake()
