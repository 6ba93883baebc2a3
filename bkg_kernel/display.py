"""HTML for notebooks: one table helper (and Markdown made safe) shared by the store, the client and the widgets
(no bkg imports)."""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from bkg_kernel.errors import UpstreamError

Row = Sequence[Any] | Mapping[str, Any]


def html_table(columns: Sequence[str], rows: Iterable[Row], caption: str = "", *, raw: Collection[str] = ()) -> str:
    """Render rows (sequences, or mappings keyed by column) as a compact HTML table for notebooks.

    Cells are escaped, except in the `raw` columns, whose cells are trusted HTML (highlights, links, SVG).
    """
    trusted = {i for i, c in enumerate(columns) if c in raw}
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td style='text-align:left'>{_cell(v) if i in trusted else html.escape(_cell(v))}</td>"
            for i, v in enumerate(_values(row, columns))
        )
        + "</tr>"
        for row in rows
    )
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='bkg-table'>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Table(list[dict[str, Any]]):
    """A list of rows (dicts) that renders as a table in a notebook; subclasses name the columns."""

    columns: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()  # what the columns are called in the table (default: their keys)
    caption = ""
    noun = ""  # what one row is ("key"): the caption then counts the rows ("1 key", "3 keys")
    nouns = ""  # its plural, when not the noun and an "s" ("audit entries")

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one row's cells, in column order."""
        return [row.get(c) for c in self.columns]

    def title(self) -> str:
        """Return the caption: `caption`, then the rows counted when the table names its `noun`."""
        if not self.noun:
            return self.caption
        count = f"{len(self)} {self.noun if len(self) == 1 else self.nouns or self.noun + 's'}"
        return f"{self.caption}: {count}" if self.caption else count

    def _repr_html_(self) -> str:
        return html_table(list(self.headers or self.columns), [self.cells(r) for r in self], self.title())


