"""Why a query ranked what it ranked: each result's fused score next to its vector and BM25 rank and score."""

from __future__ import annotations

from typing import Any

from bkg_kernel.pictures.charts import INK, colours, figure
from bkg_kernel.pictures.loader import use_panel

SIDES = [  # (result key, rank key, title, what a missing rank means)
    ("score", "rank", "fused (ranked)", ""),
    ("vector_score", "vector_rank", "vector similarity", "past #100"),
    ("text_score", "text_rank", "BM25", "no word in common"),
]


def retrieval_view(result: dict[str, Any], gateway_url: str | None = None, height_per_row: int = 28) -> Any:
    """Draw a `brainml.query` or collection query answer (asked with `explain=True`) as three bar charts side by
    side, one row per result: the fused score, the vector similarity and the BM25 score, each with its rank."""
    from bokeh.models import ColumnDataSource, HoverTool, LabelSet  # type: ignore[attr-defined]

    pn = use_panel(gateway_url)
    rows = result.get("results") or []
    if not rows:
        return pn.pane.HTML("<p class='bkg-empty'>No results: try another query, or mode='text' for exact words.</p>")
    labels = [f"#{i} {str(r.get('doc_id') or r['id'])[:24]}" for i, r in enumerate(rows, 1)][::-1]
    text = [(r.get("chunk") or r.get("text") or "")[:160] for r in rows][::-1]
    explained = any("vector_rank" in r for r in rows)
    sides = SIDES if explained else SIDES[:1]
    figs: list[Any] = []
    for (key, rank_key, title, missing), colour in zip(sides, colours(len(sides)), strict=True):
        values = [r.get(key) for r in rows][::-1]
        ranks = [r.get(rank_key) if rank_key != "rank" else i for i, r in enumerate(rows, 1)][::-1]
        src = ColumnDataSource(
            {
                "label": labels, "value": [v or 0.0 for v in values], "text": text,
                "note": [f"#{k}" if k else missing for k in ranks],
                "shown": ["–" if v is None else f"{v:.3f}" for v in values],
            }
        )  # fmt: skip
        f = figure(
            title, y_range=labels if not figs else figs[0].y_range, height=height_per_row * len(rows) + 70, tools="save"
        )
        f.hbar(y="label", right="value", height=0.7, source=src, color=colour)
        f.add_layout(LabelSet(x="value", y="label", text="note", source=src, x_offset=4, y_offset=-6,
                              text_font_size="10px", text_color=INK))  # fmt: skip
        f.add_tools(HoverTool(tooltips=[("result", "@label"), (title, "@shown (@note)"), ("text", "@text")]))
        f.x_range.start = 0
        f.x_range.range_padding = 0.25
        if figs:
            f.yaxis.visible = False
        figs.append(f)
    mode = result.get("mode", "")
    caption = (
        f"<p>{len(rows)} results ({mode}). Each bar's label is the result's rank in that list: hybrid fuses the vector "
        "and BM25 rankings by reciprocal rank, so a result high in both lists comes first.</p>"
        if explained
        else "<p>Ask with <code>explain=True</code> to see the vector and BM25 scores next to the fused one.</p>"
    )
    return pn.Column(pn.pane.HTML(caption), pn.Row(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in figs]),
                     sizing_mode="stretch_width")  # fmt: skip
