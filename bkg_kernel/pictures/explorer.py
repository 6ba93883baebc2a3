"""A collection as a 2-D map of its vectors: PCA (by the gateway) or UMAP (here, from 50 PCA components),
sampled past a size you choose (the same points and the same layout for a seed), coloured by a payload field;
hover shows a point, a box or lasso selection lists the points, a click shows the nearest neighbours, and a
filter (the store's filter language) narrows it.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from html import escape
from typing import Any

import numpy as np

from bkg_kernel.display import fmt_count
from bkg_kernel.errors import user_message
from bkg_kernel.pictures.charts import OTHER, PALETTE, figure, legend_style
from bkg_kernel.pictures.loader import PanelView, use_panel

MAX_CATEGORIES = len(PALETTE)
LISTED = 50  # selected points listed by name; the rest counted
UMAP_COMPONENTS = 50
UMAP_MIN_POINTS = 4  # fewer: umap-learn's spectral start fails (3 points), or its neighbour graph does (2)
MAX_SEED = 2**32 - 1  # umap-learn's random_state takes 0..2**32-1


def _short(value: Any, n: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


def _float(v: int | float) -> float:
    """A payload number as a float: an integer past the float range is an infinity of its sign."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def colour_column(payloads: list[Any], field: str | None) -> tuple[list[str], list[str], str]:
    """Return each point's colour and legend label for `field`, and how the field was read (categories, a
    numeric scale, or none)."""
    n = len(payloads)
    if not field:
        return [PALETTE[0]] * n, [""] * n, "none"
    values = [p.get(field) if isinstance(p, dict) else None for p in payloads]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    distinct = {json.dumps(v, default=str) for v in values if v is not None}
    if numbers and len(numbers) == sum(v is not None for v in values) and len(distinct) > MAX_CATEGORIES:
        from bokeh.palettes import Viridis256

        finite = [x for x in map(_float, numbers) if math.isfinite(x)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        # halved first: a field spanning -1e308..1e308 would overflow `hi - lo` (and colour every point NaN)
        span = (hi / 2 - lo / 2) or 1.0

        def scale(v: Any) -> str:
            if v is None:
                return OTHER
            x = _float(v)
            step = 0.0 if x <= lo else 255.0 if x >= hi else (x / 2 - lo / 2) / span * 255
            return Viridis256[min(255, max(0, int(step)))]

        return [scale(v) for v in values], [_short(v, 30) if v is not None else "(none)" for v in values], "scale"
    counts = Counter(_short(v, 30) for v in values if v is not None)
    top = [k for k, _ in counts.most_common(MAX_CATEGORIES - 1 if len(counts) > MAX_CATEGORIES else MAX_CATEGORIES)]
    colour_of = {k: PALETTE[i] for i, k in enumerate(top)}
    labels = []
    for v in values:
        key = _short(v, 30) if v is not None else None
        labels.append(key if key in colour_of else "(none)" if key is None else "(other)")
    return [colour_of.get(lab, OTHER) for lab in labels], labels, "categories"


class Explorer(PanelView):
    """The map of one collection; displays itself in a notebook and `.widget()` goes into a dashboard."""

    def __init__(
        self,
        wb: Any,
        name: str,
        *,
        color: str | None = None,
        method: str = "pca",
        sample: int = 5000,
        filter: dict[str, Any] | None = None,
        neighbours: int = 10,
        height: int = 520,
        seed: int = 0,
    ) -> None:
        if method not in ("pca", "umap"):
            raise ValueError(f"method must be 'pca' or 'umap', not {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}")
        self.pn = use_panel(wb.url)
        self.wb, self.name = wb, name
        self.neighbours = neighbours
        self.data: dict[str, Any] = {}
        pn = self.pn
        self.color = pn.widgets.Select(label="colour by", options=[""], value="", width=180)
        self.method = pn.widgets.RadioButtonGroup(label="projection", options=["pca", "umap"], value=method)
        self.sample = pn.widgets.IntInput(
            label="sample", value=sample, start=100, end=50_000, step=1000, width=110, css_classes=["bkg-sample"]
        )
        self.seed = pn.widgets.IntInput(
            label="seed", value=seed, start=0, end=MAX_SEED, width=90, css_classes=["bkg-seed"]
        )
        self.filter = pn.widgets.TextInput(
            label="filter",
            value=json.dumps(filter) if filter else "",
            placeholder='{"label": "sports"}',
            width=260,
            css_classes=["bkg-filter"],
        )
        self.draw_button = pn.widgets.Button(label="Draw", color="primary", width=80, align="end")
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["bkg-map-status"])
        self.selection = pn.pane.HTML(
            "<p class='bkg-empty'>Drag a box or a lasso over the map to list points; click one for its neighbours.</p>",
            sizing_mode="stretch_width",
            css_classes=["bkg-map-selection"],
        )
        self.neighbour_list = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["bkg-map-neighbours"])
        self.plot = pn.pane.Bokeh(sizing_mode="stretch_width", height=height)
        self.height = height
        self.draw_button.on_click(lambda _: self.draw())
        self.color.param.watch(lambda _: self._recolour(), "value")
        self._wanted_colour = color
        self._drawing = False
        self.draw()

    # -- data ----------------------------------------------------------------------------------------
    def _fetch(self) -> dict[str, Any]:
        flt = json.loads(self.filter.value) if self.filter.value.strip() else None
        umap, seed = self.method.value == "umap", int(self.seed.value)
        body = {
            "sample": int(self.sample.value), "filter": flt, "seed": seed,
            "components": UMAP_COMPONENTS if umap else 2,
        }  # fmt: skip
        data = dict(self.wb.call("POST", f"/api/collections/{self.name}/map", json=body))
        data["seed"], data["asked"], data["drawn"] = seed, self.method.value, "pca"  # said in the status line
        reduced = data.pop("reduced", None)
        if umap and data["sampled"] >= UMAP_MIN_POINTS:
            xy = umap_2d(np.frombuffer(base64.b64decode(reduced), dtype=np.float32).reshape(data["sampled"], -1), seed)
            data["x"], data["y"], data["drawn"] = xy[:, 0].tolist(), xy[:, 1].tolist(), "umap"
        return data

    def draw(self) -> None:
        """Fetch the sample (with the current filter, size and projection) and draw it."""
        try:
            self.status.object = "<p>Drawing…</p>"
            self.data = self._fetch()
        except json.JSONDecodeError as exc:
            self.status.object = f"<p class='bkg-error'>filter: not JSON ({escape(str(exc))})</p>"
            return
        except Exception as exc:  # noqa: BLE001 - said in the view
            self.status.object = f"<p class='bkg-error'>{escape(user_message(exc))}</p>"
            return
        fields = sorted({k for p in self.data["payloads"] if isinstance(p, dict) for k in p})
        self.color.options = ["", *fields]
        wanted = self._wanted_colour if self._wanted_colour in fields else default_colour(self.data["payloads"], fields)
        if wanted and self.color.value != wanted:
            self._wanted_colour = wanted
            self._drawing = True  # drawn once, below, not also by _recolour
            try:
                self.color.value = wanted
            finally:
                self._drawing = False
        d = self.data
        if not d["sampled"]:
            self.plot.object = None
            self.status.object = f"<p class='bkg-empty'><b>{escape(self.name)}</b> {self._nothing_drawn()}</p>"
            return
        self.status.object = f"<p><b>{escape(self.name)}</b>: {self._what_is_drawn()}.</p>"
        self._build_plot()

    def _what_is_drawn(self) -> str:
        d = self.data
        shown = (
            f"all {fmt_count(d['total'])} points"
            if d["sampled"] == d["total"]
            else f"a sample of {fmt_count(d['sampled'])} of {fmt_count(d['total'])} points"
        )
        if d["drawn"] == "umap":
            return f"{shown} (UMAP of {UMAP_COMPONENTS} PCA components, seed {d['seed']})"
        how = "PCA"
        if d["asked"] == "umap":  # too few points for UMAP: said, not drawn under its name
            how = f"PCA, not UMAP: UMAP needs at least {UMAP_MIN_POINTS} points and this has {d['sampled']}"
        seed = f", seed {d['seed']}" if d["sampled"] < d["total"] else ""  # the seed picked the sample
        var = d.get("explained_variance") or []
        explained = f"; the axes explain {var[0]:.0%} and {var[1]:.0%} of the variance" if len(var) == 2 else ""
        return f"{shown} ({how}{seed}{explained})"

    def _nothing_drawn(self) -> str:
        if self.filter.value.strip():
            return "has no point that matches this filter."
        name = escape(repr(self.name))
        return (
            f"has no points yet. Upload some with <code>wb.collection({name}).upsert(...)</code>, or index "
            f"documents into it with <code>wb.brain.index({name}, [{{'text': 'hello world'}}])</code>; then Draw "
            "again."
        )

    # -- drawing -------------------------------------------------------------------------------------
    def _columns(self) -> dict[str, list[Any]]:
        d = self.data
        colour, label, _ = colour_column(d["payloads"], self.color.value or None)
        return {
            "x": d["x"], "y": d["y"], "id": [str(i) for i in d["ids"]],
            "text": [_short(t or "", 140) for t in d["texts"]],
            "payload": [_short(p or {}, 140) for p in d["payloads"]],
            "colour": colour, "label": label,
        }  # fmt: skip

    def _build_plot(self) -> None:
        from bokeh.models import ColumnDataSource, HoverTool

        self.source = ColumnDataSource(self._columns())
        self.near = ColumnDataSource({"x": [], "y": []})
        f = figure(
            height=self.height, tools="pan,wheel_zoom,box_select,lasso_select,tap,reset,save",
            active_drag="pan", active_scroll="wheel_zoom", output_backend="webgl",
        )  # fmt: skip
        f.xaxis.visible = f.yaxis.visible = False
        f.grid.grid_line_alpha = 0.3
        size = 4 if len(self.data["ids"]) > 5000 else 6
        legend = {"legend_field": "label"} if self.color.value else {}
        points = f.scatter(
            "x", "y", source=self.source, size=size, color="colour", alpha=0.7, line_color=None,
            selection_alpha=1.0, nonselection_alpha=0.15, **legend,
        )  # fmt: skip
        f.scatter("x", "y", source=self.near, size=size + 8, fill_color=None, line_color="#d62728", line_width=2)
        f.add_tools(
            HoverTool(
                renderers=[points],
                tooltips=[("id", "@id"), ("text", "@text"), ("payload", "@payload")],
            )
        )
        if legend:
            f.legend.location = "top_left"
            f.legend.label_text_font_size = "11px"
            f.legend.click_policy = "hide"
            legend_style(f)
        self.source.selected.on_change("indices", self._selected)
        self.figure = f
        self.plot.object = f

    def _recolour(self) -> None:
        if self.data.get("sampled") and hasattr(self, "source") and not self._drawing:
            try:
                self._build_plot()  # the legend follows the colour field, so the figure is rebuilt
            except Exception as exc:  # noqa: BLE001 - said in the view (a widget callback's error shows nowhere)
                field = escape(str(self.color.value))
                self.status.object = f"<p class='bkg-error'>colour by {field}: {escape(user_message(exc))}</p>"

    # -- interaction ---------------------------------------------------------------------------------
    def _selected(self, attr: str, old: list[int], new: list[int]) -> None:
        d = self.data
        if not new:
            self.selection.object = "<p class='bkg-empty'>Nothing selected.</p>"
            self.near.data = {"x": [], "y": []}
            return
        rows = "".join(
            f"<tr><td>{escape(str(d['ids'][i]))}</td><td>{escape(_short(d['texts'][i] or '', 120))}</td>"
            f"<td>{escape(_short(d['payloads'][i] or {}, 80))}</td></tr>"
            for i in new[:LISTED]
        )
        more = f" (the first {LISTED} listed)" if len(new) > LISTED else ""
        self.selection.object = (
            f"<p><b>{len(new)} selected</b>{more}</p><table class='bkg-table'><tr><th>id</th><th>text</th>"
            f"<th>payload</th></tr>{rows}</table>"
        )
        if len(new) == 1:
            self.show_neighbours(new[0])

    def show_neighbours(self, i: int) -> None:
        """List the nearest neighbours of the i-th drawn point (from the whole collection) and ring those drawn."""
        d = self.data
        pid = d["ids"][i]
        try:
            got = self.wb.call("POST", f"/api/collections/{self.name}/points/get", json={"ids": [pid]})["points"]
            r = self.wb.call(
                "POST", f"/api/collections/{self.name}/query",
                json={"vector": got[0]["vector"], "k": self.neighbours + 1, "with_text": True},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            self.neighbour_list.object = f"<p class='bkg-error'>{escape(user_message(exc))}</p>"
            return
        hits = [h for h in r["results"] if h["id"] != pid][: self.neighbours]
        at = {str(x): j for j, x in enumerate(d["ids"])}
        drawn = [at[str(h["id"])] for h in hits if str(h["id"]) in at]
        self.near.data = {"x": [d["x"][j] for j in drawn], "y": [d["y"][j] for j in drawn]}
        rows = "".join(
            f"<tr><td>{k}</td><td>{escape(str(h['id']))}</td><td>{h['score']:.3f}</td>"
            f"<td>{escape(_short(h.get('text') or '', 120))}</td></tr>"
            for k, h in enumerate(hits, 1)
        )
        self.neighbour_list.object = (
            f"<p><b>Nearest neighbours of {escape(str(pid))}</b> ({len(drawn)} of them on the map, ringed red)</p>"
            f"<table class='bkg-table'><tr><th>#</th><th>id</th><th>score</th><th>text</th></tr>{rows}</table>"
        )

    # -- showing -------------------------------------------------------------------------------------
    def panel(self) -> Any:
        """Return the whole view as a Panel layout."""
        pn = self.pn
        controls = pn.Row(self.color, self.method, self.sample, self.seed, self.filter, self.draw_button)
        side = pn.Column(self.neighbour_list, self.selection, width=440, height=self.height, scroll=True)
        return pn.Column(controls, self.status, pn.Row(self.plot, side), sizing_mode="stretch_width")


def default_colour(payloads: list[Any], fields: list[str]) -> str | None:
    """Return the first payload field with 2 to 20 distinct values (a label worth colouring by), if any."""
    for field in fields:
        values = {json.dumps(p.get(field), default=str) for p in payloads[:2000] if isinstance(p, dict)}
        if 2 <= len(values) <= MAX_CATEGORIES:
            return field
    return None


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return UMAP's 2-D layout of the rows of `x` (umap-learn; its first call compiles, a few seconds)."""
    import umap

    n_neighbors = max(2, min(15, len(x) - 1))
    # seeded for a layout that stays put between draws, which UMAP runs on one thread (said here, not warned)
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)
