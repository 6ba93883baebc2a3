"""The notebook side of repoagent: `wb.repo("name")` reads, searches, maps and asks about a workspace; answers
render with their citations as code snippets, files with line numbers, maps as outlines, references as a table."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from bkg_kernel.client import transport
from bkg_kernel.display import ShownOnce, Table, html_table, markdown_html, streamed_answer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bkg_kernel.client.workbench import Workbench

_PRE = "style='margin:0;padding:6px;background:#f6f8fa;border-radius:4px;overflow:auto;font-size:12px'"


class Text(dict[str, Any]):
    """A result with a `text` field (a tree, a numbered file window, a map): shown as preformatted text."""

    key = "text"

    def __str__(self) -> str:
        return str(self.get(self.key, ""))

    def _repr_html_(self) -> str:
        return f"<pre {_PRE}>{escape(str(self))}</pre>"


class MapText(Text):
    """repo.map's answer: the ranked outline."""

    key = "map"

    def _repr_html_(self) -> str:
        cap = f"{self['symbols_shown']} symbols in {self['files_shown']} files, ~{self['tokens']} tokens"
        return f"<div><b>{escape(cap)}</b><pre {_PRE}>{escape(str(self))}</pre></div>"


class Hits(dict[str, Any]):
    """repo.search's answer: path, line, text."""

    def _repr_html_(self) -> str:
        rows = [(f"{h['path']}:{h['line']}", h["text"]) for h in self["hits"]]
        return html_table(["where", "line"], rows, self["message"])


class Refs(dict[str, Any]):
    """repo.refs's answer: where a symbol is defined (with its signature), then a table of the calls, imports and
    uses of its name, each with the symbol it is in and its line."""

    def _repr_html_(self) -> str:
        parts = [f"<div><b>{escape(str(self['symbol']))}</b></div>"]
        for d in self["definitions"]:
            where, sig = f"{d['path']}:{d['start']}-{d['end']}", str(d.get("signature") or d["qualname"])
            parts.append(f"<div>{escape(str(d['kind']))} <code>{escape(where)}</code> <code>{escape(sig)}</code></div>")
        if not self["definitions"]:
            parts.append(f"<div><i>{escape(self.get('message') or 'no definition in the index')}</i></div>")
        refs = self["references"]
        rows = [(f"{r['path']}:{r['line']}", r["kind"], r.get("in") or "", r.get("text") or "") for r in refs]
        total = self.get("total", len(refs))
        shown = f"{len(refs)} of {total}" if total > len(refs) else f"{total}"
        parts.append(html_table(["where", "kind", "in", "line"], rows, f"{shown} reference{'' if total == 1 else 's'}"))
        return "".join(parts)


class SymbolTable(Table):
    """Symbols with their spans and signatures."""

    columns = ("kind", "qualname", "path", "start", "end", "signature")


class Answer(ShownOnce, dict[str, Any]):
    """repo.ask's answer, with its checked citations as code snippets (streamed into its cell as it was written,
    not shown again there as the cell's result)."""

    def __str__(self) -> str:
        return str(self["answer"])

    def _repr_html_(self) -> str:
        parts = [f"<div style='white-space:pre-wrap'>{escape(self['answer'])}</div>"]
        for c in self["citations"]:
            head = f"[{c['n']}] {c['path']}:{c['start']}-{c['end']} {c['symbol']}"
            lines = c["code"].removesuffix("\n").split("\n")  # as repoagent counts lines: a form feed is not one
            numbered = "\n".join(f"{n:>5}| {ln.removesuffix(chr(13))}" for n, ln in enumerate(lines, start=c["start"]))
            parts.append(f"<details><summary><code>{escape(head)}</code></summary><pre {_PRE}>{escape(numbered)}</pre>")
            parts.append("</details>")
        if self["dropped"]:
            parts.append(f"<p><i>{len(self['dropped'])} citation(s) dropped: they did not hold.</i></p>")
        return "".join(parts)


class Docs(dict[str, Any]):
    """repo.document's answer: the Markdown it wrote, shown rendered with its raw HTML as text. The Markdown holds
    what a model wrote about a repository's code (comments there can steer it) and the repository's own paths:
    markup in them would run in the notebook of whoever reads the docs."""

    def _repr_html_(self) -> str:
        return markdown_html(str(self["markdown"]))


