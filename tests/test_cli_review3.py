"""What a third review of bkg's settings, CLI and notebook client found (each with real processes, a real gateway):

1. a typo in bkg.toml (`prot = 5`) was ignored without a word: every setting at its default;
2. reading store commands (`bkg store list --data-dir <typo>`) made a new empty store there, and a failing one
   (`bkg keys recover-admin` on an empty folder) left one behind;
3. a cancelled run read `cell None: Cancelled: cancelled` in the run table;
4. `wb.plugin("../admin/users").status()` answered `no such route: GET /api/plugins/../admin/users/status`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_for, wait_run
from helpers import bkg, notebook, one_line_error

from bkg_kernel.client import connect
from bkg_kernel.errors import InvalidInput
from bkg_kernel.settings import Settings


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = tmp_path_factory.mktemp("review3roots")
    notebook(roots / "sleepy.ipynb", "seconds = 120.0", "import time", "time.sleep(seconds)")
    g = start_gateway(tmp_path_factory.mktemp("review3") / "data", env={"BKG_JOB_ROOTS": str(roots)},
                      plugins=["sysinfo"])  # fmt: skip
    yield g
    g.stop()


# -- 1: bkg.toml --------------------------------------------------------------------------------------------------


def test_an_unknown_key_in_bkg_toml_is_refused_naming_it_the_file_and_the_setting_meant(tmp_path: Path) -> None:
    cfg = tmp_path / "bkg.toml"
    cfg.write_text("prot = 5\n")
    one_line_error(bkg("settings", cwd=tmp_path), "prot", str(cfg), "did you mean 'port'?")
    one_line_error(bkg("store", "list", "--data-dir", str(tmp_path / "d"), cwd=tmp_path), "prot", str(cfg))
    named = tmp_path / "conf" / "mine.toml"  # the file BKG_CONFIG names, not ./bkg.toml
    named.parent.mkdir()
    named.write_text('port = 5001\nhots = "0.0.0.0"\nBKG_MODEL_DIR = "m"\n[tool]\nx = 1\n')
    r = bkg("settings", cwd=tmp_path, BKG_CONFIG=str(named))
    one_line_error(r, str(named), "hots", "did you mean 'host'?", "BKG_MODEL_DIR", "did you mean 'model_dir'?", "tool")
    assert "port:" not in r.stderr  # a known key is not named
    with pytest.MonkeyPatch.context() as mp:  # a notebook's settings, too
        mp.setenv("BKG_CONFIG", str(named))
        with pytest.raises(InvalidInput) as refused:
            Settings()
        assert refused.value.field == "hots" and str(named) in refused.value.message
    assert not (tmp_path / "d").exists()


def test_every_setting_still_loads_from_the_file_and_unknown_bkg_variables_stay_ignored(tmp_path: Path) -> None:
    """Each field of Settings under the key the file takes (a Hub one under its JUPYTERHUB_* name, as before), in
    any case; an unknown BKG_* environment variable is no error (other tools and other bkg versions set them)."""
    defaults = json.loads(bkg("settings", cwd=tmp_path).stdout)
    lines, expect = [], {}
    for name, field in Settings.model_fields.items():
        value = defaults[name]
        if value is None:
            value = [str(tmp_path)] if name.endswith("roots") else "http://127.0.0.1:9"
        elif isinstance(value, bool):
            value = not value
        elif isinstance(value, int | float):
            value = value + 1
        key = field.validation_alias if isinstance(field.validation_alias, str) else name
        key = key.upper() if name == "port" else key  # keys match settings in any case, as they did
        lines.append(f"{key} = {json.dumps(value)}")
        expect[name] = "(set)" if name in ("admin_key", "api_key", "hub_api_token") else value
    cfg = tmp_path / "all.toml"
    cfg.write_text("\n".join(lines) + "\n")
    r = bkg("settings", cwd=tmp_path, BKG_CONFIG=str(cfg), BKG_PROT="5", BKG_SOMETHING_ELSE="x")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expect


# -- 2: a data dir with no store --------------------------------------------------------------------------------


def test_commands_that_read_the_store_refuse_a_folder_with_no_store_and_make_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    typo = tmp_path / "x" / "nonexist" / "y"
    reading = [
        ["store", "list"], ["store", "snapshots"], ["store", "describe", "docs"], ["store", "drop", "docs", "--yes"],
        ["store", "snapshot", "docs"], ["store", "delete-snapshot", "docs", "s1", "--yes"], ["keys", "recover-admin"],
    ]  # fmt: skip
    for folder in (typo, empty):
        for args in reading:
            r = bkg(*args, "--data-dir", str(folder), cwd=tmp_path)
            one_line_error(r, f"no bkg store in {folder}", "bkg.duckdb")
        r = bkg("store", "list", cwd=tmp_path, BKG_DATA_DIR=str(folder))  # named by the environment: the same
        one_line_error(r, f"no bkg store in {folder}")
    # commands that may make the store, failing: nothing of theirs is left
    for folder in (typo, empty):
        one_line_error(bkg("store", "create", "docs", "--dim", "0", "--data-dir", str(folder), cwd=tmp_path), "dim")
        r = bkg("store", "restore", "docs", "s1", "--into", "copy", "--data-dir", str(folder), cwd=tmp_path)
        one_line_error(r, "no snapshot")
    assert not (tmp_path / "x").exists() and list(empty.iterdir()) == []
    # what makes data still makes the store, and reading it then works
    made = bkg("store", "create", "docs", "--dim", "4", "--data-dir", str(typo), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listed = bkg("store", "list", "--data-dir", str(typo), cwd=tmp_path)
    assert [c["name"] for c in json.loads(listed.stdout)] == ["docs"]


def test_a_failed_create_removes_only_what_the_store_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a `bkg store create` that failed in a folder holding no store deleted everything that
    appeared in the folder meanwhile, another process's files too (57 of them, in the review). It now removes only
    what a store makes, and the folders it made only while they are empty."""
    from bkg_kernel.cli import _store
    from bkg_kernel.errors import InvalidInput

    monkeypatch.delenv("BKG_DATA_DIR", raising=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "before.txt").write_text("kept")
    with pytest.raises(InvalidInput), _store(shared, made=False) as store:
        (shared / "theirs.txt").write_text("another process's")  # written while the command runs
        (shared / "indexes-of-theirs").mkdir()
        store.create_collection("docs", dim=4, metric="bogus")
    assert sorted(p.name for p in shared.iterdir()) == ["before.txt", "indexes-of-theirs", "theirs.txt"]
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(InvalidInput), _store(fresh, made=False) as store:
        (tmp_path / "new" / "theirs.txt").write_text("another process's")
        store.create_collection("docs", dim=4, metric="bogus")
    assert not fresh.exists() and [p.name for p in (tmp_path / "new").iterdir()] == ["theirs.txt"]


