"""A job run's output budget holds against what a review found went around it, on a real gateway with real job
workers, kernels and papermill runs: a loop of `showtraceback()` (an error is kept while it fits, and past the budget
one a cell, its latest: the one that failed the cell), rich outputs an `ipywidgets.Output` widget captures, and the
widget state saved in the notebook's metadata (a 5 MB `Textarea`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from gateway_harness import Gateway, start_gateway, submit, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow
LIMIT = 1024 * 1024  # the gateway's job_max_output_bytes here (10 MiB by default)
SLACK = 64 * 1024  # the notebook's own JSON and the markers
SECRET = "row 7 is 5f1d"
RULE = f"a job keeps the first {LIMIT:,} bytes of its cells' output (setting job_max_output_bytes)"
STATE = "application/vnd.jupyter.widget-state+json"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cap_review2")
    notebook(root / "tracebacks.ipynb", "n = 3000",
             "ip = get_ipython()\nfor i in range(n):\n    try:\n        raise ValueError(f'{i} ' + 'v' * 1500)\n"
             f"    except ValueError:\n        ip.showtraceback()\nraise RuntimeError('{SECRET}')")  # fmt: skip
    notebook(root / "captured.ipynb", "mb = 3",
             "import ipywidgets as w\nfrom IPython.display import HTML, display\nout = w.Output()\ndisplay(out)\n"
             "with out:\n    for i in range(mb):\n        display(HTML(str(i) * 1_000_000))\n"
             "print('after the widget')")  # fmt: skip
    notebook(root / "many.ipynb", "n = 2000",
             "import ipywidgets as w\nfrom IPython.display import HTML, display\nout = w.Output()\ndisplay(out)\n"
             "with out:\n    for i in range(n):\n        display(HTML(f'<b>{i}</b>' + 'm' * 300))")  # fmt: skip
    notebook(root / "textarea.ipynb", "mb = 5",
             "import ipywidgets as w\nt = w.Textarea(value='a' + 'z' * (mb * 1_000_000) + 'b')\nt")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Gateway]:
    env = {"BKG_JOB_ROOTS": str(root), "BKG_JOB_MAX_OUTPUT_BYTES": str(LIMIT)}
    g = start_gateway(tmp_path_factory.mktemp("jobs_cap_review2") / "data", env=env, plugins=["sysinfo"])
    yield g
    g.stop()


def _output(gw: Gateway, run_id: str) -> Any:
    r = gw.client().get(f"/api/jobs/{run_id}/output")
    assert r.status_code == 200, r.text
    return nbformat.reads(r.text, 4)


def _cells(nb: Any) -> list[Any]:
    """The code cells as written (the parameters cells left out; papermill's error banner is a markdown cell)."""
    tagged = {"parameters", "injected-parameters"}
    return [c for c in nb.cells if c.cell_type == "code" and not set(c.metadata.get("tags", [])) & tagged]


def _html(gw: Gateway, run_id: str) -> str:
    c = gw.client()
    c.timeout = httpx.Timeout(180)  # the gateway waits for the HTML of a run just ended (rendered on its worker)
    r = c.get(f"/api/jobs/{run_id}/output", params={"format": "html"})
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) < 2 * LIMIT, len(r.content)
    return r.text


def _dropped(cell: Any) -> list[str]:
    return [o.text for o in cell.outputs if o.output_type == "stream" and "output dropped" in o.text]


def _models(nb: Any) -> dict[str, Any]:
    return {m["model_name"]: m["state"] for m in nb.metadata["widgets"][STATE]["state"].values()}


