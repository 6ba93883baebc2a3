"""Running the workbench: every plugin live, one plugin's start / stop / restart and its settings, gateway
health, background jobs, recent audit events, and the operator's front page made of them."""

from __future__ import annotations

from collections import deque
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.display import fmt_bytes, fmt_count, fmt_duration
from bkg_kernel.errors import BkgError
from bkg_kernel.widgets.primitives import Session, ask_first, badge, error_html, sparkline, table
from bkg_kernel.widgets.schema_form import SchemaForm

PLUGIN_COLUMNS = ["plugin", "status", "uptime", "memory", "memory (2 min)", "requests", "req/min", "errors", "p50"]


def plugins_panel(session: Session, refresh_s: float = 2.0) -> W.VBox:
    """Show every plugin: status, uptime, memory, requests, errors, p50 latency; live, with memory sparklines."""
    out = W.HTML()
    history: dict[str, deque[float]] = {}
    try:  # the gateway's telemetry ring: the sparklines start with the last two minutes, not an empty box
        past = session.wb.call("GET", "/api/plugins/telemetry/history", params={"minutes": 2})["plugins"]
        for pid, cols in past.items():
            history[pid] = deque((float(v or 0) for v in cols["rss_bytes"]), maxlen=60)
    except Exception:  # noqa: BLE001, S110 - an older gateway: the sparklines fill as the page polls
        pass

    def row(p: dict[str, Any]) -> dict[str, Any]:
        t = p["telemetry"]
        h = history.setdefault(p["id"], deque(maxlen=60))
        h.append(float(t.get("rss_bytes") or 0))
        return {
            "plugin": f"<span data-plugin='{escape(p['id'])}'>{escape(p['name'])}</span>",
            "status": badge(p["state"]),
            "uptime": fmt_duration(p["uptime_s"]) if p["uptime_s"] else "–",
            "memory": fmt_bytes(t.get("rss_bytes")),
            "memory (2 min)": sparkline(list(h)),
            "requests": fmt_count(t.get("requests", 0)),
            "req/min": fmt_count(t.get("requests_per_min", 0)),
            "errors": fmt_count(t.get("errors", 0)),
            "p50": fmt_duration(t["latency_p50_ms"] / 1000) if t.get("latency_p50_ms") is not None else "–",
        }

    def render() -> None:
        try:
            plugins = session.wb.call("GET", "/api/plugins")["plugins"]
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)
            return
        out.value = table([row(p) for p in plugins], PLUGIN_COLUMNS, raw=("plugin", "status", "memory (2 min)"))

    render()
    session.every(refresh_s, render)
    return W.VBox([W.HTML("<h3>Plugins</h3>"), out])


def plugin_actions(session: Session, plugin_id: str) -> W.VBox:
    """Show one plugin's status with start / stop / restart (stop and restart ask first)."""
    status = W.HTML()
    confirm = W.HBox([])

    def render() -> None:
        try:
            s = session.wb.plugin(plugin_id).status()
            status.value = f"<p>{escape(plugin_id)}: {badge(s['state'])} {escape(s.get('reason') or '')}</p>"
        except Exception as exc:  # noqa: BLE001
            status.value = error_html(exc)

    def act(action: str) -> None:
        try:
            getattr(session.wb.plugin(plugin_id), action)()
        except Exception as exc:  # noqa: BLE001
            status.value = error_html(exc)
            return
        confirm.children = []
        render()

    def ask(action: str) -> None:
        ask_first(confirm, f"{action.capitalize()} {escape(plugin_id)}? ", f"Yes, {action}", lambda: act(action))

    buttons = []
    for action in ("start", "stop", "restart"):
        b = W.Button(description=action.capitalize(), disabled=not session.can("plugins:write"))
        b.on_click(lambda _, a=action: act(a) if a == "start" else ask(a))
        buttons.append(b)
    render()
    session.every(2.0, render)
    from bkg_kernel.widgets.pictures import telemetry

    return W.VBox([status, W.HBox(buttons), confirm, telemetry(session, [plugin_id])])


