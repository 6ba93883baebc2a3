"""`bkg run` (what `make run` calls): the gateway in the background, the Voila dashboards and JupyterLab with the
bkg extension in front, all reachable; the lab holds the workbench key, never the admin key, and Voila no key at
all; a gateway that dies is started again where the lab points; a SIGTERM stops all three."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
from gateway_harness import free_port, wait_for


def test_bkg_run_serves_gateway_and_lab(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lab_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("BKG_API_KEY", "BKG_ADMIN_KEY")}
    env.update(BKG_PORT="0", JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))  # the gateway on any free port
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bkg_kernel.cli",
            "run",
            "--port",
            str(lab_port),
            "--data-dir",
            str(data),
            "--dashboards-port",
            str(dash_port),
        ],  # fmt: skip
        cwd=Path(__file__).parent.parent,
        env=env,
        stdout=log,  # a file, not a pipe: a pipe nobody reads until the end can fill up and block the lab
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def lab_up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{lab_port}/lab", timeout=2).status_code in (200, 302)
            except httpx.HTTPError:
                return False

        wait_for(lab_up, timeout=120, every=0.5)
        gateway = json.loads((data / "gateway.json").read_text())["url"]  # the port it took
        assert f"bkg gateway: {gateway}  (plugins:" in (tmp_path / "run.log").read_text(errors="replace")
        health = httpx.get(f"{gateway}/health").json()
        assert health["plugins"]["sysinfo"] == "running"
        assert (data / "admin.key").stat().st_mode & 0o777 == 0o600
        gateway_pid = json.loads((data / "gateway.json").read_text())["pid"]
        dash = f"http://127.0.0.1:{dash_port}/voila/render/overview.ipynb"
        # a render runs the notebook (with Panel's telemetry charts, 3-15 s on 2 cores): a short request timeout
        # abandons every render and never sees one finish
        wait_for(lambda: _status(dash, timeout=60) == 200, timeout=180, every=0.5)
        # the clients hold the workbench key (developer scopes), not the admin key
        admin_key, bench_key = ((data / n).read_text().strip() for n in ("admin.key", "workbench.key"))
        assert (data / "workbench.key").stat().st_mode & 0o777 == 0o600
        children = psutil.Process(proc.pid).children(recursive=True)
        labs = [c for c in children if "jupyterlab" in " ".join(c.cmdline())]
        voilas = [c for c in children if "voila" in " ".join(c.cmdline())]
        assert labs and voilas
        for c in labs:
            assert c.environ().get("BKG_API_KEY") == bench_key and admin_key not in str(c.environ()), c.cmdline()
        for c in voilas:  # Voila asks nobody for a token: its kernels hold no key, every dashboard asks for a login
            assert bench_key not in str(c.environ()) and admin_key not in str(c.environ()), c.cmdline()
        me = httpx.get(f"{gateway}/auth/me", headers={"Authorization": f"Bearer {bench_key}"}).json()
        assert me["username"] == "admin" and not any(s.startswith("admin:") for s in me["scopes"])
        assert "collections:write" in me["scopes"] and "plugins:write" in me["scopes"]
        _lab_kernel_over_unix_sockets(lab_port, tmp_path / "rt")
        # a gateway that dies (killed outright, as the OOM killer does) is started again where the lab points
        os.kill(gateway_pid, signal.SIGKILL)
        wait_for(lambda: not _running(gateway_pid), timeout=30)
        again = wait_for(
            lambda: (g := _recorded(data)) and g["pid"] != gateway_pid and _status(f"{gateway}/health") == 200 and g,
            120,
            every=0.5,
        )
        assert again["url"] == gateway, again
        token = json.loads(next((tmp_path / "rt").glob("jpserver-*.json")).read_text())["token"]
        me = httpx.get(f"http://127.0.0.1:{lab_port}/bkg/api/auth/me", headers={"Authorization": f"token {token}"})
        assert me.status_code == 200 and me.json()["username"] == "admin", me.text  # the lab's proxy reaches it
        assert "the bkg gateway died (signal SIGKILL): starting it again" in (tmp_path / "run.log").read_text()
        gateway_pid = again["pid"]  # the one the SIGTERM below must stop
    finally:
        proc.terminate()  # SIGTERM to `bkg run` alone (a service manager): it stops what it started
        proc.wait(timeout=90)
        log.close()
    out = (tmp_path / "run.log").read_text(errors="replace")
    assert "bkg gateway: http://127.0.0.1:" in out and "admin API key file" in out and "bkg gateway stopped" in out
    assert _status(dash) == 0 and _status(f"http://127.0.0.1:{lab_port}/lab") == 0
    wait_for(lambda: not (data / "gateway.json").exists(), timeout=30)
    wait_for(lambda: not _running(gateway_pid), timeout=30)


def _lab_kernel_over_unix_sockets(port: int, runtime: Path) -> None:
    """The lab's kernels listen on Unix sockets in a short private folder, though this runtime dir's path is too
    long for a socket's: a kernel starts, its connection file says `ipc`, and a client reaches it there."""
    from jupyter_client import BlockingKernelClient

    token = json.loads(next(runtime.glob("jpserver-*.json")).read_text())["token"]
    lab = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"token {token}"}, timeout=60)
    kernel = lab.post("/api/kernels", json={"name": "python3"}).json()
    try:
        info = json.loads((runtime / f"kernel-{kernel['id']}.json").read_text())
        assert info["transport"] == "ipc" and len(info["ip"]) < 80, info
        assert "/bkg-kernels-" in info["ip"] and not info["ip"].startswith(str(runtime))
        # the kernel binds its five sockets as it starts: a client that pings its heartbeat before then reads the
        # missing answer as death ("Kernel died before replying to kernel_info", on two loaded cores in CI)
        sockets = [Path(f"{info['ip']}-{n}") for n in range(1, 6)]
        wait_for(lambda: all(s.is_socket() for s in sockets), timeout=90)
        kc = BlockingKernelClient(connection_file=str(runtime / f"kernel-{kernel['id']}.json"))
        kc.load_connection_file()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=90)  # the kernel answered on its Unix sockets
        finally:
            kc.stop_channels()
    finally:
        lab.delete(f"/api/kernels/{kernel['id']}")


def _recorded(data: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((data / "gateway.json").read_text()))
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # an orphan may wait for its reaper
    except psutil.NoSuchProcess:
        return False


def _status(url: str, timeout: float = 5) -> int:
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return 0
