"""The Voila dashboards in a real Chromium, served the way `bkg dashboards` serves them, against a real
gateway: the overview shows every plugin; an API key is created and its secret shown once; revoking asks
first and then the key stops working; a viewer-scoped login cannot see the keys page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, dashboard_login, start_gateway, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "ui"
VOILA_LOG = ARTIFACTS / "voila-test_dashboards.log"  # written by the voila fixture (conftest.py)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("dash") / "data")
    yield g
    g.stop()


def open_logged_in(browser: Any, voila: str, page_name: str, key: str) -> Any:
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    dashboard_login(page, voila, page_name, key, VOILA_LOG)
    return page


def test_overview_shows_every_plugin(browser: Any, voila: str, gw: Gateway) -> None:
    page = open_logged_in(browser, voila, "overview", ADMIN_KEY)
    for p in gw.client().get("/api/plugins").json()["plugins"]:
        page.locator(f"span[data-plugin='{p['id']}']").wait_for(timeout=30_000)
    html = page.content()
    assert "Gateway" in html and "Recent audit events" in html and "bkg-badge" in html
    assert "Traceback" not in html and "from bkg_kernel import widgets" not in html  # no tracebacks, no sources
    page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)
    page.close()


def test_api_keys_create_once_and_revoke_after_confirming(browser: Any, voila: str, gw: Gateway) -> None:
    page = open_logged_in(browser, voila, "api_keys", ADMIN_KEY)
    page.locator(".widget-text input").first.fill("ui-key")
    page.locator("button:has-text('Create key')").click()
    secret_box = page.locator(".bkg-secret-value")
    secret_box.wait_for(timeout=30_000)
    secret = secret_box.input_value()
    assert secret.startswith("bkg_")
    assert httpx.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    page.screenshot(path=str(ARTIFACTS / "dashboard-key-created.png"), full_page=True)
    page.close()

    # shown once: a fresh visit lists the key but never its secret
    page = open_logged_in(browser, voila, "api_keys", ADMIN_KEY)
    page.locator("button:has-text('Revoke ui-key')").wait_for(timeout=30_000)
    assert secret not in page.content()
    page.locator("button:has-text('Revoke ui-key')").click()
    assert httpx.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    page.locator("button:has-text('Yes, revoke ui-key')").click()  # the confirmation
    page.locator("text=Revoked ui-key").wait_for(timeout=30_000)
    assert httpx.get(f"{gw.url}/auth/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    page.close()


def test_a_viewer_cannot_see_the_keys_page(browser: Any, voila: str, gw: Gateway) -> None:
    c = gw.client()
    user = c.post("/admin/users", json={"username": "vera", "role": "viewer"}).json()
    viewer_key = c.post("/admin/keys", json={"name": "vera-key", "user_id": user["id"]}).json()["key"]
    page = open_logged_in(browser, voila, "api_keys", viewer_key)
    page.locator(".bkg-refused").wait_for(timeout=30_000)
    html = page.content()
    assert "admin:keys" in html and "vera-key" not in html and "Create key" not in html
    page.close()
    page = open_logged_in(browser, voila, "overview", viewer_key)  # what a viewer may see, it sees
    page.locator("span[data-plugin='sysinfo']").wait_for(timeout=30_000)
    assert "need the scope" in page.content()  # the audit part says why it is hidden
    page.close()


def test_repoagent_adds_indexes_and_answers_with_citations(browser: Any, voila: str, gw: Gateway) -> None:
    repo = gw.data_dir / "repos" / "mini"  # under the default repo root, <data_dir>/repos
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "shapes.py").write_text(
        'def circle_area(radius: float) -> float:\n    """The area of a circle."""\n    return 3.14159 * radius ** 2\n'
    )
    page = open_logged_in(browser, voila, "repoagent", ADMIN_KEY)
    page.locator("input[placeholder='my-repo']").fill("mini")
    page.locator("input[placeholder='a folder under a repo root']").fill("mini")
    page.locator("button:has-text('Add workspace')").click()
    page.locator("text=Added workspace").wait_for(timeout=30_000)
    page.locator("button:has-text('Index')").click()
    page.locator("text=Indexed 1 changed files").wait_for(timeout=120_000)
    page.locator("input[placeholder='Where is X done, and how?']").fill("What does circle_area compute?")
    page.locator("button:has-text('Ask')").click()
    page.locator("summary:has-text('shapes.py:1-3')").wait_for(timeout=120_000)  # the citation, checked
    page.locator("summary:has-text('shapes.py:1-3')").click()
    assert "3.14159 * radius ** 2" in page.content()
    page.screenshot(path=str(ARTIFACTS / "dashboard-repoagent-answer.png"), full_page=True)
    page.close()


def test_jobs_page_runs_a_notebook_and_names_the_failed_cell(browser: Any, voila: str, gw: Gateway) -> None:
    from test_jobs import notebook

    root = gw.data_dir / "notebooks"  # a default job root
    notebook(root / "dash_ok.ipynb", "n = 2", "print(n * 21)")
    notebook(root / "dash_fails.ipynb", "n = 2", "a = n", "raise KeyError('no such thing')")
    page = open_logged_in(browser, voila, "jobs", ADMIN_KEY)
    pick = page.locator(".widget-dropdown:has-text('notebook') select")
    for name in ("dash_ok.ipynb", "dash_fails.ipynb"):
        pick.select_option(name)
        page.locator("button:has-text('Run')").first.click()
        page.locator("text=queued run-").wait_for(timeout=30_000)
    page.locator("td:has-text('cell 2: KeyError')").wait_for(timeout=120_000)
    page.locator("td:has-text('dash_ok.ipynb') >> xpath=.. >> text=succeeded").wait_for(timeout=120_000)
    assert not page.locator("p.bkg-error").all_inner_texts()
    page.screenshot(path=str(ARTIFACTS / "dashboard-jobs-runs.png"), full_page=True)
    page.close()


@pytest.mark.parametrize(
    "name",
    ["overview", "api_keys", "users", "models", "jobs", "settings", "llmserver", "candle", "rustyface", "brainml",
     "apikeys", "repoagent", "explorer", "collections"],
)  # fmt: skip
def test_every_dashboard_renders_for_an_admin(browser: Any, voila: str, name: str) -> None:
    page = open_logged_in(browser, voila, name, ADMIN_KEY)
    body = page.locator(".bkg-page-body").first  # the page itself, past the login: it must show something
    body.wait_for(timeout=60_000)
    shown = wait_for(lambda: len(text := body.inner_text().strip()) > 30 and text, 30, 0.2)
    assert "This page needs the scope" not in shown, shown
    html = page.content()
    errors = page.locator("p.bkg-error").all_inner_texts()
    assert not errors and "Traceback" not in html, errors
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)
    page.close()
