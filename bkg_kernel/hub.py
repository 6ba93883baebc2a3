"""`bkg hub`: JupyterHub with the shipped `deploy/jupyterhub_config.py` on 127.0.0.1, for a local trial of the
team set-up (the gateway as a Hub-managed service; Hub logins everywhere; rights from Hub groups)."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

from bkg_kernel.errors import NotFound

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "jupyterhub_config.py"


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
    """Replace this process with JupyterHub (it stops its proxy and the gateway service on Ctrl-C)."""
    os.chdir(cwd)
    os.execve(sys.executable, command, env)
