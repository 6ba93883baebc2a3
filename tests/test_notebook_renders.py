"""What a notebook shows for results found broken by a review: a background job's record from `wb.jobs.get` (its
`_repr_html_` raised KeyError: it has a kind, no notebook) and a small model's size (a 6 KB classifier read
"0.0" MB)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from helpers import write_gguf

from bkg_kernel.client import connect
from bkg_kernel.client.llm import ModelTable
from bkg_kernel.models.registry import ModelRegistry

PLUGINS = ["sysinfo"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("renders") / "data", plugins=PLUGINS)
    yield g
    g.stop()


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
