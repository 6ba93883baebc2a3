"""brainml's page: the collections it indexed and a query playground with the matches highlighted."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, error_html, table

STATS_COLUMNS = ["collection", "documents", "chunks", "embed_model", "queries", "avg_query_ms"]


def brain_panel(session: Session) -> W.VBox:
    """Show brainml's collections, a hybrid / vector / text query playground with each result's vector and BM25
    scores drawn next to the fused one, and a classifier trainer with its report."""
    from bkg_kernel.client.brain import Ranked
    from bkg_kernel.widgets.pictures import retrieval, training_form

    stats = session.wb.brain.stats()
    if not stats:
        return W.VBox(
            [
                plugin_actions(session, "brainml"),
                W.HTML(
                    "<h3>No indexed collections yet</h3><p class='bkg-empty'>Index documents from a notebook, then "
                    "search them here: <code>wb.brain.index('docs', [{'text': 'The sun is a star.', "
                    "'metadata': {'label': 'space'}}])</code></p>"
                ),
            ]
        )
    names = [s["collection"] for s in stats]
    coll = W.Dropdown(options=names, description="collection")
    query = W.Text(description="query", layout=W.Layout(width="500px"))
    mode = W.ToggleButtons(options=["hybrid", "vector", "text"])
    go = W.Button(description="Search", button_style="primary")
    out = W.VBox([])

    def search(_: Any) -> None:
        try:
            r = Ranked(session.wb.brain.query(coll.value, query.value, mode=mode.value, explain=True))
            out.children = [retrieval(r, session), W.HTML(r._repr_html_())]
        except Exception as exc:  # noqa: BLE001
            out.children = [W.HTML(error_html(exc))]

    go.on_click(search)
    listing = W.HTML(table(stats, STATS_COLUMNS))
    return W.VBox(
        [plugin_actions(session, "brainml"), listing, coll, query, mode, go, out, training_form(session, names)]
    )
