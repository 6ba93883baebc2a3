"""What a new user's hour with the `bkg` command found (each ran as a real subprocess): a name with `#` acted on
another user; settings that cannot be used, a missing folder and a config that is not TOML were tracebacks; an
unknown plugin id was hosted silently; `bkg settings` printed keys; `jobs list --limit -1` left out a run; a
BKG_CONFIG naming no file and an empty data dir went unsaid; a plugin the gateway does not host read as none."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from helpers import bkg

PLUGINS = ["apikeys"]
BKG = [sys.executable, "-m", "bkg_kernel.cli"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("clitrial") / "data", plugins=PLUGINS)
    yield g
    g.stop()


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_a_name_with_url_characters_names_no_one_else(gw: Gateway, tmp_path: Path) -> None:
    admin = gw.client()
    zed = admin.post("/admin/users", json={"username": "zed", "role": "viewer"}).json()
    for name in ("zed#frag", "zed?x=1", "zed%3Fx", "zed/../zed"):  # the last: a '/' in a name, a 404 naming it
        said = "no user" if "/" not in name else "user_id: 'zed/../zed' holds a '/'"
        one_line_error(bkg("users", "disable", name, "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY), said)
        one_line_error(bkg("users", "delete", name, "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY), said)
        r = bkg("keys", "revoke", name, "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    users = {u["username"]: u for u in admin.get("/admin/users").json()["users"]}
    assert users["zed"]["id"] == zed["id"] and not users["zed"]["disabled"]  # untouched


def test_settings_that_cannot_be_used_are_one_line(tmp_path: Path) -> None:
    one_line_error(bkg("settings", cwd=tmp_path, BKG_PORT="abc"), "port (BKG_PORT)", "valid integer", "'abc'")
    one_line_error(bkg("status", cwd=tmp_path, BKG_PORT="70000"), "port (BKG_PORT)", "65535")
    one_line_error(bkg("serve", "--port", "-1", "--data-dir", str(tmp_path / "d"), cwd=tmp_path), "port")
    (tmp_path / "bkg.toml").write_text("port = \n")
    one_line_error(bkg("status", cwd=tmp_path), "not valid TOML")


def test_settings_name_keys_as_set_never_their_values(tmp_path: Path) -> None:
    r = bkg("settings", cwd=tmp_path, BKG_API_KEY="bkg_secret_value", BKG_ADMIN_KEY="another_secret")
    assert r.returncode == 0 and '"api_key": "(set)"' in r.stdout and '"admin_key": "(set)"' in r.stdout
    assert "secret" not in r.stdout


def test_folders_that_are_not_there_and_unknown_plugins_are_refused_first(tmp_path: Path) -> None:
    one_line_error(bkg("dashboards", "--folder", str(tmp_path / "none"), cwd=tmp_path), "no dashboards folder at")
    one_line_error(bkg("run", "--data-dir", str(tmp_path / "d"), cwd=tmp_path), "no notebooks folder at")
    (tmp_path / "a-file").write_text("")
    one_line_error(bkg("hub", "--data-dir", str(tmp_path / "a-file"), cwd=tmp_path), "a file is in the way")
    one_line_error(bkg("hub", "--config", str(tmp_path / "none.py"), cwd=tmp_path), "no JupyterHub config")
    r = bkg("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--plugins", "nosuch,sysinfo", cwd=tmp_path)
    one_line_error(r, "no plugin 'nosuch'", "sysinfo")
    assert not (tmp_path / "d" / "gateway.json").exists()


def test_a_run_limit_below_one_is_refused(gw: Gateway, tmp_path: Path) -> None:
    r = bkg("jobs", "list", "--limit", "-1", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
    assert r.returncode == 2 and "'--limit'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_restoring_over_a_collection_and_deleting_a_snapshot_ask_first(tmp_path: Path) -> None:
    """`store restore NAME SNAP` replaced the live collection without a word, where `store drop` asks."""
    import json

    import numpy as np

    from bkg_kernel.store import Store

    d = str(tmp_path / "data")
    with Store(tmp_path / "data") as s:
        s.create_collection("docs", dim=4)
        snap = s.snapshot("docs").id  # empty
        s.collection("docs").upsert(ids=[1, 2], vectors=np.eye(4, dtype=np.float32)[:2], progress=False)

    def run(*args: str, answer: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BKG_")}
        return subprocess.run([*BKG, "store", *args, "--data-dir", d], input=answer, cwd=tmp_path, env=clean,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    r = run("restore", "docs", snap, answer="n\n")
    assert r.returncode == 1 and "Replace collection 'docs'" in r.stdout and "Aborted" in r.stderr, r
    r = run("delete-snapshot", "docs", snap, answer="n\n")
    assert r.returncode == 1 and "Delete snapshot" in r.stdout, r
    with Store(tmp_path / "data") as s:
        assert s.collection("docs").count() == 2 and len(s.list_snapshots("docs")) == 1  # both kept
    assert json.loads(run("restore", "docs", snap, "--yes", answer="").stdout)["count"] == 0
    assert run("delete-snapshot", "docs", snap, answer="y\n").returncode == 0


def test_a_config_file_that_is_not_there_is_refused(gw: Gateway, tmp_path: Path) -> None:
    """BKG_CONFIG naming no file was ignored: every setting it held silently at its default."""
    none = tmp_path / "none.toml"
    for args in (["settings"], ["status"], ["store", "list", "--data-dir", str(tmp_path / "d")]):
        one_line_error(bkg(*args, cwd=tmp_path, BKG_CONFIG=str(none)), "BKG_CONFIG", str(none), "not there")
    r = bkg("plugins", "list", "--url", gw.url, cwd=tmp_path, BKG_CONFIG="conf.toml", BKG_API_KEY=ADMIN_KEY)
    one_line_error(r, "BKG_CONFIG", str(tmp_path / "conf.toml"))  # a relative one, named where it was looked for
    one_line_error(bkg("settings", cwd=tmp_path, BKG_CONFIG=str(tmp_path)), "BKG_CONFIG", "a folder")
    one_line_error(bkg("settings", cwd=tmp_path, BKG_CONFIG=""), "BKG_CONFIG", "empty")
    assert not (tmp_path / "d").exists()
    assert bkg("settings", cwd=tmp_path).returncode == 0  # no ./bkg.toml and no BKG_CONFIG: the defaults
    none.write_text("port = 5001\n")
    assert '"port": 5001' in bkg("settings", cwd=tmp_path, BKG_CONFIG=str(none)).stdout


def test_an_empty_data_dir_is_refused(tmp_path: Path) -> None:
    """`--data-dir ""` and BKG_DATA_DIR="" were the working directory: the catalog and keys went wherever bkg ran
    (an empty model dir: the model files)."""
    for args in (["store", "list"], ["status"], ["keys", "recover-admin"], ["serve", "--port", "0"]):
        one_line_error(bkg(*args, "--data-dir", "", cwd=tmp_path), "data_dir (--data-dir)", "must not be empty")
    one_line_error(bkg("store", "list", "--data-dir=", cwd=tmp_path), "--data-dir", "must not be empty")
    one_line_error(bkg("settings", cwd=tmp_path, BKG_DATA_DIR=""), "data_dir (BKG_DATA_DIR)", "must not be empty")
    one_line_error(bkg("store", "list", cwd=tmp_path, BKG_DATA_DIR=""), "BKG_DATA_DIR", "must not be empty")
    one_line_error(bkg("jobs", "list", "--data-dir", "", cwd=tmp_path), "data_dir (--data-dir)", "must not be empty")
    one_line_error(bkg("models", "list", "--model-dir", "", cwd=tmp_path), "model_dir (--model-dir)", "not be empty")
    one_line_error(bkg("settings", cwd=tmp_path, BKG_MODEL_DIR=""), "model_dir (BKG_MODEL_DIR)", "must not be empty")
    (tmp_path / "bkg.toml").write_text('data_dir = ""\n')
    one_line_error(bkg("settings", cwd=tmp_path), "data_dir", "must not be empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bkg.toml"]  # nothing made in the working directory


def test_a_plugin_this_gateway_does_not_host_is_told_apart_from_one_that_does_not_exist(
    gw: Gateway, tmp_path: Path
) -> None:
    """`plugins start llmserver` on a gateway serving `--plugins apikeys` said "no plugin 'llmserver'"."""
    r = bkg("plugins", "start", "llmserver", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
    one_line_error(r, "plugin 'llmserver' is not hosted by this gateway (it hosts: apikeys)", "--plugins")
    assert "no plugin" not in r.stderr
    admin = gw.client()
    for pid, said in [
        ("llmserver", "plugin 'llmserver' is not hosted by this gateway (it hosts: apikeys); start the gateway with "
                      "--plugins including it"),
        ("apikey", "no plugin 'apikey' (did you mean 'apikeys'?)"),
        ("llmservr", "no plugin 'llmservr' (did you mean 'llmserver'? this gateway does not host it)"),
        ("zzz", "no plugin 'zzz' (this gateway hosts: apikeys)"),
    ]:  # fmt: skip
        body = admin.post(f"/api/plugins/{pid}/start").json()["error"]
        assert (body["status"], body["field"], body["message"]) == (404, "plugin", said), body
        assert admin.post(f"/api/plugins/{pid}/invoke/x.y", json={}).json()["error"]["message"] == said
    one_line_error(
        bkg("plugins", "stop", "zzz", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY), "no plugin 'zzz'"
    )
