"""A job run's output budget counts all the output notebook keeps, against a real gateway with real job workers,
kernels and papermill runs: images and results shown past job_max_output_bytes are dropped for one marker per cell
saying how many and how big, an error is always kept (shortened past the budget), and what a cell clears or
replaces in place goes back to the budget."""

from __future__ import annotations

import base64
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
# a valid PNG of random pixels, stored uncompressed: its size is set by `side`, its bytes by `seed`
PNG = """
import random, struct, zlib

def png(seed, side):
    pixels = random.Random(seed).randbytes(side * side * 3)
    raw = b"".join(b"\\x00" + pixels[r * side * 3:(r + 1) * side * 3] for r in range(side))
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    head = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")
    return b"\\x89PNG\\r\\n\\x1a\\n" + body
"""
BIG, SMALL = 316, 180  # sides: ~300 KB and ~97 KB images (base64: ~400 KB, ~130 KB)


def png(seed: int, side: int) -> bytes:
    """The image the notebooks show for `seed` and `side`."""
    space: dict[str, Any] = {}
    exec(PNG, space)  # the very code the notebooks run
    return bytes(space["png"](seed, side))


def b64(seed: int, side: int) -> str:
    return base64.b64encode(png(seed, side)).decode()


def per_image(side: int) -> int:
    """The budget one shown image takes: its base64 PNG and its text/plain repr."""
    from IPython.display import Image

    return len(b64(0, side)) + len(repr(Image(data=png(0, side), format="png")))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputcap")
    show = "from IPython.display import HTML, Image, clear_output, display"
    notebook(root / "pictures.ipynb", f"n = 20\nside = {BIG}", PNG + show,
             "for i in range(n):\n    display(Image(data=png(i, side), format='png'))\nprint('after the pictures')",
             "HTML('<p>' + 'h' * 600_000 + '</p>')")  # fmt: skip
    notebook(root / "failing.ipynb", f"n = {LIMIT + 4096}",
             "print('x' * n)",
             "import sys\nfor i in range(1000):\n    sys.displayhook(f'result {i}')",
             f"raise ValueError('{SECRET} ' + 'z' * 3_000_000)")  # fmt: skip
    notebook(root / "redraw.ipynb", f"side = {SMALL}", PNG + show,
             "for i in range(30):\n    clear_output(wait=True)\n    display(Image(data=png(i, side), format='png'))",
             "for i in range(100, 130):\n    display(Image(data=png(i, side), format='png'))\n    clear_output()",
             "h = display(Image(data=png(200, side), format='png'), display_id=True)\n"
             "for i in range(201, 231):\n    h.update(Image(data=png(i, side), format='png'))",
             "for i in range(300, 310):\n    display(Image(data=png(i, side), format='png'))\n"
             "h.update(Image(data=png(400, 2 * side), format='png'))")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Gateway]:
    env = {"BKG_JOB_ROOTS": str(root), "BKG_JOB_MAX_OUTPUT_BYTES": str(LIMIT)}
    g = start_gateway(tmp_path_factory.mktemp("jobs_outputcap") / "data", env=env, plugins=["sysinfo"])
    yield g
    g.stop()


def _cells(gw: Gateway, run_id: str) -> list[Any]:
    """The run's output notebook's code cells as written (the parameters cells left out; papermill's error banner
    is a markdown cell)."""
    r = gw.client().get(f"/api/jobs/{run_id}/output")
    assert r.status_code == 200, r.text
    tagged = {"parameters", "injected-parameters"}
    cells = nbformat.reads(r.text, 4).cells
    return [c for c in cells if c.cell_type == "code" and not set(c.metadata.get("tags", [])) & tagged]


def _dropped(cell: Any) -> list[str]:
    return [o.text for o in cell.outputs if o.output_type == "stream" and "output dropped" in o.text]


def _images(cell: Any) -> list[str]:
    return [o.data["image/png"] for o in cell.outputs if o.output_type == "display_data"]


