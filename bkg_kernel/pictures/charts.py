"""What every view is drawn with: colours and a plain Bokeh figure (numbers for people: `bkg_kernel.display`)."""

from __future__ import annotations

from typing import Any

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip
OTHER = "#b0b0b0"  # points with no value, and labels past the palette
INK = "#8a8a8a"  # axes, titles and legends: readable on the light and the dark theme alike
TOOLS = "pan,wheel_zoom,box_zoom,reset,save"


def colours(n: int) -> list[str]:
    """Return `n` distinct colours (the palette repeated past 20)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def figure(title: str = "", **kw: Any) -> Any:
    """Return a Bokeh figure with bkg's defaults (sized to its container, quiet toolbar, no outline)."""
    from bokeh.plotting import figure as bk_figure

    defaults: dict[str, Any] = {
        "title": title, "tools": TOOLS, "toolbar_location": "right", "sizing_mode": "stretch_width", "height": 260,
    }  # fmt: skip
    f = bk_figure(**{**defaults, **kw})
    f.outline_line_color = None
    f.toolbar.logo = None
    # transparent, with mid-grey ink: the page's theme (Voila's or JupyterLab's, light or dark) shows through
    f.background_fill_alpha = 0
    f.border_fill_alpha = 0
    f.title.text_font_size = "13px"  # type: ignore[union-attr]
    f.title.text_color = INK  # type: ignore[union-attr]
    for axis in (*f.xaxis, *f.yaxis):
        axis.axis_line_color = axis.major_tick_line_color = axis.minor_tick_line_color = INK
        axis.major_label_text_color = axis.axis_label_text_color = INK
    for grid in f.grid:
        grid.grid_line_color, grid.grid_line_alpha = INK, 0.25
    return f


def legend_style(f: Any) -> None:
    """Give a figure's legend the theme-neutral look (call after glyphs with legend labels are added)."""
    for legend in f.legend:
        legend.background_fill_alpha = 0.4
        legend.border_line_alpha = 0
        legend.label_text_color = INK
