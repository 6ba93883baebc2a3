"""The repo map: a ranked outline of a workspace's definitions that fits a token budget (aider's idea).

Files are nodes; each identifier a file references and another file defines adds an edge from the
referencing file to the defining one, weighted by sqrt(number of references) times a multiplier: x10 for
names in focus and for long specific names (8+ characters in snake/camel case), x0.1 for `_private` names
and for names defined in more than five files. PageRank (personalised towards the focus files when there
are any) ranks the files; each file's rank flows along its edges to the definitions it uses, which ranks
the definitions. The outline shows signatures only, grouped by file, and a binary search finds the most
definitions whose outline fits the budget (a token is counted as ~4 characters).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bkg_kernel.plugins.repoagent.codeindex import CodeIndex

CHARS_PER_TOKEN = 4
OUTLINE_KINDS = {"class", "function", "method", "interface", "type", "trait", "struct", "enum", "module", "impl"}


def tokens(text: str) -> int:
    """Estimate a text's tokens (~4 characters each)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def rank(index: CodeIndex, focus: list[str]) -> list[tuple[float, dict[str, Any]]]:
    """Rank every outline-worthy symbol: (score, symbol), best first."""
    import networkx as nx

    defines: dict[str, set[str]] = defaultdict(set)
    for path, f in index.files.items():
        for s in f["symbols"]:
            if s["kind"] != "module":
                defines[s["name"]].add(path)
    references: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path, f in index.files.items():
        for r in f["refs"]:
            if r["name"] in defines:
                references[r["name"]][path] += 1
    focus_files = {p for p in index.files if any(p == x or p.startswith(x.rstrip("/") + "/") for x in focus)}
    focus_names = {x.rsplit(".", 1)[-1] for x in focus if x not in focus_files and "/" not in x}
    for name in focus_names:
        focus_files |= defines.get(name, set())
    g = nx.MultiDiGraph()
    g.add_nodes_from(index.files)
    for name, users in references.items():
        mul = 1.0
        if name in focus_names:
            mul *= 10
        if len(name) >= 8 and ("_" in name.strip("_") or any(c.isupper() for c in name[1:])):
            mul *= 10
        if name.startswith("_"):
            mul *= 0.1
        if len(defines[name]) > 5:
            mul *= 0.1
        for src, n in users.items():
            for dst in defines[name]:
                g.add_edge(src, dst, weight=mul * math.sqrt(n), name=name)
    if not g.number_of_nodes():
        return []
    personal = {p: 1.0 for p in focus_files} if focus_files else None
    try:
        pr = nx.pagerank(g, weight="weight", personalization=personal)
    except nx.PowerIterationFailedConvergence:
        pr = {p: 1.0 / g.number_of_nodes() for p in g.nodes}
    score: dict[tuple[str, str], float] = defaultdict(float)
    for src in g.nodes:
        out = g.out_edges(src, data=True)
        total = sum(d["weight"] for _, _, d in out)
        for _, dst, d in out:
            score[(dst, d["name"])] += pr[src] * d["weight"] / total
    ranked: list[tuple[float, dict[str, Any]]] = []
    for path, f in index.files.items():
        for s in f["symbols"]:
            if s["kind"] not in OUTLINE_KINDS:
                continue
            base = score.get((path, s["name"]), 0.0)
            # a file's unreferenced definitions still get a little of its rank, so the map is never empty
            own = pr.get(path, 0.0) * (0.1 if s["kind"] != "module" else 0.05)
            boost = 10.0 if s["name"] in focus_names or s["qualname"] in focus else 1.0
            ranked.append((boost * (base + own * 0.01), s))
    ranked.sort(key=lambda t: (-t[0], t[1]["path"], t[1]["start"]))
    return ranked


def render(symbols: list[dict[str, Any]]) -> str:
    """The outline of these symbols: per file (in path order), signatures indented by nesting, in line order."""
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in symbols:
        by_file[s["path"]].append(s)
    parts = []
    for path in sorted(by_file):
        lines = [f"{path}:"]
        for s in sorted(by_file[path], key=lambda s: s["start"]):
            if s["kind"] == "module":
                continue
            depth = s["qualname"].count(".")
            lines.append(f"{s['start']:>5}│ {'    ' * depth}{s['signature']}")
        parts.append("\n".join(lines))
    return "\n".join(parts) + ("\n" if parts else "")


def build(index: CodeIndex, budget_tokens: int, focus: list[str]) -> dict[str, Any]:
    """The best-ranked outline that fits `budget_tokens`, with what it shows."""
    ranked = rank(index, focus)
    lo, hi, best = 0, len(ranked), ""
    shown: list[dict[str, Any]] = []
    while lo <= hi:  # the most symbols whose outline fits
        mid = (lo + hi) // 2
        syms = [s for _, s in ranked[:mid]]
        text = render(syms)
        if tokens(text) <= budget_tokens:
            best, shown, lo = text, syms, mid + 1
        else:
            hi = mid - 1
    return {
        "map": best,
        "tokens": tokens(best),
        "budget_tokens": budget_tokens,
        "symbols_shown": len([s for s in shown if s["kind"] != "module"]),
        "files_shown": len({s["path"] for s in shown}),
        "ranked": [
            {"path": s["path"], "qualname": s["qualname"], "kind": s["kind"], "line": s["start"], "score": round(sc, 6)}
            for sc, s in ranked[:20]
        ],
    }
