"""The state kept beside the store (key files, `plugins.json`, a plugin's own JSON, the model manifest, staged model
folders) survives a crash or a full disk in the middle of a write. Found by a review: a failed write of `admin.key`
on the first start left an admin no one could ever act as; a cut `plugins.json` kept the gateway from starting;
a damaged `stats.json`, or one bad entry in the model manifest, kept brainml from starting; a model import or a
classifier killed mid-way left a folder that blocked its id for good."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from gateway_harness import http_ok, start_gateway, wait_for

import bkg_kernel.auth.service as auth_service
from bkg_kernel import statefiles
from bkg_kernel.auth import AuthService
from bkg_kernel.errors import AlreadyExists, CorruptData, Unavailable
from bkg_kernel.models.classifier import Classifier
from bkg_kernel.models.download import sweep_partial
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.runtime.discovery import RegistryFile
from bkg_kernel.store import Store


def test_a_first_start_that_cannot_write_admin_key_leaves_no_admin_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Store(data) as store:
        auth = AuthService(store)
        with (
            mock.patch.object(auth_service, "_write_key_file", side_effect=OSError(28, "No space left on device")),
            pytest.raises(OSError),
        ):
            auth.bootstrap(data, None)
        assert auth.users == {} and not (data / "admin.key").exists()
        auth.close()
        auth = AuthService(store)  # the next start
        assert auth.users == {}, "a user was stored without the key file that lets anyone act as them"
        path = auth.bootstrap(data, None)
        assert path == data / "admin.key" and path.stat().st_mode & 0o777 == 0o600
        assert auth.authenticate(path.read_text().strip()).role == "admin"
        assert not list(data.glob(".admin.key.*"))  # no temp file left beside it
        (data / "workbench.key").write_text("")  # what a power loss could leave of it before
        key = auth.workbench_key(data).read_text().strip()
        assert auth.authenticate(key).username == "admin"
        auth.close()


def test_plugins_json_cut_short_or_from_elsewhere_is_read_or_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "plugins.json"
    path.write_text('{"brainml": {"enabled": fal')
    assert RegistryFile(path).entries == {}
    aside = list(tmp_path.glob("plugins.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"brainml": {"enabled": fal', "the damaged file is kept"
    path.write_text(json.dumps({"brainml": {"enabled": False, "colour": 1}, "x": 3, "y": {"autostart": "no"}}))
    entries = RegistryFile(path).entries
    assert set(entries) == {"brainml", "y"} and entries["brainml"].enabled is False and entries["y"].autostart is True


def test_plugins_json_saved_from_many_threads_is_always_whole(tmp_path: Path) -> None:
    path = tmp_path / "plugins.json"
    reg = RegistryFile(path)
    errors: list[BaseException] = []
    torn: list[str] = []
    done = threading.Event()

    def save(n: int) -> None:
        try:
            for i in range(150):
                reg.get(f"p{n}-{i}").config = {"i": i}
                reg.save()
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        while not done.is_set():
            try:
                json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except ValueError as exc:
                torn.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=save, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert errors == [] and torn == []
    assert len(json.loads(path.read_text())) == 600
    assert not list(tmp_path.glob(".plugins.json.*"))


def test_the_gateway_and_its_plugins_start_over_damaged_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    plugins = ["brainml", "repoagent", "sysinfo"]
    g = start_gateway(data, plugins=plugins)
    try:
        wait_for(lambda: g.client().get("/api/plugins/brainml/status").json()["state"] == "running", timeout=60)
    finally:
        g.stop()
    (data / "plugins.json").write_text('{"brainml": {"ena')
    (data / "plugins" / "brainml" / "stats.json").write_text("")
    workspaces = data / "plugins" / "repoagent" / "workspaces.json"
    workspaces.write_text('[{"name": "demo", "pa')
    manifest = tmp_path / "models" / "manifest.json"
    listed = json.loads(manifest.read_text())
    listed["models"].append({"id": "half-written"})
    manifest.write_text(json.dumps(listed))
    g = start_gateway(data, plugins=plugins, wait=False)  # not healthy: repoagent will not start (below)
    try:
        c = g.client()
        wait_for(lambda: http_ok(g.url + "/health"), timeout=60)
        brainml = wait_for(lambda: (s := c.get("/api/plugins/brainml/status").json())["state"] != "starting" and s)
        assert brainml["state"] == "running", brainml
        repoagent = wait_for(lambda: (s := c.get("/api/plugins/repoagent/status").json())["state"] != "starting" and s)
        assert repoagent["state"] == "error" and "workspaces.json cannot be read" in repoagent["reason"], repoagent
        assert workspaces.read_text() == '[{"name": "demo", "pa', "what lists the repositories is never replaced"
        models = c.get("/api/models")
        assert models.status_code == 200 and models.json()["models"], models.text
        assert "half-written" not in {m["id"] for m in models.json()["models"]}
        assert list(data.glob("plugins.json.damaged-*")) and list((data / "plugins" / "brainml").glob("stats.json.*"))
    finally:
        g.stop()
    assert {"id": "half-written"} in json.loads(manifest.read_text())["models"], "a write never drops an entry"


def test_a_model_import_killed_mid_way_does_not_block_its_id(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    src = tmp_path / "clf"
    Classifier(["a", "b"], [(np.ones((3, 1)), np.zeros(1))], {}).save(src)
    left = reg.dir / ".partial" / "clf.x1y2"  # what an import killed while copying leaves
    (left / "clf").mkdir(parents=True)
    (left / "clf" / "weights.npz").write_bytes(b"half")
    (reg.dir / "clf.partial").mkdir()  # and where older versions staged it
    entry = reg.add(src, id="clf", kind="classifier", import_mode="copy")
    assert Classifier.load(reg.resolve(entry)).labels == ["a", "b"]
    assert sweep_partial(reg.dir, older_than_s=0) == ["clf.x1y2"]
    assert [p.name for p in (reg.dir / ".partial").iterdir()] == []


def test_of_two_writers_placing_one_model_folder_one_wins(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    dest = reg.dir / "quant"
    with reg.staged("quant") as a, reg.staged("quant") as b:
        assert a != b
        for stage, text in ((a, "first"), (b, "second")):
            stage.mkdir()
            (stage / "weights").write_text(text)
        reg.place(a, dest)
        with pytest.raises(AlreadyExists):
            reg.place(b, dest)
    assert (dest / "weights").read_text() == "first"
    with reg.staged("one.bin") as c, reg.staged("one.bin") as d:
        c.write_text("first")
        d.write_text("second")
        reg.place(c, reg.dir / "one.bin")
        with pytest.raises(AlreadyExists):
            reg.place(d, reg.dir / "one.bin")
    assert (reg.dir / "one.bin").read_text() == "first"
    assert list((reg.dir / ".partial").iterdir()) == []


def test_a_classifier_without_labels_is_corrupt_data_not_a_500(tmp_path: Path) -> None:
    folder = tmp_path / "clf"
    Classifier(["a", "b"], [(np.ones((3, 1)), np.zeros(1))], {}).save(folder)
    meta = json.loads((folder / "classifier.json").read_text())
    del meta["labels"]
    (folder / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptData, match="lists no labels"):
        Classifier.load(folder)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = statefiles.write(tmp_path / "state.json", '{"v": 1}')
    with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")), pytest.raises(OSError):
        statefiles.write(path, '{"v": 2}')
    assert path.read_text() == '{"v": 1}' and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    path.write_text("[1, 2")
    with pytest.raises(CorruptData, match="state.json cannot be read"):
        statefiles.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(CorruptData, match="holds an array, not an object"):
        statefiles.load(path)


def test_state_files_keep_the_umask_s_mode_and_keys_stay_private(tmp_path: Path) -> None:
    """Found by a review: every state file came out 0600 (mkstemp's), so a model dir prepared by another user (an
    init container, `sudo bkg models add`) left the gateway unable to read its manifest. Only keys are private."""
    old = os.umask(0o022)
    try:
        plain = statefiles.write(tmp_path / "manifest.json", "{}")
        key = statefiles.write(tmp_path / "admin.key", "bkg_x\n", private=True)
    finally:
        os.umask(old)
    assert plain.stat().st_mode & 0o777 == 0o644 and key.stat().st_mode & 0o777 == 0o600


def test_a_file_that_cannot_be_read_is_not_taken_for_damaged(tmp_path: Path) -> None:
    """Found by a review: any read error (no permission, an I/O error) set plugins.json aside and started every
    plugin from its defaults, re-enabling the ones an admin had disabled. Only a file that is not JSON is damaged."""
    (tmp_path / "plugins.json").mkdir()  # read_bytes fails with an OSError, as EACCES or EIO would
    with pytest.raises(OSError):
        RegistryFile(tmp_path / "plugins.json")
    assert (tmp_path / "plugins.json").is_dir() and not list(tmp_path.glob("plugins.json.damaged-*"))


def test_a_model_file_is_placed_where_hard_links_are_not_to_be_had(tmp_path: Path) -> None:
    """Found by a review: placing a single file used a hard link only; a model dir on exFAT, a network mount or
    another mount than `.partial/` gave a raw OSError (a 500) where `os.replace` had worked."""
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    with mock.patch("os.link", side_effect=OSError(errno.EXDEV, "Invalid cross-device link")):
        with reg.staged("m.gguf") as a:
            a.write_text("first")
            reg.place(a, reg.dir / "m.gguf")
        with reg.staged("m.gguf") as b, pytest.raises(AlreadyExists):
            b.write_text("second")
            reg.place(b, reg.dir / "m.gguf")
    assert (reg.dir / "m.gguf").read_text() == "first"


def test_recover_admin_never_picks_a_hub_user_and_leaves_no_unstored_key(tmp_path: Path) -> None:
    """Found by a review: with the local admin disabled and a JupyterHub admin left, recovery picked the Hub user,
    wrote admin.key, and then failed to store the key: the file held a key that worked nowhere."""
    data = tmp_path / "data"
    with Store(data) as store:
        auth = AuthService(store)
        path = auth.bootstrap(data, None)
        assert path is not None
        before = path.read_text()
        auth.create_user("alice" + auth_service.HUB_SUFFIX, "admin", actor=auth_service.HUB_ACTOR)
        local = next(u for u in auth.users.values() if u["username"] == "admin")
        auth.update_user(local["id"], disabled=True, actor="test")
        with pytest.raises(Unavailable, match="other than JupyterHub"):
            auth.recover_admin_key(data)
        assert path.read_text() == before
        auth.close()
