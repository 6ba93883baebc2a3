"""The team set-up, measured: time from `bkg hub` to a logged-in user seeing the bkg sidebar in their JupyterLab,
and the gateway's memory with one user connected against two (one shared gateway serves both).

    python bench/hub.py [--plugins sysinfo] [--keep]

Starts `bkg hub --dummy-auth --developer dev` on free ports in a temp dir (the shipped deploy/jupyterhub_config.py),
then drives Debian's Chromium: log in as `dev` (the Hub spawns dev's server), open the bkg sidebar, wait for a
plugin row (the lab extension forwarding to the gateway as dev). Memory is the gateway process's RSS (psutil), and
with its plugin workers, after one user's lab is open and after a second user's is too. Each lab's sidebar polls
the gateway and holds a live WebSocket through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from gateway_harness import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def rss(pid: int) -> tuple[float, float]:
    """(the gateway's RSS, with its child processes), in MB."""
    p = psutil.Process(pid)
    own = p.memory_info().rss
    kids = sum(c.memory_info().rss for c in p.children(recursive=True) if c.is_running())
    return own / 2**20, (own + kids) / 2**20


def open_lab(browser: object, url: str, name: str) -> tuple[object, float]:
    """Log `name` in through the Hub and wait for the bkg sidebar to list a plugin; return (page, seconds)."""
    t0 = time.perf_counter()
    page = browser.new_page(viewport={"width": 1300, "height": 900})  # type: ignore[attr-defined]
    page.goto(url + "/hub/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", "any-password")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(f"**/user/{name}/lab**", timeout=180_000)
    page.locator('li[data-id="bkg-sidebar"]').wait_for(timeout=180_000)
    if not page.locator("#bkg-sidebar").is_visible():
        page.click('li[data-id="bkg-sidebar"]')
    page.locator("tr[data-plugin]").first.wait_for(timeout=180_000)
    return page, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plugins", default="", help="the gateway's plugins (default: all, as `bkg hub` runs them)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bkg-bench-hub-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"BKG_MODEL_DIR": str(ROOT / "models"), "BKG_HUB_NOTEBOOK_DIR": str(ROOT)}
    if args.plugins:
        env["BKG_HUB_PLUGINS"] = args.plugins
    cmd = [sys.executable, "-m", "bkg_kernel.cli", "hub", "--port", str(port), "--data-dir", str(tmp / "data"),
           "--state-dir", str(tmp / "state"), "--dummy-auth", "--developer", "dev", "--developer", "ana"]  # fmt: skip
    t0 = time.perf_counter()
    with open(tmp / "hub.log", "wb") as log:
        hub = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        while True:
            try:
                if httpx.get(url + "/services/bkg/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if hub.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit((tmp / "hub.log").read_text()[-3000:])
            time.sleep(0.2)
        t_service = time.perf_counter() - t0
        gw_pid = json.loads((tmp / "data" / "gateway.json").read_text())["pid"]
        idle = rss(gw_pid)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            _, t_first = open_lab(browser, url, "dev")
            t_total = time.perf_counter() - t0
            time.sleep(5)  # the sidebar's polling and live events settle
            one = rss(gw_pid)
            _, t_second = open_lab(browser, url, "ana")
            time.sleep(5)
            two = rss(gw_pid)
            browser.close()
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    plugins = args.plugins or "all"
    print(f"\n`bkg hub` (plugins: {plugins}) to a logged-in user seeing the bkg sidebar\n")
    print("| step | seconds |\n|---|---|")
    print(f"| `bkg hub` → the gateway answers at /services/bkg/ | {t_service:.1f} |")
    print(f"| login → dev's server spawned → sidebar lists plugins | {t_first:.1f} |")
    print(f"| **`bkg hub` → dev sees the bkg sidebar** | **{t_total:.1f}** |")
    print(f"| a second user (ana), login → sidebar | {t_second:.1f} |")
    print("\nGateway memory (RSS, MB)\n")
    print("| connected | gateway | gateway + plugin workers |\n|---|---|---|")
    for label, (own, total) in (("no user", idle), ("one user (dev)", one), ("two users (dev, ana)", two)):
        print(f"| {label} | {own:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