# -- 3: a cancelled run in the run table ------------------------------------------------------------------------


def test_a_cancelled_run_reads_as_the_run_not_cell_none(gw: Gateway) -> None:
    wb = connect(gw.url, api_key=ADMIN_KEY)
    run = submit(gw, {"notebook": "sleepy.ipynb"})
    c = gw.client()
    wait_for(lambda: c.get(f"/api/jobs/{run['id']}").json()["state"] == "running", 120)
    wb.jobs.cancel(run["id"])
    # cancelled as soon as it runs: its kernel killed while the worker still readied it, which then waited out its
    # 60 s readiness deadline (the run ended ~56 s after the cancel); now the wait sees the kernel gone
    done = wait_run(gw, run["id"], timeout=30)
    assert done["state"] == "cancelled" and done["error"].get("cell_index") is None, done
    table = wb.jobs.list()
    row = next(r for r in table if r["id"] == run["id"])
    assert table.cells(row)[-1] == f"the run: Cancelled: {done['error']['evalue']}"
    assert "cell None" not in table._repr_html_()
    listed = bkg("jobs", "list", "--url", gw.url, cwd=gw.data_dir.parent, BKG_API_KEY=ADMIN_KEY)  # the CLI's line
    line = next(x for x in listed.stdout.splitlines() if x.startswith(run["id"]))
    assert line.endswith(f"the run: Cancelled: {done['error']['evalue']}") and "cell None" not in line, line


# -- 4: a plugin id that cannot be one --------------------------------------------------------------------------


def test_a_plugin_id_that_cannot_be_one_is_refused_before_it_is_sent(gw: Gateway, tmp_path: Path) -> None:
    wb = connect(gw.url, api_key=ADMIN_KEY)
    for bad in ("../admin/users", "..", ".", "", "a/b", "x" * 65):
        with pytest.raises(InvalidInput) as refused:
            wb.plugin(bad).status()
        assert refused.value.field == "plugin" and f"{bad!r} cannot be a plugin id" in refused.value.message
        with pytest.raises(InvalidInput, match="cannot be a plugin id"):
            wb.invoke(bad, "sysinfo.facts", {})
    assert wb.plugin("sysinfo").status()["state"] == "running"  # a real one still answers
    r = bkg("plugins", "stop", "../admin/users", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
    one_line_error(r, "'../admin/users' cannot be a plugin id")
    assert "no such route" not in r.stderr
