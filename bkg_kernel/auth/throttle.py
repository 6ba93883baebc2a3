"""Login throttling: failed attempts counted per user name and per client address in a sliding window.

Like a reverse proxy's `limit_req` in front of a login form: past the limit a login answers 429 with
Retry-After until the oldest failure leaves the window, whether or not the password would now be right.
Memory is bounded: at most `max_tracked` names and addresses are remembered (the oldest are forgotten first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from bkg_kernel.errors import TooManyRequests


class LoginThrottle:
    """`check(name, address)` before a login, `failed(name, address)` after a wrong one, `succeeded(name)`."""

    def __init__(
        self, per_name: int = 10, per_address: int = 30, window_s: float = 300.0, max_tracked: int = 10_000
    ) -> None:
        self.limits = {"name": per_name, "address": per_address}
        self.window_s, self.max_tracked = window_s, max_tracked
        self._fails: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def check(self, name: str, address: str) -> None:
        """Raise 429 (with the seconds until a slot frees) when the name or the address is over its limit."""
        now = time.monotonic()
        with self._lock:
            for kind, value in (("name", name), ("address", address)):
                q = self._recent((kind, value), now)
                if len(q) >= self.limits[kind]:
                    wait = q[0] + self.window_s - now
                    raise TooManyRequests(
                        f"too many failed logins for this {'user name' if kind == 'name' else 'address'} "
                        f"({len(q)} in {self.window_s:g}s): try again in {wait:.0f}s",
                        retry_after=wait,
                    )

    def failed(self, name: str, address: str) -> None:
        """Count a failed login against the name and the address."""
        now = time.monotonic()
        with self._lock:
            for key in (("name", name), ("address", address)):
                q = self._fails.setdefault(key, deque())
                q.append(now)
                self._fails.move_to_end(key)
            while len(self._fails) > self.max_tracked:
                self._fails.popitem(last=False)

    def succeeded(self, name: str) -> None:
        """A right password clears the name's failures (the address keeps its count)."""
        with self._lock:
            self._fails.pop(("name", name), None)


class AuditBudget:
    """At most `per_min` rows a minute for a noisy event (failed logins); what it holds back is counted and
    reported on the next row it lets through."""

    def __init__(self, per_min: int = 60) -> None:
        self.per_min = per_min
        self.tokens, self.at, self.held_back = float(per_min), time.monotonic(), 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """Return how many rows were held back before this one (write it), or None (hold this one back)."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(float(self.per_min), self.tokens + (now - self.at) * self.per_min / 60.0)
            self.at = now
            if self.tokens < 1.0:
                self.held_back += 1
                return None
            self.tokens -= 1.0
            held, self.held_back = self.held_back, 0
            return held
