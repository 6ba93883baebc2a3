"""The store's page: every collection (points, shape, size on disk, last snapshot), and for one picked, its
snapshots; with `collections:write`, take a snapshot, restore one (into the collection or a new name), delete one,
or drop the collection (each that destroys something asks first). A snapshot or a restore runs as a gateway job
whose steps a bar follows (`?background=true`), as Qdrant's web UI takes and restores snapshots."""

from __future__ import annotations

import threading
import time
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client.transport import seg
from bkg_kernel.display import fmt_bytes
from bkg_kernel.errors import InvalidInput
from bkg_kernel.widgets.primitives import Session, ask_first, enable_when_picked, error_html, set_options, table

COLUMNS = ["name", "points", "dim", "metric", "index", "embed_model", "on disk", "last snapshot"]
SNAPSHOT_COLUMNS = ["id", "created", "points", "size", "ok"]
EMPTY = (
    "<h3>No collections yet</h3><p class='bkg-empty'>Make one from a notebook, e.g. <code>wb.brain.index('docs', "
    "[{'text': 'hello world'}])</code> or <code>wb.create_collection('docs', dim=384)</code>; it is listed here.</p>"
)
POLL_S = 0.5  # how often a running snapshot's or restore's job is asked how far it got


def collections_table(rows: list[dict[str, Any]]) -> str:
    """The collections, largest first."""
    shown = [
        {"name": c["name"], "points": f"{c.get('count', 0):,}", "dim": c.get("dim"), "metric": c.get("metric"),
         "index": c.get("index"), "embed_model": c.get("embed_model") or "",
         "on disk": fmt_bytes(c.get("bytes_on_disk")), "last snapshot": c.get("last_snapshot") or ""}
        for c in sorted(rows, key=lambda c: -int(c.get("count") or 0))
    ]  # fmt: skip
    return table(shown, COLUMNS)


def snapshots_table(name: str, rows: list[dict[str, Any]]) -> str:
    """One collection's snapshots, newest first."""
    if not rows:
        return f"<p>No snapshots of <code>{escape(name)}</code> yet.</p>"
    shown = [
        {"id": s["id"], "created": str(s.get("created_at", ""))[:19].replace("T", " "), "points": f"{s['points']:,}",
         "size": fmt_bytes(s.get("bytes")), "ok": "yes" if s.get("ok", True) else f"no: {s.get('error')}"}
        for s in rows
    ]  # fmt: skip
    return f"<h4>Snapshots of {escape(name)} ({len(rows)})</h4>" + table(shown, SNAPSHOT_COLUMNS)


