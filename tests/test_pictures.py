"""Pictures: the gateway's side (Panel's files served locally, collection maps, explained scores, the telemetry
ring, tokens per key and day) and the Panel views in a real Chromium, served the way `bkg dashboards` serves them
against a real gateway: the explorer of a 20,000-point collection (a canvas, a hover tooltip, a box selection that
lists points, a click that lists neighbours), telemetry history right after opening, brainml's retrieval view and
training report, the dark theme; no request of any page leaves 127.0.0.1. Screenshots: test-artifacts/ui/."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway, dashboard_login, dashboards, start_gateway, wait_for

from bkg_kernel.gateway.routes.assets import panel_dist
from bkg_kernel.models.defaults import DEFAULT_LLM

# Panel 1.x warns of what 2.0 removes (a widget's `name`, `button_type`): the pictures must not lean on it
pytestmark = pytest.mark.filterwarnings("error::PendingDeprecationWarning:bkg_kernel.*")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "ui"
VOILA_LOG = ARTIFACTS / "voila-test_pictures.log"  # written by the voila fixture (conftest.py)
PREHEAT = ["explorer", "overview", "brainml", "rustyface"]  # the dashboards this module opens
LABELS = ["alpha", "beta", "gamma", "delta", "epsilon"]
N_POINTS = 20_000
DOCS = {
    "space": ["The sun is a star at the centre of the solar system.", "Mars is a cold red planet with thin air.",
              "A comet's tail points away from the sun.", "Telescopes gather light from distant galaxies."],
    "cooking": ["Knead the bread dough for ten minutes.", "Simmer the tomato sauce with garlic and basil.",
                "Whisk eggs and sugar until pale for the cake.", "Roast the vegetables in a hot oven."],
    "sport": ["The striker scored twice in the football final.", "She ran the marathon in under three hours.",
              "The tennis match went to a fifth set.", "The cyclist won the mountain stage."],
}  # fmt: skip


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("pictures") / "data")
    c = g.client()
    assert c.post("/api/collections", json={"name": "points", "dim": 32}).status_code == 201
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(LABELS), 32)) * 3
    for a in range(0, N_POINTS, 2500):
        pts = [
            {"id": i, "vector": (centres[i % 5] + rng.normal(size=32)).round(4).tolist(),
             "payload": {"label": LABELS[i % 5], "n": i}, "text": f"point {i}, a {LABELS[i % 5]}"}
            for i in range(a, a + 2500)
        ]  # fmt: skip
        assert c.put("/api/collections/points/points", json={"points": pts}, timeout=60).status_code == 200
    docs = [
        {"id": f"{label}-{i}", "text": text, "metadata": {"label": label}}
        for label, texts in DOCS.items()
        for i, text in enumerate(texts)
    ]
    r = c.post(
        "/api/plugins/brainml/invoke/brainml.index", json={"collection": "notes", "documents": docs}, timeout=120
    )
    assert r.status_code == 200, r.text
    ask = {"model": DEFAULT_LLM, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    assert c.post("/v1/chat/completions", json=ask, timeout=120).status_code == 200  # tokens for the usage chart
    yield g
    g.stop()


class Page:
    """A dashboard page, logged in, with every request it made."""

    def __init__(self, browser: Any, voila: str, name: str, query: str = "") -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        dashboard_login(self.page, voila, name, ADMIN_KEY, VOILA_LOG, query=query, box_s=90, page_s=60)

    def left_the_machine(self) -> list[str]:
        """Every request that went anywhere but 127.0.0.1."""
        return [u for u in self.requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]

    def close(self, shot: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
        away = self.left_the_machine()
        self.page.close()
        assert not away, f"requests that left 127.0.0.1: {away}"


# -- the gateway's side --------------------------------------------------------------------------------------------
def test_panel_files_are_served_by_the_gateway(gw: Gateway) -> None:
    found = panel_dist()
    assert found is not None
    version = found[0]
    r = httpx.get(f"{gw.url}/static/panel/{version}/dist/css/loading.css")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*" and ".pn-loading" in r.text
    assert httpx.get(f"{gw.url}/static/panel/{version}/dist/../__init__.py").status_code == 404
    assert httpx.get(f"{gw.url}/static/panel/{version}/dist/%2e%2e/__init__.py").status_code == 404
    assert httpx.get(f"{gw.url}/static/panel/0.0.1/dist/css/loading.css").status_code == 404
    for hostile in ("%00", "a" * 5000, "css/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"):
        r = httpx.get(f"{gw.url}/static/panel/{version}/dist/{hostile}")
        assert r.status_code == 404 and r.json()["error"]["field"] == "path", (hostile, r.status_code)


def test_a_map_is_a_repeatable_sample_with_pca_coordinates(gw: Gateway) -> None:
    c = gw.client()
    a = c.post("/api/collections/points/map", json={"sample": 3000}).json()
    b = c.post("/api/collections/points/map", json={"sample": 3000}).json()
    assert a["total"] == N_POINTS and a["sampled"] == 3000 and a["ids"] == b["ids"] and a["x"] == b["x"]
    assert len(a["x"]) == len(a["y"]) == len(a["payloads"]) == len(a["texts"]) == 3000
    assert a["explained_variance"][0] >= a["explained_variance"][1] > 0.05  # five clusters: two strong axes
    # the map separates the clusters: points of one label sit together
    xy, labels = np.c_[a["x"], a["y"]], np.array([p["label"] for p in a["payloads"]])
    centres = {lab: xy[labels == lab].mean(axis=0) for lab in LABELS}
    spread = np.mean([np.linalg.norm(xy[labels == lab] - centres[lab], axis=1).mean() for lab in LABELS])
    apart = np.mean([np.linalg.norm(centres[p] - centres[q]) for p in LABELS for q in LABELS if p < q])
    assert apart > 2 * spread
    f = c.post("/api/collections/points/map", json={"sample": 50_000, "filter": {"label": "beta"}}).json()
    assert f["total"] == f["sampled"] == N_POINTS // 5 and {p["label"] for p in f["payloads"]} == {"beta"}
    u = c.post("/api/collections/points/map", json={"sample": 500, "components": 50}).json()
    assert len(base64.b64decode(u["reduced"])) == 500 * 50 * 4
    bad = c.post("/api/collections/points/map", json={"sample": 0})
    assert bad.status_code == 422 and "sample" in bad.text
    bad = c.post("/api/collections/points/map", json={"filter": {"label": {"$nope": 1}}})
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("filter"), bad.text
    assert c.post("/api/collections/nope/map", json={}).status_code == 404


def test_explained_scores_place_each_hit_in_both_rankings(gw: Gateway) -> None:
    r = gw.client().post(
        "/api/plugins/brainml/invoke/brainml.query",
        json={"collection": "notes", "query": "red planet Mars", "mode": "hybrid", "top_k": 5, "explain": True},
    )
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["doc_id"] == "space-1" and top["text_rank"] == 1 and top["vector_rank"] is not None
    assert top["text_score"] > 0 and top["vector_score"] > 0
    plain = gw.client().post(
        "/api/plugins/brainml/invoke/brainml.query", json={"collection": "notes", "query": "red planet Mars"}
    )
    assert "vector_rank" not in plain.json()["results"][0]


def test_the_gateway_keeps_an_hour_of_telemetry(gw: Gateway) -> None:
    c = gw.client()
    c.get("/api/plugins/sysinfo/health")
    wait_for(lambda: len(c.get("/api/plugins/telemetry/history").json()["plugins"]["sysinfo"]["t"]) >= 2, timeout=30)
    h = c.get("/api/plugins/telemetry/history", params={"minutes": 60}).json()
    cols = h["plugins"]["sysinfo"]
    assert set(cols) == {"t", "cpu_percent", "rss_bytes", "latency_p50_ms", "latency_p95_ms", "requests_per_min"}
    assert cols["t"] == sorted(cols["t"]) and all(v > 0 for v in cols["rss_bytes"])
    assert c.get("/api/plugins/telemetry/history", params={"minutes": 61}).status_code == 422
    usage = c.get("/admin/usage", params={"group_by": "key_day"}).json()["usage"]
    assert usage[0]["username"] == "admin" and usage[0]["day"] and usage[0]["total_tokens"] > 0


# -- the views in Chromium -----------------------------------------------------------------------------------------
def _hover_until_tooltip(page: Any, box: dict[str, float]) -> tuple[float, float]:
    """Move over the plot until a point's tooltip shows; return where."""
    for fy in np.linspace(0.1, 0.9, 17):
        for fx in np.linspace(0.1, 0.9, 17):
            x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
            page.mouse.move(x, y)
            if page.locator(".bk-Tooltip").count() and page.locator(".bk-Tooltip").first.is_visible():
                return x, y
    raise AssertionError("no tooltip anywhere over the map")


