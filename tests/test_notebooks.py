"""The shipped notebooks run top to bottom in a real kernel and render their results as tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def test_store_quickstart_runs_and_renders_tables(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BKG_DATA_DIR", str(tmp_path / "data"))
    nb = nbformat.read(NOTEBOOKS / "store_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    html = [
        out["data"]["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "text/html" in out.get("data", {})
    ]
    assert len(html) >= 5
    assert "5 results (vector)" in html[1] and "2020" in html[1]
    assert "results (hybrid)" in html[2] and "vision" in html[2]
    assert "quickstart" in html[-1] and "2000" in html[-1]
    assert (tmp_path / "data" / "snapshots" / "quickstart").is_dir()
    assert not any(out.get("output_type") == "error" for c in nb.cells for out in c.get("outputs", []))
    assert os.environ["BKG_DATA_DIR"] == str(tmp_path / "data")


def test_llm_quickstart_streams_and_embeds(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    nb = _run_with_own_gateway("llm_quickstart.ipynb", tmp_path, monkeypatch)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(out.get("output_type") == "error" for c in code for out in c.get("outputs", []))
    assert "smollm2-135m-instruct" in code[0].outputs[0]["data"]["text/html"]
    streamed = "".join(o.get("text", "") for o in code[1].outputs if o.get("output_type") == "stream")
    usage = code[1].outputs[-1]["data"]["text/plain"]
    assert len(streamed.strip()) > 0 and "completion_tokens" in usage
    chat = "".join(o.get("text", "") for o in code[3].outputs if o.get("output_type") == "stream")
    assert len(chat.strip()) > 0
    shape, near, far = eval(code[4].outputs[0]["data"]["text/plain"])  # noqa: S307 - our own notebook's output
    assert shape[0] == 3 and near > far


def _run_with_own_gateway(name: str, tmp_path: Path, monkeypatch) -> Any:  # type: ignore[no-untyped-def]
    """Run a notebook whose `bkg.connect()` starts a gateway for a fresh data dir; stop that gateway after."""
    import json
    import signal

    data = tmp_path / "data"
    monkeypatch.setenv("BKG_DATA_DIR", str(data))
    monkeypatch.setenv("BKG_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("BKG_PORT", "0")  # any free port: connect() finds the one it took in gateway.json
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        state = data / "gateway.json"
        if state.exists():  # connect() started a gateway for this data dir: stop it
            os.kill(json.loads(state.read_text())["pid"], signal.SIGTERM)
    return nb


def test_repo_quickstart_indexes_maps_and_asks(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    nb = _run_with_own_gateway("repo_quickstart.ipynb", tmp_path, monkeypatch)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(out.get("output_type") == "error" for c in code for out in c.get("outputs", []))
    assert "decoder.py" in code[0].outputs[0]["data"]["text/html"]
    assert (data / "repos" / "stdlib-json" / "decoder.py").is_file()
    report = eval(code[1].outputs[0]["data"]["text/plain"])  # noqa: S307 - our own notebook's output
    assert report["files"] >= 5 and report["symbols"] > 30 and report["languages"] == {"python": report["files"]}
    assert "py_scanstring" in code[2].outputs[0]["data"]["text/html"]
    assert "decoder.py:" in code[3].outputs[0]["data"]["text/html"]
    cited = eval(code[6].outputs[0]["data"]["text/plain"])  # noqa: S307
    answer_html = code[5].outputs[0]["data"]["text/html"]
    assert cited, answer_html  # a question that names a symbol: its answer cites it (an empty list checked nothing)
    for path, start, end, _ in cited:  # each citation is shown with its code, and its lines exist
        assert f"{path}:{start}-{end}" in answer_html
        assert end <= len((data / "repos" / "stdlib-json" / path).read_text().splitlines())
