"""The code index of a workspace: per file its content hash, symbols, references and chunks, kept in
`<work_dir>/workspaces/<name>/index.json`, with the chunks embedded into the store collection
`repo-<name>` (vectors + BM25 text).

Incremental: a file whose size and mtime are unchanged is not read; one whose content hash is unchanged
is not parsed; only changed files are parsed and re-embedded, and deleted files leave the collection.
Code is chunked by symbol (a function or method each, a class's head, a module's head); files without a
grammar are chunked in windows of lines, so they are still found as text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.errors import CorruptData
from bkg_kernel.plugins.repoagent.parsing import language_of, parse
from bkg_kernel.plugins.repoagent.workspace import is_binary, text_lines

INDEX_VERSION = 2  # 2: lines counted by newlines alone (1 cut chunks at form feeds, U+2028, ...)
log = logging.getLogger("bkg.repoagent")
CHUNK_CHARS = 1600  # text kept per chunk for BM25; the citation span stays the symbol's whole span
EMBED_CHARS = 320  # what is embedded: the head (path, name, signature, doc) and the code's first lines
WINDOW_LINES = 60
MODULE_HEAD_LINES = 40
UPSERT_BATCH = 512
MAX_POINT_ID = 512  # the store's longest string id
TEXT_SUFFIXES = {
    ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".sh", ".sql", ".html", ".css",
    ".scss", ".rb", ".php", ".kt", ".swift", ".scala", ".lua", ".r", ".jl", ".cs", ".m", ".pl", ".ex", ".exs",
}  # fmt: skip


@dataclass
class CodeIndex:
    """A workspace's index, in memory."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    indexed_at: float | None = None
    lost: bool = False  # a saved index was there but could not be read: what its collection holds is unknown

    @classmethod
    def load(cls, path: Path) -> CodeIndex:
        """Read it: an empty index when there is none; an empty one that is `lost` when the file is not an index or
        comes from another version (its collection holds chunks no index knows: the next run starts over). A file
        that cannot be read at all (an I/O error) raises its OSError: nothing is dropped over it."""
        if not path.exists():
            return cls()
        try:
            data = statefiles.load(path)
            if data.get("version") != INDEX_VERSION:
                raise CorruptData(f"{path} is an index of version {data.get('version')!r}, not {INDEX_VERSION}")
            return cls(files=dict(data["files"]), indexed_at=data.get("indexed_at"))
        except (CorruptData, KeyError, TypeError, ValueError) as exc:
            why = exc.message if isinstance(exc, CorruptData) else f"{path} is not an index ({exc!r})"
            log.warning("%s: the next repo.index of this workspace indexes every file again", why)
            return cls(lost=True)

    def copy(self) -> CodeIndex:
        """A copy for `update` to change while calls read this one (it replaces a file's entry, never edits it)."""
        return CodeIndex(files=dict(self.files), indexed_at=self.indexed_at)

    def save(self, path: Path) -> None:
        """Write it, whole or not at all."""
        statefiles.write(
            path, json.dumps({"version": INDEX_VERSION, "indexed_at": self.indexed_at, "files": self.files})
        )

    def symbols(self) -> list[dict[str, Any]]:
        """Every symbol of every file."""
        return [s for f in self.files.values() for s in f["symbols"]]

    def refs(self) -> list[dict[str, Any]]:
        """Every reference, with its file."""
        return [{**r, "path": p} for p, f in self.files.items() for r in f["refs"]]

    def summary(self) -> dict[str, Any]:
        """Counts for status pages: files, symbols, references, chunks, languages, parse errors."""
        langs: dict[str, int] = {}
        for f in self.files.values():
            key = f["language"] or "text"
            langs[key] = langs.get(key, 0) + 1
        return {
            "indexed_at": self.indexed_at,
            "files": len(self.files),
            "symbols": sum(len(f["symbols"]) for f in self.files.values()),
            "refs": sum(len(f["refs"]) for f in self.files.values()),
            "chunks": sum(len(f["chunks"]) for f in self.files.values()),
            "languages": dict(sorted(langs.items(), key=lambda kv: -kv[1])),
            "parse_errors": {p: f["error"] for p, f in self.files.items() if f.get("error")},
        }


def words(name: str) -> str:
    """Split an identifier into words for BM25: `get_encoding_from_headers` -> `get encoding from headers`."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name.replace("_", " ").replace(".", " "))
    return " ".join(spaced.lower().split())


def chunks_for(path: str, source: str, parsed: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of one file: `{start, end, kind, symbol, text}` (text is what gets embedded)."""
    lines = text_lines(source)
    out: list[dict[str, Any]] = []

    def add(start: int, end: int, kind: str, symbol: str, head: str) -> None:
        body = "\n".join(lines[start - 1 : end])
        text = f"{head}\n{body}"
        out.append(
            {"start": start, "end": end, "kind": kind, "symbol": symbol, "text": text[:CHUNK_CHARS],
             "embed": text[:EMBED_CHARS]}
        )  # fmt: skip

    symbols = [s for s in parsed["symbols"] if s["kind"] != "module"]
    if parsed["language"] is None or not symbols and not parsed["symbols"]:
        step = WINDOW_LINES - 10
        for a in range(1, max(len(lines), 1) + 1, step):
            b = min(len(lines), a + WINDOW_LINES - 1)
            add(a, max(a, b), "text", "", f"{path} lines {a}-{b}")
            if b >= len(lines):
                break
        return out
    mod = parsed["symbols"][0]
    first = min((s["start"] for s in symbols), default=len(lines) + 1)
    head_end = max(1, min(len(lines), MODULE_HEAD_LINES, first - 1 if first > 1 else MODULE_HEAD_LINES))
    add(1, head_end, "module", mod["qualname"], f"{path} module {mod['qualname']} ({words(mod['qualname'])})")
    starts = sorted(s["start"] for s in symbols)
    for s in symbols:
        end = s["end"]
        if s["kind"] in ("class", "interface", "trait", "struct", "impl"):
            end = own_end(s, symbols, starts)
        head = f"{path} {s['kind']} {s['qualname']} ({words(s['qualname'])})"
        if s["doc"]:
            head += f"\n{s['doc'][:400]}"
        add(s["start"], end, s["kind"], s["qualname"], head)
    return out