class Repo:
    """One repoagent workspace through the gateway."""

    def __init__(self, wb: Workbench, name: str) -> None:
        self.wb, self.name = wb, name

    def __repr__(self) -> str:
        return f"Repo({self.name!r})"

    def _invoke(self, cap: str, **body: Any) -> Any:
        return self.wb.invoke("repoagent", cap, {"workspace": self.name, **body})

    def _job(self, cap: str, progress: bool, **body: Any) -> dict[str, Any]:
        job = self._invoke(cap, **body)["job"]
        return self.wb.wait_job(job["id"], progress=progress)

    def describe(self) -> dict[str, Any]:
        """The workspace: path, git, who added it, and its index status."""
        return dict(self.wb.invoke("repoagent", "repo.workspace", {"action": "describe", "name": self.name}))

    def tree(self, path: str = ".", depth: int = 3, **opts: Any) -> Text:
        """Files and folders under `path` (ignored files left out)."""
        return Text(self._invoke("repo.tree", path=path, depth=depth, **opts))

    def read(self, path: str, start_line: int = 1, end_line: int | None = None) -> Text:
        """A window of a text file with line numbers."""
        return Text(self._invoke("repo.file.read", path=path, start_line=start_line, end_line=end_line))

    def write(self, path: str, content: str, mode: str = "overwrite", force: bool = False) -> dict[str, Any]:
        """Write a text file (Python that does not parse is refused unless `force`)."""
        return dict(self._invoke("repo.file.write", path=path, content=content, mode=mode, force=force))

    def search(self, query: str, **opts: Any) -> Hits:
        """Lines matching a literal (or `regex=True`), optionally in files matching `glob`."""
        return Hits(self._invoke("repo.search", query=query, **opts))

    def diff(self, *paths: str) -> Text:
        """Uncommitted changes."""
        out = self._invoke("repo.diff", paths=list(paths))
        return Text({**out, "text": out["diff"] or "(no changes)"})

    def commit(self, message: str, *paths: str, signoff: bool = False) -> dict[str, Any]:
        """Commit changes as you."""
        return dict(self._invoke("repo.commit", message=message, paths=list(paths), signoff=signoff))

    def run(self, name: str, *args: str, echo: bool = True) -> dict[str, Any]:
        """Run an allow-listed command; its output prints as it comes; returns exit code and output."""
        result: dict[str, Any] = {}
        for event in self._stream(name, list(args)):
            if "output" in event and echo:
                print(event["output"], end="", flush=True)
            if "result" in event:
                result = event["result"]
        return result

    def _stream(self, name: str, args: list[str]) -> Iterator[dict[str, Any]]:
        path = f"/api/repo/{transport.seg(self.name)}/run/{transport.seg(name)}"
        yield from transport.stream(self.wb.http, "POST", path, json={"args": args})

    def index(self, full: bool = False, progress: bool = True) -> dict[str, Any]:
        """Index changed files (all with `full`) with a progress bar."""
        return self._job("repo.index", progress, full=full)

    def symbols(self, query: str | None = None, path: str | None = None, **opts: Any) -> SymbolTable:
        """Symbols by name, or those of a path."""
        return SymbolTable(self._invoke("repo.symbols", query=query, path=path, **opts)["symbols"])

    def refs(self, symbol: str) -> Refs:
        """Where a symbol is defined and who calls, imports or uses it (definitions and a table in a notebook)."""
        return Refs(self._invoke("repo.refs", symbol=symbol))

    def map(self, budget_tokens: int = 1024, focus: list[str] | None = None) -> MapText:
        """The ranked outline of the workspace that fits the budget."""
        return MapText(self._invoke("repo.map", budget_tokens=budget_tokens, focus=focus or []))

    def ask(self, question: str, top_k: int = 4, *, stream: bool = True, echo: bool = True) -> Answer:
        """Answer from the code with checked `path:start-end` citations. With `stream` (and `echo`) the answer
        appears as the model writes it (a notebook shows it, then the answer with its cited code, in one output;
        elsewhere it is printed); without, it comes whole."""
        if not stream:
            return Answer(self._invoke("repo.ask", question=question, top_k=top_k))
        path = f"/api/repo/{transport.seg(self.name)}/ask"
        events = transport.stream(self.wb.http, "POST", path, json={"question": question, "top_k": top_k})
        return streamed_answer(events, Answer, f"pieces of {self.name}'s code" if echo else None)

    def document(
        self, symbol: str | None = None, path: str | None = None, force: bool = False, progress: bool = True
    ) -> Docs:
        """Markdown docs for a symbol or a file (callee-first; unchanged code reuses its docs)."""
        return Docs(self._job("repo.document", progress, symbol=symbol, path=path, force=force))
