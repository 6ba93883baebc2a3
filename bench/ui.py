"""UI timings in a real Chromium: opening JupyterLab until the bkg sidebar lists every plugin, next to
JupyterLab's own readiness (its splash screen gone) in the same page loads.

    python bench/ui.py [--runs 5]

Needs /usr/bin/chromium (scripts/bootstrap.sh installs it). The Voila dashboards do not exist yet; their
time-to-interactive row comes with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, free_port, start_gateway, wait_for  # noqa: E402

ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    gw = start_gateway(work / "data")
    ids = [p["id"] for p in gw.client().get("/api/plugins").json()["plugins"]]
    port = free_port()
    env = {**os.environ, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": ADMIN_KEY, "BKG_LAB_START_GATEWAY": "0"}
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=t", f"--ServerApp.root_dir={work}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    ready, sidebar = [], []
    try:
        wait_for(lambda: _up(url), timeout=90, every=0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            for run in range(args.runs + 1):  # the first load warms the server's caches: not counted
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                t0 = time.perf_counter()
                page.goto(f"{url}/lab?token=t")
                page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=60_000)
                t_ready = time.perf_counter() - t0
                page.click('li[data-id="bkg-sidebar"]')
                for pid in ids:
                    page.wait_for_selector(f'tr[data-plugin="{pid}"] .bkg-state-running', timeout=60_000)
                t_sidebar = time.perf_counter() - t0
                if run:
                    ready.append(t_ready)
                    sidebar.append(t_sidebar)
                page.close()
            browser.close()
    finally:
        lab.terminate()
        lab.wait(20)
        gw.stop()
    print(f"{args.runs} page loads, {len(ids)} plugins (median, min - max)")
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| JupyterLab ready (splash gone) | {statistics.median(ready):.2f} ({min(ready):.2f} - {max(ready):.2f}) |")
    print(
        f"| bkg sidebar populated (every plugin row, running) | {statistics.median(sidebar):.2f} "
        f"({min(sidebar):.2f} - {max(sidebar):.2f}) |"
    )
    gap = statistics.median([s - r for s, r in zip(sidebar, ready, strict=True)])
    print(f"| sidebar after JupyterLab ready | {gap:.2f} |")


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/status", params={"token": "t"}, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
