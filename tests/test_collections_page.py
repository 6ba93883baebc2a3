"""The collections dashboard (`collections_panel`): every collection and its snapshots; with collections:write a
snapshot and a restore run as gateway jobs a bar follows, and deleting a snapshot or dropping a collection asks
first; a viewer sees the same and may do none of it. Built in this process with a real gateway session and
inspected without a browser (the widgets' values and disabled state are what the page shows); the page itself is
opened in Chromium by tests/test_dashboards.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as W
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, user_key, wait_for
from helpers import button, dropdown, every, text

from bkg_kernel.client import Workbench
from bkg_kernel.widgets import Session, collections_panel

DIM = 4


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("collpage") / "data", plugins=["sysinfo"])
    c = g.client()
    for name, n in (("big", 120), ("small", 7)):
        assert c.post("/api/collections", json={"name": name, "dim": DIM}).status_code == 201
        points = [{"id": i, "vector": [1.0, float(i), 0.5, 0.25], "text": f"{name} {i}"} for i in range(n)]
        assert c.put(f"/api/collections/{name}/points", json={"points": points}).status_code == 200
    yield g
    g.stop()


def test_an_admin_takes_restores_and_deletes_snapshots_and_drops_a_collection(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    session = login(ADMIN_KEY)
    call = session.wb.call

    def slow_lists(method: str, path: str, *args: Any, **kw: Any) -> Any:
        """A slow link for the page's list refreshes: what the page says once a job ends must wait for them."""
        if method == "GET" and path in ("/api/collections", "/api/snapshots"):
            time.sleep(0.3)
        return call(method, path, *args, **kw)

    session.wb.call = slow_lists  # type: ignore[method-assign]
    panel = collections_panel(session)
    shown = text(panel)
    assert shown.index("<td style='text-align:left'>big</td>") < shown.index("<td style='text-align:left'>small</td>")
    pick = dropdown(panel, "collection")
    assert pick.value == "big" and "No snapshots of <code>big</code> yet" in shown

    button(panel, "Snapshot").click()  # a job; the bar follows it, then the page says what it wrote
    wait_for(lambda: "written (120 points" in text(panel), 60, every=0.1)
    snap = dropdown(panel, "snapshot")
    assert len(snap.options) == 1  # the lists were refreshed before the page said it was written
    assert "Snapshots of big (1)" in text(panel) and "bkg-error" not in text(panel)
    bar = next(b for b in every(panel) if isinstance(b, W.FloatProgress))
    assert bar.layout.display == "none"  # gone once the job ended

    next(t for t in every(panel) if isinstance(t, W.Text) and t.description == "into").value = "big-copy"
    button(panel, "Restore").click()  # a new name: nothing to replace, no question
    wait_for(lambda: "as <code>big-copy</code> (120 points)" in text(panel), 60, every=0.1)
    assert "big-copy" in pick.options

    next(t for t in every(panel) if isinstance(t, W.Text) and t.description == "into").value = ""
    button(panel, "Restore").click()  # into itself: it replaces what is there, so it asks first
    assert "Replace <code>big</code> (120 points)" in text(panel)
    button(panel, "Cancel").click()
    assert "Replace <code>big</code>" not in text(panel)

    button(panel, "Delete snapshot").click()
    assert "Delete snapshot <code>" in text(panel)
    button(panel, "Delete it").click()
    wait_for(lambda: not snap.options, 30, every=0.1)
    assert len(Workbench(gw.url, ADMIN_KEY).collection("big").snapshots()) == 0

    pick.value = "big-copy"
    button(panel, "Drop collection").click()
    assert "Drop <code>big-copy</code> and its 120 points?" in text(panel)
    button(panel, "Drop it").click()
    wait_for(lambda: "big-copy" not in pick.options, 30, every=0.1)
    assert "dropped <code>big-copy</code>" in text(panel)
    assert "big-copy" not in [c["name"] for c in gw.client().get("/api/collections").json()["collections"]]


def test_a_viewer_sees_collections_and_snapshots_and_may_change_nothing(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    gw.client().post("/api/collections/small/snapshots")
    panel = collections_panel(login(user_key(gw, "coll-viewer", ["collections:read", "plugins:read"])))
    pick = dropdown(panel, "collection")
    pick.value = "small"
    assert "Snapshots of small (1)" in text(panel)
    assert all(button(panel, b).disabled for b in ("Snapshot", "Restore", "Delete snapshot", "Drop collection"))
    assert "need the scope collections:write" in text(panel)


def test_a_dropped_collection_comes_back_from_its_snapshot_and_a_taken_name_is_said_first(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    """Found by a review: the page said a dropped collection's snapshots stay, then listed them nowhere; dropping
    the last collection swapped the page for its empty text (the "dropped" line with it); and restoring into
    another collection's name asked "Replace it?" for the gateway to refuse."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "lonely", "dim": DIM}).status_code == 201
    c.put("/api/collections/lonely/points", json={"points": [{"id": 1, "vector": [1, 2, 3, 4]}]}).raise_for_status()
    snap = c.post("/api/collections/lonely/snapshots").json()["id"]
    panel = collections_panel(login(ADMIN_KEY))
    pick = dropdown(panel, "collection")
    pick.value = "lonely"
    next(t for t in every(panel) if isinstance(t, W.Text) and t.description == "into").value = "small"
    button(panel, "Restore").click()
    assert "collection small exists: restore into a new name" in text(panel) and "Replace" not in text(panel)
    next(t for t in every(panel) if isinstance(t, W.Text) and t.description == "into").value = ""

    button(panel, "Drop collection").click()
    button(panel, "Drop it").click()
    wait_for(lambda: "dropped <code>lonely</code>" in text(panel), 30, every=0.1)
    assert "lonely" in pick.options  # still pickable: it has a snapshot
    pick.value = "lonely"
    assert "the collection was dropped" in text(panel)
    assert button(panel, "Snapshot").disabled and button(panel, "Drop collection").disabled
    assert dropdown(panel, "snapshot").value == snap and not button(panel, "Restore").disabled
    button(panel, "Restore").click()  # nothing there to replace: no question
    wait_for(lambda: "as <code>lonely</code> (1 points)" in text(panel), 60, every=0.1)
    assert "lonely" in [x["name"] for x in c.get("/api/collections").json()["collections"]]
    assert not button(panel, "Snapshot").disabled


def test_the_empty_page_keeps_its_widgets_and_what_it_said(tmp_path: Any) -> None:
    """Found by a review: with no collection, each refresh built the page's empty text anew (three widgets more
    every ten seconds, for as long as the page stayed open)."""
    import time

    g = start_gateway(tmp_path / "data", plugins=["sysinfo"])
    try:
        wb = Workbench(g.url, ADMIN_KEY)
        session = Session(wb, wb.me())
        from ipywidgets.widgets.widget import _instances  # every widget this kernel holds

        panel = collections_panel(session, refresh_s=0.05)
        time.sleep(0.5)
        before = len(_instances)
        time.sleep(1.5)  # the page's own timer refreshes it meanwhile, many times over
        assert "No collections yet" in text(panel) and len(_instances) == before
        for stop in session.timers:
            stop.set()
    finally:
        g.stop()
