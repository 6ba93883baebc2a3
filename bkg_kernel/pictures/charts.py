"""What every view is drawn with: colours (light and dark), number formats and a plain Bokeh figure."""

from __future__ import annotations

from typing import Any

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip
OTHER = "#b0b0b0"  # points with no value, and labels past the palette
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
    f.title.text_font_size = "13px"  # type: ignore[union-attr]
    return f


def fmt_bytes(n: float | None) -> str:
    """Return a byte count for people (`1.5 GB`)."""
    if not n:
        return "0 B"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_duration(seconds: float | None) -> str:
    """Return a duration for people (`850 ms`, `12.3 s`, `4 min 05 s`, `3 h 20 min`)."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def fmt_count(n: float | None) -> str:
    """Return a count for people (`950`, `12.5k`, `3.2M`)."""
    if n is None:
        return "–"
    if abs(n) < 1000:
        return f"{n:g}" if isinstance(n, float) else str(n)
    if abs(n) < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"
