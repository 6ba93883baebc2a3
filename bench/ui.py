"""UI timings in a real Chromium: opening JupyterLab until the bkg sidebar lists every plugin, next to
JupyterLab's own readiness (its splash screen gone) in the same page loads.

    python bench/ui.py [--runs 5]

Also each Voila dashboard (served as `bkg dashboards` serves it: preheated kernels): from opening the page to
its login box taking input (interactive), and to the logged-in page showing its panels. Then the pictures: from
logging in to each Panel view drawn and answering (the explorer of a 20,000-point collection, the overview's
telemetry, brainml's retrieval view), and the explorer's frame time while panning 20,000 points (requestAnimationFrame
intervals during a drag), next to the same Bokeh plot of the same points on its own (no Panel, no Voila).
Needs /usr/bin/chromium (scripts/bootstrap.sh installs it).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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
    atexit.register(shutil.rmtree, work, True)  # what it made goes when the bench ends
    gw = start_gateway(work / "data")
    ids = [p["id"] for p in gw.client().get("/api/plugins").json()["plugins"]]
    fill(gw)
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
            pictures = bench_pictures(browser, vurl, args.runs, work, gw)
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
    print()
    print("| picture | logged in to drawn and answering, s (median, min - max) |")
    print("|---|---|")
    for name, xs in pictures.items():
        if name.startswith("frame"):
            continue
        print(f"| {name} | {statistics.median(xs):.2f} ({min(xs):.2f} - {max(xs):.2f}) |")
    print()
    print("| panning 20,000 points | frame time p50, ms | p95, ms | frames |")
    print("|---|---|---|---|")
    for name in ("frame: bkg explorer (Panel in Voila)", "frame: the same Bokeh plot alone"):
        f = pictures[name]
        print(
            f"| {name.removeprefix('frame: ')} | {np.percentile(f, 50):.1f} | {np.percentile(f, 95):.1f} | {len(f)} |"
        )
    alone = np.percentile(pictures["frame: the same Bokeh plot alone"], 50)
    ours = np.percentile(pictures["frame: bkg explorer (Panel in Voila)"], 50)
    print(f"\nexplorer / plain Bokeh frame time (p50): {ours / alone:.2f}x")


N_POINTS = 20_000
PAN_JS = """async (box) => {
  const times = [];
  let last = performance.now(), on = true;
  const tick = (t) => { times.push(t - last); last = t; if (on) requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  await new Promise((r) => setTimeout(r, 2500));
  on = false;
  return times.slice(2);
}"""


def fill(gw: Any) -> None:
    """A 20,000-point collection of five clusters (32-d), for the explorer."""
    c = gw.client()
    c.post("/api/collections", json={"name": "points", "dim": 32})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32)) * 3
    for a in range(0, N_POINTS, 2500):
        pts = [
            {"id": i, "vector": (centres[i % 5] + rng.normal(size=32)).round(4).tolist(),
             "payload": {"label": f"c{i % 5}"}, "text": f"point {i}"}
            for i in range(a, a + 2500)
        ]  # fmt: skip
        c.put("/api/collections/points/points", json={"points": pts}, timeout=60)
    topics = {"space": "stars planets comets orbit telescope", "cooking": "dough sauce oven garlic whisk",
              "sport": "football marathon tennis cyclist goal"}  # fmt: skip
    docs = [
        {"id": f"{t}-{i}", "text": f"{t} note {i}: " + " ".join(np.random.default_rng(i).permutation(w.split())),
         "metadata": {"label": t}}
        for t, w in topics.items() for i in range(8)
    ]  # fmt: skip
    c.post("/api/plugins/brainml/invoke/brainml.index", json={"collection": "notes", "documents": docs}, timeout=120)


def pan(page: Any) -> list[float]:
    """Drag the first canvas for 2.5 s and return the frame intervals (ms) the page drew meanwhile."""
    box = page.locator("canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    frames = page.evaluate_handle(PAN_JS, box)
    for i in range(60):  # 2.4 s of drag, 40 ms apart
        dx = 120 * np.sin(i / 6)
        page.mouse.move(box["x"] + box["width"] / 2 + dx, box["y"] + box["height"] / 2 + dx / 2)
        page.wait_for_timeout(40)
    page.mouse.up()
    return list(frames.json_value())


def plain_bokeh(work: Path, gw: Any) -> Path:
    """The same 20,000 points as one standalone Bokeh HTML file (inline resources): the peer for frame time."""
    from bokeh.embed import file_html
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    m = gw.client().post("/api/collections/points/map", json={"sample": N_POINTS}).json()
    f = figure(width=850, height=520, tools="pan,wheel_zoom,box_select,lasso_select,tap,reset", output_backend="webgl")
    f.scatter(m["x"], m["y"], size=4, alpha=0.7, line_color=None)
    path = work / "plain.html"
    path.write_text(file_html(f, INLINE, "plain"))
    return path


def bench_pictures(browser: Any, vurl: str, runs: int, work: Path, gw: Any) -> dict[str, list[float]]:
    """Time each new view from login to drawn and answering; the explorer's and plain Bokeh's pan frame times."""
    out: dict[str, list[float]] = {}

    def login(name: str) -> tuple[Any, float]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{vurl}/voila/render/{name}.ipynb")
        field = page.locator("input[type=password]").first
        field.wait_for(timeout=90_000)
        field.fill(ADMIN_KEY)
        t0 = time.perf_counter()
        page.locator("button:has-text('Log in')").click()
        return page, t0

    for _ in range(runs):
        page, t0 = login("explorer")
        page.locator("text=a sample of 5.0k of 20.0k points").wait_for(timeout=90_000)
        page.locator("canvas").first.wait_for(timeout=60_000)
        out.setdefault("explorer (5,000 of 20,000 points)", []).append(time.perf_counter() - t0)
        sample = page.locator(".bkg-sample input").first
        sample.fill(str(N_POINTS))
        sample.press("Enter")
        t1 = time.perf_counter()
        page.locator("button:has-text('Draw')").click()
        page.locator("text=all 20.0k points").wait_for(timeout=90_000)
        page.locator("canvas").first.wait_for(timeout=60_000)
        out.setdefault("explorer: Draw all 20,000 points (to the status line saying so)", []).append(
            time.perf_counter() - t1
        )
        page.wait_for_timeout(1000)
        out.setdefault("frame: bkg explorer (Panel in Voila)", []).extend(pan(page))
        page.close()
        time.sleep(2)
        page, _ = login("brainml")
        page.locator(".widget-text:has-text('query') input").wait_for(timeout=60_000)
        page.locator(".widget-text:has-text('query') input").fill("planets orbit")
        t0 = time.perf_counter()
        page.locator("button:has-text('Search')").click()
        page.locator("text=Each bar's label is the result's rank").wait_for(timeout=60_000)
        out.setdefault("brainml: Search to the retrieval view drawn", []).append(time.perf_counter() - t0)
        page.locator(".widget-text:has-text('label field') input").fill("label")
        t0 = time.perf_counter()
        page.locator("button:has-text('Train')").click()
        page.locator("text=for always guessing the commonest label").wait_for(timeout=120_000)
        out.setdefault("brainml: Train (logistic, 24 chunks) to the report drawn", []).append(time.perf_counter() - t0)
        page.close()
        time.sleep(2)
        page, t0 = login("overview")
        page.locator("text=/History: [0-9]+ samples/").first.wait_for(timeout=90_000)
        out.setdefault("overview telemetry (history drawn)", []).append(time.perf_counter() - t0)
        page.close()
        time.sleep(2)
    plain = plain_bokeh(work, gw)
    for _ in range(runs):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(plain.as_uri())
        page.locator("canvas").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        out.setdefault("frame: the same Bokeh plot alone", []).extend(pan(page))
        page.close()
    return out


if __name__ == "__main__":
    main()
