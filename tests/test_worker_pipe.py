"""A worker's pipe is closed by the last of its two threads to end, never by a stop while a thread may still use it.
Found in a fresh-clone CI run: a config change while sysinfo was starting stopped the worker being started, and the
stop closed the pipe while its writer thread was about to send that worker ("stop",). The next worker's pipe took
the freed descriptor number, the old writer's message reached the new worker, and it exited under the three calls
just sent to it (each a 503 "the sysinfo worker exited while handling the request")."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bkg_kernel.plugins.sysinfo.plugin import SysInfo
from bkg_kernel.runtime.discovery import Discovered, Entry
from bkg_kernel.runtime.host import PluginHost


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _same(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def test_a_stop_leaves_the_pipe_to_a_writer_still_sending_then_it_closes(tmp_path: Path) -> None:
    host = PluginHost(Discovered("sysinfo", "test", SysInfo), Entry(config={}), tmp_path, lambda *a: None)
    assert host.start()["state"] == "running"
    w = host.worker
    assert w is not None
    fd = w.conn.fileno()
    inode = os.fstat(fd).st_ino
    sending, go_on = threading.Event(), threading.Event()
    send = w.conn.send_bytes

    def held(frame: Any) -> None:  # the writer, about to write: it holds the descriptor's number
        sending.set()
        go_on.wait(30)
        send(frame)

    w.conn.send_bytes = held  # type: ignore[method-assign]
    host.worker = None  # stopped as the supervisor's reaper and a start ended by a stop do: the worker alone
    stopping = threading.Thread(target=w.stop, args=(0,))
    stopping.start()
    assert sending.wait(10)
    stopping.join(30)
    assert not stopping.is_alive()
    # stopped (the process killed), yet its writer is still in a send: the descriptor is still the pipe's, so a
    # new pipe cannot take its number and get what the old writer sends
    assert _same(fd, inode)
    a, b = socket.socketpair()
    try:
        assert fd not in (a.fileno(), b.fileno())
    finally:
        a.close()
        b.close()
    go_on.set()
    # the writer's send fails (the pipe is shut down), it ends, and the last of the two threads closes the pipe
    assert _wait(lambda: not _same(fd, inode))
