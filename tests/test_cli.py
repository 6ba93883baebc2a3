"""The `bkg` console script, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BKG = [sys.executable, "-c", "from bkg_kernel.cli import main; main()"]
COMMANDS = [
    [],
    ["version"],
    ["settings"],
    ["lab"],
    ["run"],
    ["serve"],
    ["status"],
    ["plugins"],
    ["plugins", "list"],
    ["plugins", "start"],
    ["plugins", "stop"],
    ["plugins", "restart"],
    ["plugins", "logs"],
    ["keys"],
    ["keys", "list"],
    ["keys", "create"],
    ["keys", "rotate"],
    ["keys", "recover-admin"],
    ["keys", "revoke"],
    ["users"],
    ["users", "list"],
    ["users", "create"],
    ["users", "disable"],
    ["users", "enable"],
    ["users", "passwd"],
    ["users", "delete"],
    ["store"],
    ["store", "list"],
    ["store", "create"],
    ["store", "describe"],
    ["store", "drop"],
    ["store", "snapshot"],
    ["store", "snapshots"],
    ["store", "restore"],
    ["store", "delete-snapshot"],
]


def bkg(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI; env values of "" remove that variable."""
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v != ""}
    return subprocess.run([*BKG, *args], capture_output=True, text=True, check=check, env=full)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) or "bkg" for c in COMMANDS])
def test_help_everywhere(cmd: list[str]) -> None:
    out = bkg(*cmd, "--help").stdout
    assert "Usage:" in out


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "bkg"
    assert exe.exists()
    assert subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True).stdout.strip()


