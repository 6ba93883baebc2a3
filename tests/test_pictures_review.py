"""The pictures where a review found them wrong, against a real gateway, inspected without a browser: the explorer
on samples too small for UMAP (PCA drawn and said so), on an empty collection (what to do next), with a seed (the
same points and layout for it, said); telemetry asked for a plugin the gateway does not host (said, no warnings)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway

# Panel 1.x warns of what 2.0 removes (a widget's `name`, `button_type`): the pictures must not lean on it
pytestmark = pytest.mark.filterwarnings("error::PendingDeprecationWarning:bkg_kernel.*")
PLUGINS = ["sysinfo"]  # no llmserver: the telemetry view is asked for one this gateway does not host


def _wb(gw: Gateway) -> Any:
    from bkg_kernel.client import Workbench

    return Workbench(gw.url, ADMIN_KEY)


def _collection(wb: Any, name: str, n: int, dim: int = 8) -> Any:
    c = wb.create_collection(name, dim=dim)
    if n:
        rng = np.random.default_rng(n)
        c.upsert(ids=list(range(n)), vectors=rng.normal(size=(n, dim)).astype("float32"),
                 payloads=[{"label": ["a", "b"][i % 2]} for i in range(n)])  # fmt: skip
    return c


def _renders(view: Any) -> None:
    from bokeh.document import Document

    doc = Document()
    view.panel().get_root(doc)
    doc.validate()


def test_umap_on_too_few_points_draws_pca_and_says_why(gw: Gateway) -> None:
    wb = _wb(gw)
    for n in (3, 2):  # 3: umap-learn's spectral start failed (a TypeError shown); 2: PCA drawn, labelled UMAP
        ex = _collection(wb, f"small{n}", n).explore(method="umap")
        status = ex.status.object
        assert "bkg-error" not in status and "UMAP of" not in status, status
        assert f"PCA, not UMAP: UMAP needs at least 4 points and this has {n}" in status, status
        assert ex.plot.object is not None and len(ex.source.data["x"]) == n
        _renders(ex)
    ex = _collection(wb, "small4", 4).explore(method="umap", seed=3)  # enough: UMAP, with the seed it used
    assert "all 4 points (UMAP of 50 PCA components, seed 3)" in ex.status.object, ex.status.object
    assert ex.data["drawn"] == "umap" and len(ex.source.data["x"]) == 4


def test_an_empty_collection_says_what_to_do_next(gw: Gateway) -> None:
    wb = _wb(gw)
    ex = _collection(wb, "empty", 0).explore()
    status = ex.status.object
    assert "filter" not in status, status  # none was given
    assert "has no points yet" in status and "upsert(" in status and "wb.brain.index(" in status, status
    assert ex.plot.object is None
    _renders(ex)
    ex = _collection(wb, "labelled", 6).explore(filter={"label": "zzz"})
    assert "has no point that matches this filter" in ex.status.object and "upsert(" not in ex.status.object


def test_the_explorer_takes_a_seed_for_its_sample(gw: Gateway) -> None:
    wb = _wb(gw)
    c = _collection(wb, "seeded", 60)
    one, again, two = (c.explore(sample=10, seed=s) for s in (1, 1, 2))
    assert one.data["ids"] == again.data["ids"] != two.data["ids"]
    assert one.data["ids"] == c.map(sample=10, seed=1)["ids"]  # the seed went to the gateway's sample
    assert "a sample of 10 of 60 points (PCA, seed 1;" in one.status.object, one.status.object
    assert "seed 2" in two.status.object and one.seed.value == 1
    for bad in (-1, 2**32, True):
        with pytest.raises(ValueError, match="seed"):
            c.explore(seed=bad)


def test_telemetry_of_a_plugin_this_gateway_does_not_host_says_so(gw: Gateway) -> None:
    from bkg_kernel import pictures

    wb = _wb(gw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tv = pictures.telemetry_view(wb, plugins=["llmserver"])
        tv.stop()
        _renders(tv)
    assert [str(w.message) for w in caught if "legend" in str(w.message)] == []
    assert "Not hosted by this gateway: llmserver (it hosts sysinfo" in tv.status.object, tv.status.object
    assert "No samples yet" not in tv.status.object  # it never would have one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tv = pictures.telemetry_view(wb, plugins=["sysinfo", "llmserver"])  # one hosted: its charts, and the other said
        tv.stop()
    assert [str(w.message) for w in caught if "legend" in str(w.message)] == []
    assert "Not hosted by this gateway: llmserver" in tv.status.object and list(tv.sources) == ["sysinfo"]
