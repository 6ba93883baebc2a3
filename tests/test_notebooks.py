"""The shipped notebooks run top to bottom in a real kernel and render their results as tables."""

from __future__ import annotations

import os
from pathlib import Path

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
