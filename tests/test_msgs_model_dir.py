"""`bkg models ... --model-dir PATH` where PATH is no folder: a regular file was blamed as `<file>/manifest.json
cannot be read`, and a link to nothing had `add` make the folder it named, wherever that was. Each is one line
naming --model-dir and what is wrong; a missing folder is still made by `add` and named by the reading commands.
(`bkg store create --data-dir FILE`: its clean-up hid the clear error under a traceback.)"""

from __future__ import annotations

from pathlib import Path

from helpers import bkg, one_line_error, write_gguf


def test_a_model_dir_that_is_no_folder_is_one_line_naming_the_option(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf")
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder\n")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    commands = (["add", "m.gguf", "--import", "copy"], ["list"], ["verify"], ["remove", "m"])
    for args in commands:
        r = bkg("models", *args, "--model-dir", str(a_file), cwd=tmp_path)
        one_line_error(r, "--model-dir: ", f"{a_file} is a file", "must be a folder")
        assert "manifest" not in r.stderr, r.stderr
        r = bkg("models", *args, "--model-dir", str(a_file / "sub"), cwd=tmp_path)
        one_line_error(r, "--model-dir: ", f"{a_file} is a file, in the way of the folder {a_file / 'sub'}")
        r = bkg("models", *args, "--model-dir", "dangling", cwd=tmp_path)
        one_line_error(r, "--model-dir: ", f"{dangling} is a link to {tmp_path / 'nowhere'}, which is not there")
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "nowhere").exists()  # nothing made
    r = bkg("models", "list", cwd=tmp_path, BKG_MODEL_DIR=str(a_file))  # by the settings: they are named
    one_line_error(r, f"{a_file} is a file", "BKG_MODEL_DIR")
    # a folder that is not there: `add` makes it, the reading commands say it is not there
    one_line_error(bkg("models", "list", "--model-dir", "missing", cwd=tmp_path), "no model dir at")
    assert not (tmp_path / "missing").exists()
    r = bkg("models", "add", "m.gguf", "--import", "copy", "--model-dir", "missing", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "missing" / "m.gguf").is_file(), r.stderr
    listed = bkg("models", "list", "--model-dir", "missing", cwd=tmp_path)
    assert listed.returncode == 0 and any(line.startswith("m ") for line in listed.stdout.splitlines()), listed.stdout


def test_a_data_dir_that_is_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder\n")
    r = bkg("store", "create", "c1", "--dim", "4", "--data-dir", str(a_file), cwd=tmp_path)
    one_line_error(r, str(a_file), "a file is in the way of the folder")
    assert a_file.read_text() == "not a folder\n"