def test_the_explorer_draws_20000_points_with_hover_selection_and_neighbours(browser: Any, voila: str) -> None:
    p = Page(browser, voila, "explorer")
    page = p.page
    page.locator("text=a sample of 5.0k of 20.0k points").wait_for(timeout=60_000)  # the largest collection
    sample = page.locator(".bkg-sample input").first
    sample.fill("20000")
    sample.press("Enter")
    page.locator("button:has-text('Draw')").click()
    t0 = time.monotonic()
    page.locator("text=all 20.0k points").wait_for(timeout=90_000)
    page.locator(".bk-Canvas canvas, canvas").first.wait_for(timeout=30_000)
    drawn_s = time.monotonic() - t0
    page.wait_for_timeout(1000)
    box = page.locator("canvas").first.bounding_box()
    x, y = _hover_until_tooltip(page, box)
    page.locator(".bk-Tooltip >> text=/point [0-9]+, an? /").first.wait_for(timeout=5_000)  # the text of a point
    page.screenshot(path=str(ARTIFACTS / "explorer-hover.png"))
    # a click on a point: its neighbours
    page.mouse.click(x, y)
    picked = page.locator("text=/^[0-9]+ selected/").first  # the kernel heard the click (a busy machine: seconds)
    picked.wait_for(timeout=60_000)
    assert picked.inner_text().startswith("1 selected"), picked.inner_text()
    page.locator("text=Nearest neighbours of").wait_for(timeout=60_000)
    assert page.locator(".bkg-map-neighbours tr").count() == 11  # a header and ten neighbours
    # a box selection lists points
    page.locator(".bk-tool-icon-box-select").first.click()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.05)  # right of the legend
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.95, steps=8)
    page.mouse.up()
    many = page.locator("text=/^([2-9]|[1-9][0-9]+) selected/").first  # more than the one clicked before
    many.wait_for(timeout=30_000)
    n = int(many.inner_text().split()[0])
    assert n > 1 and page.locator(".bkg-map-selection tr").count() == min(n, 50) + 1
    print(f"explorer: 20,000 points drawn {drawn_s:.1f} s after Draw")
    p.close("explorer-20000")


