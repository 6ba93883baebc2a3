"""A real gateway in a subprocess on 127.0.0.1, for the tests (it stops itself when the test session ends)."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from helpers import stop_process

ADMIN_KEY = "bkg_0123456789ab_" + "A" * 40

# Every gateway started here, stopped when the test process ends if nothing stopped it before: a module fixture whose
# setup failed after its gateway started never reaches its `stop` (one from a failed pictures setup ran on for hours)
_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _stop_the_rest() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            stop_process(proc)


def free_port() -> int:
    """A port for a server that takes no port 0 (a Hub, Voila, `bkg run`'s lab): bkg.hub's pick, below the range
    outgoing connections take their ports from."""
    from bkg_kernel.hub import free_port as below_outgoing

    return below_outgoing()


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path

    def client(self, key: str | None = ADMIN_KEY, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        """Poll a job until it finishes; return its record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client().get(f"/api/jobs/{job_id}").json()
            if job["finished"] is not None:
                return dict(job)
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_gateway(
    data_dir: Path,
    env: dict[str, str] | None = None,
    wait: bool = True,
    port: int | None = None,
    plugins: list[str] | None = None,
) -> Gateway:
    """A gateway on `port`, or by default on a port it takes itself (--port 0, read back from the line it prints):
    a port picked free here could be taken by another process before the gateway binds it, as one was in CI."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = next(p for i in itertools.count(1) if not (p := data_dir.parent / f"gateway-{i}.log").exists())
    full_env = {
        **os.environ,
        "BKG_ADMIN_KEY": ADMIN_KEY,
        "BKG_MODEL_DIR": str(data_dir.parent / "models"),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bkg_kernel.cli", "serve", "--data-dir", str(data_dir), "--port", str(port or 0)]
        + (["--plugins", ",".join(plugins)] if plugins else []),
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    _STARTED[:] = [p for p in _STARTED if p.poll() is None] + [proc]
    # what it prints once it holds its data dir and its port ("...:0" when it exits first, as a second one on a
    # data dir does)
    url = f"http://127.0.0.1:{port}" if port else announced(proc, log, r"bkg gateway on (http://\S+) ")
    gw = Gateway(proc, url or "http://127.0.0.1:0", data_dir, log)
    if wait:
        try:
            wait_healthy(gw)
        except BaseException:  # a gateway that never became healthy is stopped too, not left running
            gw.stop()
            raise
    return gw


def announced(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float = 60) -> str | None:
    """The first group of `pattern` in `log` once the server writes it (where it listens: what it took for port 0,
    or where Jupyter's and Voila's port retries took it); None when the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = proc.poll() is not None  # before the read: a line written just before the exit is still seen
        if found := re.search(pattern, log.read_text(errors="replace") if log.exists() else ""):
            return found.group(1)
        if exited:
            return None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"no {pattern!r} in {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}")


# after its log line's prefix; never ":0/", what older Jupyter Servers printed for --port=0 (this one prints the port)
JUPYTER_RUNNING = r"is running at:\s+(?:\[[^\]]*\]\s+)?(http://127\.0\.0\.1:[1-9]\d*)/"


