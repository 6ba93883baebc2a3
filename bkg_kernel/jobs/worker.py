"""A job worker: a long-lived process that runs notebooks one at a time, each on a kernel started before it.

`python -m bkg_kernel.jobs.worker` reads one JSON request per line on stdin and answers with JSON events on
stdout (everything else a run prints goes to stderr):

    -> {"op": "run", "id", "input", "output", "html", "parameters", "env", "cwd"}
    <- {"event": "ready"}                                  a warm kernel waits
    <- {"event": "started", "id", "kernel_pid"}            kill this process group to cancel the run
    <- {"event": "cell", "id", "index", "state", "done", "total"}
    <- {"event": "done", "id", "ok", "error", "cells_done", "cells_total", "duration_s", "output"}
    <- {"event": "html", "id", "path"}

The next kernel is spawned as a run starts, so it boots while the run executes. `--once` runs a single request
from stdin on a fresh kernel and exits (the Dask executor's child process); `--sockets DIR` makes the kernels'
Unix sockets in DIR (a folder the caller removes, even if it kills this process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import IO, Any

from bkg_kernel import kernels
from bkg_kernel.jobs import execute
from bkg_kernel.jobs.render import render_html
from bkg_kernel.runtime.worker import WORKER_NICE


class Channel:
    """The protocol stream: the real stdout, kept apart from whatever the run prints."""

    def __init__(self) -> None:
        self.out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # print() in this process, and the kernels' inherited stdout, now go to stderr
        sys.stdout = sys.stderr
        self.lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps(msg, default=str) + "\n")
            self.out.flush()


def ready_kernel(cwd: str, km: Any = None) -> Any:
    """A warm kernel: `km` if it warms up, else a new one; three tries (a kernel can fail to boot on a busy
    machine; kernels talk over Unix sockets, so concurrent starts no longer collide on a port, papermill #511)."""
    for attempt in range(3):
        try:
            km = km if km is not None else execute.spawn_kernel(cwd)
            execute.warm(km)
            return km
        except Exception as exc:
            print(f"job worker: kernel start failed ({exc}); trying again", file=sys.stderr)
            if km is not None:
                execute.shutdown(km)
            km = None
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError("could not start a kernel after 3 tries")


def _spawn_next(cwd: str) -> Any:
    try:
        return execute.spawn_kernel(cwd)
    except Exception:  # ready_kernel starts one after the run instead
        return None


def _run(msg: dict[str, Any], km: Any, chan: Channel) -> threading.Thread | None:
    """Run one request; the HTML rendering goes on in the returned thread while the next kernel warms up."""
    chan.send({"event": "started", "id": msg["id"], "kernel_pid": execute.kernel_pid(km)})
    outcome = execute.run(msg, km, chan.send)
    chan.send(outcome)
    if not (outcome["output"] and msg.get("html")):
        return None

    def render() -> None:
        path = render_html(outcome["output"], msg["html"], msg.get("cwd"))  # its images: next to it
        chan.send({"event": "html", "id": msg["id"], "path": path})

    t = threading.Thread(target=render, name="bkg-render", daemon=True)
    t.start()
    return t


KERNELS: list[Any] = []  # the kernels this worker holds (the running one, the next one)


def _orphan_watch(parent: int) -> None:
    """When the gateway dies (even by SIGKILL), kill this worker's kernels and exit: no run outlives its gateway."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            for km in list(KERNELS):
                pid = execute.kernel_pid(km)
                if pid:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
            kernels.remove_socket_dir()
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Serve run requests from stdin until it closes."""
    args = sys.argv[1:] if argv is None else argv
    chan = Channel()
    cwd = os.getcwd()
    if "--sockets" in args:  # the kernels' sockets go in a folder made in this one
        kernels.SOCKETS_PARENT = args[args.index("--sockets") + 1]
    if "--once" in args:
        msg = json.loads(sys.stdin.readline())
        km = execute.spawn_kernel(cwd)
        try:
            rendering = _run(msg, km, chan)
        finally:
            execute.shutdown(km)
        if rendering is not None:
            rendering.join()
        return 0
    os.nice(WORKER_NICE)  # the gateway answers first; runs (and their kernels, which inherit this) wait
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), name="bkg-orphan-watch", daemon=True).start()
    km = ready_kernel(cwd)
    KERNELS[:] = [km]
    try:
        import nbconvert  # noqa: F401  (rendering the first output should not pay for this import)

        chan.send({"event": "ready"})
        for line in sys.stdin:
            msg = json.loads(line)
            if msg.get("op") != "run":
                continue
            nxt = _spawn_next(cwd)  # boots while this run executes
            KERNELS[:] = [k for k in (km, nxt) if k is not None]
            try:
                _run(msg, km, chan)
            except Exception as exc:  # the worker lives on: one broken request fails one run
                chan.send(
                    {
                        "event": "done",
                        "id": msg.get("id"),
                        "ok": False,
                        "cells_done": 0,
                        "cells_total": 0,
                        "duration_s": 0.0,
                        "output": None,
                        "error": {
                            "cell_index": None,
                            "source": None,
                            "ename": type(exc).__name__,
                            "evalue": str(exc),
                            "traceback": "",
                        },
                    }
                )
            finally:
                execute.shutdown(km)
            km = ready_kernel(cwd, nxt)
            KERNELS[:] = [km]
            chan.send({"event": "ready"})
    finally:
        execute.shutdown(km)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