def test_images_shown_past_the_limit_are_dropped_for_one_marker_saying_how_many_and_how_big(gw: Gateway) -> None:
    """Found by a review: a run kept every image and result whole and uncounted (only printing was capped), so a
    notebook showing a 300 KB image in a loop wrote it all into its output notebook and HTML. Every output counts
    now: the first that fit are kept intact, the rest of the cell's shown under one marker with their count and
    bytes, a smaller output that still fits is kept, and a result past the budget is dropped the same way."""
    run = submit(gw, {"notebook": "pictures.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK  # not the 8 MB it showed
    per, n = per_image(BIG), 20
    fit = LIMIT // per
    assert 0 < fit < n, fit
    cells = _cells(gw, run["id"])
    assert _images(cells[1]) == [b64(i, BIG) for i in range(fit)]  # the first ones, whole
    (mark,) = _dropped(cells[1])
    what = f"{n - fit} outputs ({n - fit} displays) of image/png, text/plain ({(n - fit) * per:,} bytes in all)"
    assert f"[bkg: output dropped: {what}; {RULE}]" in mark, mark
    assert "after the pictures\n" in [o.get("text") for o in cells[1].outputs]  # it still fit
    from IPython.display import HTML

    result = len("<p>" + "h" * 600_000 + "</p>") + len(repr(HTML("x")))
    assert [o.output_type for o in cells[2].outputs] == ["stream"], cells[2].outputs
    what = f"a result of text/html, text/plain ({result:,} bytes)"
    assert _dropped(cells[2]) == [f"[bkg: output dropped: {what}; {RULE}]\n"]
    c = gw.client()
    c.timeout = httpx.Timeout(180)  # the gateway waits for the HTML of a run just ended (rendered on its worker)
    html = c.get(f"/api/jobs/{run['id']}/output", params={"format": "html"})
    assert html.status_code == 200 and "output dropped" in html.text
    assert len(html.content) < 2 * LIMIT, len(html.content)


def test_a_cell_failing_past_the_limit_still_shows_its_error_with_its_traceback_cut(gw: Gateway) -> None:
    """An error is always kept, a failed run must show why: past the budget (spent here by printing) its name and
    value stay, its value bounded and its traceback cut to its last entries under a note, so an error that carries
    megabytes does not bring them into the output notebook. A cell's short result is kept past the budget too,
    once per cell: a loop of results keeps its first."""
    run = submit(gw, {"notebook": "failing.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "failed", done
    assert done["error"]["ename"] == "ValueError" and done["error"]["evalue"].startswith(SECRET), done["error"]
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK  # not the 6 MB the error held
    cells = _cells(gw, run["id"])
    assert "output truncated" in cells[0].outputs[-1].text  # the budget went to printing
    assert [o.output_type for o in cells[1].outputs] == ["execute_result", "stream"], cells[1].outputs
    assert cells[1].outputs[0].data == {"text/plain": "'result 0'"}
    rest = sum(len(repr(f"result {i}")) for i in range(1, 1000))
    assert _dropped(cells[1]) == [f"[bkg: output dropped: 999 outputs (999 results) of text/plain ({rest:,} bytes in "
                                  f"all); {RULE}]\n"]  # fmt: skip
    (error,) = [o for o in cells[2].outputs if o.output_type == "error"]
    assert error.ename == "ValueError" and error.evalue.startswith(f"{SECRET} zzz"), error.ename
    assert len(error.evalue) < 3000 and "more characters cut" in error.evalue
    assert error.traceback[0].startswith("[bkg: traceback cut to its last") and RULE in error.traceback[0]
    assert "ValueError" in error.traceback[-1] and SECRET in error.traceback[-1]  # the error's last line, its head


def test_images_a_cell_clears_or_replaces_no_longer_count_against_the_limit(gw: Gateway) -> None:
    """What a cell clears (a clear that waits for the next output, an immediate one) or replaces in place
    (update_display_data counts its growth) goes back to the budget: a loop that redraws its chart keeps showing
    it, and only what the notebook keeps is counted when a later cell fills the budget; an update past it is
    dropped, its display keeps what it showed and says so."""
    run = submit(gw, {"notebook": "redraw.ipynb"})
    done = wait_run(gw, run["id"], timeout=300)
    assert done["state"] == "succeeded", done
    cells = _cells(gw, run["id"])
    assert [o.output_type for o in cells[1].outputs] == ["display_data"], cells[1].outputs
    assert _images(cells[1]) == [b64(29, SMALL)]  # the last drawing, whole
    assert cells[2].outputs == []
    assert _images(cells[3]) == [b64(230, SMALL)]  # the last update
    per = per_image(SMALL)
    fit = (LIMIT - 2 * per) // per  # two images kept above: the budget the last cell had
    assert 0 < fit < 10, fit
    assert _images(cells[4]) == [b64(300 + i, SMALL) for i in range(fit)]
    (mark,) = _dropped(cells[4])
    assert f"{10 - fit} outputs ({10 - fit} displays) of image/png, text/plain ({(10 - fit) * per:,} bytes" in mark
    (update,) = _dropped(cells[3])  # the last update outgrew the budget: the display above keeps image 230
    assert update.startswith("[bkg: output dropped: a display update of image/png, text/plain ("), update
    assert os.path.getsize(done["output_path"]) < LIMIT + SLACK
