"""What a new user's trial of notebook jobs found, against a real gateway and real papermill runs: a failed run's
error says "failed" once, and a run's HTML output asks no other host for anything (no CDN scripts; plots, tables
and markdown images embedded), checked by parsing it and by loading it in a real browser."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest
from gateway_harness import ADMIN_KEY, CHROMIUM, CHROMIUM_ARGS, Gateway, start_gateway
from helpers import notebook

pytestmark = pytest.mark.slow

# a 2x2 PNG (red, green / blue, white): what a plot is to the HTML, an image output
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR42mP4z8DA8J+BkYHh////DAAe9gT9CzF8CQAAAABJRU5ErkJggg=="
LOCAL = {"127.0.0.1", "localhost", "::1"}


def make_notebooks(root: Path) -> Path:
    notebook(root / "fails.ipynb", "n = 1", "a = n + 1", "raise ValueError(f'boom {n}')")
    report = notebook(
        root / "report.ipynb", "n = 3\nword = 'hi'",
        "print('result', n * 2, word)",
        f"import base64\nfrom IPython.display import Image, display\ndisplay(Image(data=base64.b64decode('{PNG}')))",
        "import pandas as pd\npd.DataFrame({'squares': [i * i for i in range(n)], 'label': ['zero', 'one', 'two']})",
    )  # fmt: skip
    nb = nbformat.read(report, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("## Chart\n\n![chart](chart.png)\n\nand $x^2$ in math"))
    nbformat.write(nb, report)
    (root / "chart.png").write_bytes(base64.b64decode(PNG))
    notebook(
        root / "reaches_out.ipynb", "n = 1",
        "from IPython.display import HTML, display\nprint('reached', n)\n"
        "display(HTML('<img src=\"https://example.com/pixel.png\">'\n"
        "             '<link rel=\"stylesheet\" href=\"https://example.com/x.css\">'))",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def jgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = make_notebooks(tmp_path_factory.mktemp("trialroots"))
    g = start_gateway(tmp_path_factory.mktemp("trial") / "data", env={"BKG_JOB_ROOTS": str(roots)})
    yield g
    g.stop()


class Links(HTMLParser):
    """Every URL-valued attribute of every tag, with the tag's name."""

    ATTRS = {"src", "href", "srcset", "data", "poster", "action", "background", "xlink:href", "formaction"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in self.ATTRS and value:
                self.urls += [(tag, u.strip().split(" ")[0]) for u in value.split(",")] if name == "srcset" else [
                    (tag, value.strip())
                ]  # fmt: skip


def elsewhere(url: str) -> bool:
    """Whether loading `url` would ask a host other than this machine."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https", "ws", "wss", "ftp") or url.startswith("//"):
        return (parts.hostname or "") not in LOCAL
    return False


def test_a_failed_run_says_failed_once(jgw: Gateway) -> None:
    from bkg_kernel.client import Workbench
    from bkg_kernel.errors import JobFailed

    wb = Workbench(jgw.url, ADMIN_KEY)
    with pytest.raises(JobFailed) as exc:
        wb.jobs.run("fails.ipynb", n=1, progress=False, raise_on_failure=True)
    assert re.fullmatch(r"run run-[0-9a-f]+ failed: ValueError: boom 1", exc.value.message), exc.value.message
    assert exc.value.state == "failed" and exc.value.code == "job_failed"


def test_the_html_output_asks_no_other_host_and_still_shows_the_outputs(jgw: Gateway) -> None:
    from bkg_kernel.client import Workbench

    wb = Workbench(jgw.url, ADMIN_KEY)
    run = wb.jobs.run("report.ipynb", n=3, word="yo", progress=False)
    assert run.ok, run
    page = wb.jobs.output(run["id"], format="html")
    served = jgw.client().get(f"/api/jobs/{run['id']}/output", params={"format": "html"})  # what a browser gets
    assert served.status_code == 200 and served.text == page
    links = Links()
    links.feed(page)
    assert links.urls, "the parser found no URLs at all"
    outward = [(tag, url) for tag, url in links.urls if elsewhere(url)]
    assert not outward, outward
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page), "CSS fetches from another host"
    assert "cdnjs" not in page and "require.min.js" not in page and "MathJax.Hub" not in page
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    # the outputs still show: the printed text, the image output and the markdown image as data URIs, the table
    assert "result 6 yo" in page
    imgs = [url for tag, url in links.urls if tag == "img"]
    assert len(imgs) == 2 and all(u.startswith("data:image/png;base64,") for u in imgs), imgs
    assert "<table" in page and "squares" in page and "two" in page
    assert "x^2" in page  # LaTeX shows as written, with no MathJax to typeset it


def test_the_html_output_makes_no_request_off_the_machine_in_a_browser(jgw: Gateway, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from bkg_kernel.client import Workbench

    wb = Workbench(jgw.url, ADMIN_KEY)
    pages = {}
    for name in ("report.ipynb", "reaches_out.ipynb"):
        run = wb.jobs.run(name, progress=False)
        assert run.ok, run
        pages[name] = tmp_path / f"{run['id']}.html"
        pages[name].write_text(wb.jobs.output(run["id"], format="html"), encoding="utf-8")  # as a user saves it
    requests: list[str] = []
    blocked: list[str] = []
    texts, shown = {}, []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            # Chromium reports a request the page's policy blocks, then fails it with "csp": it never went out
            page.on("requestfailed", lambda r: blocked.append(r.url) if r.failure == "csp" else None)
            for name, path in pages.items():
                page.goto(path.as_uri(), wait_until="load")
                page.wait_for_timeout(500)  # module scripts run after load
                texts[name] = page.inner_text("body")
                if name == "report.ipynb":
                    shown = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        finally:
            browser.close()
    outward = [u for u in requests if elsewhere(u)]
    assert sorted(outward) == sorted(blocked), (outward, blocked)  # each one asked for, refused in the page
    assert sorted(outward) == ["https://example.com/pixel.png", "https://example.com/x.css"], outward
    assert "result 6 hi" in texts["report.ipynb"] and "reached 1" in texts["reaches_out.ipynb"], texts
    assert shown == [2, 2], shown  # the image output and the markdown image, both decoded from data URIs
    assert any(u.startswith("file://") for u in requests), requests
