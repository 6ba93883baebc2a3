"""The dashboard panels where a review found them wrong, built in this process with a real gateway session and
inspected without a browser (the widgets' values, options and disabled state are what the page shows): the
llmserver page for a viewer without llm:use, the telemetry's sample count, rotating the key the page is logged in
with, pickers that chose nothing, the overview's gateway uptime, and plugin pages that missed what their own
buttons made."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import ipywidgets as W
import pytest
from gateway_harness import ADMIN_KEY, Gateway, user_key, wait_for, wait_run
from helpers import button, every, notebook, text

from bkg_kernel.client import Workbench
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER
from bkg_kernel.widgets import Session

PLUGINS = ["llmserver", "candle", "brainml"]  # candle embeds for brainml


@pytest.fixture(scope="module")
def viewer_key(gw: Gateway) -> str:
    c = gw.client()
    user = c.post("/admin/users", json={"username": "vera", "role": "viewer"}).json()
    return str(c.post("/admin/keys", json={"name": "vera-key", "user_id": user["id"]}).json()["key"])


def dropdown(panel: W.Widget, label: str) -> list[W.Dropdown]:
    return [d for d in every(panel) if isinstance(d, W.Dropdown) and d.description == label]


def test_a_viewer_sees_llmservers_status_and_why_the_playground_is_hidden(
    login: Callable[[str], Session], viewer_key: str
) -> None:
    """The page let a plugins:read viewer in, then asked /v1/models (llm:use) first and showed only its refusal."""
    from bkg_kernel.widgets import llm_panel

    panel = llm_panel(login(viewer_key))
    shown = text(panel)
    assert "llmserver:" in shown and "bkg-badge" in shown, shown  # its status
    assert button(panel, "Start").disabled  # its actions, as a viewer may use them (not at all)
    assert "need the scope <code>llm:use</code>" in shown and "bkg-error" not in shown, shown
    assert not dropdown(panel, "model")
    admin = llm_panel(login(ADMIN_KEY))  # llm:use: the models and the playground
    (pick,) = dropdown(admin, "model")
    assert pick.value == pick.options[0] and not button(admin, "Send").disabled


def test_rotating_the_key_the_page_is_logged_in_with_keeps_the_page_working(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    from bkg_kernel.widgets import keys_panel

    c = gw.client()
    own = c.post("/admin/keys", json={"name": "ops-key"}).json()  # the admin's, with the admin's scopes
    other = gw.client(own["key"]).post("/admin/keys", json={"name": "other-key"}).json()  # made by it: its to renew
    session = login(own["key"])
    assert session.me["key_id"] == own["id"]
    panel = keys_panel(session)

    button(panel, "Rotate other-key").click()  # someone else's: the page keeps its own secret
    assert session.wb.api_key == own["key"] and "bkg-error" not in text(panel)
    assert httpx.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {other['key']}"}).status_code == 401

    button(panel, "Rotate ops-key").click()
    shown = text(panel)
    new = re.search(r"class='bkg-secret-value' readonly size='60' value='([^']+)'", shown)
    assert new and new.group(1) != own["key"], shown
    assert "bkg-error" not in shown and "invalid" not in shown, shown
    assert "the key this page is logged in with: the page now uses its new secret" in shown, shown
    assert session.wb.api_key == new.group(1) and session.wb.me()["key_id"] == own["id"]
    assert button(panel, "Rotate ops-key") is not None  # the key list came back, not "invalid API key"
    assert httpx.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {own['key']}"}).status_code == 401


def test_the_model_pickers_choose_a_model_and_say_who_may_act(login: Callable[[str], Session], viewer_key: str) -> None:
    """The models page's picker showed blank and Verify said "model 'None' is not registered"."""
    from bkg_kernel.widgets import candle_panel, models_panel

    viewer = login(viewer_key)
    panel = models_panel(viewer)
    (pick,) = dropdown(panel, "model")
    assert pick.options and pick.value == pick.options[0], pick.options
    verify = button(panel, "Verify")
    assert not verify.disabled
    pick.value = DEFAULT_EMBEDDER  # a small one to hash
    verify.click()
    assert f"{DEFAULT_EMBEDDER}: ok" in text(panel), text(panel)

    candle = candle_panel(viewer)
    (model,) = dropdown(candle, "model")
    assert model.value == model.options[0] and DEFAULT_EMBEDDER in model.options
    assert all(button(candle, b).disabled for b in ("Load", "Run", "Quantize"))  # a viewer: no plugins:write


