"""The way into a dashboard: which gateway, a login box, and the page that replaces it once logged in."""

from __future__ import annotations

import os
from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client import Workbench
from bkg_kernel.client.workbench import vet_gateway
from bkg_kernel.settings import Settings, gateway_url
from bkg_kernel.widgets.primitives import CSS, Session, badge, error_html


def login_box(on_login: Callable[[Session], None], url: str | None = None) -> W.VBox:
    """Ask for an API key, or a username and password (a session); on success call `on_login(session)`."""
    found = url is None  # a URL the settings found is checked before a key or a password goes there
    url = url or gateway_url()
    key = W.Password(placeholder="bkg_…", description="API key", layout=W.Layout(width="420px"))
    user = W.Text(description="or user")
    password = W.Password(description="password")
    button = W.Button(description="Log in", button_style="primary")
    status = W.HTML()

    def go(_: Any = None) -> None:
        status.value = "Logging in…"
        try:
            if found:
                vet_gateway(url, Settings())
            token = key.value.strip()
            if not token:
                body = {"username": user.value, "password": password.value}
                token = Workbench(url, None).call("POST", "/auth/login", json=body)["token"]
            wb = Workbench(url, token)
            me = wb.me()
        except Exception as exc:  # noqa: BLE001 - shown in the box
            status.value = error_html(exc)
            return
        status.value = ""
        on_login(Session(wb, me))

    button.on_click(go)
    return W.VBox(
        [
            W.HTML(f"{CSS}<h3>bkg login</h3><p>Gateway: <code>{escape(url)}</code></p>"),
            key,
            user,
            password,
            button,
            status,
        ],
        layout=W.Layout(max_width="600px"),
    )


DASHBOARDS = [  # (notebook in dashboards/, name in the header)
    ("overview", "overview"), ("collections", "collections"), ("explorer", "explorer"), ("brainml", "brainml"),
    ("llmserver", "llmserver"),
    ("candle", "candle"), ("rustyface", "rustyface"), ("repoagent", "repoagent"), ("jobs", "jobs"),
    ("models", "models"), ("settings", "settings"), ("api_keys", "API keys"), ("users", "users"),
    ("apikeys", "apikeys plugin"),
]  # fmt: skip


def nav(here: str = "") -> str:
    """Return the header every dashboard shares: links to the others (Voila serves them side by side)."""
    links = "".join(
        f"<a href='{name}.ipynb' class='{'bkg-here' if name == here else ''}' data-dashboard='{name}'>"
        f"{escape(label)}</a>"
        for name, label in DASHBOARDS
    )
    return f"<nav class='bkg-nav'><span class='bkg-brand'>bkg</span>{links}</nav>"


def whoami(session: Session) -> str:
    """Return who is logged in and the gateway's state, for the header."""
    try:
        state = str(session.wb.health().get("status", "?"))
    except Exception:  # noqa: BLE001 - the header says the gateway cannot be reached
        state = "unreachable"
    colour = {"ok": "running", "starting": "starting", "degraded": "degraded"}.get(state, "error")
    return (
        f"<p class='bkg-who'>Logged in as <b>{escape(session.me['username'])}</b> "
        f"({escape(str(session.me.get('role')))}) · gateway <code>{escape(session.wb.url)}</code> "
        f"{badge(colour, state)}</p>"
    )


def dashboard(
    build: Callable[[Session], W.Widget],
    *,
    scope: str | None = None,
    title: str = "",
    url: str | None = None,
    page: str = "",
    pictures: bool = False,
) -> W.VBox:
    """Show the shared header and a login box that turns into `build(session)` (or a plain refusal when the scope
    is missing). `page` names this dashboard in the header; `pictures` loads Panel now, while the cell runs, for
    the pictures the page draws."""
    root = W.VBox([])
    header = W.HTML(f"{CSS}{nav(page)}" + (f"<h2>{escape(title)}</h2>" if title else ""))
    if pictures:
        from bkg_kernel.pictures.loader import import_panel, use_panel

        where = url or gateway_url()
        import_panel(where)  # in a preheated kernel, before the page is even asked for
        use_panel(where, dark=page_is_dark())

    def logged_in(session: Session) -> None:
        who = W.HTML(whoami(session))
        if scope and not session.can(scope):
            body: W.Widget = W.HTML(
                f"<p class='bkg-error bkg-refused'>This page needs the scope <code>{escape(scope)}</code>; "
                f"your login has {escape(', '.join(session.me.get('scopes', [])))}.</p>"
            )
        else:
            try:
                body = build(session)
            except Exception as exc:  # noqa: BLE001 - a page that cannot load says why
                body = W.HTML(error_html(exc))
        if isinstance(body, W.DOMWidget):
            body.add_class("bkg-page-body")  # what the page shows once logged in (its tests look for it)
        root.children = [header, who, body]

    hub = hub_session(url)
    if hub is not None:  # under JupyterHub the Hub's login is the login: no second password
        logged_in(hub)
    else:
        root.children = [header, login_box(logged_in, url)]
    return root


def page_is_dark() -> bool:
    """Return whether the page asked for Voila's dark theme (`?theme=dark`). A kernel Voila preheated learns its
    request (and the query string) only once someone opens the page: it waits for that here."""
    if os.environ.get("VOILA_PREHEAT") == "True":
        from voila.utils import wait_for_request

        wait_for_request()
    return "theme=dark" in os.environ.get("QUERY_STRING", "")


def hub_session(url: str | None = None) -> Session | None:
    """The session of the JupyterHub user this kernel runs for (their Hub token), if it runs under a Hub."""
    s = Settings()
    if not (s.hub_user and s.hub_api_token) or s.api_key:
        return None
    from bkg_kernel.client.workbench import hub_gateway

    try:
        wb = Workbench(hub_gateway(s, url), s.hub_api_token)  # the Hub token goes only to the Hub's bkg service
        return Session(wb, wb.me())
    except Exception:  # the gateway does not trust this Hub: ask as usual
        return None
