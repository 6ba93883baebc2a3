"""A `bkg.toml` (or a `data/gateway.json`) in the working directory, a cloned repository's, cannot send the user's
key elsewhere: the CLI and `bkg.connect()` refuse a URL that only such a file names, before contacting it.

Found by a review: `gateway_url = "http://attacker:port"` in ./bkg.toml, then `BKG_API_KEY=... bkg status` there,
and the stranger's server logged `Authorization: Bearer <the key>`. The stranger here is a real HTTP server on
127.0.0.2: 127.0.0.1, localhost and 0.0.0.0 are this machine's gateway by their name and are trusted, any other
address stands for another host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, wait_for
from helpers import RecordingServer, recording_server, stop_process

import bkg_kernel
from bkg_kernel.errors import Forbidden

KEY = "bkg_0123456789ab_" + "S" * 40  # the user's key, as BKG_API_KEY or a key file holds it
# every setting that would say where the gateway is, or which config file to read, besides the working directory's
PLACE_VARS = ("BKG_CONFIG", "BKG_GATEWAY_URL", "BKG_HOST", "BKG_PORT", "BKG_DATA_DIR", "BKG_API_KEY", "BKG_ADMIN_KEY")


def outward_address() -> str:
    """An address that stands for another host: a loopback address other than 127.0.0.1 (Linux answers every
    127.x address on the loopback device), which bkg does not take for its own gateway's."""
    return "127.0.0.2"


def _as_a_stranger(path: str) -> tuple[int, Any]:
    """A server the user never chose: answers /health as a gateway does, refuses the rest."""
    if path == "/health":
        return 200, {"status": "ok", "version": "0", "plugins": {}}
    return 403, {"error": {"status": 403, "code": "forbidden", "message": "a stranger's server"}}


