"""brainml's page: the collections it indexed and a query playground with the matches highlighted."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, enable_when_picked, error_html, set_options, table

STATS_COLUMNS = ["collection", "documents", "chunks", "embed_model", "queries", "avg_query_ms"]
EMPTY = (
    "<h3>No indexed collections yet</h3><p class='bkg-empty'>Index documents from a notebook, then search them here "
    "(this page shows them once they are indexed): <code>wb.brain.index('docs', [{'text': 'The sun is a star.', "
    "'metadata': {'label': 'space'}}])</code></p>"
)


def brain_panel(session: Session, refresh_s: float = 10.0) -> W.VBox:
    """Show brainml's collections, a hybrid / vector / text query playground with each result's vector and BM25
    scores drawn next to the fused one, and a classifier trainer with its report; the collections and their query
    counts are read again after each search and every `refresh_s`."""
    from bkg_kernel.client.brain import Ranked
    from bkg_kernel.widgets.pictures import retrieval, training_form

    listing = W.HTML()
    coll = W.Dropdown(description="collection")
    train_coll = W.Dropdown(description="collection")
    query = W.Text(description="query", layout=W.Layout(width="500px"))
    mode = W.ToggleButtons(options=["hybrid", "vector", "text"])
    go = W.Button(description="Search", button_style="primary")
    enable_when_picked(coll, [go])
    out = W.VBox([])
    playground = [listing, coll, query, mode, go, out, training_form(session, [], pick=train_coll)]
    empty = W.HTML(EMPTY)
    body = W.VBox([])

    def refresh() -> None:
        try:
            stats = session.wb.brain.stats()
        except Exception as exc:  # noqa: BLE001
            listing.value = error_html(exc)
            if not body.children:
                body.children = [listing]
            return
        names = [s["collection"] for s in stats]
        set_options(coll, names)
        set_options(train_coll, names)
        listing.value = table(stats, STATS_COLUMNS)
        shown = tuple(playground) if stats else (empty,)
        if tuple(body.children) != shown:
            body.children = shown

    def search(_: Any) -> None:
        try:
            r = Ranked(session.wb.brain.query(coll.value, query.value, mode=mode.value, explain=True))
            out.children = [retrieval(r, session), W.HTML(r._repr_html_())]
        except Exception as exc:  # noqa: BLE001
            out.children = [W.HTML(error_html(exc))]
        refresh()  # its query count, and collections indexed meanwhile

    go.on_click(search)
    refresh()
    session.every(refresh_s, refresh)
    return W.VBox([plugin_actions(session, "brainml"), body])
