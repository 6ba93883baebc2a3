"""Settings that name nothing usable are refused where they are read, naming the setting: a BKG_CONFIG with no file
behind it, an empty data dir (pathlib's working directory); and the plugin ids `bkg_kernel.local` cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import bkg_kernel
from bkg_kernel.errors import InvalidInput, NotFound
from bkg_kernel.settings import Settings


@pytest.fixture(autouse=True)
def _no_place_vars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BKG_CONFIG", "BKG_DATA_DIR", "BKG_GATEWAY_URL", "BKG_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_bkg_config_must_name_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings().port == 43119  # no ./bkg.toml and no BKG_CONFIG: the defaults, as before
    for value, said in [
        (str(tmp_path / "none.toml"), f"BKG_CONFIG names {tmp_path / 'none.toml'}, which is not there"),
        ("conf/bkg.toml", f"BKG_CONFIG names {tmp_path / 'conf' / 'bkg.toml'}, which is not there"),
        (str(tmp_path), f"BKG_CONFIG names {tmp_path}, which is a folder"),
        ("", "BKG_CONFIG is set but empty"),
    ]:
        monkeypatch.setenv("BKG_CONFIG", value)
        with pytest.raises(InvalidInput) as err:
            Settings()
        assert err.value.field == "BKG_CONFIG" and str(err.value).startswith(said), err.value
        with pytest.raises(InvalidInput, match="BKG_CONFIG"):  # a notebook's connect: before any gateway is sought
            bkg_kernel.connect(start=False)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "bkg.toml").write_text("port = 5002\n")
    monkeypatch.setenv("BKG_CONFIG", "conf/bkg.toml")
    assert Settings().port == 5002
    monkeypatch.delenv("BKG_CONFIG")
    (tmp_path / "bkg.toml").mkdir()  # ./bkg.toml, a folder: said, not passed over
    with pytest.raises(InvalidInput) as err:
        Settings()
    assert err.value.field == "bkg.toml" and f"{tmp_path / 'bkg.toml'} is a folder, not a TOML file" in str(err.value)
    (tmp_path / "bkg.toml").rmdir()
    (tmp_path / "bkg.toml").symlink_to(tmp_path / "moved.toml")  # a link to nothing: said too
    with pytest.raises(InvalidInput, match="bkg.toml is a link to nothing, not a TOML file"):
        Settings()
    monkeypatch.setenv("BKG_CONFIG", "conf/bkg.toml")  # another file named: the folder is no matter
    assert Settings().port == 5002


def test_an_empty_data_dir_is_refused_by_every_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must not be empty"):
        Settings(data_dir="")
    monkeypatch.setenv("BKG_DATA_DIR", "")
    with pytest.raises(ValidationError, match="must not be empty"):
        Settings()
    monkeypatch.delenv("BKG_DATA_DIR")
    (tmp_path / "bkg.toml").write_text('data_dir = ""\n')
    with pytest.raises(ValidationError, match="must not be empty"):
        Settings()
    (tmp_path / "bkg.toml").unlink()
    assert Settings(data_dir=".").data_dir == Path(".")  # the working directory, when asked for by name
    for call in (lambda: bkg_kernel.connect(data_dir="", start=False), lambda: bkg_kernel.local("sysinfo", "")):
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.field == "data_dir" and "must not be empty" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing made where the process runs


def test_local_names_an_unknown_plugin_with_a_hint() -> None:
    with pytest.raises(NotFound) as err:
        bkg_kernel.local("sysinfoo")
    assert err.value.field == "plugin" and err.value.message == "no plugin 'sysinfoo' (did you mean 'sysinfo'?)"
    with pytest.raises(NotFound, match=r"^plugin: no plugin 'zzz' \(plugins here: .*apikeys, .*sysinfo"):
        bkg_kernel.local("zzz")
