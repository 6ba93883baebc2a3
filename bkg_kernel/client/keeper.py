"""`bkg run` keeps the gateway it started: one that dies (killed, crashed: any end but a clean exit) is started
again on the same data dir and at the same address, where the lab and the dashboards already point, the way
Jupyter's kernel restarter brings back a kernel that died. At most `RESTART_LIMIT` restarts within `WINDOW_S`: a
gateway that keeps dying is left down, saying so. A clean exit (a SIGTERM from `kill` or a service manager: someone
stopped it) is left alone."""

from __future__ import annotations

import collections
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bkg_kernel.errors import BkgError
from bkg_kernel.settings import Settings

RESTART_LIMIT = 5
WINDOW_S = 60.0
POLL_S = 1.0


class GatewayKeeper:
    """Watch a gateway process (`proc`, started with `spawn_gateway`) on a thread; start it again when it dies."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        settings: Settings,
        ddir: Path,
        url: str,
        say: Callable[[str], None],
        timeout: float = 60.0,
    ) -> None:
        self.proc = proc
        self.restarts = 0
        self._settings, self._ddir, self._url, self._say, self._timeout = settings, ddir, url, say, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bkg-keep-gateway", daemon=True)

    def start(self) -> GatewayKeeper:
        self._thread.start()
        return self

    def stop(self) -> int | None:
        """Stop watching (after a restart under way has ended); return the pid of the gateway kept, if it runs."""
        self._stop.set()
        self._thread.join(self._timeout + 10)
        return self.proc.pid if self.proc.poll() is None else None

    def _watch(self) -> None:
        recent: collections.deque[float] = collections.deque()
        while not self._stop.wait(POLL_S):
            code = self.proc.poll()
            if code is None:
                continue
            if code == 0:
                self._say("the bkg gateway was stopped (it exited cleanly): not started again")
                return
            if (other := _running(self._ddir)) is not None:  # started meanwhile by someone else (`bkg.connect()`)
                self._say(f"the bkg gateway died ({_how(code)}), and another one runs on its data dir now, at "
                          f"{other}: that one is not kept here")  # fmt: skip
                return
            now = time.monotonic()
            while recent and now - recent[0] > WINDOW_S:
                recent.popleft()
            if len(recent) >= RESTART_LIMIT:
                self._say(f"the bkg gateway died {RESTART_LIMIT} times within {WINDOW_S:.0f}s: not started again "
                          f"(see {self._ddir / 'gateway.log'}; `bkg serve` starts it by hand)")  # fmt: skip
                return
            recent.append(now)
            self.restarts += 1
            self._say(f"the bkg gateway died ({_how(code)}): starting it again at {self._url} "
                      f"(see {self._ddir / 'gateway.log'})")  # fmt: skip
            self._restart()

    def _restart(self) -> None:
        from bkg_kernel.client.workbench import SPAWNED, spawn_gateway

        before = set(SPAWNED)
        try:
            spawn_gateway(self._settings, self._ddir, self._url, self._timeout)
        except Exception as exc:  # its log or its process could not be made (an OSError): said, tried next round
            self._say(f"the bkg gateway did not start again: {exc.message if isinstance(exc, BkgError) else exc}")
        new = [SPAWNED[pid] for pid in set(SPAWNED) - before]
        if new:  # the one started, even if it did not answer in time (it may yet, or its end is seen next round)
            self.proc = new[-1]
            if self.proc.poll() is None:
                self._say(f"bkg gateway running again at {self._url} (pid {self.proc.pid})")


def _running(ddir: Path) -> str | None:
    """The URL of the gateway running on `ddir` now, if one does."""
    from bkg_kernel.client.workbench import running_gateway

    return running_gateway(ddir)


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