def point_id(path: str, n: int) -> str:
    """The store id of a file's `n`th chunk: `path#n`; a path too long for that to fit the store's ids keeps its
    first 400 characters and ends in a hash of all of it (`dir/…/head…<hash>#n`), so its chunks are indexed too."""
    pid = f"{path}#{n}"
    if len(pid) <= MAX_POINT_ID:
        return pid
    return f"{path[:400]}…{hashlib.sha256(path.encode()).hexdigest()[:32]}#{n}"


def indexable(path: str) -> bool:
    """Say whether a file is indexed: a language with a grammar or a common text format."""
    return language_of(path) is not None or Path(path).suffix.lower() in TEXT_SUFFIXES or Path(path).name in (
        "README", "Makefile", "Dockerfile", "LICENSE",
    )  # fmt: skip


def update(
    root: Path,
    names: list[str],
    index: CodeIndex,
    max_file_bytes: int,
    progress: Callable[[float, str], None],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], list[str]]:
    """Bring `index` up to date with the files `names` under `root`: its `files` change, the entries in it do not
    (give it a `copy` of an index that calls may be reading).

    Returns the new chunks of each changed file, the chunks each changed or removed file had before (to
    reuse unchanged chunks' vectors and delete surplus points) and the removed files.
    """
    changed: dict[str, list[dict[str, Any]]] = {}
    before: dict[str, list[dict[str, Any]]] = {}
    wanted = [n for n in names if indexable(n)]
    keep = set(wanted)
    removed = [p for p in index.files if p not in keep]
    for p in removed:
        before[p] = index.files.pop(p)["chunks"]
    total = max(len(wanted), 1)
    t_report = 0.0
    for i, rel in enumerate(wanted):
        full = root / rel
        try:
            st = full.stat()
        except OSError:
            continue
        old = index.files.get(rel)
        if old is not None and old["mtime_ns"] == st.st_mtime_ns and old["size"] == st.st_size:
            continue
        if st.st_size > max_file_bytes or not stat.S_ISREG(st.st_mode):  # (a FIFO's read would never end)
            if old is not None:
                before[rel] = index.files.pop(rel)["chunks"]
            continue
        try:
            data = full.read_bytes()
        except OSError:
            continue
        if is_binary(data):  # a file that turned binary leaves the index (its old symbols named code now gone)
            if old is not None:
                before[rel] = index.files.pop(rel)["chunks"]
            continue
        sha = hashlib.sha1(data).hexdigest()
        if old is not None and old["sha"] == sha:  # a new entry: the old one may be shared with a published index
            index.files[rel] = {**old, "mtime_ns": st.st_mtime_ns, "size": st.st_size}
            continue
        source = data.decode("utf-8", errors="replace")
        parsed = parse(rel, source)
        chunks = chunks_for(rel, source, parsed)
        src_lines = text_lines(source)
        for c in chunks:  # what a citation must still find in the file; what the embedding was made of
            c["sha"] = span_sha(src_lines, c["start"], c["end"])
            c["th"] = hashlib.sha1(c["text"].encode()).hexdigest()
        if old is not None:
            before[rel] = old["chunks"]
        index.files[rel] = {
            "sha": sha, "mtime_ns": st.st_mtime_ns, "size": st.st_size, "language": parsed["language"],
            "symbols": parsed["symbols"], "refs": parsed["refs"], "error": parsed["error"],
            "chunks": [{k: v for k, v in c.items() if k not in ("text", "embed")} for c in chunks],
        }  # fmt: skip
        changed[rel] = chunks
        now = time.monotonic()
        if now - t_report > 0.5:
            t_report = now
            progress(0.5 * (i + 1) / total, f"parsed {i + 1}/{len(wanted)} files ({len(changed)} changed)")
    return changed, before, removed


def own_end(s: dict[str, Any], symbols: list[dict[str, Any]], starts: list[int] | None = None) -> int:
    """The last line of a symbol's own code: a class ends where its first member begins (its chunk is its head,
    and a member's change regenerates the member's docs, not the class's). `starts`: the sorted first lines of
    `symbols` but the module, when the caller has them (a file of thousands of classes scanned them all per class)."""
    if starts is None:
        starts = sorted(t["start"] for t in symbols if t["kind"] != "module")
    k = bisect.bisect_right(starts, s["start"])  # the first symbol that begins after this one's first line
    return max(s["start"], starts[k] - 1) if k < len(starts) and starts[k] <= s["end"] else s["end"]


def span_sha(source_lines: list[str], start: int, end: int) -> str:
    """The hash `update` stores for a chunk's lines, to check that a citation still holds its code."""
    return hashlib.sha1("\n".join(source_lines[start - 1 : end]).encode()).hexdigest()
