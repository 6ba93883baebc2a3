"""What a job run keeps of its cells' output: the first `limit` bytes in all of what the output notebook (and so its
HTML) would hold, each output counted by its stored size (its `data` values as nbformat stores them, base64 for
an image; a stream's text; an error's name, value and traceback). A notebook that prints hundreds of MB or shows a
5 MB image in a loop never holds them in its worker nor writes them to the data dir.

Past the budget a stream is cut as it arrives (mid-text), a rich output (display, result, display update) that no
longer fits is dropped whole, and each cell that lost some says so, and how much, in a stream output of its own
(one per stream cut, one for the outputs dropped, kept up to date). An error is kept while it fits, and past the
budget a cell keeps one, its latest (the one that failed it comes last), with its name and value and the last lines
of its traceback: a failed run must show why, and a loop of `showtraceback()` keeps no more than one error a cell. So
is a cell's short result (its last expression's value, at most RESULT_GRACE bytes, one per cell): what a run came to,
a score or a count, shows after a loud cell too. What a cell clears goes back to the budget, which counts what the
notebook keeps, not all that was ever shown.

What an `ipywidgets.Output` widget captures counts the same (its outputs are the widget's, its markers the cell's),
and so does the widget state saved in the notebook's metadata at the end: each widget model whole while it fits,
else with its long values cut (strings to their ends, anything else left out), else left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ERROR_TAIL = 3  # traceback entries an error past the budget keeps (the last: the failing line, name and value)
ERROR_CHARS = 2000  # at most this much of an error's value and of each traceback entry kept, past the budget
RESULT_GRACE = 2048  # bytes of a cell's result kept past the budget (one per cell: bounded by the notebook)
MIMES_SHOWN = 8  # mime types a drop marker names (a notebook may make up any number)
OMIT = object()  # a widget state value left out
KINDS = {
    "display_data": "display",
    "execute_result": "result",
    "update_display_data": "display update",
    "error": "error",
}


def _utf8(text: Any) -> int:
    if isinstance(text, list):  # nbformat's multiline strings
        text = "".join(str(t) for t in text)
    text = str(text)
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))  # isascii: no copy (base64)


def _entry(line: Any) -> int:
    """The bytes of a traceback entry as the notebook's JSON holds it: its colours' ESC as `\\u001b` (a loop of
    tracebacks kept to the budget by their text wrote 10% more)."""
    line = str(line)
    return _utf8(line) + 5 * line.count("\x1b")


def _stored(value: Any) -> int:
    """The bytes of one data or metadata value as nbformat stores it (a string as is, JSON as JSON)."""
    if isinstance(value, (str, list)):
        return _utf8(value)
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace"))


def size(out: Any) -> int:
    """How many bytes of the budget output `out` (a notebook output) takes."""
    kind = out.get("output_type")
    if kind == "stream":
        return _utf8(out.get("text", ""))
    if kind == "error":
        return _utf8(out.get("ename", "")) + _utf8(out.get("evalue", "")) + sum(map(_entry, out.get("traceback", [])))
    data = sum(_stored(v) for v in (out.get("data") or {}).values())
    return data + (_stored(out["metadata"]) if out.get("metadata") else 0)


def _ends(text: str) -> str:
    """`text` within ERROR_CHARS: its head (where a frame is, an error's name) and its tail (the failing line)."""
    if len(text) <= ERROR_CHARS:
        return text
    half = ERROR_CHARS // 2
    return f"{text[:half]}\n... [bkg: {len(text) - 2 * half:,} characters cut] ...\n{text[-half:]}"


def _json(value: Any) -> int:
    """The bytes of a widget state value as JSON (a string as is: a long one is not copied to be counted)."""
    if isinstance(value, str):
        return _utf8(value)
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace"))


def _short(value: Any) -> Any:
    """A widget state value within about ERROR_CHARS: a long string cut to its ends, any other long one OMIT."""
    if isinstance(value, str):
        return _ends(value)
    return value if _json(value) <= ERROR_CHARS else OMIT


def _rule(limit: int) -> str:
    return f"a job keeps the first {limit:,} bytes of its cells' output (setting job_max_output_bytes)"


def marker(cut: int, name: str, limit: int) -> str:
    """The text that stands where `cut` bytes of stream `name` were cut."""
    return f"\n[bkg: output truncated: {cut:,} bytes of {name} were cut here; {_rule(limit)}]\n"


@dataclass
class Dropped:
    """The rich outputs dropped in one cell, and the marker that says so."""

    node: Any
    count: int = 0
    total: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    mimes: list[str] = field(default_factory=list)

    def text(self, limit: int) -> str:
        """The marker's text: what was dropped, how many and how big."""
        shown = ", ".join(sorted(self.mimes[:MIMES_SHOWN])) + (
            " and other types" if len(self.mimes) > MIMES_SHOWN else ""
        )
        of = f" of {shown}" if shown else ""  # an error has no data
        if self.count == 1:
            (kind,) = self.kinds
            what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}{of} ({self.total:,} bytes)"
        else:
            parts = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in self.kinds.items())
            what = f"{self.count} outputs ({parts}){of} ({self.total:,} bytes in all)"
        return f"[bkg: output dropped: {what}; {_rule(limit)}]\n"


