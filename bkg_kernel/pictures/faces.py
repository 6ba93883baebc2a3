"""Faces as faces: a gallery as a grid of thumbnails per subject, and an identify result as the photo with each
face boxed and named next to the similarity of every candidate."""

from __future__ import annotations

import re
from html import escape
from typing import Any

from bkg_kernel.display import faces_figure
from bkg_kernel.pictures.charts import colours, figure
from bkg_kernel.pictures.loader import use_panel

BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
GRID_CSS = """<style>
.bkg-faces .bkg-subject {margin: 6px 0 10px}
.bkg-faces .bkg-subject h4 {margin: 0 0 4px; font-size: 13px}
.bkg-faces .bkg-thumbs {display: flex; flex-wrap: wrap; gap: 4px}
.bkg-faces img, .bkg-faces .bkg-nothumb {width: 72px; height: 72px; border-radius: 6px; object-fit: cover}
.bkg-faces .bkg-nothumb {display: flex; align-items: center; justify-content: center; font-weight: 700;
  background: var(--jp-layout-color3, #ccc); color: var(--jp-ui-font-color1, #333)}
</style>"""


def gallery_html(gallery: str, subjects: list[dict[str, Any]]) -> str:
    """Return a gallery's subjects, each as a row of face thumbnails (initials where none was stored)."""
    if not subjects:
        return (
            f"<p class='bkg-empty'>Gallery {escape(gallery)} has no faces yet: enroll photos of a subject above, or "
            "<code>wb.faces.enroll_folder(gallery, folder)</code> with one subfolder per subject.</p>"
        )
    rows = []
    for s in subjects:
        name = str(s["subject"])
        thumbs = "".join(
            f"<img src='data:image/jpeg;base64,{f['thumb']}' title='{escape(str(f.get('source') or ''))}' "
            f"alt='{escape(name)}'/>"
            if _base64(f.get("thumb"))
            else f"<div class='bkg-nothumb' title='{escape(str(f.get('source') or ''))}'>{escape(name[:2])}</div>"
            for f in s["shown"]
        )
        more = f" (showing {len(s['shown'])})" if s["faces"] > len(s["shown"]) else ""
        rows.append(
            f"<div class='bkg-subject' data-subject='{escape(name)}'><h4>{escape(name)} · {s['faces']} "
            f"face{'s' if s['faces'] != 1 else ''}{more}</h4><div class='bkg-thumbs'>{thumbs}</div></div>"
        )
    return f"{GRID_CSS}<div class='bkg-faces'>{''.join(rows)}</div>"


def _base64(thumb: Any) -> bool:
    """Whether a stored thumbnail is base64 text, the one thing that goes into an `<img src>` as it is: a face's
    payload is whatever someone with `collections:write` put in `faces-<gallery>`, and markup there would run in
    the page of whoever looks at the gallery."""
    return isinstance(thumb, str) and BASE64.fullmatch(thumb) is not None


def faces_gallery(wb: Any, gallery: str, per_subject: int = 12) -> Any:
    """Return a gallery as a grid of face thumbnails per subject (a Panel pane)."""
    pn = use_panel(wb.url)
    r = wb.plugin("rustyface").invoke("faces.subjects", gallery=gallery, action="faces", per_subject=per_subject)
    return pn.pane.HTML(gallery_html(gallery, r["subjects"]), sizing_mode="stretch_width")


def candidates_chart(result: dict[str, Any], threshold: float | None = None) -> Any:
    """Return each found face's candidates and their similarity as bars (a Bokeh figure), or None if none."""
    from bokeh.models import ColumnDataSource, HoverTool

    rows = [
        (f"face {i} · {m['subject']}", m["similarity"], i)
        for i, face in enumerate(result.get("faces") or [], 1)
        for m in face.get("matches") or []
    ]
    if not rows:
        return None
    labels = [r[0] for r in rows][::-1]
    face_colours = colours(max(r[2] for r in rows))
    src = ColumnDataSource(
        {"label": labels, "sim": [r[1] for r in rows][::-1], "colour": [face_colours[r[2] - 1] for r in rows][::-1]}
    )
    f = figure("candidates by similarity", y_range=labels, height=28 * len(rows) + 70, tools="save")
    f.hbar(y="label", right="sim", height=0.7, color="colour", source=src)
    f.x_range.start, f.x_range.end = 0, 1
    if threshold is not None:
        from bokeh.models import Span  # type: ignore[attr-defined]

        f.add_layout(Span(location=threshold, dimension="height", line_dash="dashed", line_color="#d62728"))
    f.add_tools(HoverTool(tooltips=[("candidate", "@label"), ("similarity", "@sim{0.000}")]))
    return f


def identify_view(result: dict[str, Any], image_b64: str, gateway_url: str | None = None) -> Any:
    """Return the photo with each face boxed and named, next to every candidate's similarity (a Panel row)."""
    pn = use_panel(gateway_url)
    photo = pn.pane.HTML(faces_figure(result, image_b64), width=520)
    chart = candidates_chart(result)
    if chart is None:
        found = len(result.get("faces") or [])
        side: Any = pn.pane.HTML(
            "<p class='bkg-empty'>No face found in this photo.</p>"
            if not found
            else f"<p class='bkg-empty'>{found} face(s) found, none similar enough to anyone in the gallery.</p>"
        )
    else:
        side = pn.pane.Bokeh(chart, sizing_mode="stretch_width")
    return pn.Row(photo, side, sizing_mode="stretch_width")