def settings_panel(session: Session) -> W.VBox:
    """Edit a plugin's settings in a form built from its JSON Schema; save (a 422 marks its field) or revert."""
    plugins = [p["id"] for p in session.wb.call("GET", "/api/plugins")["plugins"]]
    pick = W.Dropdown(options=plugins, description="plugin")
    body = W.VBox([])
    save = W.Button(description="Save", button_style="primary", disabled=True)
    revert = W.Button(description="Revert", disabled=True)
    status = W.HTML()
    form = SchemaForm({}, {})
    saved: dict[str, Any] = {}

    def say(text: str, error: bool = False) -> None:
        status.value = f"<p class='bkg-error'>{escape(text)}</p>" if error else f"<p>{escape(text)}</p>"

    def load(_: Any = None) -> None:
        nonlocal form, saved
        status.value = ""
        try:
            r = session.wb.call("GET", f"/api/plugins/{pick.value}/config")
        except Exception as exc:  # noqa: BLE001
            form, body.children = SchemaForm({}, {}), [W.HTML(error_html(exc))]
        else:
            saved = r.get("config") or {}
            form = SchemaForm(r.get("schema") or {}, saved)
            body.children = [form.widget if form.fields else W.HTML("<p>This plugin has no settings.</p>")]
        save.disabled = not (form.fields and session.can("plugins:write"))
        revert.disabled = not form.fields

    def do_save(_: Any) -> None:
        nonlocal saved
        data, errors = form.value()
        if errors:
            say("Not saved: fix the fields marked in red.", error=True)
            return
        try:
            r = session.wb.call("PUT", f"/api/plugins/{pick.value}/config", json={"config": data})
        except BkgError as exc:
            # the gateway names the field as `config.<name>[.<part>]`, its message starts with that name
            name = (exc.field or "").removeprefix("config.").split(".")[0]
            text = exc.message.removeprefix(f"{exc.field}: ") if exc.field else exc.message
            marked = form.show_error(name, text)
            say("Not saved: fix the field marked in red." if marked else f"Not saved: {exc.message}", error=True)
            return
        except Exception as exc:  # noqa: BLE001
            status.value = error_html(exc)
            return
        saved = r["config"]
        form.set_value(saved)
        say("Saved; the plugin restarted to apply it." if r.get("restarted") else "Saved.")

    def do_revert(_: Any) -> None:
        form.set_value(saved)
        status.value = ""

    pick.observe(load, "value")
    save.on_click(do_save)
    revert.on_click(do_revert)
    load()
    return W.VBox([pick, body, W.HBox([save, revert]), status])


def health_panel(session: Session, refresh_s: float = 2.0) -> W.HTML:
    """Show gateway health, version, uptime and the store's size; live."""
    out = W.HTML()

    def render() -> None:
        try:
            h = session.wb.health()
            cols = session.wb.call("GET", "/api/collections")["collections"] if session.can("collections:read") else []
        except Exception as exc:  # noqa: BLE001
            out.value = "<h3>Gateway</h3>" + error_html(exc)
            return
        size = sum(c.get("bytes_on_disk") or c.get("bytes") or 0 for c in cols)
        row = {
            "status": h.get("status", "?"),
            "version": h.get("version", ""),
            "uptime": fmt_duration(h.get("uptime_s", 0)),
            "collections": len(cols),
            "points": f"{sum(c.get('count', 0) for c in cols):,}",
            "store size": fmt_bytes(size),
        }
        out.value = "<h3>Gateway</h3>" + table([row], list(row))

    render()
    session.every(refresh_s, render)
    return out


def audit_panel(session: Session, limit: int = 20) -> W.HTML:
    """Show recent audit events (needs admin:audit; says so otherwise)."""
    if not session.can("admin:audit"):
        return W.HTML("<h3>Audit</h3><p>Recent audit events need the scope <code>admin:audit</code>.</p>")
    rows = session.wb.audit(limit)
    return W.HTML("<h3>Recent audit events</h3>" + table(rows, ["created_at", "actor", "action", "target", "ok"]))


def overview(session: Session) -> W.VBox:
    """Show the operator's front page: gateway and store, every plugin live with an hour of telemetry drawn,
    the store's size per collection and LLM tokens per key, recent audit events."""
    from bkg_kernel.widgets.pictures import store_and_tokens, telemetry

    return W.VBox(
        [
            health_panel(session),
            plugins_panel(session),
            W.HTML("<h3>The last hour</h3>"),
            telemetry(session),
            store_and_tokens(session),
            audit_panel(session),
        ]
    )
