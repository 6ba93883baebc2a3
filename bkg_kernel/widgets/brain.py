"""brainml's page: the collections it indexed and a query playground with the matches highlighted."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, error_html, table

STATS_COLUMNS = ["collection", "documents", "chunks", "embed_model", "queries", "avg_query_ms"]


def brain_panel(session: Session) -> W.VBox:
    """Show brainml's collections and a hybrid / vector / text query playground."""
    from bkg_kernel.client.brain import Ranked

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
    listing = W.HTML(table(stats, STATS_COLUMNS))
    return W.VBox([plugin_actions(session, "brainml"), listing, coll, query, mode, go, out])