def test_the_overview_draws_telemetry_history_at_once(browser: Any, voila: str) -> None:
    p = Page(browser, voila, "overview")
    status = p.page.locator("text=/History: [0-9]+ samples/").first
    status.wait_for(timeout=60_000)
    samples = int(status.inner_text().split("History: ")[1].split()[0])
    assert samples >= 2, status.inner_text()  # the ring's history, not an empty box
    assert p.page.locator("canvas").count() >= 6  # four telemetry charts, store size, tokens per key and day
    p.close("pictures-overview")


def test_brainml_draws_retrieval_scores_and_a_training_report(browser: Any, voila: str) -> None:
    p = Page(browser, voila, "brainml")
    page = p.page
    page.locator(".widget-text:has-text('query') input").fill("red planet Mars")
    page.locator("button:has-text('Search')").click()
    page.locator("text=Each bar's label is the result's rank").wait_for(timeout=60_000)
    page.locator(".widget-text:has-text('label field') input").fill("label")
    page.locator("button:has-text('Train')").click()
    report = page.locator("text=for always guessing the commonest label")
    report.wait_for(timeout=120_000)
    report.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "pictures-training-report.png"))
    assert page.locator("canvas").count() >= 6  # plugin telemetry (4), retrieval (3), training (2 or 3)
    assert not page.locator("p.bkg-error").all_inner_texts()
    p.close("pictures-brainml")


