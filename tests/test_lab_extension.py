"""The JupyterLab extension in a real Chromium against a real `jupyter lab` and a real gateway on 127.0.0.1:
the sidebar lists the plugins, a stop through the UI changes the badge without a reload, an invalid setting
is shown on its field, the log view receives a new line live, and the chat panel streams an answer.
Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gateway_harness import (
    Gateway,
    free_port,
    http_ok,
    jupyter_url,
    start_gateway,
    wait_for,
)
from helpers import jupyter_lab, lab_page

from bkg_kernel.kernels import LAB_KERNEL_MANAGER

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
TOKEN = "bkg-ui-test-token"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("lab") / "data")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def labroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("labroot")


@pytest.fixture(scope="module")
def lab(gw: Gateway, labroot: Path) -> Iterator[str]:
    dashboards = {
        "BKG_DASHBOARDS_URL": "http://127.0.0.1:8866",
        "BKG_DASHBOARDS_DIR": str(Path(__file__).parent.parent / "dashboards"),
    }
    # as `bkg run` starts it: kernels over Unix sockets
    with jupyter_lab(labroot, gw.url, TOKEN, LAB_KERNEL_MANAGER, env=dashboards) as url:
        yield url


@pytest.fixture(scope="module")
def page(lab: str) -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with lab_page(lab, TOKEN) as pg:
        yield pg


def badge(page: Any, plugin: str) -> Any:
    return page.locator(f'tr[data-plugin="{plugin}"] .bkg-badge')


def test_server_extension_forwards_under_jupyter_auth(lab: str, gw: Gateway) -> None:
    r = httpx.get(f"{lab}/bkg/api/api/plugins", params={"token": TOKEN})
    assert r.status_code == 200 and {p["id"] for p in r.json()["plugins"]} >= {"sysinfo", "apikeys", "brainml"}
    assert httpx.get(f"{lab}/bkg/api/api/plugins").status_code == 403  # no Jupyter login, no gateway
    r = httpx.get(f"{lab}/bkg/api/api/collections/nope", params={"token": TOKEN})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]  # the gateway's error, unchanged
    status = httpx.get(f"{lab}/bkg/status", params={"token": TOKEN}).json()
    assert status["reachable"] is True and status["gateway"] == gw.url


def test_sidebar_lists_plugins_and_stop_changes_the_badge_live(page: Any, gw: Gateway) -> None:
    ids = [p["id"] for p in gw.client().get("/api/plugins").json()["plugins"]]
    for pid in ids:
        page.wait_for_selector(f'tr[data-plugin="{pid}"]', timeout=30_000)
    wait_for(lambda: badge(page, "sysinfo").inner_text() == "running", timeout=60)
    page.screenshot(path=str(ARTIFACTS / "sidebar.png"))
    page.click('tr[data-plugin="sysinfo"] .bkg-stop')
    page.click(".jp-Dialog .jp-mod-accept")  # the confirmation
    wait_for(lambda: badge(page, "sysinfo").inner_text() == "stopped", timeout=30)
    assert gw.client().get("/api/plugins/sysinfo/status").json()["state"] == "stopped"
    page.screenshot(path=str(ARTIFACTS / "sidebar-stopped.png"))
    page.click('tr[data-plugin="sysinfo"] .bkg-start')  # start needs no confirmation
    wait_for(lambda: badge(page, "sysinfo").inner_text() == "running", timeout=30)
    # a stop the user cancels does nothing
    page.click('tr[data-plugin="sysinfo"] .bkg-stop')
    page.click(".jp-Dialog .jp-mod-reject")
    time.sleep(1)
    assert badge(page, "sysinfo").inner_text() == "running"


def test_detail_panel_settings_error_and_live_log(page: Any, gw: Gateway) -> None:
    page.click('tr[data-plugin="sysinfo"] .bkg-plugin-name')
    panel = page.locator("#bkg-plugin-sysinfo")
    field = panel.locator("#root_request_timeout")  # JupyterLab's form component (rjsf) from the JSON Schema
    field.wait_for(timeout=30_000)
    assert "sysinfo.facts" in panel.locator(".bkg-caps").inner_text()
    # a nullable setting is one field (empty: null), not an "option 1 / option 2" selector
    assert panel.locator("#root_memory_limit_mb").count() == 1 and "option 2" not in panel.inner_text()
    # the sidebar at its default width shows every plugin's memory (it reflows instead of cutting columns); its
    # rows are drawn again on every telemetry event, so a row measured mid-redraw has no box yet: measured again

    def memory_fits() -> bool:
        side = page.locator(".bkg-sidebar").bounding_box()
        mem = page.locator('tr[data-plugin="sysinfo"] .bkg-memory').bounding_box()
        return mem is not None and side is not None and mem["x"] + mem["width"] <= side["x"] + side["width"] + 1

    wait_for(memory_fits, timeout=15)
    field.fill("-5")
    group = panel.locator(".form-group:has(#root_request_timeout)").first
    wait_for(lambda: "must be > 0" in group.inner_text(), timeout=15)  # on the field, as you type
    panel.locator(".bkg-save").click()
    wait_for(lambda: "Not saved" in panel.locator(".bkg-form-status").inner_text(), timeout=15)
    assert gw.client().get("/api/plugins/sysinfo/config").json()["config"]["request_timeout"] == 30.0  # unchanged
    page.screenshot(path=str(ARTIFACTS / "settings-error.png"))
    panel.locator(".bkg-revert").click()
    wait_for(lambda: panel.locator("#root_request_timeout").input_value() == "30", timeout=10)
    # a valid change saves, and the gateway has it
    panel.locator("#root_max_queue").fill("32")
    panel.locator(".bkg-save").click()
    wait_for(lambda: "Saved" in panel.locator(".bkg-form-status").inner_text(), timeout=30)
    assert gw.client().get("/api/plugins/sysinfo/config").json()["config"]["max_queue"] == 32

    before = panel.locator(".bkg-log-line").count()
    gw.client().post("/api/plugins/sysinfo/restart").raise_for_status()  # logs lines while the panel is open
    wait_for(lambda: panel.locator(".bkg-log-line").count() > before, timeout=30)
    page.screenshot(path=str(ARTIFACTS / "detail-log.png"))


def test_chat_panel_streams_an_answer(page: Any) -> None:
    page.keyboard.press("Control+Shift+C")
    page.fill(".lm-CommandPalette-input", "bkg: Chat")
    page.keyboard.press("Enter")
    chat = page.locator("#bkg-chat")
    chat.locator("textarea").wait_for(timeout=30_000)
    wait_for(lambda: chat.locator(".bkg-chat-model option").count() > 0, timeout=30)
    # count how many times the answer text changes while it arrives
    page.evaluate(
        """() => {
        window.__bkgUpdates = 0;
        new MutationObserver(() => { window.__bkgUpdates += 1; })
          .observe(document.querySelector('#bkg-chat .bkg-chat-log'),
                   {subtree: true, childList: true, characterData: true});
    }"""
    )
    chat.locator("textarea").fill("Name three colours.")
    chat.locator("textarea").press("Enter")
    answer = chat.locator(".bkg-chat-assistant .bkg-chat-text").last
    wait_for(lambda: chat.locator(".bkg-chat-stop").is_disabled() and answer.inner_text().strip() != "", timeout=120)
    assert page.evaluate("window.__bkgUpdates") > 3, "the answer arrived in one piece, not streamed"
    page.screenshot(path=str(ARTIFACTS / "chat.png"))


def test_launcher_offers_every_dashboard(page: Any, lab: str) -> None:
    names = sorted(p.stem for p in (Path(__file__).parent.parent / "dashboards").glob("*.ipynb"))
    info = httpx.get(f"{lab}/bkg/dashboards", params={"token": TOKEN}).json()
    assert info["dashboards"] == names and info["url"] == "http://127.0.0.1:8866"
    page.keyboard.press("Control+Shift+C")
    page.fill(".lm-CommandPalette-input", "Dashboard: ")
    items = page.locator(".lm-CommandPalette-item:has-text('Dashboard: ')")
    wait_for(lambda: items.count() >= len(names), timeout=30)
    page.keyboard.press("Escape")


def test_sidebar_reconnects_after_the_gateway_restarts(page: Any, gw: Gateway) -> None:
    """The gateway goes away: the sidebar says so; a gateway comes back on the same address: the sidebar is
    live again by itself (no reload), and a stop made through the API shows up in it."""
    port = int(gw.url.rsplit(":", 1)[1])
    gw.stop()
    banner = page.locator(".bkg-banner")
    wait_for(lambda: "reconnecting" in banner.inner_text(), timeout=30)
    g2 = start_gateway(gw.data_dir, port=port)
    try:
        wait_for(lambda: badge(page, "sysinfo").inner_text() == "running" and not banner.is_visible(), timeout=60)
        g2.client().post("/api/plugins/sysinfo/stop").raise_for_status()
        wait_for(lambda: badge(page, "sysinfo").inner_text() == "stopped", timeout=30)
    finally:
        gw.proc = g2.proc  # the module fixture stops whichever gateway runs now


def test_server_extension_starts_a_gateway_when_none_runs(tmp_path: Path) -> None:
    """No BKG_GATEWAY_URL: the extension finds the data dir's gateway and, when none answers, starts one, and keeps
    it as `bkg run` does: killed, it is started again at its address; stopped cleanly, it is left stopped."""
    import json
    import signal

    data, gport = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BKG_") or k in ("BKG_CACHE_DIR",)}
    env.update(BKG_DATA_DIR=str(data), BKG_PORT=str(gport), BKG_MODEL_DIR=str(tmp_path / "models"))
    with open(tmp_path / "lab.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--port=0", "--ip=127.0.0.1",
             f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = jupyter_url(proc, tmp_path / "lab.log")
        wait_for(lambda: http_ok(f"{url}/api/status", token=TOKEN), timeout=90, every=0.5)
        r = httpx.get(f"{url}/bkg/api/api/plugins", params={"token": TOKEN}, timeout=120)
        assert r.status_code == 200 and r.json()["plugins"], r.text
        state = json.loads((data / "gateway.json").read_text())
        assert state["url"].endswith(f":{gport}")
        status = httpx.get(f"{url}/bkg/status", params={"token": TOKEN}).json()
        assert status["reachable"] is True

        # the gateway it started dies (SIGKILL: killed, as by the OOM killer): started again where it was
        os.kill(state["pid"], signal.SIGKILL)

        def again() -> Any:
            now = json.loads((data / "gateway.json").read_text()) if (data / "gateway.json").exists() else {}
            if now.get("pid") in (None, state["pid"]):
                return None
            r = httpx.get(f"{url}/bkg/api/api/plugins", params={"token": TOKEN}, timeout=60)
            return now if r.status_code == 200 else None

        restarted = wait_for(again, timeout=120, every=1)
        assert restarted["url"] == state["url"], restarted
        # stopped cleanly (SIGTERM, as `kill` or a service manager): left stopped
        os.kill(restarted["pid"], signal.SIGTERM)
        wait_for(lambda: _ended(restarted["pid"]), timeout=60, every=0.5)
        time.sleep(3)  # the keeper looks every second: a restart would have begun
        r = httpx.get(f"{url}/bkg/api/api/plugins", params={"token": TOKEN}, timeout=60)
        assert r.status_code == 502, r.text
        assert (
            not (data / "gateway.json").exists()
            or json.loads((data / "gateway.json").read_text())["pid"] == (restarted["pid"])
        )
    finally:
        proc.terminate()
        proc.wait(20)
        if (data / "gateway.json").exists():
            os.kill(int(json.loads((data / "gateway.json").read_text())["pid"]), signal.SIGTERM)


def _ended(pid: int) -> bool:
    """Whether process `pid` has ended (gone, or a zombie its parent has yet to reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_notebook_explores_a_collection_offline(page: Any, lab: str, labroot: Path, gw: Gateway) -> None:
    import json

    import numpy as np

    c = gw.client()
    c.post("/api/collections", json={"name": "nbpoints", "dim": 8})
    rng = np.random.default_rng(1)
    pts = [
        {"id": i, "vector": rng.normal(size=8).round(3).tolist(), "payload": {"label": "ab"[i % 2]}, "text": f"p{i}"}
        for i in range(500)
    ]
    assert c.put("/api/collections/nbpoints/points", json={"points": pts}).status_code == 200
    code = (
        "import os\nfrom bkg_kernel.client import Workbench\n"
        "wb = Workbench(os.environ['BKG_GATEWAY_URL'], os.environ['BKG_API_KEY'])\n"
        "wb.collection('nbpoints').explore(color='label')"
    )
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
                   "source": code}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }  # fmt: skip
    (labroot / "explore.ipynb").write_text(json.dumps(nb))
    nbpage = page.context.browser.new_page(viewport={"width": 1400, "height": 900})
    requests: list[str] = []
    nbpage.on("request", lambda r: requests.append(r.url))
    nbpage.goto(f"{lab}/lab/tree/explore.ipynb?token={TOKEN}")
    nbpage.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    nbpage.locator("text=Python 3 (ipykernel) | Idle").wait_for(timeout=90_000)  # the kernel is up
    nbpage.locator(".jp-Notebook .jp-Cell").first.click()
    nbpage.keyboard.press("Shift+Enter")
    nbpage.locator(".jp-OutputArea canvas").first.wait_for(timeout=120_000)  # the map, drawn in the notebook
    nbpage.wait_for_timeout(1500)
    nbpage.locator("text=all 500 points").first.wait_for(timeout=30_000)  # the status line, from the gateway
    nbpage.screenshot(path=str(ARTIFACTS / "lab-notebook-explore.png"))
    away = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    nbpage.close()
    assert not away, f"requests that left 127.0.0.1: {away}"
