"""The dashboards' pictures: the collection explorer page, live telemetry on the overview and on each plugin's
page, the store and token charts, and the training report form. Each draws only when its page loaded Panel
(`dashboard(..., pictures=True)`); a notebook calls `bkg_kernel.pictures` directly."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.primitives import Session, enable_when_picked, error_html


def drawing() -> bool:
    """Return whether this page loaded Panel (so pictures can be drawn in it)."""
    from bkg_kernel.pictures import loader

    return loader._loaded  # noqa: SLF001


def telemetry(session: Session, plugins: list[str] | None = None) -> W.Widget:
    """Live cpu / memory / latency / requests charts for some plugins (all by default) over the last hour."""
    if not drawing():
        return W.HTML()
    from bkg_kernel.pictures.telemetry import TelemetryView

    try:
        return TelemetryView(session.wb, plugins).widget()
    except Exception as exc:  # noqa: BLE001
        return W.HTML(error_html(exc))


def store_and_tokens(session: Session) -> W.Widget:
    """The store's size per collection and, for auditors, LLM tokens per key and day."""
    if not drawing():
        return W.HTML()
    from bkg_kernel.pictures.loader import as_widget, use_panel
    from bkg_kernel.pictures.telemetry import store_chart, usage_chart

    pn = use_panel(session.wb.url)
    parts = []
    try:
        if session.can("collections:read"):
            parts.append(store_chart(session.wb))
        if session.can("admin:audit"):
            parts.append(usage_chart(session.wb))
    except Exception as exc:  # noqa: BLE001
        return W.HTML(error_html(exc))
    return as_widget(pn.Row(*parts, sizing_mode="stretch_width")) if parts else W.HTML()


def explorer_panel(session: Session) -> W.VBox:
    """Pick a collection (the largest first) and explore its map."""
    from bkg_kernel.pictures.explorer import Explorer

    cols = sorted(session.wb.call("GET", "/api/collections")["collections"], key=lambda c: -c.get("count", 0))
    if not cols:
        return W.VBox(
            [
                W.HTML(
                    "<div class='bkg-empty-state'><h3>No collections yet</h3><p class='bkg-empty'>A collection is "
                    "drawn here as a map of its vectors. Make one from a notebook, e.g. "
                    "<code>wb.brain.index('docs', [{'text': 'hello world', 'metadata': {'label': 'greeting'}}])"
                    "</code>, or upload points with <code>wb.collection('docs').upsert(...)</code>; then reload "
                    "this page.</p></div>"
                )
            ]
        )
    pick = W.Dropdown(
        options=[(f"{c['name']} ({c.get('count', 0):,} points)", c["name"]) for c in cols], description="collection"
    )
    body = W.VBox([])

    def show(_: Any = None) -> None:
        try:
            body.children = [Explorer(session.wb, pick.value).widget()]
        except Exception as exc:  # noqa: BLE001
            body.children = [W.HTML(error_html(exc))]

    pick.observe(show, "value")
    show()
    return W.VBox([pick, body])


def retrieval(result: dict[str, Any], session: Session) -> W.Widget:
    """The fused, vector and BM25 scores of a query's results side by side (if Panel is loaded)."""
    if not drawing():
        return W.HTML()
    from bkg_kernel.pictures.loader import as_widget
    from bkg_kernel.pictures.retrieval import retrieval_view

    return as_widget(retrieval_view(result, session.wb.url))


def training_form(session: Session, collections: list[str], pick: W.Dropdown | None = None) -> W.VBox:
    """Train a classifier on a collection's label field and show its report (needs models:write); `pick`: the
    collection picker to use instead of one offering `collections` (a page that keeps its options current)."""
    if not session.can("models:write"):
        return W.VBox([W.HTML("<p class='bkg-empty'>Training a classifier needs the scope models:write.</p>")])
    coll = pick if pick is not None else W.Dropdown(options=collections, description="collection")
    field = W.Text(description="label field", placeholder="label")
    model = W.ToggleButtons(options=["logistic", "mlp"])
    go = W.Button(description="Train", button_style="primary")
    out = W.VBox([])

    def train(_: Any) -> None:
        out.children = [W.HTML(f"<p>Training on {escape(str(coll.value))}…</p>")]
        try:
            report = session.wb.brain.train(coll.value, field.value.strip(), model=model.value, progress=False)
            if drawing():
                from bkg_kernel.pictures.loader import as_widget
                from bkg_kernel.pictures.training import training_report

                out.children = [as_widget(training_report(report, session.wb.url))]
            else:
                out.children = [W.HTML(report._repr_html_())]
        except Exception as exc:  # noqa: BLE001
            out.children = [W.HTML(error_html(exc))]

    go.on_click(train)
    enable_when_picked(coll, [go])
    return W.VBox([W.HTML("<h3>Train a classifier</h3>"), coll, field, model, go, out])