def test_the_dark_theme_is_dark(browser: Any, voila: str) -> None:
    p = Page(browser, voila, "overview", "?theme=dark")
    p.page.locator("text=/History: [0-9]+ samples/").first.wait_for(timeout=60_000)
    bg = p.page.evaluate("getComputedStyle(document.body).backgroundColor")
    ink = p.page.evaluate("getComputedStyle(document.querySelector('.bkg-who')).color")

    def luminance(css: str) -> float:
        r, g, b = (int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

    assert luminance(bg) < 0.3 and luminance(ink) > 0.6, (bg, ink)
    # the charts follow: a telemetry chart's area is dark too (its background is the page's)
    import io

    from PIL import Image

    chart = p.page.locator("canvas").first
    chart.scroll_into_view_if_needed()
    p.page.wait_for_timeout(500)
    pixels = np.asarray(Image.open(io.BytesIO(chart.screenshot())).convert("L"), dtype=float) / 255
    assert np.median(pixels) < 0.3, np.median(pixels)
    p.close("pictures-overview-dark")


def test_an_empty_store_says_what_to_do(tmp_path: Path, browser: Any) -> None:
    g = start_gateway(tmp_path / "data", plugins=["sysinfo"])
    try:
        with dashboards(g.url, preheat=["explorer"]) as url:
            p = Page(browser, url, "explorer")
            p.page.locator("text=No collections yet").wait_for(timeout=60_000)
            assert "wb.brain.index(" in p.page.content()
            assert p.page.locator("a[data-dashboard='overview']").count() == 1  # the shared header
            p.close("pictures-explorer-empty")
    finally:
        g.stop()


def test_rustyface_draws_thumbnails_per_subject_and_candidates(browser: Any, voila: str, tmp_path: Path) -> None:
    import insightface
    from PIL import Image

    images = Path(insightface.__file__).parent / "data" / "images"
    tom = tmp_path / "tom.png"
    Image.open(images / "Tom_Hanks_54745.png").convert("RGB").save(tom)
    p = Page(browser, voila, "rustyface")
    page = p.page
    page.locator("input[placeholder='name (new ones are created)']").fill("people")
    page.locator(".widget-text:has-text('subject') input").fill("tom")
    with page.expect_file_chooser() as chooser:
        page.locator("button:has-text('Enroll photos')").click()
    chooser.value.set_files(str(tom))
    page.locator("text=Enrolled 1 face(s)").wait_for(timeout=60_000)
    thumb = page.locator(".bkg-faces [data-subject='tom'] img").first
    thumb.wait_for(timeout=30_000)
    assert thumb.evaluate("i => i.naturalWidth") == 72  # a real decoded JPEG thumbnail
    with page.expect_file_chooser() as chooser:
        page.locator("button:has-text('Identify a photo')").click()
    chooser.value.set_files(str(tom))
    caption = page.locator("figcaption:has-text('tom')")
    caption.wait_for(timeout=60_000)  # the photo, boxed and named
    caption.scroll_into_view_if_needed()
    page.locator("canvas").nth(4).wait_for(timeout=30_000)  # the plugin's four telemetry charts, then candidates
    assert not page.locator("p.bkg-error").all_inner_texts()
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "pictures-rustyface-identify.png"))
    p.close("pictures-rustyface")


