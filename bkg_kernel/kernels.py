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
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

# the Jupyter Server option that gives a lab or a Hub user's server `lab_kernels.IpcKernelManager`
LAB_KERNEL_MANAGER = "--MappingKernelManager.kernel_manager_class=bkg_kernel.lab_kernels.IpcKernelManager"
_sockets: list[str] = []  # this process's folders (the last in use), made on first use
SOCKETS_PARENT: str | None = None  # where to make it (None: the system's temp dir)


def socket_dir() -> str:
    """This process's private folder (0700) for its kernels' sockets, removed when the process exits.

    A process that may be killed outright (the Dask task's child) makes it in a folder its parent removes
    (`SOCKETS_PARENT`)."""
    if not _sockets:
        atexit.register(remove_socket_dir)
    if not _sockets or not os.path.isdir(_sockets[-1]):  # a long-lived lab's folder can be swept from /tmp
        _sockets.append(tempfile.mkdtemp(prefix="bkg-kernels-", dir=SOCKETS_PARENT))
    return _sockets[-1]


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