def collections_panel(session: Session, refresh_s: float = 10.0) -> W.VBox:
    """Collections and their snapshots; snapshot, restore, delete a snapshot and drop, for who may write."""
    listing, snaps, status = W.HTML(), W.HTML(), W.HTML()
    pick = W.Dropdown(options=[], description="collection")
    snap_pick = W.Dropdown(options=[], description="snapshot")
    into = W.Text(description="into", placeholder="the same collection", layout=W.Layout(width="320px"))
    bar = W.FloatProgress(min=0.0, max=1.0, layout=W.Layout(display="none", width="320px"))
    step = W.HTML()
    confirm = W.HBox([])
    take = W.Button(description="Snapshot", button_style="primary")
    restore = W.Button(description="Restore")
    delete = W.Button(description="Delete snapshot")
    drop = W.Button(description="Drop collection", button_style="danger")
    may = session.can("collections:write")
    enable_when_picked(snap_pick, [restore, delete], allowed=may)
    running = threading.Lock()  # one snapshot or restore followed at a time on this page
    known: dict[str, dict[str, Any]] = {}  # the live collections, by name (replaced whole by each refresh)
    body = W.VBox([listing, W.HBox([pick, take, drop]), confirm, W.HBox([bar, step]), status, snaps,
                   W.HBox([snap_pick, into, restore, delete])])  # fmt: skip

    def refresh() -> None:
        nonlocal known
        try:
            rows = session.wb.call("GET", "/api/collections")["collections"]
            # a dropped collection's snapshots are how it comes back: it stays pickable while it has any
            dropped = {s["collection"] for s in session.wb.call("GET", "/api/snapshots")["snapshots"]}
        except Exception as exc:  # noqa: BLE001 - the page says why, and tries again at the next refresh
            listing.value = error_html(exc)
            return
        known = {c["name"]: c for c in rows}
        listing.value = collections_table(rows) if rows else EMPTY
        live = sorted(known, key=lambda n: -int(known[n].get("count") or 0))
        set_options(pick, live + sorted(dropped - set(known)))
        show_snapshots()

    def show_snapshots(_: Any = None) -> None:
        take.disabled = drop.disabled = not may or pick.value not in known  # a dropped one: restore only
        if pick.value is None:
            snaps.value = ""
            set_options(snap_pick, [])
            return
        try:
            rows = session.wb.call("GET", f"/api/collections/{seg(pick.value)}/snapshots")["snapshots"]
        except Exception as exc:  # noqa: BLE001
            snaps.value = error_html(exc)
            return
        gone = "" if pick.value in known else " (the collection was dropped: restore one to bring it back)"
        snaps.value = snapshots_table(pick.value, rows) + (f"<p>{escape(gone)}</p>" if gone and rows else "")
        set_options(snap_pick, [s["id"] for s in rows])

    def follow(what: str, start: Any, done: Any) -> None:
        """Start a job (`start()` answers `{"job": ...}`) and follow it on a thread: the bar shows its steps; at
        its end `done(result)` says what it made (its error, if it failed)."""
        if not running.acquire(blocking=False):
            status.value = error_html(RuntimeError(f"a {what} is under way on this page: wait for it"))
            return
        try:
            job = start()["job"]
        except Exception as exc:  # noqa: BLE001
            running.release()
            status.value = error_html(exc)
            return
        status.value, bar.value, bar.layout.display = "", 0.0, ""
        step.value = f"{escape(what)}: {escape(job['id'])} queued"

        def watch() -> None:
            result: dict[str, Any] | None = None
            failed = ""
            try:
                while True:
                    state = session.wb.call("GET", f"/api/jobs/{seg(job['id'])}")
                    bar.value = float(state.get("progress") or 0.0)
                    step.value = f"{escape(what)}: {escape(state.get('message') or state['state'])}"
                    if state.get("finished") is not None:
                        break
                    time.sleep(POLL_S)
                if state["state"] == "done":
                    result = state.get("result") or {}
                else:
                    failed = (f"<p class='bkg-error'>{escape(what)} {escape(state['state'])}: "
                              f"{escape(str(state.get('error') or ''))}</p>")  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                failed = error_html(exc)
            finally:
                bar.layout.display = "none"
                running.release()
            # the lists show what the job made before the page says it is done (the other way round, "restored as
            # big-copy" stood while big-copy could not yet be picked: found by CI on two loaded cores)
            refresh()
            if result is not None:
                done(result)
            else:
                status.value = failed

        threading.Thread(target=watch, daemon=True).start()

    def take_snapshot(_: Any) -> None:
        name = pick.value
        follow(
            "snapshot",
            lambda: session.wb.call("POST", f"/api/collections/{seg(name)}/snapshots", params={"background": "true"}),
            lambda r: setattr(step, "value", f"snapshot <code>{escape(r.get('id', ''))}</code> of "
                                             f"<code>{escape(name)}</code> written ({r.get('points', 0):,} points, "
                                             f"{fmt_bytes(r.get('bytes'))})"),
        )  # fmt: skip

    def restore_snapshot(_: Any) -> None:
        name, snap, target = pick.value, snap_pick.value, into.value.strip() or pick.value

        def go() -> None:
            confirm.children = []
            path = f"/api/collections/{seg(name)}/snapshots/{seg(snap)}/restore"
            follow(
                "restore",
                lambda: session.wb.call("POST", path, json={"into": target}, params={"background": "true"}),
                lambda r: setattr(step, "value", f"restored <code>{escape(snap)}</code> as "
                                                 f"<code>{escape(r.get('name', target))}</code> "
                                                 f"({r.get('count', 0):,} points)"),
            )  # fmt: skip

        if target != name and target in known:  # the gateway restores into a new name or the collection itself
            status.value = error_html(InvalidInput(f"collection {target} exists: restore into a new name, or into "
                                                   f"{name} itself (leave 'into' empty)", field="into"))  # fmt: skip
        elif target in known:  # it replaces what is there
            points = int(known[target].get("count") or 0)
            ask_first(confirm, f"<b>Replace <code>{escape(target)}</code> ({points:,} points) with snapshot "
                               f"<code>{escape(snap)}</code>?</b>", "Replace it", go)  # fmt: skip
        else:
            go()

    def delete_snapshot(_: Any) -> None:
        name, snap = pick.value, snap_pick.value

        def go() -> None:
            confirm.children = []
            try:
                session.wb.call("DELETE", f"/api/collections/{seg(name)}/snapshots/{seg(snap)}")
                status.value = ""
            except Exception as exc:  # noqa: BLE001
                status.value = error_html(exc)
            show_snapshots()

        ask_first(confirm, f"<b>Delete snapshot <code>{escape(snap)}</code> of <code>{escape(name)}</code>?</b>",
                  "Delete it", go)  # fmt: skip

    def drop_collection(_: Any) -> None:
        name = pick.value
        points = int(known.get(name, {}).get("count") or 0)

        def go() -> None:
            confirm.children = []
            try:
                session.wb.call("DELETE", f"/api/collections/{seg(name)}")
                status.value = f"<p>dropped <code>{escape(name)}</code> (its snapshots stay)</p>"
            except Exception as exc:  # noqa: BLE001
                status.value = error_html(exc)
            refresh()

        ask_first(confirm, f"<b>Drop <code>{escape(name)}</code> and its {points:,} points?</b> Its snapshots stay.",
                  "Drop it", go)  # fmt: skip

    take.on_click(take_snapshot)
    restore.on_click(restore_snapshot)
    delete.on_click(delete_snapshot)
    drop.on_click(drop_collection)
    pick.observe(show_snapshots, "value")
    refresh()
    session.every(refresh_s, refresh)
    if not may:
        status.value = "<p class='bkg-empty'>Snapshots, restores and drops need the scope collections:write.</p>"
    return W.VBox([body])
