"""A lock per name (a collection's, a gallery's, a workspace's), kept only while someone holds it or waits for it:
the maps of one lock per name that three plugins kept grew by an entry for every name ever used, dropped or not."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class NamedLocks:
    """`acquire(name)` / `release(name)`, or `with locks.hold(name):`; a name's lock goes when nobody holds it or
    waits for it, and the next user of the name makes a new one (nobody can hold the old one then)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}  # name: (lock, [holders and waiters])

    def __len__(self) -> int:
        return len(self._locks)

    def _enter(self, name: str) -> threading.Lock:
        with self._guard:
            entry = self._locks.get(name)
            if entry is None:
                entry = self._locks[name] = (threading.Lock(), [0])
            entry[1][0] += 1
            return entry[0]

    def _leave(self, name: str) -> None:
        with self._guard:
            users = self._locks[name][1]
            users[0] -= 1
            if not users[0]:
                del self._locks[name]

    def acquire(self, name: str, blocking: bool = True) -> bool:
        """Take the lock of `name` (waiting for it unless `blocking` is False); return whether it is held."""
        lock = self._enter(name)
        try:
            got = lock.acquire(blocking)
        except BaseException:
            self._leave(name)
            raise
        if not got:
            self._leave(name)
        return got

    def release(self, name: str) -> None:
        """Give back the lock of `name`, taken with `acquire`."""
        with self._guard:
            lock = self._locks[name][0]
        lock.release()
        self._leave(name)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Hold the lock of `name` for the block."""
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)