class OutputCap:
    """One run's budget of output (streams and rich outputs alike), and the markers of what it cut or dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept = limit, 0  # kept: the bytes the notebook holds now (markers aside)
        self.cut: dict[tuple[int, str], tuple[Any, int]] = {}  # (cell, stream) -> its marker output, bytes cut there
        self.dropped: dict[int, Dropped] = {}  # cell -> the rich outputs dropped there
        self.graced: set[int] = set()  # cells whose result was kept past the budget
        # cell -> the error it keeps past the budget: the list that holds it (the cell's outputs or an output
        # widget's), the error as kept, and its size before it was shortened
        self.late: dict[int, tuple[list[Any], Any, int]] = {}

    @property
    def room(self) -> int:
        """Bytes left in the budget."""
        return max(0, self.limit - self.kept)

    def keep(self, text: str) -> tuple[str, int]:
        """The part of stream `text` that fits in what is left of the budget (taken from it), and how many bytes
        are cut."""
        data = text.encode("utf-8", "replace")
        room = self.room
        if len(data) <= room:
            self.kept += len(data)
            return text, 0
        self.kept += room
        return data[:room].decode("utf-8", "ignore"), len(data) - room

    def take(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in the budget (then taken from it); a negative `nbytes` always fits (given
        back)."""
        if nbytes > self.room:
            return False
        self.kept = max(0, self.kept + nbytes)
        return True

    def result(self, cell_index: int, nbytes: int) -> bool:
        """Whether a result of `nbytes` is kept in cell `cell_index` (then taken from the budget): while it fits,
        and past it a short one, once per cell."""
        if self.take(nbytes):
            return True
        if nbytes > RESULT_GRACE or cell_index in self.graced:
            return False
        self.graced.add(cell_index)
        self.kept += nbytes
        return True

    def error(self, out: Any) -> Any:
        """Error output `out` as the notebook keeps it, counted: whole while it fits, else its name, its value
        (bounded) and the last entries of its traceback under a note of what was cut."""
        whole = size(out)
        if whole <= self.room:
            self.kept += whole
            return out
        ename, evalue, tb = str(out.get("ename", ""))[:200], str(out.get("evalue", "")), list(out.get("traceback", []))
        if len(evalue) > ERROR_CHARS:
            evalue = f"{evalue[:ERROR_CHARS]} ... [bkg: {len(evalue) - ERROR_CHARS:,} more characters cut]"
        tail = [_ends(str(t)) for t in tb[-ERROR_TAIL:]]
        note = (
            f"[bkg: traceback cut to its last {len(tail)} of {len(tb)} entries, at most about {ERROR_CHARS:,} "
            f"characters each (the error took {whole:,} bytes); {_rule(self.limit)}]"
        )
        short = {**out, "ename": ename, "evalue": evalue, "traceback": [note, *tail]}
        self.kept += size(short)  # kept though past the budget: a failed run shows why (one a cell: `latest`)
        return short

    def latest(self, outs: list[Any], cell_index: int, held: list[Any], node: Any, whole: int) -> tuple[Any, int]:
        """Make error `node` (just kept past the budget in `held`: cell `cell_index`'s outputs `outs`, or an output
        widget's; `whole` bytes before it was shortened) the only one that cell keeps past the budget: the one it
        kept before leaves its list, its bytes back to the budget, counted in the cell's drop marker. Return the list
        it left and its index there ((None, -1) when there was none, or a clear took it already)."""
        before, self.late[cell_index] = self.late.get(cell_index), (held, node, whole)
        if before is None:
            return None, -1
        where, old, old_whole = before
        at = next((i for i, o in enumerate(where) if o is old), -1)
        if at < 0:
            return None, -1
        del where[at]
        self.kept = max(0, self.kept - size(old))
        self.drop(outs, cell_index, old, "error", old_whole)
        return where, at

    def widgets(self, models: dict[str, Any], counted: set[str]) -> str | None:
        """Keep of the saved widget state `models` (model id -> model, as nbclient saves it) what fits the budget, in
        place: each model whole while it fits, else its long values cut (a string to its ends, any other value and
        its binary buffers left out), else none of it; the `outputs` of the models in `counted` (output widgets) were
        counted as they were captured. Return a note of what was cut, or None."""
        cut, left = 0, list[str]()
        left_ids: set[str] = set()
        for model_id in list(models):
            model = models[model_id]
            state = model.get("state") or {}
            mine = "outputs" if model_id in counted else None
            whole = sum(_json(v) for k, v in state.items() if k != mine)
            whole += sum(_json(b) for b in model.get("buffers") or [])
            if self.take(whole):
                continue
            short = {k: v if k == mine else _short(v) for k, v in state.items()}
            short = {k: v for k, v in short.items() if v is not OMIT}
            if self.take(sum(_json(v) for k, v in short.items() if k != mine)):
                model["state"] = short
                model.pop("buffers", None)
                cut += 1
            else:
                self._leave_out(models, model_id, counted, left, left_ids)
        # a model kept that names one left out (a widget's layout, a box's children) would not render: it goes too
        while orphans := [i for i, m in models.items() if _names_any(m.get("state"), left_ids)]:
            for model_id in orphans:
                self._leave_out(models, model_id, counted, left, left_ids)
        if not cut and not left:
            return None
        gone = f", {len(left)} left out ({', '.join(sorted(set(left))[:MIMES_SHOWN])})" if left else ""
        return (
            f"[bkg: widget state cut: {cut} widget models kept with their long values cut{gone}; {_rule(self.limit)}]"
        )

    def _leave_out(
        self, models: dict[str, Any], model_id: str, counted: set[str], left: list[str], left_ids: set[str]
    ) -> None:
        """Leave a widget model out of the saved state (its name in `left`, its id in `left_ids`); an output
        widget's outputs, counted as they were captured, go back to the budget."""
        state = models.pop(model_id).get("state") or {}
        if model_id in counted and isinstance(state.get("outputs"), list):
            self.refund(state["outputs"])
        left_ids.add(model_id)
        left.append(str(state.get("_model_name", "a model")))

    def refund(self, outs: list[Any]) -> None:
        """A cell is about to clear `outs`: what they hold goes back to the budget, which counts what the notebook
        keeps, not all that was ever shown (a loop that clears and prints its progress, or redraws its chart, keeps
        one, however long it runs)."""
        markers = {id(node) for node, _ in self.cut.values()} | {id(d.node) for d in self.dropped.values()}
        self.kept = max(0, self.kept - sum(size(o) for o in outs if id(o) not in markers))

    def mark(self, outs: list[Any], cell_index: int, name: str, cut: int) -> None:
        """Say in a cell's outputs `outs` that `cut` more bytes of its stream `name` were cut: one marker per cell
        and stream, kept up to date (made again after the cell cleared its output)."""
        import nbformat

        node, before = self.cut.get((cell_index, name), (None, 0))
        if node is None or not any(o is node for o in outs):
            node, before = nbformat.v4.new_output("stream", name=name, text=""), 0
            outs.append(node)
        node["text"] = marker(before + cut, name, self.limit)
        self.cut[(cell_index, name)] = (node, before + cut)

    def drop(self, outs: list[Any], cell_index: int, out: Any, output_type: str, nbytes: int | None = None) -> None:
        """Say in a cell's outputs `outs` that output `out` (a display, result, display update or error; `nbytes`
        when not its size now) was dropped: one marker per cell with the count and total, kept up to date (made
        again after the cell cleared)."""
        import nbformat

        d = self.dropped.get(cell_index)
        if d is None or not any(o is d.node for o in outs):
            d = Dropped(nbformat.v4.new_output("stream", name="stderr", text=""))
            outs.append(d.node)
            self.dropped[cell_index] = d
        kind = KINDS.get(output_type, output_type)
        d.count, d.total = d.count + 1, d.total + (size(out) if nbytes is None else nbytes)
        d.kinds[kind] = d.kinds.get(kind, 0) + 1
        d.mimes = (d.mimes + [m for m in (out.get("data") or {}) if m not in d.mimes])[: MIMES_SHOWN + 1]
        d.node["text"] = d.text(self.limit)


def _names_any(value: Any, model_ids: set[str]) -> bool:
    """Whether a widget model's state refers to any of `model_ids` (as `"IPY_MODEL_<id>"`, anywhere in it)."""
    if isinstance(value, str):
        return value.startswith("IPY_MODEL_") and value[len("IPY_MODEL_") :] in model_ids
    if isinstance(value, dict):
        return any(_names_any(v, model_ids) for v in value.values())
    if isinstance(value, list):
        return any(_names_any(v, model_ids) for v in value)
    return False