def running_cell() -> int | None:
    """The IPython cell running now (its execution count); None outside IPython (which is then not imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return None if shell is None else int(shell.execution_count)


class ShownOnce:
    """A result that its own call already showed as it came (a streamed answer): in that cell its first display
    shows nothing, so a cell ending in the call shows it once, and it is still the cell's value (`_`, `Out`);
    anywhere else it renders as usual. The call sets `echoed_in = running_cell()`."""

    echoed_in: int | None = None

    @property
    def _ipython_display_(self) -> Callable[[], None] | None:
        # IPython calls this, when there is one, instead of asking for the formats: there is one only in the cell
        # that showed the result, and it shows nothing
        if self.echoed_in is None or self.echoed_in != running_cell():
            return None

        def shown() -> None:
            self.echoed_in = None  # once: a second display in that cell shows it

        return shown


A = TypeVar("A", bound=ShownOnce)


def streamed_answer(events: Iterable[dict[str, Any]], answer: Callable[[dict[str, Any]], A], found: str | None) -> A:
    """An answer streamed as `{"sources"}`, `{"delta"}`..., `{"result"}` events (brainml.ask, repo.ask), made with
    `answer(result)`. With `found` (what the sources are, for the status line: "chunks of docs") it is shown as it
    comes: in IPython one output holding the text so far, then the whole answer (not shown again as the cell's
    result); elsewhere the text printed as it comes."""
    live = _Live(found) if found is not None else None
    result: dict[str, Any] | None = None
    try:
        for event in events:
            if "delta" in event and live is not None:
                live.add(str(event["delta"]))
            elif "sources" in event and live is not None:
                live.given(len(event["sources"]))
            elif "result" in event:
                result = event["result"]
    finally:  # stopped early (Ctrl-C): the connection closes now, so the model stops
        close = getattr(events, "close", None)
        if close is not None:
            close()
    if result is None:
        raise UpstreamError("the gateway ended the answer's stream without the answer")
    out = answer(result)
    if live is not None:
        live.done(out)
    return out


class _Live:
    def __init__(self, found: str) -> None:
        self.parts: list[str] = []
        self.found = found
        self.handle: Any = None
        if running_cell() is not None:
            from IPython.display import HTML, display

            self.html = HTML
            self.handle = display(HTML(self._page("searching…")), display_id=True)

    def _page(self, status: str) -> str:
        text = html.escape("".join(self.parts))
        return f"<div style='white-space:pre-wrap'>{text}</div><div style='opacity:.6'>{html.escape(status)}</div>"

    def given(self, n: int) -> None:
        if self.handle is not None:
            self.handle.update(self.html(self._page(f"{n} {self.found} found; writing…")))

    def add(self, piece: str) -> None:
        self.parts.append(piece)
        if self.handle is not None:
            self.handle.update(self.html(self._page("writing…")))
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def done(self, answer: ShownOnce) -> None:
        if self.handle is not None:
            self.handle.update(answer)
            answer.echoed_in = running_cell()
        else:
            sys.stdout.write("\n")


def markdown_html(text: str) -> str:
    """Render Markdown as HTML for a notebook, any raw HTML in it shown as text: what a model or a repository wrote
    must not run in the notebook of whoever reads it. Preformatted text when markdown-it is not installed."""
    try:
        from markdown_it import MarkdownIt  # Panel's Markdown renderer, there wherever bkg's pictures are
    except ImportError:
        return f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
    return str(MarkdownIt("commonmark", {"html": False}).render(text))


def _values(row: Row, columns: Sequence[str]) -> Sequence[Any]:
    return [row.get(c) for c in columns] if isinstance(row, Mapping) else row


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict | list):
        text = json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 120 else text[:117] + "..."
    return "" if v is None else str(v)


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


FIGURE_PX = 800  # the long side of a figure's photo: a notebook shows it at about that size
SMALL_PX = 200 * 200  # a photo this small (or a transparent one) is a PNG; larger ones a JPEG, a tenth the size


def faces_figure(result: Mapping[str, Any], image_b64: str) -> str:
    """Return a photo with each face found boxed and named (green: known, red: unknown), as an HTML figure.

    The photo is scaled to at most FIGURE_PX on its long side, the boxes with it, and sent as a JPEG (a PNG when
    small or transparent): a 129 KB group photo is ~170 KB of HTML, not the 846 KB of a full-colour PNG."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    img: Any = ImageOps.exif_transpose(Image.open(io.BytesIO(base64.b64decode(image_b64))))
    clear = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA" if clear else "RGB")
    scale = min(1.0, FIGURE_PX / max(img.size))
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    width = max(2, max(img.size) // 300)
    px = max(11, max(img.size) // 64)
    font = ImageFont.load_default(size=px)
    labels = []
    for face in result["faces"]:
        if "subject" in face:  # identified: named, or unknown
            known = face["subject"] != "unknown"
            sim = f" {face['matches'][0]['similarity']:.2f}" if face["matches"] else ""
            label = f"{face['subject']}{sim}"
        else:  # detected: its detection score
            known, label = True, f"face {face['score']:.2f}"
        colour = "#2ca02c" if known else "#d62728"
        x1, y1, x2, y2 = (v * scale for v in face["bbox"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        spot = (x1, max(0, y1 - px - 2 * width))  # above the box, on a patch of its colour: readable on any photo
        draw.rectangle(draw.textbbox(spot, label, font=font), fill=colour)
        draw.text(spot, label, fill="white", font=font)
        labels.append(label)
    buf = io.BytesIO()
    png = clear or img.width * img.height <= SMALL_PX
    if png:
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=85, subsampling=0)  # 4:4:4: a thin coloured box stays its colour
    names = ", ".join(html.escape(x) for x in labels) or "no face"
    src = base64.b64encode(buf.getvalue()).decode()
    kind = "png" if png else "jpeg"
    img_tag = f"<img src='data:image/{kind};base64,{src}' style='min-width: 240px; max-width: 100%'/>"
    return f"<figure>{img_tag}<figcaption>{names}</figcaption></figure>"
