"""The way into a dashboard: which gateway, a login box, and the page that replaces it once logged in."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client import Workbench
from bkg_kernel.settings import Settings
from bkg_kernel.widgets.primitives import CSS, Session, error_html


def gateway_url() -> str:
    """Return the gateway dashboards talk to: the configured `gateway_url`, else the data dir's gateway."""
    from bkg_kernel.client import gateway_url as data_dir_gateway

    return Settings().gateway_url or data_dir_gateway()


def login_box(on_login: Callable[[Session], None], url: str | None = None) -> W.VBox:
    """Ask for an API key, or a username and password (a session); on success call `on_login(session)`."""
    url = url or gateway_url()
    key = W.Password(placeholder="bkg_…", description="API key", layout=W.Layout(width="420px"))
    user = W.Text(description="or user")
    password = W.Password(description="password")
    button = W.Button(description="Log in", button_style="primary")
    status = W.HTML()

    def go(_: Any = None) -> None:
        status.value = "Logging in…"
        try:
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


def dashboard(
    build: Callable[[Session], W.Widget], *, scope: str | None = None, title: str = "", url: str | None = None
) -> W.VBox:
    """Show a login box that turns into `build(session)` (or a plain refusal when the scope is missing)."""
    root = W.VBox([])
    header = W.HTML(f"{CSS}<h2>{escape(title)}</h2>" if title else CSS)

    def logged_in(session: Session) -> None:
        who = W.HTML(
            f"<p>Logged in as <b>{escape(session.me['username'])}</b> ({escape(str(session.me.get('role')))})</p>"
        )
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
        root.children = [header, who, body]

    hub = hub_session(url)
    if hub is not None:  # under JupyterHub the Hub's login is the login: no second password
        logged_in(hub)
    else:
        root.children = [header, login_box(logged_in, url)]
    return root


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
