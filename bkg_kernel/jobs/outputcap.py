"""What a job run keeps of what its notebook prints: the first `limit` bytes of stream output (stdout, stderr) in
all, the output notebook's and so its HTML's; the rest is cut as it arrives (a notebook that prints hundreds of MB
never holds them in its worker nor writes them to the data dir), and each cell that lost some says so, and how much,
in a last stream output of its own.

Rich outputs (images, tables, a value's repr) are kept as they come: only printing is cut.
"""

from __future__ import annotations

from typing import Any


def marker(cut: int, name: str, limit: int) -> str:
    """The text that stands where `cut` bytes of stream `name` were cut."""
    return (
        f"\n[bkg: output truncated: {cut:,} bytes of {name} were cut here; a job keeps the first {limit:,} bytes "
        "of what its cells print (setting job_max_output_bytes)]\n"
    )


class StreamCap:
    """One run's budget of stream output, and the markers of what it cut."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept = limit, 0
        self.cut: dict[tuple[int, str], tuple[Any, int]] = {}  # (cell, stream) -> its marker output, bytes cut there

    def keep(self, text: str) -> tuple[str, int]:
        """The part of `text` that fits in what is left of the budget (taken from it), and how many bytes are cut."""
        data = text.encode("utf-8", "replace")
        room = max(0, self.limit - self.kept)
        if len(data) <= room:
            self.kept += len(data)
            return text, 0
        self.kept = self.limit
        return data[:room].decode("utf-8", "ignore"), len(data) - room

    def refund(self, outs: list[Any]) -> None:
        """A cell is about to clear `outs`: what its stream outputs there hold goes back to the budget, which
        counts what the notebook keeps, not all that was ever printed (a loop that clears and prints its progress
        keeps one line, however long it runs)."""
        markers = {id(node) for node, _ in self.cut.values()}
        back = sum(len(str(o.get("text", "")).encode("utf-8", "replace"))
                   for o in outs if o.get("output_type") == "stream" and id(o) not in markers)  # fmt: skip
        self.kept = max(0, self.kept - back)

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
