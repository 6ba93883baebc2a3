"""Reusable dashboard panels (ipywidgets) over the gateway: the Voila dashboards in `dashboards/` are built
from these, and the same panels work in any notebook.

    from bkg_kernel import widgets as w
    w.dashboard(w.plugins_panel, scope="plugins:read")    # a login box first, then the panel

Every panel takes a `Session` (a logged-in `Workbench` and the caller's scopes) and shows only what those
scopes allow; a call the gateway refuses shows its message in the panel, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client import Workbench
from bkg_kernel.errors import BkgError

STATE_COLOURS = {
    "running": "#2e7d32", "degraded": "#ed6c02", "starting": "#0277bd", "stopping": "#0277bd",
    "error": "#c62828", "failed": "#c62828", "stopped": "#616161", "disabled": "#616161",
}  # fmt: skip
CSS = """<style>
.bkg-dash table {border-collapse: collapse; width: 100%; font-size: 13px}
.bkg-dash th, .bkg-dash td {border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left}
.bkg-badge {border-radius: 8px; padding: 1px 7px; color: white; font-weight: 600}
.bkg-error {color: #c62828}
.bkg-spark {background: #f3f3f3} .bkg-spark polyline {fill: none; stroke: #1976d2; stroke-width: 1.5}
</style>"""


@dataclass
class Session:
    """A logged-in client and who it is."""

    wb: Workbench
    me: dict[str, Any]
    timers: list[threading.Event] = field(default_factory=list)

    def can(self, scope: str) -> bool:
        return scope in self.me.get("scopes", [])

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        """Call `fn` every `seconds` on a background thread until the kernel goes away."""
        stop = threading.Event()
        self.timers.append(stop)

        def loop() -> None:
            while not stop.wait(seconds):
                with contextlib.suppress(Exception):  # a failed refresh shows at the next one
                    fn()

        threading.Thread(target=loop, daemon=True).start()


def gateway_url() -> str:
    """The gateway dashboards talk to: BKG_GATEWAY_URL, else the data dir's gateway."""
    from bkg_kernel.client import gateway_url as data_dir_gateway

    return os.environ.get("BKG_GATEWAY_URL") or data_dir_gateway()


def badge(state: str) -> str:
    return f"<span class='bkg-badge' style='background:{STATE_COLOURS.get(state, '#616161')}'>{escape(state)}</span>"


def error_html(exc: Exception) -> str:
    msg = exc.message if isinstance(exc, BkgError) else f"{type(exc).__name__}: {exc}"
    return f"<p class='bkg-error'>{escape(msg)}</p>"


def table(rows: list[dict[str, Any]], columns: list[str], raw: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{r.get(c, '') if c in raw else escape(str(r.get(c, '')))}</td>" for c in columns)
        + "</tr>"
        for r in rows
    )
    return f"<div class='bkg-dash'><table><tr>{head}</tr>{body}</table></div>"


def sparkline(values: list[float], width: int = 160, height: int = 36) -> str:
    if len(values) < 2:
        return f"<svg class='bkg-spark' width='{width}' height='{height}'></svg>"
    top = max(max(values), 1e-9)
    pts = " ".join(
        f"{i * width / (len(values) - 1):.1f},{height - 2 - v / top * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return f"<svg class='bkg-spark' width='{width}' height='{height}'><polyline points='{pts}'/></svg>"


def fmt_bytes(n: float | None) -> str:
    if not n:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# -- login -----------------------------------------------------------------------------------------------
def login_box(on_login: Callable[[Session], None], url: str | None = None) -> W.VBox:
    """An API key, or a username and password (a session); on success `on_login(session)`."""
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
                wb0 = Workbench(url, None)
                token = wb0.call("POST", "/auth/login", json={"username": user.value, "password": password.value})[
                    "token"
                ]
            wb = Workbench(url, token)
            me = wb.me()
        except Exception as exc:  # noqa: BLE001 - shown in the box
            status.value = error_html(exc)
            return
        status.value = ""
        on_login(Session(wb, me))

    button.on_click(go)
    key.observe(lambda ch: None, "value")
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
    """A login box that turns into `build(session)` (or a plain refusal when the scope is missing)."""
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

    root.children = [header, login_box(logged_in, url)]
    return root


# -- panels ----------------------------------------------------------------------------------------------
def plugins_panel(session: Session, refresh_s: float = 2.0) -> W.VBox:
    """Every plugin: status, uptime, memory, requests, errors, p50 latency; live, with memory sparklines."""
    out = W.HTML()
    history: dict[str, deque[float]] = {}

    def render() -> None:
        try:
            plugins = session.wb.call("GET", "/api/plugins")["plugins"]
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)
            return
        rows = []
        for p in plugins:
            t = p["telemetry"]
            h = history.setdefault(p["id"], deque(maxlen=60))
            h.append(float(t.get("rss_bytes") or 0))
            rows.append(
                {
                    "plugin": f"<span data-plugin='{escape(p['id'])}'>{escape(p['name'])}</span>",
                    "status": badge(p["state"]),
                    "uptime": f"{p['uptime_s']:.0f} s" if p["uptime_s"] else "–",
                    "memory": fmt_bytes(t.get("rss_bytes")),
                    "memory (2 min)": sparkline(list(h)),
                    "requests": t.get("requests", 0),
                    "req/min": t.get("requests_per_min", 0),
                    "errors": t.get("errors", 0),
                    "p50 ms": t.get("latency_p50_ms") or "–",
                }
            )
        cols = ["plugin", "status", "uptime", "memory", "memory (2 min)", "requests", "req/min", "errors", "p50 ms"]
        out.value = table(rows, cols, raw=("plugin", "status", "memory (2 min)"))

    render()
    session.every(refresh_s, render)
    return W.VBox([W.HTML("<h3>Plugins</h3>"), out])


def health_panel(session: Session) -> W.HTML:
    """Gateway health, version, uptime and the store's size."""
    h = session.wb.health()
    cols = session.wb.call("GET", "/api/collections")["collections"] if session.can("collections:read") else []
    size = sum(c.get("bytes_on_disk") or c.get("bytes") or 0 for c in cols)
    return W.HTML(
        "<h3>Gateway</h3>"
        + table(
            [
                {
                    "status": h.get("status", "?"),
                    "version": h.get("version", ""),
                    "uptime": f"{h.get('uptime_s', 0):.0f} s",
                    "collections": len(cols),
                    "points": sum(c.get("count", 0) for c in cols),
                    "store size": fmt_bytes(size),
                }
            ],
            ["status", "version", "uptime", "collections", "points", "store size"],
        )
    )


def audit_panel(session: Session, limit: int = 20) -> W.HTML:
    """Recent audit events (needs admin:audit; says so otherwise)."""
    if not session.can("admin:audit"):
        return W.HTML("<h3>Audit</h3><p>Recent audit events need the scope <code>admin:audit</code>.</p>")
    rows = session.wb.audit(limit)
    return W.HTML("<h3>Recent audit events</h3>" + table(rows, ["created_at", "actor", "action", "target", "ok"]))


def plugin_actions(session: Session, plugin_id: str) -> W.VBox:
    """Status of one plugin with start / stop / restart (stop and restart ask first)."""
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
        yes = W.Button(description=f"Yes, {action}", button_style="danger")
        no = W.Button(description="Cancel")
        yes.on_click(lambda _: act(action))
        no.on_click(lambda _: setattr(confirm, "children", []))
        confirm.children = [W.HTML(f"{action.capitalize()} {escape(plugin_id)}? "), yes, no]

    buttons = []
    for action in ("start", "stop", "restart"):
        b = W.Button(description=action.capitalize(), disabled=not session.can("plugins:write"))
        b.on_click(lambda _, a=action: act(a) if a == "start" else ask(a))
        buttons.append(b)
    render()
    session.every(2.0, render)
    return W.VBox([status, W.HBox(buttons), confirm])


def keys_panel(session: Session) -> W.VBox:
    """API keys: create (the secret shown once, with a copy button), rotate, revoke after confirming."""
    listing = W.VBox([])
    secret = W.HTML()
    name = W.Text(description="name")
    role_scopes = W.SelectMultiple(
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

    def refresh() -> None:
        try:
            keys = session.wb.keys()
        except Exception as exc:  # noqa: BLE001
            listing.children = [W.HTML(error_html(exc))]
            return
        rows: list[W.Widget] = [
            W.HTML(
                table(
                    keys,
                    ["name", "prefix", "state", "user_id", "scopes", "created_at", "last_used_at", "expires_at"],
                )
            )
        ]
        for k in keys:
            if k.get("state") != "active":
                continue
            rotate = W.Button(description=f"Rotate {k['name']}")
            revoke = W.Button(description=f"Revoke {k['name']}", button_style="danger")
            box = W.HBox([rotate, revoke])

            def do_rotate(_: Any, k: dict[str, Any] = k) -> None:
                try:
                    show_secret(session.wb.call("POST", f"/admin/keys/{k['id']}/rotate"), "Rotated")
                except Exception as exc:  # noqa: BLE001
                    message.value = error_html(exc)
                refresh()

            def ask_revoke(_: Any, k: dict[str, Any] = k, box: W.HBox = box) -> None:
                yes = W.Button(description=f"Yes, revoke {k['name']}", button_style="danger")
                no = W.Button(description="Cancel")

                def do(_: Any) -> None:
                    try:
                        session.wb.call("POST", f"/admin/keys/{k['id']}/revoke")
                        message.value = f"<p>Revoked {escape(k['name'])}.</p>"
                    except Exception as exc:  # noqa: BLE001
                        message.value = error_html(exc)
                    refresh()

                yes.on_click(do)
                no.on_click(lambda _: refresh())
                box.children = [W.HTML(f"Revoke <b>{escape(k['name'])}</b> for good? "), yes, no]

            rotate.on_click(do_rotate)
            revoke.on_click(ask_revoke)
            rows.append(box)
        listing.children = rows

    def do_create(_: Any) -> None:
        body: dict[str, Any] = {"name": name.value.strip()}
        if role_scopes.value:
            body["scopes"] = list(role_scopes.value)
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
    return W.VBox([W.HTML("<h3>Create a key</h3>"), name, role_scopes, days, create, secret, message,
                   W.HTML("<h3>Keys</h3>"), listing])  # fmt: skip


def users_panel(session: Session) -> W.VBox:
    """Users with their role; create one; disable / enable."""
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


def models_panel(session: Session) -> W.VBox:
    """The model registry: every model, verify one (sha256), add one by path."""
    out = W.HTML()
    pick = W.Dropdown(description="model")
    verify = W.Button(description="Verify")
    path = W.Text(description="path", placeholder="/path/to/model.gguf or folder")
    add = W.Button(description="Add (copy into the model dir)", disabled=not session.can("models:write"))
    message = W.HTML()

    def refresh() -> None:
        models = session.wb.call("GET", "/api/models")["models"]
        pick.options = [m["id"] for m in models]
        rows = [{**m, "size": fmt_bytes(m["size"]), "sha256": m["sha256"][:12]} for m in models]
        out.value = table(rows, ["id", "kind", "size", "license", "source", "sha256"])

    def do_verify(_: Any) -> None:
        try:
            r = session.wb.verify_model(pick.value)
            message.value = f"<p>{escape(pick.value)}: {'ok' if r.get('ok') else escape(str(r))}</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)

    def do_add(_: Any) -> None:
        try:
            r = session.wb.add_model(path.value.strip(), import_mode="copy")
            message.value = f"<p>Added {escape(str(r.get('id', r)))}.</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)
        refresh()

    verify.on_click(do_verify)
    add.on_click(do_add)
    refresh()
    return W.VBox([out, W.HBox([pick, verify]), W.HBox([path, add]), message])


def jobs_panel(session: Session) -> W.VBox:
    """Background jobs (model downloads, training): state, progress, result or error; live."""
    out = W.HTML()

    def render() -> None:
        jobs = session.wb.jobs()
        rows = [
            {
                **j,
                "progress": f"{100 * j['progress']:.0f} %",
                "created": time.strftime("%H:%M:%S", time.localtime(j["created"])),
                "outcome": j.get("error")
                or (
                    ", ".join(
                        f"{k}={v}" for k, v in (j.get("result") or {}).items() if isinstance(v, (str, int, float))
                    )[:160]
                ),
            }  # fmt: skip
            for j in jobs
        ]
        out.value = table(rows, ["id", "kind", "plugin", "owner", "state", "progress", "message", "created", "outcome"])

    render()
    session.every(2.0, render)
    return W.VBox([out])


def settings_panel(session: Session) -> W.VBox:
    """Each plugin's settings as JSON: edit, save (a 422 names the field), revert."""
    plugins = [p["id"] for p in session.wb.call("GET", "/api/plugins")["plugins"]]
    pick = W.Dropdown(options=plugins, description="plugin")
    editor = W.Textarea(layout=W.Layout(width="600px", height="260px"))
    save = W.Button(description="Save", button_style="primary", disabled=not session.can("plugins:write"))
    revert = W.Button(description="Revert")
    message = W.HTML()

    def load(_: Any = None) -> None:
        import json

        editor.value = json.dumps(session.wb.plugin(pick.value).describe().get("config", {}), indent=2)
        message.value = ""

    def do_save(_: Any) -> None:
        import json

        try:
            config = json.loads(editor.value)
            r = session.wb.plugin(pick.value).configure(**config)
            message.value = f"<p>Saved{' (restarted)' if r.get('restarted') else ''}.</p>"
        except ValueError as exc:
            message.value = f"<p class='bkg-error'>Not JSON: {escape(str(exc))}</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)

    pick.observe(load, "value")
    save.on_click(do_save)
    revert.on_click(load)
    load()
    return W.VBox([pick, editor, W.HBox([save, revert]), message])


def overview(session: Session) -> W.VBox:
    """The operator's front page: gateway and store, every plugin live, recent audit events."""
    return W.VBox([health_panel(session), plugins_panel(session), audit_panel(session)])


def llm_panel(session: Session) -> W.VBox:
    """llmserver: models, a playground with the answer's token throughput."""
    models = session.wb.call("GET", "/v1/models")["data"]
    pick = W.Dropdown(options=[m["id"] for m in models], description="model")
    prompt = W.Textarea(placeholder="Ask something", layout=W.Layout(width="600px"))
    go = W.Button(description="Send", button_style="primary", disabled=not session.can("llm:use"))
    answer = W.HTML()

    def ask(_: Any) -> None:
        t0 = time.perf_counter()
        try:
            r = session.wb.call(
                "POST", "/v1/chat/completions",
                json={"model": pick.value, "messages": [{"role": "user", "content": prompt.value}], "max_tokens": 128},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            answer.value = error_html(exc)
            return
        took = time.perf_counter() - t0
        n = r["usage"]["completion_tokens"]
        answer.value = (
            f"<pre class='bkg-answer'>{escape(r['choices'][0]['message']['content'])}</pre>"
            f"<p>{n} tokens in {took:.2f} s: {n / took:.1f} tokens/s</p>"
        )

    go.on_click(ask)
    return W.VBox([plugin_actions(session, "llmserver"), W.HTML(table(models, ["id", "owned_by"])), pick, prompt, go,
                   answer])  # fmt: skip


def brain_panel(session: Session) -> W.VBox:
    """brainml: collections it indexed, and a query playground with highlighted matches."""
    from bkg_kernel.brain_client import Ranked

    stats = session.wb.brain.stats()
    coll = W.Dropdown(options=[s["collection"] for s in stats], description="collection")
    query = W.Text(description="query", layout=W.Layout(width="500px"))
    mode = W.ToggleButtons(options=["hybrid", "vector", "text"])
    go = W.Button(description="Search", button_style="primary")
    out = W.HTML()

    def search(_: Any) -> None:
        try:
            out.value = Ranked(session.wb.brain.query(coll.value, query.value, mode=mode.value))._repr_html_()
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)

    go.on_click(search)
    cols = ["collection", "documents", "chunks", "embed_model", "queries", "avg_query_ms"]
    return W.VBox([plugin_actions(session, "brainml"), W.HTML(table(stats, cols)), coll, query, mode, go, out])


def faces_panel(session: Session) -> W.VBox:
    """rustyface: galleries, enroll by upload, identify by upload with the faces boxed and named."""
    import base64

    from bkg_kernel.faces_client import Identified

    def galleries() -> list[str]:
        r = session.wb.plugin("rustyface").invoke("faces.gallery", action="list")
        return [g["gallery"] for g in r["galleries"]]

    gallery = W.Combobox(options=galleries(), description="gallery", placeholder="name (new ones are created)")
    subject = W.Text(description="subject")
    upload_enroll = W.FileUpload(accept="image/*", multiple=True, description="Enroll photos")
    upload_identify = W.FileUpload(accept="image/*", description="Identify a photo")
    out = W.HTML()

    def b64(f: Any) -> str:
        return base64.b64encode(bytes(f["content"])).decode()

    def enroll(_: Any) -> None:
        try:
            if gallery.value not in galleries():
                session.wb.plugin("rustyface").invoke("faces.gallery", action="create", gallery=gallery.value)
            r = session.wb.plugin("rustyface").invoke(
                "faces.enroll", gallery=gallery.value, subject=subject.value,
                images=[b64(f) for f in upload_enroll.value], sources=[f["name"] for f in upload_enroll.value],
            )  # fmt: skip
            out.value = f"<p>Enrolled {len(r['enrolled'])} face(s); skipped {len(r['skipped'])}.</p>"
            gallery.options = galleries()
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)

    def identify(_: Any) -> None:
        try:
            f = upload_identify.value[0]
            r = session.wb.plugin("rustyface").invoke("faces.identify", gallery=gallery.value, image=b64(f))
            out.value = Identified(r, b64(f))._repr_html_()
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)

    listing = W.HTML()

    def refresh() -> None:
        r = session.wb.plugin("rustyface").invoke("faces.gallery", action="list")
        listing.value = "<h3>Galleries</h3>" + table(r["galleries"], ["gallery", "faces"])

    def enroll_and_list(change: Any) -> None:
        enroll(change)
        refresh()

    upload_enroll.observe(enroll_and_list, "value")
    upload_identify.observe(identify, "value")
    refresh()
    return W.VBox(
        [plugin_actions(session, "rustyface"), listing, gallery, subject, upload_enroll, upload_identify, out]
    )


def candle_panel(session: Session) -> W.VBox:
    """candle: loaded models and their memory; load, run and quantize a model."""
    out = W.HTML()
    result = W.HTML()
    can = session.can("plugins:write")
    models = [
        m["id"]
        for m in session.wb.call("GET", "/api/models")["models"]
        if m["kind"] in ("hf-transformers", "torch-program")
    ]
    model = W.Dropdown(options=models, description="model")
    text = W.Text(description="input", layout=W.Layout(width="500px"))
    load = W.Button(description="Load", disabled=not can)
    run = W.Button(description="Run", disabled=not can)
    method = W.Dropdown(options=["dynamic-int8", "fp16", "bf16"], description="quantize")
    quantize = W.Button(description="Quantize", disabled=not can)

    def refresh() -> None:
        s = session.wb.plugin("candle").invoke("candle.stats")
        rows = [{**m, "memory": fmt_bytes(m.get("bytes"))} for m in s.get("loaded", [])]
        out.value = (
            f"<p>torch {escape(s['torch'])} on {escape(s['device'])}, RSS {fmt_bytes(s['rss_bytes'])}</p>"
            + table(rows, ["model_id", "kind", "task", "device", "memory", "load_s"])
        )

    def call(cap: str, **body: Any) -> None:
        result.value = f"<p>{escape(cap)}…</p>"
        try:
            r = session.wb.plugin("candle").invoke(cap, **body)
            shown = {k: (f"{len(v)} x {len(v[0])} values" if k == "embeddings" else v) for k, v in r.items()}
            result.value = f"<pre>{escape(str(shown))[:3000]}</pre>"
        except Exception as exc:  # noqa: BLE001
            result.value = error_html(exc)
        refresh()

    load.on_click(lambda _: call("candle.model.load", model_id=model.value))
    run.on_click(lambda _: call("candle.run", model_id=model.value, inputs=[text.value or " "]))
    quantize.on_click(lambda _: call("candle.quantize", model_id=model.value, method=method.value))
    refresh()
    return W.VBox(
        [plugin_actions(session, "candle"), out, W.HBox([model, load]), W.HBox([text, run]), W.HBox([method, quantize]),
         result]
    )  # fmt: skip


def apikeys_panel(session: Session) -> W.VBox:
    """The apikeys plugin: its status with roles and their scopes."""
    roles = session.wb.call("GET", "/admin/roles")["roles"] if session.can("admin:users") else []
    return W.VBox([plugin_actions(session, "apikeys"), W.HTML(table(roles, ["name", "scopes", "description"]))])
