"""repoagent's page: the workspaces with their index status, an index button, a repo map and a question box
whose answer shows its checked citations as code."""

from __future__ import annotations

import time
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, error_html, set_options, table

COLUMNS = ["name", "path", "git", "file_count", "symbols", "chunks", "indexed", "added_by"]


def _rows(workspaces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **w,
            "indexed": time.strftime("%Y-%m-%d %H:%M", time.localtime(w["indexed_at"]))
            if w.get("indexed_at")
            else "no",
        }
        for w in workspaces
    ]


def repo_panel(session: Session) -> W.VBox:
    """Show repoagent's workspaces, index one, draw its repo map and ask it a question."""
    from bkg_kernel.client.repo import Answer, MapText

    listing = W.HTML()
    pick = W.Dropdown(description="workspace")
    out = W.HTML()

    def refresh() -> None:
        spaces = session.wb.repos()
        listing.value = (
            table(_rows(spaces), COLUMNS) if spaces else "<p>No workspaces yet: add one with repo.workspace.</p>"
        )
        set_options(pick, [w["name"] for w in spaces])

    def run(action: Any) -> Any:
        def handler(_: Any) -> None:
            if not pick.value:
                out.value = "<p>Pick a workspace first.</p>"
                return
            try:
                out.value = "<p>Working…</p>"
                out.value = action(session.wb.repo(pick.value))
            except Exception as exc:  # noqa: BLE001
                out.value = error_html(exc)

        return handler

    def index(repo: Any) -> str:
        r = repo.index(progress=False)
        refresh()
        done = f"{len(r['changed'])} changed files of {r['files']} ({r['symbols']} symbols)"
        return f"<p>Indexed {done} in {r['took_s']} s.</p>"

    new_name = W.Text(description="name", placeholder="my-repo", layout=W.Layout(width="260px"))
    new_path = W.Text(description="path", placeholder="a folder under a repo root", layout=W.Layout(width="420px"))
    add = W.Button(description="Add workspace", icon="plus")

    def add_workspace(_: Any) -> None:
        try:
            session.wb.add_repo(new_name.value, new_path.value)
            refresh()
            pick.value = new_name.value
            out.value = f"<p>Added workspace <b>{escape(new_name.value)}</b>.</p>"
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)

    add.on_click(add_workspace)
    question = W.Text(description="question", placeholder="Where is X done, and how?", layout=W.Layout(width="600px"))
    buttons = [
        (W.Button(description="Index", icon="refresh"), index),
        (W.Button(description="Repo map", icon="sitemap"), lambda r: MapText(r.map(budget_tokens=1024))._repr_html_()),
        (W.Button(description="Ask", button_style="primary"), lambda r: Answer(r.ask(question.value))._repr_html_()),
    ]
    for button, action in buttons:
        button.on_click(run(action))
    refresh()
    row = W.HBox([b for b, _ in buttons])
    adding = W.HBox([new_name, new_path, add])
    return W.VBox([plugin_actions(session, "repoagent"), listing, adding, pick, question, row, out])
