"""Where bkg's kernels listen (`bkg_kernel.kernels`): a private, short folder for their Unix sockets, made again
when it has been swept away, and Jupyter Server's kernel manager pointed at it whatever the runtime dir's length.
The kernels themselves run over these sockets in test_jobs, test_run, test_lab_extension and test_jupyterhub."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


_CHILD = """
import os, socket, subprocess, sys, time
from bkg_kernel import kernels
kernels.SOCKETS_PARENT = sys.argv[1]
folder = kernels.socket_dir()
path = os.path.join(folder, "kernel-0-ipc-1")
if sys.argv[2] == "orphan":  # a kernel that outlives its lab: it keeps listening after its parent is killed
    subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                      "s.bind(sys.argv[1]); s.listen(); print('up', flush=True); time.sleep(120)", path],
                     stdout=sys.stdout, start_new_session=True)
else:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()
    print("up", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def short_tmp() -> Iterator[Path]:
    """A temp folder with a short path (pytest's own can be too long for a socket path)."""
    folder = Path(tempfile.mkdtemp(prefix="bkg-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_killed_process_s_folder_goes_with_the_next_one_unless_a_kernel_still_listens(
    fresh: None, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = short_tmp

    folders: dict[str, Path] = {}
    for kind in ("dead", "orphan"):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), kind], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        child.send_signal(signal.SIGKILL)  # no atexit: the folder stays behind
        child.wait()
        (folders[kind],) = [p for p in tmp_path.iterdir() if p not in folders.values()]
        assert folders[kind].name.startswith(f"bkg-kernels-{child.pid}-")

    def orphan() -> str:
        return subprocess.run(["pgrep", "-f", str(folders["orphan"])], capture_output=True, text=True).stdout

    try:
        assert kernels.sweep(str(tmp_path)) == []  # too young to judge: its maker may live in another pid namespace
        monkeypatch.setattr(kernels, "SWEEP_AFTER_S", 0.0)
        kernels.SOCKETS_PARENT = str(tmp_path)
        mine = kernels.socket_dir()  # the next bkg process sweeps as it makes its own folder
        assert not folders["dead"].exists()
        assert folders["orphan"].is_dir() and Path(mine).is_dir()  # a kernel listens there; this process lives
        assert kernels.sweep(str(tmp_path)) == []
        for pid in orphan().split():
            os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while orphan() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kernels.sweep(str(tmp_path)) == [str(folders["orphan"])]  # once nothing listens, it goes too
        assert [p.name for p in tmp_path.iterdir()] == [Path(mine).name]
    finally:
        for pid in orphan().split():
            os.kill(int(pid), signal.SIGKILL)
        kernels.remove_socket_dir()
