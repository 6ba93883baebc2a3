"""Names read from the disk that are not UTF-8 (Python holds them with lone surrogates, which no JSON can carry), and
files gone between a folder's listing and their reading: every listing answers, the odd name left out or shown
escaped, never a 500 and never a job that fails on every run while the file is there. Found by a review."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from gateway_harness import start_gateway

from bkg_kernel.errors import escaped, is_utf8
from bkg_kernel.jobs import files
from bkg_kernel.models.registry import sha256_of


def odd(folder: Path, name: bytes) -> Path:
    """The path of `folder/name`, `name` raw bytes that need not be UTF-8."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("n = 1")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    nbformat.write(nb, path)


def test_names_that_are_not_utf8_are_told_apart_and_shown_escaped() -> None:
    name = os.fsdecode(b"Jos\xe9/odd\xff.jpg")
    assert not is_utf8(name) and escaped(name) == "Jos\\xe9/odd\\xff.jpg"
    assert is_utf8("José/ok.jpg") and escaped("José/ok.jpg") == "José/ok.jpg"


def test_listings_answer_whatever_names_the_disk_holds(tmp_path: Path) -> None:
    roots, models = tmp_path / "jobroots", tmp_path / "models"
    roots.mkdir()
    models.mkdir()
    notebook(roots / "ok.ipynb")
    notebook(odd(roots, b"odd\xff.ipynb"))
    g = start_gateway(tmp_path / "data", env={"BKG_JOB_ROOTS": str(roots), "BKG_MODEL_DIR": str(models)})
    try:
        c = g.client()
        listed = c.get("/api/jobs/notebooks")
        assert listed.status_code == 200, listed.text
        assert [n["notebook"] for n in listed.json()["notebooks"]] == ["ok.ipynb"]

        # a model folder with a stray file whose name is not UTF-8: registered, verified, listed
        pack = models / "pack"
        pack.mkdir()
        (pack / "det.onnx").write_bytes(b"\x08\x07rest")
        made = c.post("/api/models", json={"path": str(pack), "kind": "face-pack"})
        assert made.status_code in (200, 201), made.text
        model_id = made.json()["id"]
        odd(pack, b"notes\xff.txt").write_bytes(b"x")
        verified = c.post(f"/api/models/{model_id}/verify")
        assert verified.status_code == 200 and verified.json()["ok"] is False, verified.text  # it changed: drift
        pack2 = models / "pack2"
        pack2.mkdir()
        (pack2 / "det.onnx").write_bytes(b"\x08\x07rest")
        odd(pack2, b"w\xff.onnx").write_bytes(b"\x08\x07rest")
        again = c.post("/api/models", json={"path": str(pack2), "kind": "face-pack"})
        assert again.status_code in (200, 201), again.text
        assert again.json()["meta"]["models"] == ["det.onnx", "w\\xff.onnx"], again.text
        assert c.get("/api/models").status_code == 200

        # snapshots: one whose name is not UTF-8 is listed as damaged, escaped; a dangling link is not listed
        assert c.post("/api/collections", json={"name": "c1", "dim": 4}).status_code == 201
        assert c.post("/api/collections/c1/snapshots").status_code in (200, 201)
        snaps = g.data_dir / "snapshots" / "c1"
        odd(snaps, b"zz\xff.bkgsnap").write_bytes(b"junk")
        (snaps / "gone.bkgsnap").symlink_to(tmp_path / "nowhere")
        listed = c.get("/api/collections/c1/snapshots")
        assert listed.status_code == 200, listed.text
        got = {s["id"]: s for s in listed.json()["snapshots"]}
        assert "gone" not in got and got["zz\\xff"]["ok"] is False and "not UTF-8" in got["zz\\xff"]["error"]
        assert sum(s["ok"] for s in got.values()) == 1
        assert c.get("/api/collections/c1").status_code == 200
    finally:
        g.stop()


def test_a_model_folder_hashes_as_before_for_utf8_names(tmp_path: Path) -> None:
    """The folder hash feeds each name's bytes: for UTF-8 names, the same digest as when it fed `str.encode()`, so
    models registered before still verify."""
    import hashlib

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"one")
    (tmp_path / "sub" / "é.txt").write_bytes(b"two")
    h = hashlib.sha256()
    for rel, data in (("a.bin", b"one"), ("sub/é.txt", b"two")):
        h.update(rel.encode() + b"\0" + data)
    assert sha256_of(tmp_path) == (h.hexdigest(), 6)
    odd(tmp_path, b"c\xff").write_bytes(b"3")
    assert sha256_of(tmp_path)[1] == 7


def test_a_job_reads_no_file_whose_name_no_request_could_carry(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("a")
    odd(tmp_path / "docs", b"b\xff.md").write_text("b")
    odd(tmp_path, b"dir\xe9").mkdir()
    odd(tmp_path, b"dir\xe9/c.md").write_text("c")
    unnamed: list[str] = []
    found = files.readable_files(tmp_path, ["**/*.md"], unnamed)
    assert found == [tmp_path / "docs" / "a.md"]
    assert unnamed == ["dir\\xe9/c.md", "docs/b\\xff.md"]


def test_a_workspace_over_max_files_is_refused_whatever_names_it_holds(tmp_path: Path) -> None:
    """Review of the change above: the count is taken before names that are not UTF-8 are left out, so a listing
    cut at `max_files` is never taken for the whole workspace (its other files would be indexed as removed)."""
    import pytest

    from bkg_kernel.errors import InvalidInput
    from bkg_kernel.plugins.repoagent.workspace import Ignore, Workspace, list_files

    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
    odd(tmp_path, b"c\xff.py").write_text("y = 2\n")
    ws, ignore = Workspace("w", tmp_path), Ignore([])
    unnamed: list[str] = []
    assert list_files(ws, ignore, 3, unnamed) == ["a.py", "b.py"] and unnamed == ["c\\xff.py"]
    with pytest.raises(InvalidInput, match="more than 2 files"):
        list_files(ws, ignore, 2)
