"""The jobs page: notebook runs live (state, owner, duration, cells, the failed cell said plainly), start a run
with a form built from the notebook's `parameters` cell, cancel / retry / view the rendered output, schedules
(add, enable, disable, delete), and the gateway's background jobs (downloads, training)."""

from __future__ import annotations

import json
from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client.jobs import when
from bkg_kernel.jobs.notebooks import coerce
from bkg_kernel.widgets.primitives import (
    STATE_COLOURS,
    Session,
    ask_first,
    badge,
    enable_when_picked,
    error_html,
    set_options,
    table,
)

STATE_COLOURS.update(succeeded="#2e7d32", queued="#0277bd", timed_out="#c62828", cancelled="#616161", done="#2e7d32")


def _when(t: float | None, tz: str | None = None) -> str:
    """A time as the server's clock shows it, or in zone `tz` (a schedule's own), with the zone's name."""
    return when(t, tz)[5:]  # the year goes: the table is narrow


def _failed_cell(r: dict[str, Any]) -> str:
    err = r.get("error") or {}
    if not err:
        return ""
    where = f"cell {err['cell_index']}" if err.get("cell_index") is not None else "run"
    return f"{where}: {err.get('ename')}: {str(err.get('evalue'))[:100]}"


def acting(status: W.HTML, then: Callable[[], None]) -> Callable[[Callable[[], Any]], None]:
    """A button action: run it, show its error (or clear the last one) in `status`, then refresh with `then`."""

    def act(fn: Callable[[], Any]) -> None:
        try:
            fn()
            status.value = ""
        except Exception as exc:
            status.value = error_html(exc)
        then()

    return act


def runs_table(rows: list[dict[str, Any]]) -> str:
    """Notebook runs as a table with state badges."""
    shown = [
        {
            "id": r["id"], "notebook": r["notebook"], "state": badge(r["state"]), "owner": r["owner"],
            "created": _when(r.get("created_at")),
            "duration": f"{r['duration_s']:.1f} s" if r.get("duration_s") is not None else "",
            "cells": f"{r.get('cells_done', 0)}/{r.get('cells_total', 0)}", "failed at": _failed_cell(r),
        }
        for r in rows
    ]  # fmt: skip
    cols = ["id", "notebook", "state", "owner", "created", "duration", "cells", "failed at"]
    return table(shown, cols, raw=["state"])


def run_detail(r: dict[str, Any], traceback: bool = False) -> str:
    """One run: parameters, and for a failure the cell's source (and its traceback, if `traceback`)."""
    parts = [f"<h4>{escape(r['id'])} {badge(r['state'])} <code>{escape(r['notebook'])}</code></h4>"]
    parts.append(f"<p>parameters: <code>{escape(json.dumps(r.get('parameters') or {}))}</code> · attempt "
                 f"{r.get('attempt')} · {escape(str(r.get('message') or ''))}</p>")  # fmt: skip
    err = r.get("error") or {}
    if err:
        # red, but not `bkg-error`: that is a page's own failure, and this is what the run it shows did
        parts.append(f"<p class='bkg-failed'><b>{escape(_failed_cell(r))}</b></p>")
        if err.get("source"):
            parts.append(f"<pre style='background:#fff5f5;padding:4px'>{escape(err['source'])}</pre>")
        if traceback and err.get("traceback"):
            parts.append(f"<pre class='bkg-run-traceback'>{escape(err['traceback'])}</pre>")
    return "".join(parts)


def _start_form(session: Session, status: W.HTML, refresh: Any) -> W.VBox:
    listing = {n["notebook"]: n for n in session.wb.jobs.notebooks()}
    pick = W.Dropdown(options=sorted(listing), description="notebook")
    fields = W.VBox()
    timeout = W.FloatText(value=0, description="timeout s")
    go = W.Button(description="Run", button_style="primary")

    def build(_: Any = None) -> None:
        params = (listing.get(pick.value) or {}).get("parameters") or {}
        fields.children = [
            W.Text(value=str(p["default"]).strip("'\""), description=name, tooltip=p.get("help") or p["type"],
                   placeholder=p["type"])
            for name, p in params.items()
        ]  # fmt: skip

    def run(_: Any) -> None:
        params = (listing.get(pick.value) or {}).get("parameters") or {}
        values = {
            w.description: None if w.value == "None" else coerce(w.value, params[w.description]["type"])
            for w in fields.children
        }
        try:
            r = session.wb.jobs.submit(pick.value, values, timeout_s=timeout.value or None)
            status.value = f"<p>queued {escape(r['id'])}</p>"
        except Exception as exc:
            status.value = error_html(exc)
        refresh()

    pick.observe(build, "value")
    enable_when_picked(pick, [go], allowed=session.can("jobs:run"))
    go.on_click(run)
    build()
    return W.VBox([W.HTML("<h3>Run a notebook</h3>"), pick, fields, timeout, go])


