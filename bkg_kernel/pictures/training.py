"""A trained classifier at a glance: the confusion matrix as a heatmap, per-label precision / recall / F1
against the majority baseline, and the learning curve per epoch."""

from __future__ import annotations

from html import escape
from typing import Any

from bkg_kernel.models.classifier import tested_labels
from bkg_kernel.pictures.charts import colours, figure, legend_style
from bkg_kernel.pictures.loader import use_panel


def _confusion(labels: list[str], matrix: list[list[int]]) -> Any:
    from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper

    cells = [(t, p, int(matrix[i][j])) for i, t in enumerate(labels) for j, p in enumerate(labels)]
    totals = [sum(row) or 1 for row in matrix]
    src = ColumnDataSource(
        {
            "true": [c[0] for c in cells], "pred": [c[1] for c in cells], "n": [c[2] for c in cells],
            "share": [c[2] / totals[labels.index(c[0])] for c in cells],
            "ink": ["white" if c[2] / totals[labels.index(c[0])] > 0.5 else "#333" for c in cells],
        }
    )  # fmt: skip
    side = max(260, 48 * len(labels) + 90)
    f = figure("confusion (rows: true label)", x_range=labels, y_range=labels[::-1], height=side,
               sizing_mode="fixed", width=side + 40, tools="save")  # fmt: skip
    mapper = LinearColorMapper(palette="Blues256", low=1.0, high=0.0)
    f.rect("pred", "true", 1, 1, source=src, fill_color={"field": "share", "transform": mapper}, line_color="white")
    f.text("pred", "true", text="n", source=src, text_align="center", text_baseline="middle", text_color="ink",
           text_font_size="12px")  # fmt: skip
    f.xaxis.axis_label, f.yaxis.axis_label = "predicted", "true"
    f.xaxis.major_label_orientation = 0.8 if len(labels) > 4 else 0
    f.add_tools(HoverTool(tooltips=[("true", "@true"), ("predicted", "@pred"), ("count", "@n"),
                                    ("share", "@share{0%}")]))  # fmt: skip
    return f


def _per_label(per_label: list[dict[str, Any]], baseline: float) -> Any:
    from bokeh.models import ColumnDataSource, HoverTool, Span  # type: ignore[attr-defined]
    from bokeh.transform import dodge

    labels = [r["label"] for r in per_label]
    # a label with no held-out chunks has no metrics (null): no bars, "not tested" where they would stand
    nan = float("nan")
    metrics = {m: [nan if r[m] is None else r[m] for r in per_label] for m in ("precision", "recall", "f1")}
    untested = [r["label"] for r in per_label if not r["support"]]
    status = ["tested" if r["support"] else "not tested: no held-out chunks" for r in per_label]
    src = ColumnDataSource({"label": labels, "status": status, **metrics})
    f = figure("per label, against the majority baseline's accuracy (dashed)", x_range=labels, height=280,
               tools="save")  # fmt: skip
    for (metric, offset), colour in zip((("precision", -0.25), ("recall", 0.0), ("f1", 0.25)), colours(3), strict=True):
        f.vbar(x=dodge("label", offset, range=f.x_range), top=metric, width=0.22, source=src, color=colour,
               legend_label=metric)  # fmt: skip
    if untested:
        n = len(untested)
        marks = ColumnDataSource({"label": untested, "y": [0.03] * n, "text": ["not tested"] * n})
        f.text("label", "y", text="text", source=marks, text_align="left", text_baseline="middle", angle=1.5708,
               text_color="#6e7781", text_font_size="11px", text_font_style="italic")  # fmt: skip
    f.add_layout(Span(location=baseline, dimension="width", line_dash="dashed", line_color="#d62728", line_width=2))
    f.y_range.start, f.y_range.end = 0, 1.05
    f.add_layout(f.legend[0], "right")  # beside the bars, never over them
    legend_style(f)
    f.add_tools(HoverTool(tooltips=[("label", "@label"), ("precision", "@precision{0.000}"),
                                    ("recall", "@recall{0.000}"), ("F1", "@f1{0.000}"), ("", "@status")]))  # fmt: skip
    return f


def _curve(curve: list[dict[str, Any]]) -> Any:
    from bokeh.models import ColumnDataSource, HoverTool, LinearAxis, Range1d

    src = ColumnDataSource({k: [c.get(k) for c in curve] for k in ("epoch", "loss", "train_accuracy", "test_accuracy")})
    f = figure("learning curve", height=280, tools="save", x_axis_label="epoch", y_range=(0, 1.05))
    a, b, c = colours(3)
    for key, colour, name in (("train_accuracy", a, "train accuracy"), ("test_accuracy", b, "held-out accuracy")):
        f.line("epoch", key, source=src, color=colour, line_width=2, legend_label=name)
        f.scatter("epoch", key, source=src, color=colour, size=6, legend_label=name)  # one epoch is still a point
    losses = [x for x in src.data["loss"] if x is not None]
    if losses:
        f.extra_y_ranges = {"loss": Range1d(start=0, end=max(losses) * 1.05)}
        f.add_layout(LinearAxis(y_range_name="loss", axis_label="loss"), "right")
        f.line("epoch", "loss", source=src, color=c, line_dash="dashed", y_range_name="loss", legend_label="loss")
    f.add_layout(f.legend[0], "right")
    legend_style(f)
    f.add_tools(HoverTool(tooltips=[("epoch", "@epoch"), ("train", "@train_accuracy{0.000}"),
                                    ("held out", "@test_accuracy{0.000}"), ("loss", "@loss{0.0000}")]))  # fmt: skip
    return f


def training_report(report: dict[str, Any], gateway_url: str | None = None) -> Any:
    """Draw a `brainml.train` report: confusion heatmap, per-label bars against the baseline, learning curve."""
    pn = use_panel(gateway_url)
    m = report.get("metrics") or report
    labels = [r["label"] for r in m["per_label"]]
    head = pn.pane.HTML(
        f"<p><b>{escape(str(report.get('model_id', 'classifier')))}</b>: accuracy <b>{m['accuracy']:.3f}</b> against "
        f"{m['majority_baseline']:.3f} for always guessing the commonest label; macro F1 {m['f1_macro']:.3f} over "
        f"{escape(tested_labels(m))}; {m['test_examples']} held-out chunks of {m['test_documents']} documents.</p>"
    )
    charts = [pn.pane.Bokeh(_confusion(labels, m["confusion"]))]
    charts.append(pn.pane.Bokeh(_per_label(m["per_label"], m["majority_baseline"]), sizing_mode="stretch_width"))
    row = pn.Row(*charts, sizing_mode="stretch_width")
    parts = [head, row]
    if m.get("curve"):
        parts.append(pn.pane.Bokeh(_curve(m["curve"]), sizing_mode="stretch_width"))
    return pn.Column(*parts, sizing_mode="stretch_width")
