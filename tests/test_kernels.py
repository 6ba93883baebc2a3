"""Where bkg's kernels listen (`bkg_kernel.kernels`): a private, short folder for their Unix sockets, made again
when it has been swept away, and Jupyter Server's kernel manager pointed at it whatever the runtime dir's length.
The kernels themselves run over these sockets in test_jobs, test_run, test_lab_extension and test_jupyterhub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bkg_kernel import kernels


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_sockets", [])
    monkeypatch.setattr(kernels, "SOCKETS_PARENT", None)


def test_the_socket_folder_is_private_short_and_made_again_when_swept(fresh: None) -> None:
    first = kernels.socket_dir()
    assert kernels.socket_dir() == first and (os.stat(first).st_mode & 0o777) == 0o700
    prefix = kernels.ipc_prefix()
    assert prefix.startswith(first + os.sep) and len(prefix + "-5") < 100  # a socket path fits in 107 bytes
    assert kernels.ipc_prefix() != prefix  # one prefix per kernel
    assert kernels.connection_file().startswith(first + os.sep) and kernels.connection_file().endswith(".json")
    os.rmdir(first)  # a /tmp cleaner took it while the lab ran
    second = kernels.socket_dir()
    assert second != first and os.path.isdir(second) and (os.stat(second).st_mode & 0o777) == 0o700
    kernels.remove_socket_dir()
    assert not os.path.exists(second)


def test_a_parent_folder_holds_it_when_asked(fresh: None, tmp_path: Path) -> None:
    kernels.SOCKETS_PARENT = str(tmp_path)
    assert Path(kernels.socket_dir()).parent == tmp_path
    kernels.remove_socket_dir()
    assert list(tmp_path.iterdir()) == []


def test_the_lab_kernel_manager_puts_sockets_in_the_folder_not_the_runtime_dir(fresh: None, tmp_path: Path) -> None:
    from bkg_kernel.lab_kernels import IpcKernelManager

    runtime = tmp_path / ("r" * 90)  # beside it, no socket path would fit
    km = IpcKernelManager(kernel_name="python3", connection_file=str(runtime / "kernel-0123.json"))
    assert km.transport == "ipc" and km.ip.startswith(kernels.socket_dir() + os.sep)
    tcp = IpcKernelManager(kernel_name="python3", transport="tcp")  # a user's own choice still holds
    assert tcp.ip == "127.0.0.1"
    kernels.remove_socket_dir()