def _schedules(session: Session, status: W.HTML) -> W.VBox:
    out = W.HTML()
    nb, cron, tz = (
        W.Text(description="notebook"),
        W.Text(description="cron", placeholder="0 3 * * *"),
        W.Text(value="UTC", description="time zone"),
    )
    sid = W.Text(description="schedule id")
    add, on, off, drop = (W.Button(description=d) for d in ("Add", "Enable", "Disable", "Delete"))
    confirm = W.HBox()

    def render() -> None:
        rows = [{**s, "next run": _when(s.get("next_run_at"), s.get("timezone"))} for s in session.wb.jobs.schedules()]
        out.value = table(rows, ["id", "notebook", "cron", "timezone", "enabled", "owner", "next run", "last_run_id"])

    act = acting(status, render)

    add.on_click(lambda _: act(lambda: session.wb.jobs.schedule(nb.value, cron.value, timezone=tz.value)))
    on.on_click(lambda _: act(lambda: session.wb.jobs.enable(sid.value)))
    off.on_click(lambda _: act(lambda: session.wb.jobs.disable(sid.value)))

    def delete() -> None:
        confirm.children = []
        act(lambda: session.wb.jobs.delete_schedule(sid.value))

    drop.on_click(lambda _: ask_first(confirm, f"Delete schedule <b>{escape(sid.value)}</b>?", "Delete", delete))
    render()
    return W.VBox([W.HTML("<h3>Schedules</h3>"), out, W.HBox([nb, cron, tz, add]), W.HBox([sid, on, off, drop]),
                   confirm])  # fmt: skip


def background_table(rows: list[dict[str, Any]]) -> str:
    """The gateway's background jobs (downloads, training)."""
    shown = [
        {**j, "state": badge(j["state"]), "progress": f"{100 * j['progress']:.0f} %", "created": _when(j["created"]),
         "outcome": j.get("error") or ", ".join(f"{k}={v}" for k, v in (j.get("result") or {}).items()
                                                 if isinstance(v, str | int | float))[:160]}
        for j in rows
    ]  # fmt: skip
    cols = ["id", "kind", "plugin", "owner", "state", "progress", "message", "created", "outcome"]
    return table(shown, cols, raw=["state"])


def jobs_panel(session: Session) -> W.VBox:
    """Runs live, a run form, run actions (cancel, retry, output), schedules and background jobs."""
    runs_out, other_out, detail, status = W.HTML(), W.HTML(), W.HTML(), W.HTML()
    picked = W.Dropdown(options=[], description="run")
    cancel, retry, view = W.Button(description="Cancel"), W.Button(description="Retry"), W.Button(description="Output")
    # a picked failed run's traceback comes only when asked for: the first run is picked for whoever opens the page
    trace = W.ToggleButton(description="show traceback", layout=W.Layout(display="none"))
    frame = W.HTML()

    def refresh() -> None:
        every = session.wb.jobs()
        runs = [j for j in every if j.get("kind") == "notebook"]
        runs_out.value = "<h3>Notebook runs</h3>" + runs_table(runs[:50])
        other = [j for j in every if j.get("kind") != "notebook"]
        other_out.value = "<h3>Background jobs</h3>" + background_table(other[:50]) if other else ""
        set_options(picked, [r["id"] for r in runs[:50]])
        show()

    def show(_: Any = None) -> None:
        if not picked.value:
            detail.value, trace.layout.display = "", "none"
            return
        try:
            r = session.wb.jobs.get(picked.value)
        except Exception as exc:
            detail.value = error_html(exc)
            return
        detail.value = run_detail(r, traceback=trace.value)
        trace.layout.display = "" if (r.get("error") or {}).get("traceback") else "none"

    act = acting(status, refresh)

    def output() -> None:
        html = session.wb.jobs.output(picked.value, "html")
        frame.value = (f"<iframe sandbox='' srcdoc='{escape(html, quote=True)}' style='width:100%;height:480px;"
                       "border:1px solid #ddd'></iframe>")  # fmt: skip

    cancel.on_click(lambda _: act(lambda: session.wb.jobs.cancel(picked.value)))
    retry.on_click(lambda _: act(lambda: session.wb.jobs.retry(picked.value)))
    view.on_click(lambda _: act(output))
    picked.observe(lambda _: setattr(trace, "value", False), "value")  # another run: its traceback hidden
    picked.observe(show, "value")
    trace.observe(show, "value")
    enable_when_picked(picked, [cancel, retry, view])
    refresh()
    session.every(2.0, refresh)
    parts: list[W.Widget] = [runs_out, W.HBox([picked, cancel, retry, view]), status, detail, trace, frame]
    if session.can("jobs:run"):
        parts += [_start_form(session, status, refresh), _schedules(session, status)]
    return W.VBox([*parts, other_out])
