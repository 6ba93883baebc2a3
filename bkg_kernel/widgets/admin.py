"""Who may do what: API keys (created once, rotated, revoked), users and their roles, and the apikeys
plugin's page with the roles and their scopes."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, ask_first, error_html, table

KEY_COLUMNS = ["name", "prefix", "state", "user_id", "scopes", "created_at", "last_used_at", "expires_at"]


def keys_panel(session: Session) -> W.VBox:
    """Create API keys (the secret shown once, with a copy button), rotate them, revoke them after confirming."""
    listing = W.VBox([])
    secret = W.HTML()
    name = W.Text(description="name")
    scopes = W.SelectMultiple(
        options=sorted(session.me.get("scopes", [])), description="scopes", rows=6, layout=W.Layout(width="420px")
    )
    days = W.BoundedFloatText(value=90, min=0, max=3650, description="expires (days)")
    create = W.Button(description="Create key", button_style="primary")
    message = W.HTML()

    def show_secret(rec: dict[str, Any], verb: str) -> None:
        token = escape(rec["key"])
        secret.value = (
            f"<div class='bkg-secret'><p>{verb} <b>{escape(rec['name'])}</b>. Copy the secret now: it is shown "
            f"this once.</p><input class='bkg-secret-value' readonly size='60' value='{token}'> "
            f"<button onclick=\"navigator.clipboard.writeText('{token}')\">Copy</button></div>"
        )

    def key_row(k: dict[str, Any]) -> W.HBox:
        rotate = W.Button(description=f"Rotate {k['name']}")
        revoke = W.Button(description=f"Revoke {k['name']}", button_style="danger")
        box = W.HBox([rotate, revoke])

        def do_rotate(_: Any) -> None:
            try:
                rec = session.wb.call("POST", f"/admin/keys/{k['id']}/rotate")
                show_secret(rec, "Rotated")
                message.value = ""
                if k["id"] == session.me.get("key_id"):  # the old secret stopped working, this page's included
                    session.use_secret(rec["key"])
                    message.value = (
                        f"<p>{escape(k['name'])} is the key this page is logged in with: the page now uses its "
                        "new secret.</p>"
                    )
            except Exception as exc:  # noqa: BLE001
                message.value = error_html(exc)
            refresh()

        def do_revoke() -> None:
            try:
                session.wb.call("POST", f"/admin/keys/{k['id']}/revoke")
                message.value = f"<p>Revoked {escape(k['name'])}.</p>"
            except Exception as exc:  # noqa: BLE001
                message.value = error_html(exc)
            refresh()

        rotate.on_click(do_rotate)
        revoke.on_click(
            lambda _: ask_first(
                box, f"Revoke <b>{escape(k['name'])}</b> for good? ", f"Yes, revoke {k['name']}", do_revoke, refresh
            )
        )
        return box

    def refresh() -> None:
        try:
            keys = session.wb.keys()
        except Exception as exc:  # noqa: BLE001
            listing.children = [W.HTML(error_html(exc))]
            return
        active = [key_row(k) for k in keys if k.get("state") == "active"]
        listing.children = [W.HTML(table(keys, KEY_COLUMNS)), *active]

    def do_create(_: Any) -> None:
        body: dict[str, Any] = {"name": name.value.strip()}
        if scopes.value:
            body["scopes"] = list(scopes.value)
        if days.value:
            body["expires_in_days"] = days.value
        try:
            rec = session.wb.call("POST", "/admin/keys", json=body)
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)
            return
        message.value = ""
        name.value = ""
        show_secret(rec, "Created")
        refresh()

    create.on_click(do_create)
    refresh()
    return W.VBox([W.HTML("<h3>Create a key</h3>"), name, scopes, days, create, secret, message,
                   W.HTML("<h3>Keys</h3>"), listing])  # fmt: skip


def users_panel(session: Session) -> W.VBox:
    """List users with their role; create one."""
    out = W.HTML()
    username = W.Text(description="username")
    roles = [r["name"] for r in session.wb.call("GET", "/admin/roles")["roles"]]
    role = W.Dropdown(options=roles, value="viewer" if "viewer" in roles else roles[0], description="role")
    password = W.Password(description="password")
    create = W.Button(description="Create user", button_style="primary")
    message = W.HTML()

    def refresh() -> None:
        out.value = table(session.wb.users(), ["username", "role", "disabled", "created_at"])

    def do_create(_: Any) -> None:
        try:
            session.wb.create_user(username.value.strip(), role.value, password.value or None)
            message.value = f"<p>Created {escape(username.value)}.</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)
        refresh()

    create.on_click(do_create)
    refresh()
    return W.VBox([out, W.HTML("<h3>New user</h3>"), username, role, password, create, message])


def apikeys_panel(session: Session) -> W.VBox:
    """Show the apikeys plugin's status with the roles and their scopes."""
    roles = session.wb.call("GET", "/admin/roles")["roles"] if session.can("admin:users") else []
    return W.VBox([plugin_actions(session, "apikeys"), W.HTML(table(roles, ["name", "scopes", "description"]))])
