"""The jobs page: notebook runs live (state, owner, duration, cells, the failed cell said plainly), start a run
with a form built from the notebook's `parameters` cell, cancel / retry / view the rendered output, the files a
run kept (listed, each shown: a picture drawn, a table's first rows, a text's beginning, and a download link),
schedules (add, enable, disable, delete), and the gateway's background jobs (downloads, training)."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import mimetypes
from collections.abc import Callable
from html import escape
from pathlib import PurePosixPath
from typing import Any

import ipywidgets as W

from bkg_kernel.client.jobs import when
from bkg_kernel.display import fmt_bytes
from bkg_kernel.errors import PayloadTooLarge
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


PREVIEW_BYTES = 64 * 1024  # a kept text's beginning shown on the page
TABLE_ROWS = 20  # a kept CSV's first rows shown as a table
FETCH_MAX = 16 * 1024 * 1024  # a kept file over this is not fetched into the page (the CLI or `wb.jobs.file` get it)
PICTURE_LINK_MAX = 4 * 1024 * 1024  # a picture up to this also gets a Download link (its bytes in the page twice)
PICTURES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg"}


def kept_table(files: list[dict[str, Any]]) -> str:
    """A run's kept files: name, size, when written."""
    if not files:
        return "<p>This run kept no files (a notebook keeps one by writing it into <code>run_files()</code>).</p>"
    shown = [{"name": f["name"], "size": fmt_bytes(f["bytes"]), "modified": _when(f.get("modified"))} for f in files]
    return f"<h4>Files this run kept ({len(files)})</h4>" + table(shown, ["name", "size", "modified"])


def kept_preview(name: str, data: bytes) -> str:
    """One kept file on the page: a picture drawn, a CSV's first rows as a table, JSON or text from its beginning,
    anything else said to be binary; with a link that downloads it (the bytes are in the page: no gateway URL, so
    no key in a link)."""
    suffix = PurePosixPath(name).suffix.lower()
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    b64 = base64.b64encode(data).decode()
    head = f"<h4><code>{escape(name)}</code> · {fmt_bytes(len(data))}</h4>"
    link = (f"<p><a download='{escape(PurePosixPath(name).name, quote=True)}' "
            f"href='data:application/octet-stream;base64,{b64}'>Download</a></p>")  # fmt: skip
    if suffix in PICTURES:  # an <img> runs no script, an SVG's included
        body = f"<img src='data:{mime};base64,{b64}' style='max-width:100%;max-height:480px' alt='{escape(name)}'>"
        return head + body + (link if len(data) <= PICTURE_LINK_MAX else "<p><i>(right-click it to save it)</i></p>")
    text = _text(data[:PREVIEW_BYTES])
    if text is None:
        return head + f"<p>binary ({escape(mime)}): not shown here</p>" + link
    cut = ""
    if len(data) > PREVIEW_BYTES:
        cut = f"<p><i>its first {fmt_bytes(PREVIEW_BYTES)} of {fmt_bytes(len(data))}</i></p>"
    if suffix in (".csv", ".tsv"):
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        if rows:
            cols = _unique(rows[0])
            shown = [dict(zip(cols, r, strict=False)) for r in rows[1 : TABLE_ROWS + 1]]
            more = f"<p><i>its first {TABLE_ROWS} rows</i></p>" if len(rows) > TABLE_ROWS + 1 else ""
            return head + table(shown, cols) + more + link
    if suffix == ".json" and not cut:
        with contextlib.suppress(ValueError):  # not JSON after all: shown as it is
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return head + f"<pre style='max-height:480px;overflow:auto'>{escape(text)}</pre>" + cut + link


def _unique(header: list[str]) -> list[str]:
    """A CSV's column names, each once: a name taken already gets its column's number (`a (2)`), then more."""
    taken: set[str] = set()
    out = []
    for i, c in enumerate(header):
        name, n = c, i + 1
        while name in taken:
            name, n = f"{c} ({n})", n + 1
        taken.add(name)
        out.append(name)
    return out


def _text(data: bytes) -> str | None:
    """`data` as text (a character cut at the end forgiven), or None for bytes that are not text."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 3:
            return None
        return data[: exc.start].decode("utf-8")


def _kept(session: Session, picked: W.Dropdown, frame: W.HTML, status: W.HTML) -> tuple[W.Button, W.HBox]:
    """The picked run's kept files: `Files` lists them, a file picked is shown in `frame`."""
    listed = W.Button(description="Files")
    pick = W.Dropdown(options=[], description="file")
    show = W.Button(description="Show file")
    row = W.HBox([pick, show], layout=W.Layout(display="none"))
    sizes: dict[str, int] = {}

    def list_files(_: Any = None) -> None:
        try:
            files = list(session.wb.jobs.files(picked.value))
        except Exception as exc:
            status.value = error_html(exc)
            return
        status.value = ""
        sizes.clear()
        sizes.update({f["name"]: f["bytes"] for f in files})
        frame.value = kept_table(files)
        set_options(pick, [f["name"] for f in files])
        row.layout.display = "" if files else "none"

    def show_file(_: Any = None) -> None:
        name, run_id = pick.value, picked.value
        if sizes.get(name, 0) > FETCH_MAX:
            get = f"bkg jobs files {run_id} {name} -o FILE"
            frame.value = (f"<p><code>{escape(name)}</code> is more than this page fetches "
                           f"({fmt_bytes(FETCH_MAX)}): <code>{escape(get)}</code>, or "
                           "<code>wb.jobs.file(run_id, name, to=...)</code> in a notebook.</p>")  # fmt: skip
            return
        try:  # read no further than FETCH_MAX: a running run's file may have grown since it was listed
            frame.value = kept_preview(name, session.wb.jobs.file(run_id, name, max_bytes=FETCH_MAX))
            status.value = ""
        except PayloadTooLarge:
            sizes[name] = FETCH_MAX + 1
            show_file()
        except Exception as exc:
            status.value = error_html(exc)

    def another_run(_: Any) -> None:
        row.layout.display = "none"
        set_options(pick, [])

    listed.on_click(list_files)
    show.on_click(show_file)
    picked.observe(another_run, "value")
    enable_when_picked(pick, [show])
    return listed, row


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
    files, file_row = _kept(session, picked, frame, status)
    picked.observe(lambda _: setattr(trace, "value", False), "value")  # another run: its traceback hidden
    picked.observe(show, "value")
    trace.observe(show, "value")
    enable_when_picked(picked, [cancel, retry, view, files])
    refresh()
    session.every(2.0, refresh)
    parts: list[W.Widget] = [
        runs_out, W.HBox([picked, cancel, retry, view, files]), file_row, status, detail, trace, frame
    ]  # fmt: skip
    if session.can("jobs:run"):
        parts += [_start_form(session, status, refresh), _schedules(session, status)]
    return W.VBox([*parts, other_out])
