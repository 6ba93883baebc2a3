"""Where bkg's Jupyter kernels listen: Unix sockets in a short private folder, not TCP ports.

A TCP kernel gets its five ports picked free by its manager and binds them a moment later; another process
starting a kernel (or anything else) in between can take one, and the kernel dies ("Address already in use";
papermill #511, jupyter_client's own log suggests IPC). A kernel on TCP 127.0.0.1 is also reachable by every
local user, kept out only by the key in its connection file. Over IPC there is nothing to race for, and the
sockets sit in a folder only this user can enter (0700).

A socket's path must fit in 107 bytes, so the folder is a short one under the system's temp dir (Voila's choice
for its connection files), never Jupyter's runtime dir, whose path can be long; the connection files themselves
stay where their manager puts them. `bkg run`'s JupyterLab and the Hub's users' servers use `IpcKernelManager`
(`bkg_kernel.lab_kernels`, `ipc_prefix()`); the job workers keep their connection files in the folder too
(`connection_file()`).

The folder is named after the process that made it (`bkg-kernels-<pid>-...`) and removed when that process exits;
one left behind by a process killed outright (SIGKILL, the OOM killer) is removed by the next bkg process of the
same user that makes its own: its process is gone and none of its sockets answers (a kernel that outlived its
lab keeps its folder).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid

# the Jupyter Server option that gives a lab or a Hub user's server `lab_kernels.IpcKernelManager`
LAB_KERNEL_MANAGER = "--MappingKernelManager.kernel_manager_class=bkg_kernel.lab_kernels.IpcKernelManager"
_sockets: list[str] = []  # this process's folders (the last in use), made on first use
SOCKETS_PARENT: str | None = None  # where to make it (None: the system's temp dir)
_FOLDER = re.compile(r"bkg-kernels-(\d+)-[A-Za-z0-9_]+")
SWEEP_AFTER_S = 60.0  # a folder younger than this is never swept (its maker may be in another pid namespace)


def socket_dir() -> str:
    """This process's private folder (0700) for its kernels' sockets, removed when the process exits.

    A process that may be killed outright (the Dask task's child) makes it in a folder its parent removes
    (`SOCKETS_PARENT`)."""
    if not _sockets:
        atexit.register(remove_socket_dir)
        sweep(SOCKETS_PARENT or tempfile.gettempdir())
    if not _sockets or not os.path.isdir(_sockets[-1]):  # a long-lived lab's folder can be swept from /tmp
        _sockets.append(tempfile.mkdtemp(prefix=f"bkg-kernels-{os.getpid()}-", dir=SOCKETS_PARENT))
    return _sockets[-1]


def sweep(parent: str) -> list[str]:
    """Remove this user's socket folders under `parent` left by killed processes; return what was removed.

    A folder goes only when it is ours, older than `SWEEP_AFTER_S`, the process named in it is gone, and no
    socket in it accepts a connection."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _FOLDER.fullmatch(entry.name)
        if m is None or int(m[1]) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or time.time() - st.st_mtime < SWEEP_AFTER_S:
            continue
        if _alive(int(m[1])) or _answers(entry.path):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _answers(folder: str) -> bool:
    """Whether any Unix socket in the folder accepts a connection (a kernel still listens there)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return True  # cannot look inside: leave it
    for entry in entries:
        try:
            if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(entry.path)
            except OSError:
                continue
            return True
    return False


def remove_socket_dir() -> None:
    """Remove the folder (also called by a process that exits without running atexit)."""
    for folder in _sockets:
        shutil.rmtree(folder, ignore_errors=True)


def connection_file() -> str:
    """A new kernel's connection file in the folder (a job kernel's: its sockets are named after it)."""
    return os.path.join(socket_dir(), f"kernel-{uuid.uuid4().hex[:12]}.json")


def ipc_prefix() -> str:
    """A new kernel's socket path prefix (its channels are `<prefix>-1` ... `<prefix>-5`), for a kernel whose
    connection file lives elsewhere (a lab's, in Jupyter's runtime dir)."""
    return os.path.join(socket_dir(), f"kernel-{uuid.uuid4().hex[:12]}-ipc")
