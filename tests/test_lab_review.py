"""Found by a review, each with real parts: the lab finds a gateway restarted on another port (a real Jupyter Server
with the extension, a real gateway stopped and started again); in-gateway plugins report the gateway's cpu %, not
the microseconds between two samples; the plugin tab shows CRITICAL (and a plugin's own) log lines, and its uptime moves
(a real JupyterLab in a real Chromium)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gateway_harness import Gateway, http_ok, jupyter_url, start_gateway, wait_for
from helpers import jupyter_lab, lab_page, register_plugins, stop_process
from tornado import websocket

TOKEN = "bkg-review-test-token"


async def first_message(url: str) -> Any:
    """The first message of a WebSocket (None when it was closed instead)."""
    ws = await websocket.websocket_connect(url)
    try:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        return json.loads(msg) if msg is not None else None
    finally:
        ws.close()


def test_the_lab_finds_the_gateway_again_after_it_restarts_on_another_port(tmp_path: Path) -> None:
    """Found by a review: with the gateway found through the data dir (no BKG_GATEWAY_URL), a gateway stopped and
    started again (`bkg serve --port 0`) was a 502 naming the old URL for good, until Jupyter restarted."""
    data = tmp_path / "data"
    g1 = start_gateway(data, plugins=["sysinfo"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BKG_") or k == "BKG_CACHE_DIR"}
    env.update(BKG_DATA_DIR=str(data), BKG_MODEL_DIR=str(tmp_path / "models"), BKG_LAB_START_GATEWAY="0")
    with open(tmp_path / "server.log", "wb") as log:
        lab = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--port=0", "--ip=127.0.0.1",
             f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    g2: Gateway | None = None
    held = socket.socket()  # the old port, bound and not listening: refused, and no `--port 0` gets it again
    try:
        url = jupyter_url(lab, tmp_path / "server.log")
        wait_for(lambda: http_ok(f"{url}/api/status", token=TOKEN), timeout=90, every=0.5)
        c = httpx.Client(base_url=url, params={"token": TOKEN}, timeout=60)
        assert c.get("/bkg/api/api/plugins").status_code == 200
        assert c.get("/bkg/status").json()["gateway"] == g1.url
        g1.stop()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", int(g1.url.rsplit(":", 1)[1])))
        r = c.get("/bkg/api/api/plugins")
        assert r.status_code == 502 and r.json()["error"]["code"] == "gateway_unreachable", r.text
        g2 = start_gateway(data, plugins=["sysinfo"])
        assert g2.url != g1.url
        # the same Jupyter server: REST, status and the live socket all reach the new gateway
        r = wait_for(lambda: (r := c.get("/bkg/api/api/plugins")).status_code == 200 and r, timeout=30)
        assert [p["id"] for p in r.json()["plugins"]] == ["sysinfo"]
        status = c.get("/bkg/status").json()
        assert status["reachable"] is True and status["gateway"] == g2.url, status
        msg = asyncio.run(first_message(url.replace("http://", "ws://") + f"/bkg/ws?token={TOKEN}"))
        assert msg is not None and msg["type"] == "bootstrap", msg
    finally:
        held.close()
        stop_process(lab)
        g1.stop()
        if g2 is not None:
            g2.stop()


def test_every_in_gateway_plugin_reports_the_gateway_s_cpu(tmp_path: Path) -> None:
    """Found by a review: each in-gateway plugin's sample asked the gateway process for its cpu % since the last
    call, so the second one measured the microseconds since the first: 0, or up to 5,744 % on 2 cores."""
    g = start_gateway(tmp_path / "data", plugins=["apikeys", "brainml"])
    done = threading.Event()

    def busy() -> None:  # the gateway at work between samples, listing the plugins as the lab's sidebar does
        with g.client() as c:
            while not done.is_set():
                c.get("/api/plugins").raise_for_status()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    try:
        c = g.client()

        def history() -> Any:
            plugins = c.get("/api/plugins/telemetry/history", params={"minutes": 10}).json()["plugins"]
            return plugins if min(len(p["cpu_percent"]) for p in plugins.values()) >= 6 else None

        plugins = wait_for(history, timeout=120, every=1)
        # listed between samples all along: a list route caches each plugin's numbers for a moment, and a sample
        # took those (the previous round's, for one plugin and not the other) until a sample ended the cache
        assert {p["id"]: p["mode"] for p in c.get("/api/plugins").json()["plugins"]} == {
            "apikeys": "inline", "brainml": "inline"
        }  # fmt: skip
    finally:
        done.set()
        worker.join(30)
        g.stop()
    most = 100.0 * (psutil.cpu_count() or 1) * 1.1
    for pid, columns in plugins.items():
        assert all(0.0 <= v <= most for v in columns["cpu_percent"]), (pid, columns["cpu_percent"])
    # one process, one figure a round (a request for the history between two plugins' samples: one row more)
    a, b = (plugins[pid]["cpu_percent"] for pid in ("apikeys", "brainml"))
    n = min(len(a), len(b))
    assert a[:n] == b[:n], (a, b)
    assert any(v > 0 for v in a[1:n]), a  # the gateway was at work: a figure that could differ, not all zeros


SHOUTY = '''
    import logging

    from bkg_kernel.runtime.contract import Plugin

    logging.addLevelName(25, "NOTICE")


    class Shouty(Plugin):
        """Logs a line at every level when it starts, and one at a level of its own."""

        id = "shouty"
        name = "Shouty"
        version = "0.1.0"
        description = "Logs a line at every level."
        mode = "inline"

        def start(self) -> None:
            for level in ("info", "warning", "error", "critical"):
                getattr(self.log, level)("%s line from shouty", level.upper())
            self.log.log(25, "NOTICE line from shouty")


    PLUGIN = Shouty
'''


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    site = tmp_path_factory.mktemp("site")
    (site / "bkg_shouty.py").write_text(textwrap.dedent(SHOUTY))
    register_plugins(site, "bkg-shouty", {"shouty": "bkg_shouty"})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    g = start_gateway(tmp_path_factory.mktemp("review") / "data", env=env, plugins=["shouty"])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def page(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("reviewlab")
    with jupyter_lab(root, gw.url, TOKEN) as url, lab_page(url, TOKEN) as pg:
        pg.click('tr[data-plugin="shouty"] .bkg-plugin-name', timeout=30_000)
        pg.locator("#bkg-plugin-shouty .bkg-detail-header .bkg-uptime").wait_for(timeout=30_000)
        yield pg


def test_the_plugin_tab_s_uptime_moves(page: Any) -> None:
    """Found by a review: the tab's header drew the uptime on status messages only, so it stood still while the
    sidebar's moved."""
    uptime = page.locator("#bkg-plugin-shouty .bkg-detail-header .bkg-uptime")
    first = uptime.inner_text().strip()
    assert first.startswith("up "), first
    wait_for(lambda: uptime.inner_text().strip() not in (first, "up –"), timeout=30)  # telemetry: every 2 s


