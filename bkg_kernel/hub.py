"""`bkg hub`: JupyterHub with the shipped `deploy/jupyterhub_config.py` on 127.0.0.1, for a local trial of the
team set-up (the gateway as a Hub-managed service; Hub logins everywhere; rights from Hub groups)."""

from __future__ import annotations

import ctypes
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bkg_kernel.errors import NotFound

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "jupyterhub_config.py"
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port nothing listens on now (127.0.0.1), for a server that binds it a few seconds later. Picked below the
    kernel's range for the local ports of outgoing connections (`ip_local_port_range`, where a bind to port 0 picks
    too): a connection made meanwhile by any process takes its port from that range, never from this one."""
    low = _outgoing_ports()[0]
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(10000, low) if low > 10000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: another
            return int(s.getsockname()[1])
    with socket.socket() as s:  # every try was in use: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _outgoing_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def hub_env(
    *,
    port: int,
    data_dir: Path,
    state_dir: Path,
    admins: list[str],
    developers: list[str],
    dummy_auth: bool,
    gateway_port: int | None = None,
) -> dict[str, str]:
    """The environment the shipped config reads (every internal port free, the Hub's state in `state_dir`)."""
    here = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        BKG_HUB_PORT=str(port),
        BKG_HUB_HUB_PORT=str(free_port()),
        BKG_HUB_PROXY_API_PORT=str(free_port()),
        BKG_HUB_GATEWAY_PORT=str(gateway_port or free_port()),
        BKG_HUB_DATA_DIR=str(data_dir.resolve()),
        BKG_HUB_STATE_DIR=str(state_dir.resolve()),
        BKG_HUB_ADMINS=",".join(admins),
        BKG_HUB_DEVELOPERS=",".join(developers),
        BKG_HUB_DUMMY_AUTH="1" if dummy_auth else "0",
        PYTHONPATH=os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p),
    )
    for secret in ("BKG_API_KEY", "JUPYTERHUB_API_TOKEN"):  # the Hub hands out its own
        env.pop(secret, None)
    return env


def hub_command(config: Path | None = None) -> list[str]:
    """The command that runs JupyterHub with the shipped config (or `config`)."""
    path = config or CONFIG
    if not path.exists():
        raise NotFound(f"no JupyterHub config at {path}: pass --config", field="config")
    return [sys.executable, "-m", "jupyterhub", "-f", str(path)]


def run(command: list[str], env: dict[str, str], cwd: Path) -> None:
    """Replace this process with JupyterHub (it stops its proxy and the gateway service on Ctrl-C; when it dies
    otherwise, they stop themselves: `with_hub`)."""
    os.chdir(cwd)
    os.execve(sys.executable, command, env)


def with_hub(command: list[str]) -> list[str]:
    """`command` run by `follow` on behalf of this process (the Hub, which loads its config in-process): the Hub's
    proxy and the gateway service run in sessions of their own, so when the Hub dies without stopping them (SIGKILL,
    a crash, the OOM killer) nothing else would stop them, and they would keep the public port and the data dir."""
    return [sys.executable, "-m", "bkg_kernel.hub", str(os.getpid()), *command]


def follow(hub_pid: int, command: list[str], every: float = 0.5, grace: float = 10) -> int:
    """Run `command`, handing it the Hub's SIGINT / SIGTERM, until it exits; when the Hub `hub_pid` is gone, stop
    it (SIGTERM, then SIGKILL after `grace` seconds). Return its exit status (128 + the signal that ended it).

    The Hub is this process's parent: a poll of the parent pid sees it go however it goes. (The kernel's
    PR_SET_PDEATHSIG would fire when the Hub's *thread* that started us ends, and says nothing on a Hub that died
    before it was asked.) This follower, one thread, asks it for its own child: when the Hub SIGKILLs a follower
    that did not stop in time, the command goes with it, as it did when the Hub ran it itself."""
    if os.getppid() != hub_pid:  # gone before this follower started: nothing to start
        return 0
    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []

    def relay(sig: int, _frame: object) -> None:
        if child is None:
            early.append(sig)  # before the command started: handed on once it has
        else:
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, relay)  # the command starts with the default handlers (exec resets them)
    child = subprocess.Popen(command, preexec_fn=_killed_with_parent())  # noqa: PLW1509 - this process has one thread
    for got in early:
        child.send_signal(got)
    while child.poll() is None:
        if os.getppid() != hub_pid:
            said = f"bkg: the Hub (pid {hub_pid}) is gone: stopping {shlex.join(command[:4])}"
            print(said, file=sys.stderr, flush=True)
            child.terminate()
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                child.kill()
            break
        time.sleep(every)
    code = child.wait()
    return code if code >= 0 else 128 - code


def _killed_with_parent() -> Callable[[], object] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when this (one-threaded) process ends (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":  # `with_hub`'s command: python -m bkg_kernel.hub HUB_PID COMMAND...
    sys.exit(follow(int(sys.argv[1]), sys.argv[2:]))