def test_colours_follow_the_field_kind() -> None:
    from bkg_kernel.pictures.explorer import colour_column, default_colour

    payloads = [{"label": ["a", "b", "c"][i % 3], "n": i, "tags": [i]} for i in range(300)] + [{}]
    colour, label, how = colour_column(payloads, "label")
    assert how == "categories" and len(set(colour[:300])) == 3 and label[-1] == "(none)"
    colour, _, how = colour_column(payloads, "n")
    assert how == "scale" and colour[0] != colour[299]
    assert colour_column(payloads, None)[2] == "none"
    assert default_colour(payloads, ["label", "n", "tags"]) == "label"


def test_a_numeric_field_spanning_the_float_range_is_coloured(gw: Gateway) -> None:
    """Found by a review: values from -1e308 to 1e308 overflowed `hi - lo` to inf, every colour index to NaN, and
    the explorer raised (in a notebook) or kept its old colours without a word (on the dashboard)."""
    from bokeh.palettes import Viridis256

    from bkg_kernel.client import Workbench
    from bkg_kernel.pictures.explorer import Explorer, colour_column

    values = [(-1) ** i * 1e308 * ((i + 1) / 31) for i in range(30)]
    colour, _, how = colour_column([{"v": v} for v in [*values, 10**400, -(10**400)]], "v")
    low, high = values.index(min(values)), values.index(max(values))
    assert how == "scale" and colour[low] == Viridis256[0] and colour[high] == Viridis256[255]
    assert colour[30] == Viridis256[255] and colour[31] == Viridis256[0]  # past the float range: the ends
    c = gw.client()
    assert c.post("/api/collections", json={"name": "overflow", "dim": 4}).status_code == 201
    pts = [{"id": i, "vector": [1.0, float(i), 0.5, -1.0], "payload": {"v": v}} for i, v in enumerate(values)]
    assert c.put("/api/collections/overflow/points", json={"points": pts}).status_code == 200
    ex = Explorer(Workbench(gw.url, ADMIN_KEY), "overflow", color="v")
    assert "bkg-error" not in ex.status.object and len(set(ex.source.data["colour"])) > 10, ex.status.object


def test_umap_lays_out_the_clusters_in_the_kernel(gw: Gateway) -> None:
    from bkg_kernel.client import Workbench
    from bkg_kernel.pictures.explorer import Explorer

    ex = Explorer(Workbench(gw.url, ADMIN_KEY), "points", method="umap", sample=600, color="label")
    d = ex.data
    assert d["sampled"] == 600 and len(d["x"]) == 600 and "reduced" not in d
    xy, labels = np.c_[d["x"], d["y"]], np.array([p["label"] for p in d["payloads"]])
    inside = np.mean([np.linalg.norm(xy[labels == lab] - xy[labels == lab].mean(0), axis=1).mean() for lab in LABELS])
    centres = [xy[labels == lab].mean(0) for lab in LABELS]
    apart = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]])
    assert apart > 2 * inside  # UMAP keeps the five clusters apart
    assert ex.color.value == "label" and "UMAP" in ex.status.object


def test_telemetry_times_are_moments_in_utc_as_bokeh_shows_them() -> None:
    """Bokeh shows a datetime axis in UTC: naive local times were shown as if UTC (the server's wall clock, folded
    back when the clocks went back); now the moments themselves, and the axis says UTC."""
    from datetime import UTC, datetime

    from bkg_kernel.pictures.telemetry import _x

    assert _x([0.0, 3600.0]) == [datetime(1970, 1, 1, 0, tzinfo=UTC), datetime(1970, 1, 1, 1, tzinfo=UTC)]