def test_a_loop_of_tracebacks_keeps_one_error_past_the_limit_the_one_that_failed_the_cell(gw: Gateway) -> None:
    """Found by a review: every error was kept past the budget (shortened, but each one), so a cell calling
    `showtraceback()` 3000 times wrote a 12 MB output notebook and a 9 MB HTML page. Errors are kept while they fit;
    past the budget a cell keeps one, its latest, which is the error that failed it, and the rest are counted in
    the cell's drop marker."""
    run = submit(gw, {"notebook": "tracebacks.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "failed", done
    assert done["error"]["cell_index"] == 1, done["error"]  # papermill names a cell's first error: ValueError 0
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK  # not the 10 MB of tracebacks
    (cell,) = _cells(_output(gw, run["id"]))
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert 100 < len(errors) < 1000, len(errors)  # those that fit, whole, and the last
    assert [e.evalue.split()[0] for e in errors[:-1]] == [str(i) for i in range(len(errors) - 1)]
    assert not errors[-2].traceback[0].startswith("[bkg:")  # whole
    last = errors[-1]  # the one that failed the cell, kept past the budget
    assert (last.ename, last.evalue) == ("RuntimeError", SECRET), last
    assert SECRET in last.traceback[-1]
    lost = 3000 - (len(errors) - 1)
    (mark,) = _dropped(cell)
    assert mark.startswith(f"[bkg: output dropped: {lost} outputs ({lost} errors) (") and RULE in mark, mark
    html = _html(gw, run["id"])
    assert SECRET in html and f"{lost} outputs ({lost} errors)" in html


def test_what_an_output_widget_captures_counts_against_the_limit(gw: Gateway) -> None:
    """Found by a review: the rich outputs an `ipywidgets.Output` widget captured were not counted, and the widget
    state nbclient saves (which holds them) was kept whole: a 3 MB display inside an Output widget landed whole in
    the output notebook and its HTML. They count as the cell's own outputs do: the first display fits and stays in
    the widget, the rest are dropped for the cell's marker, and the cell goes on printing."""
    run = submit(gw, {"notebook": "captured.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK  # not the 3 MB shown
    nb = _output(gw, run["id"])
    (cell,) = _cells(nb)
    kinds = [o.output_type for o in cell.outputs]
    assert kinds[0] == "display_data" and "application/vnd.jupyter.widget-view+json" in cell.outputs[0].data, kinds
    (mark,) = _dropped(cell)
    assert mark.startswith("[bkg: output dropped: 2 outputs (2 displays) of text/html, text/plain (") and RULE in mark
    assert "after the widget\n" in [o.get("text") for o in cell.outputs]
    shown = _models(nb)["OutputModel"]["outputs"]
    assert [o["data"]["text/html"] for o in shown] == ["0" * 1_000_000]  # the first, whole, in the widget
    assert len(_html(gw, run["id"])) < LIMIT + 4 * SLACK


def test_widget_state_past_the_limit_is_saved_with_its_long_values_cut(gw: Gateway) -> None:
    """Found by a review: the widget state nbclient saves into the notebook's metadata was not counted, so a 5 MB
    `Textarea` landed whole in the output notebook and its HTML. The saved state counts too: a widget model that
    does not fit keeps its long values cut to their ends (the widget still shows), and the notebook says so."""
    run = submit(gw, {"notebook": "textarea.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK  # not the 5 MB value
    nb = _output(gw, run["id"])
    value = _models(nb)["TextareaModel"]["value"]
    assert value.startswith("az") and value.endswith("zb") and "characters cut" in value and len(value) < 3000
    assert _models(nb)["TextareaModel"]["_model_name"] == "TextareaModel"  # the rest of its state, as it was
    note = nb.metadata["bkg"]["output_cap"]
    assert note.startswith("[bkg: widget state cut: 1 widget models kept with their long values cut") and RULE in note
    (cell,) = _cells(nb)
    (view,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    model_id = view.data["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert nb.metadata["widgets"][STATE]["state"][model_id]["model_name"] == "TextareaModel"
    assert len(json.dumps(nb.metadata["widgets"])) < 64 * 1024
    assert "z" * 5000 not in _html(gw, run["id"])


def test_an_output_widget_showing_many_small_displays_runs_through(gw: Gateway) -> None:
    """Found with the review's hang: nbclient sent all of an Output widget's outputs back to the kernel after each
    new one (and the kernel echoed them), so 2,000 small displays made gigabytes of traffic and the run failed on
    nbclient's IOPub wait; that send, on the socket the reply comes by, also left some runs waiting for their reply
    until the cell timed out (or for good). What a widget captures stays with the run's client now."""
    run = submit(gw, {"notebook": "many.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    shown = _models(_output(gw, run["id"]))["OutputModel"]["outputs"]
    assert [o["data"]["text/html"] for o in shown] == [f"<b>{i}</b>" + "m" * 300 for i in range(2000)]


def test_widget_state_left_out_takes_the_models_that_name_it_along() -> None:
    """Found by a review of the cap: a model left out of the saved widget state (a layout the budget had no room
    for) stayed named by a model kept (its Textarea), which a front end could not render. A model that names one
    left out goes too; an output widget left out gives its counted outputs back to the budget."""
    from bkg_kernel.jobs.outputcap import OutputCap

    cap = OutputCap(600)
    outs = [{"output_type": "stream", "name": "stdout", "text": "o" * 200}]
    models = {
        "area": {"state": {"_model_name": "TextareaModel", "value": "v" * 100, "layout": "IPY_MODEL_lay"}},
        "box": {"state": {"_model_name": "VBoxModel", "children": ["IPY_MODEL_area"]}},
        "out": {"state": {"_model_name": "OutputModel", "outputs": outs, "layout": "IPY_MODEL_lay"}},
        "lay": {"state": {"_model_name": "LayoutModel", "width": "w" * 2000}},  # no room for it, whole or cut
    }
    assert cap.take(sum(len(json.dumps(o)) for o in outs))  # the output widget's, counted as they came
    before = cap.kept
    note = cap.widgets(models, counted={"out"})
    assert note is not None and "left out" in note
    assert set(models) == set(), models  # the layout, then all that name it, then the box naming the textarea
    assert cap.kept < before  # the output widget's outputs were given back
