"""Answers and documentation from the local LLM, grounded in the code index.

`ask`: hybrid retrieval (the store's vectors + BM25, symbols named in the question first) plus a small repo
map as context. A citation is a numbered source the model cites as [n], a `path:start-end` it writes, or a
source whose symbol the answer names; every one is checked against the file as it is now (the cited lines
exist and still hold the code that was shown) before the answer is returned. Citations that cannot be
verified are dropped and counted.

`document`: Markdown for a symbol or a module, written callee-first (a function's callees are documented
before it, so their summaries feed its prompt), with its callers and callees listed; each symbol's text is
cached by the hash of its code and regenerated only when that changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.errors import CorruptData, InvalidInput, NotFound
from bkg_kernel.plugins.repoagent.codeindex import CodeIndex, own_end, point_id, span_sha
from bkg_kernel.plugins.repoagent.repomap import build as build_map
from bkg_kernel.plugins.repoagent.workspace import file_lines, inside

log = logging.getLogger("bkg.repoagent")

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
# a documented file's name, at most: its docs are `<name>.json` and `<name>.md`, each written through a temp file
# named `.<name>.<random>.tmp`, and a file name holds 255 bytes
MAX_DOC_NAME = 200
BRACKET = re.compile(r"\[(\d{1,3})\]")
PATH_CITE = re.compile(r"([\w./-]+\.[A-Za-z0-9]+):(\d+)(?:-(\d+))?")

Chat = Callable[[list[dict[str, str]], int], dict[str, Any]]


def chunk_index(index: CodeIndex) -> dict[str, dict[str, Any]]:
    """Every chunk by its point id (`path#n`), with its path."""
    return {point_id(p, i): {**c, "path": p} for p, f in index.files.items() for i, c in enumerate(f["chunks"])}


def retrieve(
    index: CodeIndex, search: Callable[[str, int], list[dict[str, Any]]], question: str, k: int
) -> list[dict[str, Any]]:
    """The best `k` chunks for a question: chunks of symbols the question names, then hybrid search hits."""
    chunks = chunk_index(index)
    named = set(IDENT.findall(question))
    out: dict[str, dict[str, Any]] = {}
    for cid, c in chunks.items():
        sym = c["symbol"].rsplit(".", 1)[-1] if c["symbol"] else ""
        if sym and (sym in named or c["symbol"] in named) and c["kind"] != "module":
            out[cid] = {**c, "id": cid, "score": 1.0, "via": "name"}
    for hit in search(question, k * 2):
        found = chunks.get(str(hit["id"]))
        if found is not None and hit["id"] not in out:
            out[str(hit["id"])] = {**found, "id": str(hit["id"]), "score": hit["score"], "via": "search"}
    return list(out.values())[:k]


def read_lines(root: Path, path: str) -> list[str] | None:
    """The lines of a file inside `root`, as the index counts them (None when it is not there, or not inside)."""
    full = (root / path).resolve()
    if root not in full.parents or not full.is_file():
        return None
    return file_lines(full)


def verify(root: Path, path: str, start: int, end: int, sha: str | None) -> str | None:
    """Why a citation does not hold (None when it does): the file, its lines and, given `sha`, their code."""
    return _check(read_lines(root, path), path, start, end, sha)


def _check(lines: list[str] | None, path: str, start: int, end: int, sha: str | None) -> str | None:
    if lines is None:
        return f"{path} does not exist"
    if start < 1 or end < start or end > len(lines):
        return f"{path} has {len(lines)} lines, not {start}-{end}"
    if sha is not None and span_sha(lines, start, end) != sha:
        return f"{path}:{start}-{end} changed since it was indexed"
    return None


class Prompt:
    """What an answer is asked from: the sources (each a symbol's lines, numbered from 1) and the chat messages
    that show them with the repo map; `lines_of` reads each file once, for the prompt and the citations."""

    def __init__(self, root: Path, question: str) -> None:
        self.root, self.question = root, question
        self.files: dict[str, list[str] | None] = {}
        self.sources: list[dict[str, Any]] = []
        self.messages: list[dict[str, str]] = []

    def lines_of(self, path: str) -> list[str] | None:
        if path not in self.files:
            self.files[path] = read_lines(self.root, path)
        return self.files[path]

    def shown_sources(self) -> list[dict[str, Any]]:
        """The sources as the answer lists them."""
        keys = ("path", "start", "end", "kind", "symbol", "score", "via")
        return [{k: s[k] for k in keys} for s in self.sources]


NOTHING = "The index has nothing that matches the question."


def prompt(
    root: Path,
    index: CodeIndex,
    search: Callable[[str, int], list[dict[str, Any]]],
    question: str,
    top_k: int,
    map_tokens: int,
    context_tokens: int,
) -> Prompt:
    """The sources for a question and the prompt that shows them; it fits `context_tokens` (counted as ~3
    characters of code each): the repo map takes its share and the sources split the rest, each cut at a line
    boundary. No source: no messages (nothing to ask)."""
    p = Prompt(root, question)
    # a file deleted since it was indexed is no source
    p.sources = [s for s in retrieve(index, search, question, top_k) if p.lines_of(s["path"]) is not None]
    if not p.sources:
        return p
    map_tokens = min(map_tokens, context_tokens // 4)
    repo_map = build_map(index, map_tokens, sorted({s["path"] for s in p.sources}))["map"] if map_tokens else ""
    room = max(200, (context_tokens * 3 - len(repo_map)) // len(p.sources))
    shown = []
    for n, s in enumerate(p.sources, start=1):
        code = "\n".join((p.lines_of(s["path"]) or [])[s["start"] - 1 : s["end"]])
        if len(code) > room:
            code = code[:room].rsplit("\n", 1)[0] + "\n..."
        shown.append(f"[{n}] {s['path']}:{s['start']}-{s['end']} ({s['kind']} {s['symbol']})\n{code}")
    system = (
        "You answer questions about a code repository using only the numbered sources. "
        "Name the function or class that does it and say how. Cite each source you use as [n]."
    )
    user = (f"Repository map:\n{repo_map}\n" if repo_map else "") + "Sources:\n" + "\n\n".join(shown)
    user += f"\n\nQuestion: {question}"
    p.messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return p


def answered(p: Prompt, answer: str, model: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The answer with its citations checked against the files: `[n]`, `path:start-end` and a source's symbol
    named in the text; what does not hold is listed in `dropped`."""
    if not p.sources:
        return {"question": p.question, "answer": NOTHING, "citations": [], "dropped": [], "sources": []}
    sources, lines_of = p.sources, p.lines_of
    citations: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    seen: set[tuple[str, int, int]] = set()
    for m in BRACKET.finditer(answer):
        n = int(m.group(1))
        if not 1 <= n <= len(sources):
            dropped.append({"cited": m.group(0), "why": f"there is no source [{n}]"})
            continue
        s = sources[n - 1]
        _cite(lines_of, citations, dropped, seen, s["path"], s["start"], s["end"], s["sha"], n, s["symbol"], "[n]")
    for m in PATH_CITE.finditer(answer):
        path, a = m.group(1), int(m.group(2))
        b = int(m.group(3) or a)
        src = next((s for s in sources if s["path"] == path and s["start"] <= a and b <= s["end"]), None)
        if src is None:
            dropped.append({"cited": m.group(0), "why": "no source shown to the model holds these lines"})
            continue
        n = sources.index(src) + 1
        _cite(lines_of, citations, dropped, seen, path, a, b, None, n, src["symbol"], "path")
    for n, s in enumerate(sources, start=1):  # a source whose symbol the answer names is cited by that name
        name = s["symbol"].rsplit(".", 1)[-1]
        if s["kind"] not in ("module", "text") and name and re.search(rf"(?<![\w.]){re.escape(name)}\b", answer):
            _cite(lines_of, citations, dropped, seen, s["path"], s["start"], s["end"], s["sha"], n, s["symbol"], "name")
    return {
        "question": p.question,
        "answer": answer,
        "citations": citations,
        "dropped": dropped,
        "sources": p.shown_sources(),
        "model": model,
        "usage": usage,
    }


def ask(
    root: Path,
    index: CodeIndex,
    search: Callable[[str, int], list[dict[str, Any]]],
    chat: Chat,
    question: str,
    top_k: int,
    map_tokens: int,
    max_tokens: int,
    context_tokens: int,
) -> dict[str, Any]:
    """Answer a question about the workspace with verified `path:start-end` citations (`prompt`, the model, then
    `answered`)."""
    p = prompt(root, index, search, question, top_k, map_tokens, context_tokens)
    if not p.sources:
        return answered(p, "", None, None)
    r = chat(p.messages, max_tokens)
    return answered(p, r["choices"][0]["message"]["content"], r.get("model"), r.get("usage"))


def _cite(
    lines_of: Callable[[str], list[str] | None], citations: list[dict[str, Any]], dropped: list[dict[str, Any]],
    seen: set[tuple[str, int, int]], path: str, start: int, end: int, sha: str | None, n: int, symbol: str, how: str,
) -> None:  # fmt: skip
    key = (path, start, end)
    if key in seen:
        return
    lines = lines_of(path)
    why = _check(lines, path, start, end, sha)
    if why is not None or lines is None:
        dropped.append({"cited": f"{path}:{start}-{end}", "why": why})
        return
    seen.add(key)
    citations.append(
        {
            "n": n,
            "path": path,
            "start": start,
            "end": end,
            "symbol": symbol,
            "how": how,
            "code": "\n".join(lines[start - 1 : end]),
        }
    )


def callee_first(index: CodeIndex, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order symbols so that each comes after the targets it calls (cycles broken in line order)."""
    by_qual = {t["qualname"]: t for t in targets}
    names: dict[str, list[str]] = {}
    for t in targets:
        names.setdefault(t["name"], []).append(t["qualname"])
    calls: dict[str, list[str]] = {q: [] for q in by_qual}
    for t in targets:
        for r in index.files[t["path"]]["refs"]:
            if r["in"] == t["qualname"] and r["kind"] == "call":
                calls[t["qualname"]] += [q for q in names.get(r["name"], []) if q != t["qualname"]]
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(q: str) -> None:
        if state.get(q):
            return
        state[q] = 1
        for c in calls[q]:
            visit(c)
        order.append(q)

    for t in sorted(targets, key=lambda t: (t["path"], t["start"])):
        visit(t["qualname"])
    return [by_qual[q] for q in order]


def callers_of(index: CodeIndex, name: str, limit: int = 8) -> list[str]:
    """`path:line (in symbol)` of the calls to a name."""
    out = [
        f"{p}:{r['line']} (in {r['in']})"
        for p, f in index.files.items()
        for r in f["refs"]
        if r["name"] == name and r["kind"] == "call"
    ]
    return out[:limit]


def document(
    root: Path,
    index: CodeIndex,
    targets: list[dict[str, Any]],
    docs_dir: Path,
    chat: Chat,
    max_tokens: int,
    force: bool,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """Write Markdown for `targets` (one file's symbols, or one symbol), callee-first; reuse unchanged ones."""
    path = targets[0]["path"]
    if len(os.fsencode(path.rsplit("/", 1)[-1])) > MAX_DOC_NAME:  # its .json and .md, and their temp files
        raise InvalidInput(f"{path}: a name over {MAX_DOC_NAME} bytes cannot be documented", field="path")
    if not inside(root, path):  # a folder made a link out of the workspace since it was indexed
        raise NotFound(f"{path} is no longer a file in the workspace: run repo.index again", field="path")
    cache_file = docs_dir / f"{path}.json"
    cache: dict[str, Any] = {}
    if cache_file.exists():
        try:  # what was written for each symbol before: a cache, so a damaged one is written again
            saved = statefiles.load(cache_file)
            cache = {q: e for q, e in saved.items() if isinstance(e, dict) and {"sha", "text", "summary"} <= set(e)}
        except CorruptData as exc:
            log.warning("%s: its symbols are documented again", exc.message)
    try:
        lines = file_lines(root / path)
    except OSError:
        raise NotFound(f"{path} is no longer a file in the workspace: run repo.index again", field="path") from None
    ordered = callee_first(index, targets)
    done: list[dict[str, Any]] = []
    every_sym = index.files[path]["symbols"]
    starts = sorted(t["start"] for t in every_sym if t["kind"] != "module")  # once: own_end bisects them
    for i, s in enumerate(ordered):
        sha = span_sha(lines, s["start"], own_end(s, every_sym, starts))
        entry = cache.get(s["qualname"])
        if entry is None or entry["sha"] != sha or force:
            callees = [
                q for r in index.files[path]["refs"] if r["in"] == s["qualname"] and r["kind"] == "call"
                for q in cache if q.rsplit(".", 1)[-1] == r["name"] and q != s["qualname"]
            ]  # fmt: skip
            known = "\n".join(f"- {q}: {cache[q]['summary']}" for q in dict.fromkeys(callees))
            code = "\n".join(lines[s["start"] - 1 : s["end"]])[:2500]
            prompt = f"Code of {s['kind']} {s['qualname']} in {path}:\n```\n{code}\n```\n"
            if known:
                prompt += f"It calls these (already documented):\n{known}\n"
            prompt += "Describe what it does, its parameters and what it returns, in two to four sentences."
            messages = [
                {"role": "system", "content": "You write short, accurate documentation for source code."},
                {"role": "user", "content": prompt},
            ]
            text = chat(messages, max_tokens)["choices"][0]["message"]["content"].strip()
            entry = {"sha": sha, "text": text, "summary": text.split("\n", 1)[0][:200]}
            cache[s["qualname"]] = entry
            regenerated = True
        else:
            regenerated = False
        done.append({"qualname": s["qualname"], "kind": s["kind"], "regenerated": regenerated})
        progress((i + 1) / len(ordered), f"documented {s['qualname']} ({i + 1}/{len(ordered)})")

    def section(s: dict[str, Any]) -> str:
        callers = callers_of(index, s["name"])
        return (
            f"## `{s['qualname']}` ({s['kind']})\n\n```\n{s['signature']}\n```\n\n{cache[s['qualname']]['text']}\n\n"
            f"*Defined at `{path}:{s['start']}-{s['end']}`.*"
            + (f" *Called from:* {', '.join(f'`{c}`' for c in callers)}." if callers else "")
            + "\n"
        )

    head = f"# `{path}`\n"
    markdown = "\n".join([head, *(section(s) for s in sorted(ordered, key=lambda s: s["start"]))])
    every = [s for s in index.files[path]["symbols"] if s["qualname"] in cache and s["kind"] != "module"]
    statefiles.write(cache_file, json.dumps(cache))
    doc_file = docs_dir / f"{path}.md"  # the file gathers every symbol of the module documented so far
    statefiles.write(doc_file, "\n".join([head, *(section(s) for s in sorted(every, key=lambda s: s["start"]))]))
    return {
        "path": path,
        "doc_file": str(doc_file),
        "symbols": done,
        "regenerated": sum(d["regenerated"] for d in done),
        "reused": sum(not d["regenerated"] for d in done),
        "markdown": markdown,
    }
