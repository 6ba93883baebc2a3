"""What a fourth review of the bkg CLI reproduced as tracebacks or misleading errors (each with the real CLI in a
subprocess; a real gateway where one answers):

2. a `bkg.duckdb` that is not a DuckDB file: DuckDB's IOException from every store command, `serve` too;
3. a --data-dir whose name is not UTF-8: UnicodeEncodeError;
4. a --data-dir / --model-dir with a 300-character name: OSError (ENAMETOOLONG);
5. a bkg.toml that is not UTF-8: UnicodeDecodeError;
6. / 7. a --url whose host or port cannot be read (`http://[::1`, `http://h:abc`): ValueError, httpx's InvalidURL;
8. a gateway.json that is no gateway's (`[]`, `{"url": 5}`): TypeError, ValueError, or an error blaming --url;
9. / 10. a key (BKG_API_KEY, admin.key, workbench.key) that is not printable ASCII or not UTF-8: UnicodeError;
11. a file at <data>/snapshots: NotADirectoryError from `bkg store snapshot`;
12. a missing admin.key: the gateway's "missing credentials"; a bad cron or notebook path: a raw regex.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import Gateway, start_gateway
from helpers import bkg, one_line_error


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("review4") / "data", plugins=["sysinfo"])
    yield g
    g.stop()


def test_a_bkg_duckdb_that_is_not_duckdb_is_refused_naming_it_and_left_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "bkg.duckdb"
    db.write_bytes(b"not a database\n")
    for args in (["store", "list"], ["store", "create", "c1", "--dim", "4"], ["keys", "recover-admin"],
                 ["serve", "--port", "0"]):  # fmt: skip
        one_line_error(bkg(*args, "--data-dir", str(data), cwd=tmp_path), str(db), "is not a bkg store")
        assert db.read_bytes() == b"not a database\n"
    assert not (data / "admin.key").exists()


def test_a_folder_option_that_no_folder_can_have_is_refused_naming_the_option(tmp_path: Path) -> None:
    not_utf8 = os.fsdecode(b"nu\xff")  # as the shell hands over $'nu\xff'
    for args in (["store", "list"], ["serve", "--port", "0"], ["status"]):
        one_line_error(bkg(*args, "--data-dir", not_utf8, cwd=tmp_path), "--data-dir", "not valid UTF-8", "nu\\xff")
    long = "x" * 300
    for args in (["store", "list"], ["store", "create", "c1", "--dim", "4"], ["status"], ["serve", "--port", "0"]):
        one_line_error(bkg(*args, "--data-dir", str(tmp_path / long), cwd=tmp_path), "--data-dir", "too long")
    for args in (["models", "list"], ["models", "add", str(tmp_path / "m.gguf")]):
        one_line_error(bkg(*args, "--model-dir", str(tmp_path / long / "m"), cwd=tmp_path), "--model-dir", "too long")
    assert sorted(os.listdir(tmp_path)) == []  # nothing made


def test_a_bkg_toml_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "bkg.toml"
    cfg.write_bytes(b'data_dir = "caf\xe9"\n')  # Latin-1
    one_line_error(bkg("settings", cwd=tmp_path), str(cfg), "not UTF-8")
    one_line_error(bkg("store", "list", cwd=tmp_path), str(cfg), "not UTF-8")


def test_a_url_whose_host_or_port_cannot_be_read_is_refused_naming_url(tmp_path: Path) -> None:
    for url in ("http://[::1", "http://[zz]:1", "http://127.0.0.1:abc", "http://127.0.0.1:99999"):
        one_line_error(bkg("status", "--url", url, cwd=tmp_path), "--url", repr(url), "http://host:port")


def test_a_gateway_json_that_is_no_gateways_is_as_if_missing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for text in ("[]", '{"url": "http://[::1"}', '{"url": 5}', '{"url": "http://127.0.0.1:abc"}', "\xff"):
        (data / "gateway.json").write_text(text, encoding="latin-1")
        r = bkg("status", "--data-dir", str(data), cwd=tmp_path)
        one_line_error(r, f"no bkg gateway answers for data dir {data}")
        assert "--url" not in r.stderr


def test_a_key_that_cannot_be_sent_is_refused_naming_where_it_came_from(gw: Gateway, tmp_path: Path) -> None:
    data = str(gw.data_dir)
    one_line_error(bkg("status", "--data-dir", data, cwd=tmp_path, BKG_API_KEY="ключ"), "BKG_API_KEY", "printable")
    admin = gw.data_dir / "admin.key"
    workbench = gw.data_dir / "workbench.key"
    kept = workbench.read_bytes()
    try:
        admin.write_text("ключ\n")
        one_line_error(bkg("status", "--data-dir", data, cwd=tmp_path), str(admin), "printable ASCII",
                       "bkg keys recover-admin")  # fmt: skip
        admin.write_bytes(b"\xff\xfe\n")
        one_line_error(bkg("status", "--data-dir", data, cwd=tmp_path), str(admin), "not UTF-8")
        workbench.write_bytes(b"bkg_\xe9\n")
        one_line_error(bkg("jobs", "list", "--data-dir", data, cwd=tmp_path), str(workbench), "not UTF-8")
        workbench.write_text("bkg_ключ\n")
        one_line_error(bkg("jobs", "list", "--data-dir", data, cwd=tmp_path), str(workbench), "printable ASCII")
    finally:
        admin.unlink(missing_ok=True)
        workbench.write_bytes(kept)
    assert bkg("jobs", "list", "--data-dir", data, cwd=tmp_path).returncode == 0  # the key file back: it works


def test_a_missing_key_file_is_named_on_the_client_side(gw: Gateway, tmp_path: Path) -> None:
    admin = gw.data_dir / "admin.key"
    assert not admin.exists()  # the harness gives the gateway its admin key as BKG_ADMIN_KEY: no file
    r = bkg("users", "list", "--data-dir", str(gw.data_dir), cwd=tmp_path)
    one_line_error(r, str(admin), "missing", "bkg keys recover-admin", "BKG_API_KEY")
    assert "Authorization" not in r.stderr


def test_a_bad_cron_or_notebook_path_says_what_it_takes_not_a_regex(gw: Gateway, tmp_path: Path) -> None:
    data = str(gw.data_dir)
    r = bkg("jobs", "schedule", "x.ipynb", "* * *", "--data-dir", data, cwd=tmp_path)
    one_line_error(r, "cron", "five fields", "minute hour day month weekday")
    assert "pattern" not in r.stderr
    r = bkg("jobs", "schedule", "x.ipynb", "* * * * !", "--data-dir", data, cwd=tmp_path)
    one_line_error(r, "cron", "digits")
    assert "pattern" not in r.stderr
    r = bkg("jobs", "schedule", "notes.txt", "0 3 * * *", "--data-dir", data, cwd=tmp_path)
    one_line_error(r, "notebook", ".ipynb")
    assert "pattern" not in r.stderr
    r = bkg("jobs", "run", "notes.txt", "--data-dir", data, cwd=tmp_path)
    one_line_error(r, "notebook", ".ipynb")
    assert "pattern" not in r.stderr


def test_a_file_where_the_snapshots_folder_goes_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert bkg("store", "create", "c1", "--dim", "4", "--data-dir", str(data), cwd=tmp_path).returncode == 0
    snaps = data / "snapshots"
    if snaps.exists():
        snaps.rmdir()
    snaps.write_text("mine")
    one_line_error(bkg("store", "snapshot", "c1", "--data-dir", str(data), cwd=tmp_path), str(snaps), "in the way")
    assert snaps.read_text() == "mine"
    snaps.unlink()
    snaps.mkdir()
    (snaps / "c1").write_text("mine too")
    one_line_error(bkg("store", "snapshot", "c1", "--data-dir", str(data), cwd=tmp_path), str(snaps / "c1"))
    (snaps / "c1").unlink()
    assert bkg("store", "snapshot", "c1", "--data-dir", str(data), cwd=tmp_path).returncode == 0