def test_store_commands_end_to_end(tmp_path: Path) -> None:
    d = str(tmp_path / "data")
    bkg("store", "create", "docs", "--dim", "4", "--index", "hnsw", "--data-dir", d)
    listed = json.loads(bkg("store", "list", "--data-dir", d).stdout)
    assert [c["name"] for c in listed] == ["docs"] and listed[0]["index"] == "hnsw"
    snap = json.loads(bkg("store", "snapshot", "docs", "--data-dir", d).stdout)
    restored = json.loads(bkg("store", "restore", "docs", snap["id"], "--into", "copy", "--data-dir", d).stdout)
    assert restored["name"] == "copy"
    assert len(json.loads(bkg("store", "snapshots", "--data-dir", d).stdout)) == 1
    bkg("store", "drop", "docs", "--yes", "--data-dir", d)
    assert [c["name"] for c in json.loads(bkg("store", "list", "--data-dir", d).stdout)] == ["copy"]


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    r = bkg("store", "create", "a/b", "--dim", "4", "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: name: collection name 'a/b' must not contain '/' or '\\'"
    assert "Traceback" not in r.stderr
    r = bkg("store", "describe", "nope", "--data-dir", str(tmp_path), check=False)  # a store has yet to be made
    assert r.returncode == 2 and "no bkg store in" in r.stderr and "Traceback" not in r.stderr
    bkg("store", "create", "there", "--dim", "4", "--data-dir", str(tmp_path))
    r = bkg("store", "describe", "nope", "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2 and "'nope'" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_settings_from_env_and_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "bkg.toml"
    cfg.write_text('port = 5000\nmodel_dir = "/srv/models"\n')
    env = {"BKG_CONFIG": str(cfg), "BKG_PORT": "6000", "BKG_DATA_DIR": "/tmp/x", "BKG_MODEL_DIR": ""}
    out = json.loads(bkg("settings", env=env).stdout)
    assert out["port"] == 6000  # env beats the file
    assert out["model_dir"] == "/srv/models"  # the file beats defaults
    assert out["data_dir"] == "/tmp/x" and out["host"] == "127.0.0.1"
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    defaults = json.loads(bkg("settings", env={"BKG_CONFIG": str(empty), "BKG_MODEL_DIR": ""}).stdout)
    assert defaults["port"] == 43119 and defaults["data_dir"] == "data" and defaults["model_dir"] == "models"


def test_gateway_commands_against_a_real_gateway(tmp_path: Path) -> None:
    from gateway_harness import ADMIN_KEY, start_gateway

    g = start_gateway(tmp_path / "data", plugins=["sysinfo"])
    try:
        env = {"BKG_API_KEY": ADMIN_KEY}
        common = ["--url", g.url]
        assert json.loads(bkg("status", *common, env=env).stdout)["plugins"]["sysinfo"] == "running"
        listed = bkg("plugins", "list", *common, env=env).stdout
        assert "sysinfo" in listed and "running" in listed
        assert json.loads(bkg("plugins", "stop", "sysinfo", *common, env=env).stdout)["state"] == "stopped"
        assert json.loads(bkg("plugins", "start", "sysinfo", *common, env=env).stdout)["state"] == "running"
        assert "sysinfo running" in bkg("plugins", "logs", "sysinfo", *common, env=env).stdout
        user = json.loads(bkg("users", "create", "cli-user", "--role", "developer", *common, env=env).stdout)
        key = json.loads(
            bkg("keys", "create", "cli", "--user", user["id"], "--scope", "plugins:read", *common, env=env).stdout
        )
        assert key["key"].startswith("bkg_") and key["scopes"] == ["plugins:read"]
        assert json.loads(bkg("keys", "revoke", key["id"], *common, env=env).stdout)["state"] == "revoked"
        assert json.loads(bkg("users", "disable", user["id"], *common, env=env).stdout)["disabled"] is True
        r = bkg("status", "--url", "http://127.0.0.1:9", check=False)
        assert r.returncode == 2 and "no bkg gateway answers" in r.stderr
    finally:
        g.stop()


def test_the_dashboards_hold_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: Voila asks nobody for a token, and `bkg dashboards` run in a JupyterHub user's terminal
    passed that user's Hub token on, so every dashboard logged whoever opened it in as them. Its kernels get no key
    and no Hub token: every dashboard asks for a login."""
    from bkg_kernel.cli import dashboards_env

    secrets = {"BKG_API_KEY": "bkg_x_y", "BKG_ADMIN_KEY": "bkg_a_b", "JUPYTERHUB_API_TOKEN": "h", "JPY_API_TOKEN": "t"}
    for name, value in {**secrets, "JUPYTERHUB_USER": "ana", "JUPYTERHUB_API_URL": "http://hub"}.items():
        monkeypatch.setenv(name, value)
    env = dashboards_env("http://127.0.0.1:9")
    assert not [k for k in env if k in secrets or k.startswith("JUPYTERHUB_")], sorted(env)
    assert env["BKG_GATEWAY_URL"] == "http://127.0.0.1:9" and env["PATH"] == os.environ["PATH"]
    assert "widgets" in env["JUPYTER_PATH"]


def test_a_lost_admin_key_is_recovered_by_whoever_holds_the_data_dir(tmp_path: Path) -> None:
    """An admin.key deleted, or never written by a bkg before this one: `bkg keys recover-admin` (gateway stopped)
    gives the admin a new key in admin.key; while a gateway holds the data dir it is refused."""
    from bkg_kernel.auth import AuthService
    from bkg_kernel.store import Store

    data = tmp_path / "data"
    with Store(data) as store:
        auth = AuthService(store)
        old = auth.bootstrap(data, None)
        assert old is not None
        first = old.read_text().strip()
        auth.close()
    (data / "admin.key").unlink()
    out = bkg("keys", "recover-admin", "--data-dir", str(data))
    assert "admin.key (mode 0600)" in out.stdout
    new = (data / "admin.key").read_text().strip()
    assert new != first and (data / "admin.key").stat().st_mode & 0o777 == 0o600
    with Store(data) as store:
        auth = AuthService(store)
        assert auth.authenticate(new).role == "admin" and auth.authenticate(first).role == "admin"
        held = bkg("keys", "recover-admin", "--data-dir", str(data), check=False)  # the data dir is in use
        assert held.returncode == 2 and "admin.key" not in held.stdout
        # one clear line naming the holder (this process), not any crash's non-zero exit
        assert "already owned by" in held.stderr and f"pid {os.getpid()} " in held.stderr, held.stderr
        assert "Traceback" not in held.stderr and len(held.stderr.strip().splitlines()) == 1
        auth.close()
