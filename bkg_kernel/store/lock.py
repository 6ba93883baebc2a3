"""Exclusive ownership of a data dir: one process at a time, and the error names the holder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from bkg_kernel.errors import DataDirLocked

LOCK_NAME = "bkg.lock"


class DataDirLock:
    """An advisory `flock` on `<data_dir>/bkg.lock`; the kernel drops it when its holder dies (never stale)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise `DataDirLocked` naming the process that holds it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private(self.path.parent)
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the store
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise DataDirLocked(
                f"data dir {self.path.parent} is already owned by {holder}; "
                "connect to that process (the bkg gateway) instead of opening the store again",
                field="data_dir",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(sys.argv)[:200],
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        )
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def holder(self) -> dict[str, object] | None:
        """Return what the lock file says about its holder, if anything."""
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None


def private(data_dir: Path) -> None:
    """Let no other OS user into the data dir: it holds the users and their keys' hashes, plugin settings with
    secrets (an upstream LLM key), every collection and every run's output, written with the default umask. On a
    shared machine (JupyterHub's users are OS users) the folder's mode is what keeps them from reading it all."""
    st = data_dir.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(data_dir, st.st_mode & 0o700)


def _describe(raw: str) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']} ({info['command']!r}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
