"""A crashed plugin's pending automatic restart is void once a person stops or starts it by hand: the supervisor
kept the due time of the crash, and later fired it at a plugin whose start by hand had failed since (or that was
stopped meanwhile), as if it had crashed again."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from bkg_kernel.runtime.contract import Plugin, capability
from bkg_kernel.runtime.discovery import Discovered
from bkg_kernel.runtime.supervisor import Supervisor


class _Nothing(BaseModel):
    pass


class _Plain(Plugin):
    id = "plain"
    name = "Plain"
    mode = "inline"

    @capability("plain.noop", scope="plugins:read")
    def noop(self, inp: _Nothing) -> _Nothing:
        """Nothing."""
        return _Nothing()


def _crashed(sup: Supervisor, now: float) -> None:
    """The state the supervisor leaves after a worker's crash: in error, a restart due in a second."""
    h = sup.hosts["plain"]
    h.want_running, h.state = True, "error"
    sup._schedule_restart(h, now)  # noqa: SLF001 - as `_check` does on a crash


def test_a_start_by_hand_voids_the_pending_restart(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"plain": Discovered("plain", "test", _Plain)})
    h = sup.hosts["plain"]
    now = time.monotonic()
    _crashed(sup, now)
    assert h.start()["state"] == "running" and h.restart_at is None  # by hand, during the backoff
    h.state = "error"  # then, say, a restart for a new setting failed: it stays in error until started by hand
    sup._check(h, now + 60)  # noqa: SLF001 - the watch thread's tick, well after the crash's due time
    assert h.restarts == 0 and h.state == "error"
    assert "plain" not in sup._restart_at  # noqa: SLF001


def test_a_stop_by_hand_voids_the_pending_restart(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"plain": Discovered("plain", "test", _Plain)})
    h = sup.hosts["plain"]
    now = time.monotonic()
    _crashed(sup, now)
    h.stop()
    assert h.restart_at is None and h.retry_after() is None  # callers are not told to retry a stopped plugin
    h.want_running, h.state = True, "error"  # a start by hand failed later
    sup._check(h, now + 60)  # noqa: SLF001
    assert h.restarts == 0 and h.state == "error"


def test_the_crash_restart_itself_still_fires(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"plain": Discovered("plain", "test", _Plain)})
    h = sup.hosts["plain"]
    now = time.monotonic()
    _crashed(sup, now)
    sup._check(h, now + 60)  # noqa: SLF001
    assert h.restarts == 1
    deadline = time.monotonic() + 30
    while h.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.state == "running"
    h.stop()


def test_a_watch_tick_while_a_new_restart_time_is_stored_keeps_it(tmp_path: Path) -> None:
    """Found by a review: the new time went into the supervisor's map before the host's, so a watch tick between
    the two stores (after a failed supervised start, whose `start()` had cleared the host's) took it for one voided
    by hand and dropped it: the plugin stayed in error, saying "next in 2s", for good."""
    sup = Supervisor(tmp_path, lambda *a: None, discovered={"plain": Discovered("plain", "test", _Plain)})
    h = sup.hosts["plain"]

    class _TickingMap(dict[str, float]):
        def __setitem__(self, key: str, value: float) -> None:
            super().__setitem__(key, value)
            sup._check(h, time.monotonic())  # noqa: SLF001 - the watch thread's tick, right then

    sup._restart_at = _TickingMap()  # noqa: SLF001
    h.want_running, h.state, h.restart_at = True, "error", None  # as a failed supervised start leaves it
    sup._schedule_restart(h, time.monotonic())  # noqa: SLF001
    assert h.restart_at is not None and sup._restart_at.get("plain") == h.restart_at  # noqa: SLF001
