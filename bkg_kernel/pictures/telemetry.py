"""Telemetry over time: per plugin cpu, memory, p50/p95 latency and requests/min over the last hour (the
gateway keeps that history, so a page opened now draws it at once) and live after that; LLM tokens per key and
per day; the store's size per collection."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from bkg_kernel.display import fmt_bytes, fmt_count, fmt_duration
from bkg_kernel.pictures.charts import colours, figure, legend_style
from bkg_kernel.pictures.loader import PanelView, use_panel
from bkg_kernel.runtime.telemetry import HISTORY_POINTS

SERIES = [  # (history column, chart title, y scale)
    ("cpu_percent", "CPU %", 1.0),
    ("rss_bytes", "memory (MB)", 1 / 2**20),
    ("latency_p95_ms", "latency p95 (ms; dashed: p50)", 1.0),
    ("requests_per_min", "requests / min", 1.0),
]


def _x(ts: list[float]) -> list[datetime]:
    """Bokeh shows a datetime axis in UTC: the moments in UTC (local wall times were shown as if UTC, and folded
    back on themselves when the clocks went back)."""
    return [datetime.fromtimestamp(t, UTC) for t in ts]


class TelemetryView(PanelView):
    """Per-plugin telemetry charts, filled from the gateway's history and then refreshed every `refresh_s`."""

    def __init__(
        self, wb: Any, plugins: list[str] | None = None, minutes: float = 60, refresh_s: float = 5.0, height: int = 200
    ) -> None:
        self.pn = use_panel(wb.url)
        self.wb, self.only, self.height = wb, plugins, height
        self.status = self.pn.pane.HTML("", css_classes=["bkg-telemetry-status"], sizing_mode="stretch_width")
        self.sources: dict[str, Any] = {}  # one ColumnDataSource per plugin
        self.last_t = 0.0
        self.samples = 0
        self.interval_s = 2.0  # the gateway's sampling period, as its answer says
        self.hosted: list[str] = []  # every plugin the gateway hosts
        history = self._history(minutes)
        self.figures = self._figures(history)
        self._say()
        self.callback = self.pn.state.add_periodic_callback(self.refresh, period=int(refresh_s * 1000))

    def _history(self, minutes: float) -> dict[str, dict[str, list[Any]]]:
        r = self.wb.call("GET", "/api/plugins/telemetry/history", params={"minutes": minutes})
        self.interval_s = float(r.get("interval_s", self.interval_s))
        self.hosted = sorted(r["plugins"])  # all of them, sampled yet or not
        return {p: cols for p, cols in r["plugins"].items() if self.only is None or p in self.only}

    def _data(self, cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
        data: dict[str, list[Any]] = {"t": _x(cols["t"])}
        for key, _, scale in SERIES:
            data[key] = [None if v is None else v * scale for v in cols[key]]
        data["latency_p50_ms"] = cols["latency_p50_ms"]
        return data

    def _figures(self, history: dict[str, dict[str, list[Any]]]) -> list[Any]:
        from bokeh.models import ColumnDataSource, HoverTool

        ids = sorted(history)
        palette = dict(zip(ids, colours(len(ids)), strict=True))
        for pid, cols in history.items():
            self.sources[pid] = ColumnDataSource(self._data(cols))
            self.samples = max(self.samples, len(cols["t"]))
            if cols["t"]:
                self.last_t = max(self.last_t, cols["t"][-1])
        figs = []
        x_range = None
        for key, title, _ in SERIES:
            f = figure(title, x_axis_type="datetime", height=self.height, tools="pan,xwheel_zoom,reset,save")
            f.y_range.start = 0  # from zero: a flat line reads as flat, not as noise
            f.xaxis.axis_label = "time (UTC)"
            f.y_range.range_padding = 0.1
            if x_range is None:
                x_range = f.x_range
            else:
                f.x_range = x_range  # the four charts pan and zoom together
            for pid in ids:
                src = self.sources[pid]
                line = f.line("t", key, source=src, color=palette[pid], line_width=2, legend_label=pid)
                if key == "latency_p95_ms":
                    f.line("t", "latency_p50_ms", source=src, color=palette[pid], line_dash="dashed", line_width=1)
                f.add_tools(
                    HoverTool(
                        renderers=[line],
                        tooltips=[("plugin", pid), ("time", "@t{%H:%M:%S}"), (title, f"@{key}{{0.0}}")],
                        formatters={"@t": "datetime"},
                    )
                )
            if ids:  # a figure with no line has no legend to set
                f.legend.visible = key == "cpu_percent"
                f.legend.click_policy = "hide"
                f.legend.label_text_font_size = "10px"
                f.legend.location = "top_left"
                legend_style(f)
            figs.append(f)
        return figs

    def _say(self) -> None:
        span = self.samples * self.interval_s
        missing = [p for p in self.only or [] if p not in self.hosted]  # asked for, never sampled here
        if missing:
            said = (
                f"<p class='bkg-empty'>Not hosted by this gateway: {escape(', '.join(missing))} (it hosts "
                f"{escape(', '.join(self.hosted)) or 'no plugin'}).</p>"
            )
        elif not self.sources:
            said = f"<p class='bkg-empty'>No plugin to draw{'.' if self.hosted else ': this gateway hosts none.'}</p>"
        else:
            said = ""
        if self.samples:
            said += f"<p>History: {self.samples} samples per plugin ({fmt_duration(span)}), refreshed live.</p>"
        elif self.sources:
            said += f"<p class='bkg-empty'>No samples yet: the gateway takes one every {self.interval_s:g} s.</p>"
        self.status.object = said

    def refresh(self) -> None:
        """Add the samples taken since the last refresh."""
        try:
            r = self.wb.call("GET", "/api/plugins/telemetry/history", params={"minutes": 5})
        except Exception:  # noqa: BLE001 - the next refresh tries again
            return
        newest, added = self.last_t, 0
        for pid, cols in r["plugins"].items():
            if pid not in self.sources:
                continue
            keep = [i for i, t in enumerate(cols["t"]) if t > self.last_t]
            if not keep:
                continue
            part = {k: [v[i] for i in keep] for k, v in cols.items()}
            self.sources[pid].stream(self._data(part), rollover=HISTORY_POINTS)
            newest = max(newest, part["t"][-1])
            added = max(added, len(keep))  # per plugin: every plugin is sampled in the same round
        self.samples = min(HISTORY_POINTS, self.samples + added)
        self.last_t = newest
        self._say()

    def stop(self) -> None:
        """Stop refreshing (a notebook that drew many views frees them; a closed dashboard's kernel goes away)."""
        self.callback.stop()

    def panel(self) -> Any:
        """Return the charts as a Panel layout (two by two)."""
        pn = self.pn
        if not self.sources:  # nothing to draw: what the status says, not four empty charts
            return pn.Column(self.status, sizing_mode="stretch_width")
        panes = [pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.figures]
        rows = [pn.Row(*panes[:2], sizing_mode="stretch_width"), pn.Row(*panes[2:], sizing_mode="stretch_width")]
        return pn.Column(self.status, *rows, sizing_mode="stretch_width")


def telemetry_view(wb: Any, plugins: list[str] | None = None, **kw: Any) -> TelemetryView:
    """Draw every plugin's (or some plugins') cpu, memory, latency and requests/min over the last hour, live."""
    return TelemetryView(wb, plugins, **kw)


def usage_chart(wb: Any, days: int = 14) -> Any:
    """Return LLM tokens per day, stacked by key (needs admin:audit), as a Panel pane."""
    from datetime import timedelta

    from bokeh.models import ColumnDataSource, HoverTool

    pn = use_panel(wb.url)
    since = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    rows = wb.call("GET", "/admin/usage", params={"group_by": "key_day", "since": since})["usage"]
    if not rows:
        return pn.pane.HTML(
            "<p class='bkg-empty'>No LLM tokens used in the last two weeks. A chat completion counts: "
            "<code>wb.llm.chat('hello')</code>.</p>"
        )
    days_seen = sorted({r["day"] for r in rows})
    key_of = [f"{r.get('username') or '?'}:{r.get('key_id') or 'session'}" for r in rows]
    keys = sorted(set(key_of))
    table = {k: [0] * len(days_seen) for k in keys}
    for key, r in zip(key_of, rows, strict=True):
        table[key][days_seen.index(r["day"])] += int(r["total_tokens"])
    src = ColumnDataSource({"day": days_seen, **table})
    f = figure("LLM tokens per day, by key", x_range=days_seen, height=240, tools="save")
    f.vbar_stack(keys, x="day", width=0.8, color=colours(len(keys)), source=src, legend_label=keys)
    f.add_tools(HoverTool(tooltips=[("day", "@day"), ("key", "$name"), ("tokens", "@$name{0,0}")]))
    f.legend.location = "top_left"
    f.legend.label_text_font_size = "10px"
    legend_style(f)
    f.xaxis.major_label_orientation = 0.8
    return pn.pane.Bokeh(f, sizing_mode="stretch_width")


def store_chart(wb: Any) -> Any:
    """Return each collection's size on disk and point count as a Panel pane."""
    from bokeh.models import ColumnDataSource, HoverTool

    pn = use_panel(wb.url)
    cols = wb.call("GET", "/api/collections")["collections"]
    if not cols:
        return pn.pane.HTML(
            "<p class='bkg-empty'>The store is empty. Index some documents to make a collection: "
            "<code>wb.brain.index('docs', [{'text': 'hello'}])</code>.</p>"
        )
    cols = sorted(cols, key=lambda c: c.get("bytes_on_disk") or 0)
    names = [c["name"] for c in cols]
    src = ColumnDataSource(
        {
            "name": names,
            "mb": [(c.get("bytes_on_disk") or 0) / 2**20 for c in cols],
            "size": [fmt_bytes(c.get("bytes_on_disk")) for c in cols],
            "points": [fmt_count(c.get("count", 0)) for c in cols],
        }
    )
    f = figure("store size per collection (MB)", y_range=names, height=max(140, 28 * len(names) + 60), tools="save")
    f.hbar(y="name", right="mb", height=0.7, source=src, color=colours(1)[0])
    f.add_tools(HoverTool(tooltips=[("collection", "@name"), ("size", "@size"), ("points", "@points")]))
    f.x_range.start = 0
    return pn.pane.Bokeh(f, sizing_mode="stretch_width")