def test_the_jobs_run_picker_chooses_a_run_and_its_buttons_wait_for_one(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    """The run picker stayed blank once runs appeared, and Output / Retry said "no job 'None'"."""
    from bkg_kernel.widgets import jobs_panel

    notebook(gw.data_dir / "notebooks" / "review_ok.ipynb", "n = 2", "print(n * 21)")
    notebook(gw.data_dir / "notebooks" / "review_fails.ipynb", "n = 2", "raise KeyError('no such thing')")
    panel = jobs_panel(login(ADMIN_KEY))
    (picked,) = dropdown(panel, "run")
    actions = [button(panel, b) for b in ("Cancel", "Retry", "Output")]
    assert picked.value is None and all(b.disabled for b in actions)  # no run yet: nothing to act on
    (nb,) = dropdown(panel, "notebook")
    nb.value = "review_ok.ipynb"
    button(panel, "Run").click()  # the form refreshes the runs once it queued one
    run_id = re.search(r"queued (run-\S+?)</p>", text(panel))
    assert run_id, text(panel)
    assert picked.value == run_id.group(1) and not any(b.disabled for b in actions)
    wait_run(gw, run_id.group(1))
    button(panel, "Output").click()
    shown = text(panel)
    assert "'None'" not in shown and "bkg-error" not in shown and "<iframe" in shown, shown

    # a failed run, picked: its failed cell in red; its traceback only when asked for (the first run is picked
    # for whoever opens the page, and a page shows no traceback unasked)
    nb.value = "review_fails.ipynb"
    button(panel, "Run").click()
    failed = re.search(r"queued (run-\S+?)</p>", text(panel))
    assert failed and picked.value == run_id.group(1)  # the choice kept
    wait_run(gw, failed.group(1))
    picked.value = failed.group(1)
    shown = text(panel)
    assert "<p class='bkg-failed'><b>cell 1: KeyError" in shown and "Traceback" not in shown, shown
    trace = next(t for t in every(panel) if isinstance(t, W.ToggleButton))
    assert trace.layout.display != "none"
    trace.value = True
    assert "Traceback" in text(panel) and "KeyError" in text(panel)


def test_the_overviews_gateway_uptime_is_live(login: Callable[[str], Session]) -> None:
    from bkg_kernel.widgets import health_panel

    panel = health_panel(login(ADMIN_KEY))
    first = panel.value
    assert "uptime" in first
    wait_for(lambda: panel.value != first, 60, 0.2)  # refreshed, as the plugin table next to it is
    assert "bkg-error" not in panel.value


def test_candle_s_page_shows_the_plugin_to_a_key_that_may_not_read_the_registry(
    gw: Gateway, login: Callable[[str], Session]
) -> None:
    """Found by a review: the page asks plugins:read, but listed the registry (models:read) first and showed only
    that refusal, not candle's stats, which the key may read."""
    from bkg_kernel.widgets import candle_panel

    panel = candle_panel(login(user_key(gw, "petra", ["plugins:read"])))
    shown = text(panel)
    assert "torch " in shown and " on cpu" in shown, shown  # candle.stats
    assert "models:read" in shown, shown  # and why the model picker is empty
    (model,) = dropdown(panel, "model")
    assert not model.options and all(button(panel, b).disabled for b in ("Load", "Run", "Quantize"))


def test_candle_offers_the_model_its_quantize_button_made(gw: Gateway, login: Callable[[str], Session]) -> None:
    from bkg_kernel.widgets import candle_panel

    panel = candle_panel(login(ADMIN_KEY))
    (model,) = dropdown(panel, "model")
    registered = {m["id"] for m in gw.client().get("/api/models").json()["models"]}
    model.value = DEFAULT_EMBEDDER
    assert not button(panel, "Quantize").disabled
    button(panel, "Quantize").click()  # dynamic-int8, the first method
    assert "bkg-error" not in text(panel), text(panel)
    made = {m["id"] for m in gw.client().get("/api/models").json()["models"]} - registered
    assert len(made) == 1 and made <= set(model.options), (made, model.options)
    assert model.value == DEFAULT_EMBEDDER  # the choice kept


def test_brainml_shows_new_collections_and_query_counts(gw: Gateway, login: Callable[[str], Session]) -> None:
    from bkg_kernel.widgets import brain_panel
    from bkg_kernel.widgets.brain import STATS_COLUMNS
    from bkg_kernel.widgets.primitives import table

    session = login(ADMIN_KEY)
    wb = session.wb
    panel = brain_panel(session)
    assert "No indexed collections yet" in text(panel)
    docs = [{"text": "The sun is a star.", "metadata": {"label": "space"}},
            {"text": "Bread is baked in an oven.", "metadata": {"label": "food"}}]  # fmt: skip
    wb.brain.index("notes", docs)
    wait_for(lambda: dropdown(panel, "collection"), 60, 0.2)  # indexed from a notebook: shown without a reload
    search = button(panel, "Search")
    query = next(t for t in every(panel) if isinstance(t, W.Text) and t.description == "query")
    query.value = "sun"
    search.click()
    listing = next(h for h in every(panel) if isinstance(h, W.HTML) and "embed_model" in h.value)
    stats = wb.brain.stats()
    assert [s["queries"] for s in stats] == [1] and listing.value == table(stats, STATS_COLUMNS)  # the query counted

    wb.brain.index("more", docs)  # meanwhile, from a notebook
    search.click()
    for pick in dropdown(panel, "collection"):  # the playground's and the trainer's
        assert set(pick.options) == {"notes", "more"} and pick.value == "notes", pick.options


def test_telemetry_counts_each_round_of_samples_once(gw: Gateway) -> None:
    """ "History: N samples per plugin" grew by one per plugin for each round the gateway sampled (last here: it
    loads Panel, after which the plugin pages above would draw their telemetry too)."""
    from bkg_kernel import pictures

    wb = Workbench(gw.url, ADMIN_KEY)
    tv = pictures.telemetry_view(wb)
    tv.stop()  # refreshed by hand below
    assert len(tv.sources) >= 2, list(tv.sources)
    before, last = tv.samples, tv.last_t
    sizes = {p: len(src.data["t"]) for p, src in tv.sources.items()}

    def sampled_again() -> bool:
        r = wb.call("GET", "/api/plugins/telemetry/history", params={"minutes": 5})["plugins"]
        return all(any(t > last for t in r[p]["t"]) for p in tv.sources)

    wait_for(sampled_again, 60, 0.5)
    tv.refresh()
    added = [len(src.data["t"]) - sizes[p] for p, src in tv.sources.items()]
    assert min(added) >= 1
    assert tv.samples == before + max(added), (before, added, tv.samples)
    assert f"History: {tv.samples} samples per plugin" in tv.status.object