def test_the_log_view_shows_critical_and_unknown_levels(page: Any, gw: Gateway) -> None:
    """Found by a review: the log view knew no CRITICAL, and a level it does not know was hidden at every
    minimum level, the lowest included."""
    panel = page.locator("#bkg-plugin-shouty")
    logs = panel.locator(".bkg-logs")
    # from the gateway's ring, the plugin's own level too (the ring's /logs left that out: it came only live)
    wait_for(lambda: "CRITICAL line from shouty" in logs.inner_text(), timeout=30)
    assert "NOTICE line from shouty" in logs.inner_text()
    # live, while the tab is open: the restarted plugin logs it once more
    gw.client().post("/api/plugins/shouty/restart").raise_for_status()
    wait_for(lambda: logs.inner_text().count("NOTICE line from shouty") >= 2, timeout=30)
    minimum = panel.locator("select[aria-label='minimum log level']")
    assert "CRITICAL" in minimum.locator("option").all_inner_texts()
    minimum.select_option("ERROR")
    wait_for(lambda: "WARNING line from shouty" not in logs.inner_text(), timeout=10)
    shown = logs.inner_text()
    assert "CRITICAL line from shouty" in shown and "ERROR line from shouty" in shown
    assert "NOTICE line from shouty" in shown  # a level of the plugin's own: shown, not hidden
    minimum.select_option("CRITICAL")
    wait_for(lambda: "ERROR line from shouty" not in logs.inner_text(), timeout=10)
    assert "CRITICAL line from shouty" in logs.inner_text()
