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

from bkg_kernel.errors import DataDirLocked, InvalidInput

LOCK_NAME = "bkg.lock"


class DataDirLock:
    """An advisory `flock` on `<data_dir>/bkg.lock`; the kernel drops it when its holder dies (never stale)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise `DataDirLocked` naming the process that holds it."""
        make_data_dir(self.path.parent)
        try:
            fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the store
        except OSError as exc:
            raise unusable(self.path.parent, exc) from None
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


def make_data_dir(data_dir: Path) -> None:
    """Create the data dir (private to this OS user) if it is missing; one that cannot be (a file by that name, a
    folder this user may not write) is a 422 naming the path, not an OSError."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private(data_dir)
    except OSError as exc:
        raise unusable(data_dir, exc) from None


def unusable(data_dir: Path, exc: OSError) -> InvalidInput:
    """The error for a data dir the OS refuses: it names the path and why."""
    why = exc.strerror or type(exc).__name__
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        why = "a file is in the way of the folder"
    return InvalidInput(f"cannot use {data_dir} as the data dir: {why} (set --data-dir or BKG_DATA_DIR)",
                        field="data_dir")  # fmt: skip


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
