"""UI timings in a real Chromium: opening JupyterLab until the bkg sidebar lists every plugin, next to
JupyterLab's own readiness (its splash screen gone) in the same page loads.

    python bench/ui.py [--runs 5]

Also each Voila dashboard (served as `bkg dashboards` serves it: preheated kernels): from opening the page to
its login box taking input (interactive), and to the logged-in page showing its panels.
Needs /usr/bin/chromium (scripts/bootstrap.sh installs it).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, CHROMIUM, CHROMIUM_ARGS, free_port, http_ok, start_gateway, wait_for  # noqa: E402

from bkg_kernel.cli import dashboards_cmd, dashboards_env  # noqa: E402

DASHBOARDS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "dashboards").glob("*.ipynb"))


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
    vport = free_port()
    voila = subprocess.Popen(
        dashboards_cmd(vport, Path(__file__).resolve().parent.parent / "dashboards"),
        env=dashboards_env(gw.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    vurl = f"http://127.0.0.1:{vport}"
    ready, sidebar = [], []
    dash: dict[str, list[tuple[float, float]]] = {}
    try:
        wait_for(lambda: http_ok(f"{url}/api/status", token="t"), timeout=90, every=0.5)
        wait_for(lambda: http_ok(vurl), timeout=90, every=0.5)
        time.sleep(5)  # let the preheated kernels finish their pre-run
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
            for _ in range(args.runs):
                for name in DASHBOARDS:
                    page = browser.new_page(viewport={"width": 1300, "height": 900})
                    t0 = time.perf_counter()
                    page.goto(f"{vurl}/voila/render/{name}.ipynb")
                    field = page.locator("input[type=password]").first
                    field.wait_for(timeout=60_000)
                    field.fill(ADMIN_KEY)
                    t_interactive = time.perf_counter() - t0
                    page.locator("button:has-text('Log in')").click()
                    page.locator("text=Logged in as").wait_for(timeout=60_000)
                    dash.setdefault(name, []).append((t_interactive, time.perf_counter() - t0))
                    page.close()
                    time.sleep(2)  # Voila refills the pool with a fresh preheated kernel
            browser.close()
    finally:
        voila.terminate()
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
    print()
    print("| dashboard | open to interactive (login box takes input), s | open to logged-in page, s |")
    print("|---|---|---|")
    for name, xs in dash.items():
        print(f"| {name} | {statistics.median(x[0] for x in xs):.2f} | {statistics.median(x[1] for x in xs):.2f} |")


if __name__ == "__main__":
    main()