def jupyter_url(proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> str:
    """Where a Jupyter server started with --port=0 listens (it takes a free port itself, and says which)."""
    url = announced(proc, log, JUPYTER_RUNNING, timeout)
    if url is None:
        raise RuntimeError(f"the Jupyter server exited: {log.read_text(errors='replace')[-2000:]}")
    return url


def wait_healthy(gw: Gateway, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {gw.log.read_text()[-2000:]}")
        try:
            r = httpx.get(gw.url + "/health", timeout=1)
            if r.status_code == 200 and r.json()["status"] == "ok":  # every autostarted plugin is running
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway did not become healthy")


def wait_for(fn: Any, timeout: float = 30, every: float = 0.1) -> Any:
    """Poll fn() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def wait_run(gw: Gateway, run_id: str, key: str = ADMIN_KEY, timeout: float = 120) -> dict[str, Any]:
    """A notebook run (`POST /api/jobs`) once it has finished."""
    c = gw.client(key)
    return dict(wait_for(lambda: (r := c.get(f"/api/jobs/{run_id}").json())["finished_at"] and r, timeout))


def submit(gw: Gateway, body: dict[str, Any], key: str = ADMIN_KEY) -> dict[str, Any]:
    """Queue a notebook run; it must be accepted."""
    r = gw.client(key).post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    return dict(r.json())


def kernel_connection(cmdline: list[str]) -> dict[str, Any]:
    """A running ipykernel's connection info, from the file its command line names (`... -f <file>`)."""
    return dict(json.loads(Path(cmdline[cmdline.index("-f") + 1]).read_text()))


# Debian's Chromium for the UI tests and bench/ui.py (never a downloaded browser); flags that work offline here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def http_ok(url: str, **params: str) -> bool:
    """True when `url` answers 200 (a server that is still starting answers nothing)."""
    try:
        return httpx.get(url, params=params, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def dashboards(gateway_url: str, log: Path | None = None, preheat: list[str] | None = None) -> Iterator[str]:
    """Serve dashboards/ with Voila the way `bkg dashboards` does, against `gateway_url`; yield its URL.

    `preheat`: only these dashboards get a preheated kernel (the others start one when opened, as Voila does
    without preheating); every dashboard is preheated by default, as `bkg dashboards` does. A test that opens
    a few pages saves starting, on two cores, a dozen kernels it never uses."""
    from bkg_kernel.cli import dashboards_cmd, dashboards_env

    folder = Path(__file__).resolve().parent.parent / "dashboards"
    cmd = dashboards_cmd(free_port(), folder)  # Voila moves on to another port if this one was taken meanwhile
    if preheat is not None:
        skip = sorted(p.name for p in folder.glob("*.ipynb") if p.stem not in preheat)
        cmd.append("--VoilaKernelManager.preheat_denylist=" + json.dumps(skip))
    with contextlib.ExitStack() as scratch:
        log = log or Path(scratch.enter_context(tempfile.TemporaryDirectory())) / "voila.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=dashboards_env(gateway_url), stdout=out, stderr=subprocess.STDOUT)
        try:
            url = announced(proc, log, r"Voil\S* is running at:\s+(http://127\.0\.0\.1:\d+)", timeout=90)
            if url is None:
                raise RuntimeError(f"Voila exited: {log.read_text(errors='replace')[-2000:]}")
            wait_for(lambda: http_ok(url), timeout=90, every=0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def dashboard_login(
    page: Any, url: str, name: str, key: str, log: Path, *, query: str = "", box_s: float = 120, page_s: float = 30
) -> None:
    """Open dashboard `name` in `page` and log in with `key`. A page that shows no login box within `box_s` fails
    with its screenshot (next to `log`) and the end of Voila's log."""
    deadline = time.monotonic() + box_s  # navigation included: Voila streams the page while the kernel runs it
    field = page.locator("input[type=password]").first
    try:
        page.goto(f"{url}/voila/render/{name}.ipynb{query}", timeout=box_s * 1000)
        field.wait_for(timeout=max(1.0, deadline - time.monotonic()) * 1000)
    except Exception:  # the page never showed its login box: keep what it showed and what Voila said
        page.screenshot(path=str(log.parent / f"stuck-{name}.png"), full_page=True)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"{name}: no login box after {box_s:.0f} s; Voila log ends:\n{tail}") from None
    field.fill(key)
    page.locator("button:has-text('Log in')").click()
    page.locator("text=Logged in as").wait_for(timeout=page_s * 1000)


@contextlib.contextmanager
def configured(gw: Gateway, plugin: str, **changes: Any) -> Iterator[None]:
    """A plugin's settings changed for a while (a worker starts again with the ones it reads itself, and again
    after; its limits apply at once)."""
    c = gw.client()
    cfg = c.get(f"/api/plugins/{plugin}/config").json()["config"]
    c.put(f"/api/plugins/{plugin}/config", json={"config": {**cfg, **changes}}).raise_for_status()
    try:
        yield
    finally:
        c.put(f"/api/plugins/{plugin}/config", json={"config": cfg}).raise_for_status()


def repo_invoke(
    g: Gateway, cap: str, body: dict[str, Any], key: str | None = None, timeout: float = 300
) -> httpx.Response:
    """A repoagent capability called over HTTP, as `key` (else the admin)."""
    c = g.client(key) if key else g.client()
    return c.post(f"/api/plugins/repoagent/invoke/{cap}", json=body, timeout=timeout)


def repo_job(
    g: Gateway, cap: str, body: dict[str, Any], key: str | None = None, answered: tuple[int, ...] = (202,)
) -> dict[str, Any]:
    """A repoagent job capability called (its first answer one of `answered`), then waited for until it ends."""
    r = repo_invoke(g, cap, body, key)
    assert r.status_code in answered, r.text
    return g.wait_job(r.json()["job"]["id"])


def user_key(g: Gateway, name: str, scopes: list[str]) -> str:
    """A key of a new user `name` whose role has exactly `scopes`."""
    admin = g.client()
    assert admin.post("/admin/roles", json={"name": f"{name}-role", "scopes": scopes}).status_code == 201
    user = admin.post("/admin/users", json={"username": name, "role": f"{name}-role"}).json()
    return str(admin.post("/admin/keys", json={"name": f"{name}'s", "user_id": user["id"]}).json()["key"])
