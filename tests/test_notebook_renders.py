"""What a notebook shows for results found broken by a review: a background job's record from `wb.jobs.get` (its
`_repr_html_` raised KeyError: it has a kind, no notebook), a small model's size (a 6 KB classifier read "0.0" MB),
a cell ending in `wb.llm.chat(...)` (the answer streamed, then again as a quoted repr), admin listings and plugin
logs (a wall of dicts), repo.refs (a dict) and a run's HTML output (its source, not the page)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from helpers import notebook, write_gguf

from bkg_kernel.client import connect
from bkg_kernel.client.jobs import Page
from bkg_kernel.client.llm import Answer, ModelTable
from bkg_kernel.client.plugins import LogTable
from bkg_kernel.client.repo import Refs
from bkg_kernel.client.workbench import AuditTable, KeyTable, UserTable
from bkg_kernel.models.defaults import DEFAULT_LLM
from bkg_kernel.models.registry import ModelRegistry

PLUGINS = ["sysinfo", "llmserver"]
# a notebook that chats as people do: a cell ending in the call, the answer kept and shown later, one not echoed
CHAT_CELLS = {
    "setup": "import bkg_kernel\nwb = bkg_kernel.connect()\n"
    "opts = dict(model=model, max_tokens=8, temperature=0, seed=1)",
    "streamed": "wb.llm.chat(prompt, **opts)",
    "kept": "print('kept', type(_).__name__, len(_))",
    "printed": "wb.llm.chat(prompt, stream=False, **opts)",
    "assigned": "answer = wb.llm.chat(prompt, **opts)",
    "shown later": "answer",
    "not echoed": "wb.llm.chat(prompt, echo=False, **opts)",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = tmp_path_factory.mktemp("renders-jobs")
    notebook(roots / "chat.ipynb", "prompt = 'Name one colour.'\nmodel = ''", *CHAT_CELLS.values())
    env = {"BKG_JOB_ROOTS": str(roots)}
    g = start_gateway(tmp_path_factory.mktemp("renders") / "data", env=env, plugins=PLUGINS)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def chat_run(gw: Gateway) -> dict[str, Any]:
    """chat.ipynb run as a notebook job: a real kernel, as a notebook runs its cells."""
    run = connect(gw.url, api_key=ADMIN_KEY).jobs.run("chat.ipynb", model=DEFAULT_LLM, progress=False)
    assert run.ok, run
    return dict(run)


def test_a_background_job_renders_as_its_kind_progress_and_error(gw: Gateway) -> None:
    wb = connect(gw.url, api_key=ADMIN_KEY)
    job = wb.invoke("sysinfo", "sysinfo.survey", {"samples": 2, "every_s": 0.01})["job"]
    wb.wait_job(job["id"], progress=False)
    run = wb.jobs.get(job["id"])
    html = run._repr_html_()
    assert "sysinfo.survey" in html and ">done<" in html and "100%" in html and "admin" in html
    assert "cells" not in html  # a notebook run's words, not a job's

    failed = dict(run, state="failed", error="<b>boom</b> in the survey", owner=None, finished=None)
    html = type(run)(failed)._repr_html_()
    assert "&lt;b&gt;boom&lt;/b&gt; in the survey" in html and "<b>boom" not in html and "None" not in html


def test_a_small_model_s_size_is_in_the_unit_that_shows_it(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    reg.dir.mkdir(parents=True)
    entry = reg.add(write_gguf(reg.dir / "tiny.gguf"))
    assert entry.size < 2**20
    shown = f"{entry.size / 1024:.1f} KB" if entry.size >= 1024 else f"{entry.size} B"
    assert shown in reg._repr_html_() and "0.0 MB" not in reg._repr_html_()
    table = ModelTable([entry.to_manifest() | {"id": entry.id}])._repr_html_()
    assert shown in table and "0.0" not in table


def test_collections_and_snapshots_show_their_sizes_for_people(tmp_path: Path) -> None:
    import numpy as np

    from bkg_kernel.store import Store

    with Store(tmp_path / "data") as store:
        c = store.create_collection("docs", dim=4)
        c.upsert(ids=[1, 2], vectors=np.eye(4, dtype=np.float32)[:2], texts=["one", "two"], progress=False)
        snap = store.snapshot("docs")
        listed = store.list_collections()
        html = listed._repr_html_()
        assert "1 collection<" in html and ">size</th>" in html and "bytes_on_disk" not in html
        assert any(unit in html for unit in (" KB<", " MB<", " B<"))
        snaps = store.list_snapshots("docs")._repr_html_()
        assert "1 snapshot<" in snaps and snap.id in snaps and ">size</th>" in snaps


def test_a_cell_ending_in_a_chat_shows_the_answer_once_and_a_later_cell_shows_it_as_markdown(
    gw: Gateway, chat_run: dict[str, Any]
) -> None:
    """Run in a real kernel (a notebook job): the streamed (or printed) answer is the cell's only output, no quoted
    `Out[]` after it, though the value is still the cell's result (`_`); the answer shown in a later cell, or one
    not echoed, is Markdown (rendered as HTML) with its text as the plain fallback."""
    wb = connect(gw.url, api_key=ADMIN_KEY)
    out = nbformat.reads(wb.jobs.output(chat_run["id"]), as_version=4)
    outputs = {name: next(c.outputs for c in out.cells if c.source == src) for name, src in CHAT_CELLS.items()}

    def printed(name: str) -> str:
        return "".join(o["text"] for o in outputs[name] if o["output_type"] == "stream" and o["name"] == "stdout")

    def results(name: str) -> list[dict[str, str]]:
        return [o["data"] for o in outputs[name] if o["output_type"] == "execute_result"]

    answer = printed("streamed").removesuffix("\n")
    assert answer.strip(), outputs["streamed"]
    for name in ("streamed", "printed", "assigned"):
        assert printed(name) == answer + "\n" and results(name) == [], (name, outputs[name])
    assert printed("kept") == f"kept Answer {len(answer)}\n"  # the echoed answer is still the cell's value
    for name in ("shown later", "not echoed"):
        (data,) = results(name)
        assert data["text/plain"] == data["text/markdown"] == answer, data  # its text, not a quoted repr
        assert data["text/html"] == Answer(answer)._repr_mimebundle_()["text/html"]


def test_an_answer_renders_the_model_s_markdown_and_never_its_html() -> None:
    """What IPython makes of an answer not echoed in the cell running now: Markdown, its text as the plain fallback
    (not str's quoted repr), and the markup a prompt could steer a model to write shown as text, not run."""
    from IPython.core.formatters import DisplayFormatter

    text = "**blue** <img src=x onerror=alert(1)>\n\n```\na < b\n```"
    bundle, _ = DisplayFormatter().format(Answer(text))
    assert bundle["text/plain"] == bundle["text/markdown"] == text
    assert "<strong>blue</strong>" in bundle["text/html"] and "<img" not in bundle["text/html"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in bundle["text/html"] and "a &lt; b" in bundle["text/html"]
    echoed = Answer(text)
    echoed.echoed_in = 1  # echoed in a cell that is not running now (none is, here): shown like any other answer
    assert DisplayFormatter().format(echoed) == (bundle, {})


def test_a_run_s_html_output_renders_as_the_page_in_a_sandboxed_frame(gw: Gateway, chat_run: dict[str, Any]) -> None:
    wb = connect(gw.url, api_key=ADMIN_KEY)
    run = chat_run
    page = wb.jobs.output(run["id"], "html")
    assert isinstance(page, Page) and isinstance(page, str) and "<html" in page.lower()
    assert isinstance(wb.jobs.output(run["id"]), str) and not isinstance(wb.jobs.output(run["id"]), Page)
    frame = page._repr_html_()
    found = re.fullmatch(r"<iframe sandbox='' srcdoc='([^']*)' style='[^']*'></iframe>", frame)  # no script runs
    assert found and html.unescape(found.group(1)) == page  # the whole page, escaped: no quote ends the attribute
    assert "<html" not in found.group(1).lower()


def test_admin_listings_and_plugin_logs_are_counted_tables_without_secrets(gw: Gateway) -> None:
    wb = connect(gw.url, api_key=ADMIN_KEY)
    wb.create_user("render-viewer", role="viewer")
    secret = wb.create_key("render-key")["key"]
    keys, users, audit = wb.keys(), wb.users(), wb.audit(limit=2)
    assert isinstance(keys, KeyTable) and keys == list(keys) and type(keys[0]) is dict  # still a list of the dicts
    assert isinstance(users, UserTable) and "render-viewer" in {u["username"] for u in users}
    assert isinstance(audit, AuditTable) and len(audit) == 2 and audit[0]["id"] > audit[1]["id"]
    page = keys._repr_html_()
    assert f"{len(keys)} keys<" in page and "render-key" in page and ">scopes</th>" in page
    assert secret not in page and secret not in repr(keys) and secret.split("_")[-1] not in page
    assert f"{len(users)} users<" in users._repr_html_() and "render-viewer" in users._repr_html_()
    assert "1 user<" in UserTable(users[:1])._repr_html_() and "1 key<" in KeyTable(keys[:1])._repr_html_()
    assert "2 audit entries<" in audit._repr_html_() and ">action</th>" in audit._repr_html_()
    assert "1 audit entry<" in AuditTable(audit[:1])._repr_html_()
    logs = wb.plugin("sysinfo").logs(limit=3)
    assert isinstance(logs, LogTable) and len(logs) <= 3 and all({"time", "level", "message"} <= set(x) for x in logs)
    noun = "log line" if len(logs) == 1 else "log lines"
    assert f"plugin sysinfo: {len(logs)} {noun}<" in logs._repr_html_() and ">message</th>" in logs._repr_html_()
    line = LogTable([{"seq": 1, "time": 0.5, "level": "INFO", "message": "<b>up</b>"}])._repr_html_()
    assert "1 log line<" in line and "&lt;b&gt;up&lt;/b&gt;" in line and "<b>up" not in line


def test_refs_render_the_definition_and_a_table_of_references() -> None:
    """repo.refs's answer (as repoagent sends it) is still the dict, shown as its definition and a table."""
    answer = {
        "workspace": "demo", "symbol": "slugify", "total": 3, "callers": ["pkg/core.py:parse_config"],
        "definitions": [{"kind": "function", "name": "slugify", "qualname": "slugify", "path": "pkg/util.py",
                         "start": 1, "end": 3, "signature": "def slugify(text: str) -> str", "doc": ""}],
        "references": [
            {"name": "slugify", "kind": "import", "line": 2, "in": "", "path": "pkg/core.py",
             "text": "from pkg.util import slugify"},
            {"name": "slugify", "kind": "call", "line": 10, "in": "parse_config", "path": "pkg/core.py",
             "text": "if slugify(key) < '<b>': pass"},
        ],
        "message": None,
    }  # fmt: skip
    refs = Refs(answer)
    assert refs == answer and refs["references"][1]["in"] == "parse_config"
    page = refs._repr_html_()
    assert "pkg/util.py:1-3" in page and "def slugify(text: str) -&gt; str" in page
    assert "2 of 3 references<" in page and "pkg/core.py:10" in page and ">parse_config<" in page
    assert "&lt;b&gt;" in page and "<b>'" not in page
    none = Refs({**answer, "definitions": [], "references": [], "total": 0, "message": "'x' is neither defined"})
    assert "0 references<" in none._repr_html_() and "&#x27;x&#x27; is neither defined" in none._repr_html_()
