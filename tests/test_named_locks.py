"""A lock per name, kept only while in use: brainml's lock per collection, rustyface's per gallery and repoagent's
per workspace were maps that grew by an entry for every name ever used (a million collections made and dropped:
a million locks, for good)."""

from __future__ import annotations

import threading
import time

from helpers import on_thread

from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.plugins.rustyface import galleries


def test_a_name_s_lock_keeps_its_holders_apart_and_goes_with_its_last_user() -> None:
    locks = NamedLocks()
    inside: list[str] = []
    order: list[str] = []

    def work(who: str) -> None:
        with locks.hold("docs"):
            inside.append(who)
            assert len(inside) == 1  # never two at once
            time.sleep(0.05)
            order.append(who)
            inside.remove(who)

    threads = [on_thread(lambda w=w: work(w))[0] for w in ("a", "b", "c")]  # type: ignore[misc]
    with locks.hold("other"):  # another name is not held up by them
        assert len(locks) >= 1
    for t in threads:
        t.join(30)
    assert sorted(order) == ["a", "b", "c"]
    assert len(locks) == 0  # nobody holds or waits: no entry is left


def test_a_waiter_keeps_the_name_s_lock_and_a_refused_try_leaves_nothing() -> None:
    locks = NamedLocks()
    assert locks.acquire("w")
    assert not locks.acquire("w", blocking=False)  # held: refused, and counted as no user
    got = threading.Event()

    def wait() -> None:
        locks.acquire("w")
        got.set()
        locks.release("w")

    waiter, _ = on_thread(wait)
    time.sleep(0.05)
    assert not got.is_set() and len(locks) == 1
    locks.release("w")  # the waiter gets the same lock: the entry stays until it lets go
    assert got.wait(30)
    waiter.join(30)
    assert len(locks) == 0
    assert locks.acquire("x", blocking=False)
    locks.release("x")
    assert len(locks) == 0


def test_a_gallery_s_write_lock_goes_when_its_writes_end() -> None:
    with galleries.writing("faces-a"):
        assert "faces-a" in galleries._WRITERS._locks  # noqa: SLF001
        held, answer = on_thread(lambda: galleries._WRITERS.acquire("faces-a", blocking=False))  # noqa: SLF001
        held.join(30)
        assert answer == [False]  # another thread's write waits
    assert "faces-a" not in galleries._WRITERS._locks  # noqa: SLF001