@pytest.fixture
def stranger() -> Iterator[RecordingServer]:
    """A stranger's server on another host's address: counts every connection it accepts and keeps the
    Authorization header of every request."""
    with recording_server(_as_a_stranger, outward_address()) as s:
        yield s


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cloned repository as the working directory, in an environment that names no gateway and no config."""
    for var in PLACE_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith(("JUPYTERHUB_", "JPY_"))]:
        monkeypatch.delenv(var)
    path = tmp_path / "repo"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m bkg_kernel.cli ...` in `cwd`, with `env` over the place-free environment of `repo`."""
    return subprocess.run(
        [sys.executable, "-m", "bkg_kernel.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("names", ["gateway_url", "host and port"])
@pytest.mark.parametrize("key_from", ["BKG_API_KEY", "admin.key"])
def test_bkg_status_keeps_the_key_from_a_url_only_bkg_toml_names(
    names: str, key_from: str, repo: Path, stranger: RecordingServer, tmp_path: Path
) -> None:
    host, port = stranger.server_address[:2]
    toml = f'gateway_url = "{stranger.url}"' if names == "gateway_url" else f'host = "{host}"\nport = {port}'
    (repo / "bkg.toml").write_text(toml + "\n")
    data = tmp_path / "home-data"  # the user's own data dir, named in the environment
    data.mkdir()
    (data / "admin.key").write_text(KEY + "\n")
    env = {"BKG_DATA_DIR": str(data)} | ({"BKG_API_KEY": KEY} if key_from == "BKG_API_KEY" else {})

    r = cli("status", cwd=repo, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"only {repo / 'bkg.toml'} names it ({names})" in r.stderr
    assert "--url" in r.stderr and ("BKG_GATEWAY_URL" if names == "gateway_url" else "BKG_HOST") in r.stderr
    assert stranger.connections == 0 and stranger.keys == []  # not even /health: nothing went there

    # the same URL passed on the command line is the user's choice
    r = cli("status", "--url", stranger.url, cwd=repo, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "ok" and stranger.keys[-1] == f"Bearer {KEY}"


def test_connect_refuses_a_url_only_bkg_toml_names_and_trusts_it_when_told(
    repo: Path, stranger: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo / "bkg.toml").write_text(f'gateway_url = "{stranger.url}"\n')
    monkeypatch.setenv("BKG_API_KEY", KEY)
    data = tmp_path / "home-data"
    with pytest.raises(Forbidden) as refused:
        bkg_kernel.connect(data_dir=data)
    assert str(repo / "bkg.toml") in refused.value.message and "BKG_GATEWAY_URL" in refused.value.message
    with pytest.raises(Forbidden):  # a key passed in is the user's all the same
        bkg_kernel.connect(api_key=KEY, data_dir=data)
    assert stranger.connections == 0 and not data.exists()  # nothing contacted, no gateway started

    # trusted once the user names it: passed, or in the environment
    assert bkg_kernel.connect(stranger.url, data_dir=data).health()["status"] == "ok"
    monkeypatch.setenv("BKG_GATEWAY_URL", stranger.url)
    assert bkg_kernel.connect(data_dir=data).health()["status"] == "ok"
    assert stranger.keys == [None, f"Bearer {KEY}"] * 2  # /health unauthenticated by connect(), then the call

    # a loopback URL in bkg.toml is this machine's: trusted (a gateway on another port, say)
    monkeypatch.delenv("BKG_GATEWAY_URL")
    with recording_server(_as_a_stranger) as here:
        (repo / "bkg.toml").write_text(f'gateway_url = "{here.url}"\n')
        assert bkg_kernel.connect(data_dir=data).health()["status"] == "ok"
        assert here.keys[-1] == f"Bearer {KEY}"


@pytest.mark.parametrize("where", ["data/gateway.json", "bkg.toml's data_dir"])
def test_a_gateway_json_that_no_gateway_holds_is_not_trusted(
    where: str, repo: Path, stranger: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data dir's gateway.json is trusted while its gateway runs (holds the data dir's lock); a repo's own
    copy names whatever its author likes, with or without a bkg.toml pointing the data dir at it."""
    ddir = repo / "data"
    if where != "data/gateway.json":
        ddir = repo / "state"
        (repo / "bkg.toml").write_text('data_dir = "state"\n')
    ddir.mkdir()
    (ddir / "gateway.json").write_text(json.dumps({"pid": 1, "url": stranger.url}))
    (ddir / "bkg.lock").write_text("")
    monkeypatch.setenv("BKG_API_KEY", KEY)
    with pytest.raises(Forbidden) as refused:
        bkg_kernel.connect()
    assert f"only {ddir / 'gateway.json'} names it (no gateway holds its data dir)" in refused.value.message
    r = cli("status", cwd=repo, env={})
    assert r.returncode == 2 and str(ddir / "gateway.json") in r.stderr
    assert stranger.connections == 0


def test_the_running_gateway_s_recorded_url_is_trusted_and_a_forged_one_beside_it_is_not(
    repo: Path, stranger: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real gateway serving on this machine's outward address: bkg.toml may point at its data dir (it recorded
    its URL there and holds the lock). A repo's data dir whose gateway.json names the stranger and whose bkg.lock
    links to that gateway's held lock is still not trusted."""
    host = stranger.server_address[0]
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    home = tmp_path / "home-data"
    gw_env = {k: v for k, v in os.environ.items() if k not in PLACE_VARS}
    gw_env |= {"BKG_ADMIN_KEY": ADMIN_KEY, "BKG_MODEL_DIR": str(tmp_path / "models")}
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bkg_kernel.cli", "serve", "--host", host, "--port", str(port),
             "--data-dir", str(home), "--plugins", "sysinfo"],
            cwd=tmp_path, env=gw_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://{host}:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _healthy(url), timeout=90)
        assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-2000:]
        monkeypatch.setenv("BKG_API_KEY", ADMIN_KEY)
        (repo / "bkg.toml").write_text(f'data_dir = "{home}"\n')
        wb = bkg_kernel.connect()
        assert wb.url == url and wb.me()["username"] == "admin"
        r = cli("status", cwd=repo, env={})
        assert r.returncode == 0 and json.loads(r.stdout)["plugins"]["sysinfo"] == "running", r.stderr

        forged = repo / "forged"
        forged.mkdir()
        (forged / "gateway.json").write_text(json.dumps({"pid": proc.pid, "url": stranger.url}))
        (forged / "bkg.lock").symlink_to(home / "bkg.lock")  # held, but by another data dir's gateway
        (repo / "bkg.toml").write_text('data_dir = "forged"\n')
        monkeypatch.setenv("BKG_API_KEY", KEY)
        with pytest.raises(Forbidden):
            bkg_kernel.connect()
        assert stranger.connections == 0
    finally:
        stop_process(proc, 30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def test_bkg_run_does_not_give_a_host_only_bkg_toml_names_the_key(
    repo: Path, stranger: RecordingServer, tmp_path: Path
) -> None:
    """`bkg run` connects to host:port from the settings: a bkg.toml's host gets neither the key nor the lab."""
    host, port = stranger.server_address[:2]
    (repo / "bkg.toml").write_text(f'host = "{host}"\nport = {port}\n')
    env = {"BKG_API_KEY": KEY, "BKG_DATA_DIR": str(tmp_path / "home-data")}
    r = cli("run", "--port", "9", "--dashboards-port", "9", cwd=repo, env=env)
    assert r.returncode == 2 and f"only {repo / 'bkg.toml'} names it (host and port)" in r.stderr, r.stderr
    assert stranger.connections == 0


def test_the_lab_extension_and_the_dashboard_login_keep_keys_and_passwords_from_it(
    repo: Path, stranger: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab server extension took the settings' gateway_url (bkg.toml's included) as its default and sent
    BKG_API_KEY there without `connect()`; a dashboard's login box posted a username and password to it."""
    from jupyterlab_bkg.handlers import BkgLab, _bkg_settings

    from bkg_kernel.widgets.login import login_box

    (repo / "bkg.toml").write_text(f'gateway_url = "{stranger.url}"\n')
    monkeypatch.setenv("BKG_API_KEY", KEY)
    _bkg_settings.cache_clear()
    try:
        assert BkgLab().gateway_url is None  # the lab then asks `connect()`, which says why not
    finally:
        _bkg_settings.cache_clear()
    logged: list[Any] = []
    box = login_box(logged.append)

    def widgets(w: Any) -> Iterator[Any]:
        yield w
        for child in getattr(w, "children", ()):
            yield from widgets(child)

    every = list(widgets(box))
    user = next(w for w in every if type(w).__name__ == "Text")
    password = next(w for w in every if type(w).__name__ == "Password" and w.description == "password")
    user.value, password.value = "ann", "a long enough password"
    next(w for w in every if type(w).__name__ == "Button").click()
    status = next(w for w in every if type(w).__name__ == "HTML" and "not sending" in w.value)
    assert "bkg.toml" in status.value and not logged
    assert stranger.connections == 0 and stranger.keys == []
