"""repoagent: a sandboxed code-repository workspace with a code index, a repo map and cited answers (worker).

Workspaces are folders under the `repo_roots` setting, clear of the data dir but for its `repos` folder (both
held again on every call: one the roots no longer hold answers only its removal). File operations stay inside
them (403 otherwise), commands come from an allow-list and run in a process-level sandbox, commits are real git
commits by the caller. `repo.index` parses Python with `ast` and other languages with tree-sitter grammar
wheels, and embeds chunks (one per symbol) into the store collection `repo-<name>`; `repo.map`, `repo.ask` and
`repo.document` build on it. Every capability needs `repo:use`; the store and the LLM are reached as the
caller, so `repo.workspace` add `collections:read` (is `repo-<name>` free?), `repo.index` `collections:read`,
`collections:write` and `llm:use` (it embeds), `repo.ask` `collections:read` and `llm:use`, `repo.document`
`llm:use`, and removing an indexed workspace `collections:write` (its collection is dropped).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from bkg_kernel.errors import AlreadyExists, BkgError, Forbidden, InvalidInput, NotFound
from bkg_kernel.plugins.repoagent import answers, gitops, repomap, sandbox
from bkg_kernel.plugins.repoagent.indexing import Indexing
from bkg_kernel.plugins.repoagent.parsing import ast_lines
from bkg_kernel.plugins.repoagent.schemas import (
    AskRequest,
    CommandRequest,
    CommitRequest,
    DiffRequest,
    DocumentRequest,
    IndexRequest,
    MapRequest,
    ReadRequest,
    RefsRequest,
    RepoSettings,
    Result,
    SearchRequest,
    SymbolsRequest,
    TreeRequest,
    WorkspaceRequest,
    WriteRequest,
)  # fmt: skip
from bkg_kernel.plugins.repoagent.workspace import (
    BINARY_SNIFF,
    Ignore,
    Workspace,
    file_lines,
    inside,
    is_binary,
    read_text,
    text_lines,
)
from bkg_kernel.runtime.contract import Cancelled, GatewayAPI, Plugin, Progress, capability

MAX_LINE_CHARS = 2000  # search reads at most this much of one line
SEARCH_TIMEOUT_S = 10.0  # matching time one repo.search may take, all files together
MAX_DEPTH = 64  # folders deep a written file may be (pathlib walks deeper paths by recursion)


MAX_REPEATS = 100_000  # what a search pattern's counted repeats add up to: (?:a{1000}){1000} took GBs to compile


def _compilable(query: str) -> None:
    """422 for a pattern whose counted repeats weigh more than `MAX_REPEATS`: the `regex` module compiles each of
    them out (the search's timeout bounds matching, not compiling), so nested repeats multiply and repeats in
    sequence or in branches add up (`a{99999}` 125 times took 3.4 GB). Read with Python's own parser; a pattern
    only `regex` reads is held to the product of all its counts times its length, a bound on the same weight."""
    import re._parser as sre  # noqa: PLC2701 - the parser of Python's own `re`: structure, nothing compiled

    def weight(items: Any) -> int:  # each item 1, a repeat its count times its body's weight
        total = 0
        for op, arg in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                low, high, sub = arg
                count = high if high != sre.MAXREPEAT else max(low, 1)
                total += max(count, 1) * weight(sub)
                continue
            subs = [  # groups, branches, lookarounds
                sub
                for part in (arg if isinstance(arg, (tuple, list)) else (arg,))
                for sub in (part if isinstance(part, list) else (part,))
                if isinstance(sub, sre.SubPattern)
            ]
            total += sum(map(weight, subs)) if subs else 1
        return total

    try:
        total = weight(sre.parse(query))
    except Exception:  # noqa: BLE001 - syntax only `regex` knows: every count in it, multiplied, times its length
        total = len(query)
        for low, high in re.findall(r"\{(\d*)(?:,(\d*))?\}", query):
            total *= max(int(high or low or 1), 1)
    if total > MAX_REPEATS:
        raise InvalidInput(f"the pattern's counted repeats add up and multiply to {total:,} (at most {MAX_REPEATS:,}): "
                           "it would take too much memory to compile", field="query")  # fmt: skip


def _glob(pattern: str) -> Callable[[str], bool]:
    """`repo.search`'s `glob` as git and ripgrep read one (gitignore's wildmatch): `*` stays within a folder, `**/`
    is any number of folders, none included, and a pattern without a `/` matches a file's name at any depth. A
    leading `!` excludes, as ripgrep's `-g '!*.md'` does: every file but those the rest matches (to gitignore, a
    lone negation only re-includes, so it matched nothing at all); `\\!` matches a name that begins with `!`. 422
    naming `glob` for one git could not read, a bare `!` and a `!!`."""
    import pathspec

    negate = pattern.startswith("!")
    rest = pattern[1:] if negate else pattern
    if negate and (not rest.strip() or rest.startswith("!")):
        raise InvalidInput(f"glob {pattern!r}: a leading '!' takes one pattern after it, whose files are left out "
                           "('!*.md': every file but Markdown; '\\!name' for a name that begins with '!')",
                           field="glob")  # fmt: skip
    try:
        spec = pathspec.GitIgnoreSpec.from_lines([rest])
    except ValueError as exc:  # a pattern ending in a lone backslash
        raise InvalidInput(f"not a glob git can read: {exc}", field="glob") from None
    if negate:
        return lambda rel: not spec.match_file(rel)
    return spec.match_file


def _regular_bytes(full: Path, max_bytes: int) -> bytes | None:
    """A regular file's bytes; None for a bigger one than `max_bytes`, or anything else (a tracked file replaced by
    a FIFO hung the search in its read: it is opened without blocking, and the open file itself is looked at)."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
                return None
            data = fh.read(max_bytes + 1)
        except OSError:
            return None
    return data if len(data) <= max_bytes else None  # grown past the limit since the fstat


class RepoAgent(Indexing, Plugin):
    """Workspaces, file operations, allow-listed commands, git, a code index, a repo map, answers and docs."""

    id = "repoagent"
    name = "repoagent"
    version = "0.1.0"
    description = (
        "Sandboxed code-repository workspaces: tree, read, write, search, allow-listed commands, git diff and "
        "commit; a code index (ast + tree-sitter), a PageRank repo map, answers with verified path:line "
        "citations and callee-first docs from the local LLM."
    )
    mode = "worker"
    Settings = RepoSettings
    settings: RepoSettings

    @classmethod
    def routes(cls, api: GatewayAPI) -> APIRouter:
        """Mount `/api/repo/{workspace}/run/{name}`: a command's output streamed as server-sent events."""
        from bkg_kernel.plugins.repoagent import routes

        return routes.build(api)

    def start(self) -> None:
        assert self.context is not None
        self._load_workspaces()
        self.roots = [Path(r).expanduser().resolve() for r in self.settings.repo_roots] or [
            (self.context.data_dir / "repos").resolve()
        ]
        self.roots[0].mkdir(parents=True, exist_ok=True)
        self.ignore = Ignore(self.settings.ignore)

    # -- helpers ----------------------------------------------------------------------------------
    def _chat(self, messages: list[dict[str, str]], max_tokens: int, route: str) -> dict[str, Any]:
        return self.store.chat(self._chat_body(messages, max_tokens), route=route)

    def _chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if self.settings.llm_model:
            body["model"] = self.settings.llm_model
        return body

    # -- workspace and files ----------------------------------------------------------------------
    @capability("repo.workspace", scope="repo:use")
    def workspace(self, inp: WorkspaceRequest) -> Result:
        """Add a folder under a repo root as a workspace, list them, describe one, or remove one (files stay)."""
        if inp.action == "list":
            with self.lock:
                return Result(
                    workspaces=[w.to_dict() for w in self.workspaces.values()], roots=list(map(str, self.roots))
                )
        assert inp.name is not None
        if inp.action == "add":
            return self._add(inp.name, inp.path or "")
        ws = self._ws(inp.name) if inp.action == "describe" else self.workspaces.get(inp.name)
        if ws is None:
            raise NotFound(f"workspace {inp.name!r} does not exist", field="name")
        if inp.action == "describe":
            return Result(**ws.to_dict(), index=self._index(ws, need=False).summary())
        return self._remove(ws)

    @capability("repo.tree", scope="repo:use")
    def tree(self, inp: TreeRequest) -> Result:
        """The files and folders under a path, `depth` levels deep, as entries and as an indented text."""
        ws = self._ws(inp.workspace)
        base = ws.resolve(inp.path)
        if not base.is_dir():
            raise InvalidInput(f"{inp.path!r} is not a folder", field="path")
        prefix = "" if base == ws.path else ws.rel(base) + "/"
        entries: dict[str, dict[str, Any]] = {}
        truncated = False
        for rel in self._files(ws):
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix) :].split("/")
            for depth in range(1, min(len(parts), inp.depth) + 1):
                key = prefix + "/".join(parts[:depth])
                if key in entries:
                    continue
                if len(entries) >= inp.limit:
                    truncated = True
                    break
                is_file = depth == len(parts)
                size = (ws.path / key).stat().st_size if is_file and (ws.path / key).exists() else None
                entries[key] = {"path": key, "type": "file" if is_file else "dir", "depth": depth, "size": size}
        items = sorted(entries.values(), key=lambda e: e["path"])
        text = "\n".join(
            "    " * (e["depth"] - 1) + e["path"].rsplit("/", 1)[-1] + ("/" if e["type"] == "dir" else "")
            for e in items
        )
        if not items:
            text = "(no files here: empty, or every file is ignored)"
        return Result(workspace=ws.name, path=inp.path, entries=items, text=text, truncated=truncated)

    @capability("repo.file.read", scope="repo:use")
    def read(self, inp: ReadRequest) -> Result:
        """Lines `start_line`..`end_line` of a text file (at most `read_window`), numbered."""
        ws = self._ws(inp.workspace)
        full = ws.resolve(inp.path)
        text = read_text(full, self.settings.max_file_bytes)
        lines = text_lines(text)
        start = inp.start_line
        end = min(inp.end_line or start + self.settings.read_window - 1, start + self.settings.read_window - 1)
        if end < start:
            raise InvalidInput("end_line is before start_line", field="end_line")
        if lines and start > len(lines):
            raise InvalidInput(
                f"{inp.path} has {len(lines)} lines; start_line {start} is past its end", field="start_line"
            )
        end = min(end, len(lines))
        window = lines[start - 1 : end]
        numbered = "\n".join(f"{n:>6}| {ln}" for n, ln in zip(range(start, end + 1), window, strict=False))
        return Result(
            workspace=ws.name, path=ws.rel(full), start_line=start, end_line=end, total_lines=len(lines),
            content="\n".join(window), text=numbered or "(empty file)", more=end < len(lines),
        )  # fmt: skip

    @capability("repo.file.write", scope="repo:use", big_input=True)
    def write(self, inp: WriteRequest) -> Result:
        """Write text (overwrite, append or create); Python that does not parse is refused unless `force`."""
        ws = self._ws(inp.workspace)
        full = ws.resolve(inp.path)
        rel = ws.rel(full)
        if rel == "." or ".git" in rel.split("/"):  # a nested .git/config could name commands git would run
            raise Forbidden(f"{inp.path!r} is not writable: .git folders and the workspace folder are off limits")
        if rel.count("/") >= MAX_DEPTH:
            raise InvalidInput(f"{inp.path[:100]!r}... is {rel.count('/')} folders deep (at most {MAX_DEPTH})",
                               field="path")  # fmt: skip
        for folder in full.parents:  # `README.md/notes.txt`: a file where a folder would have to be
            if folder == ws.path:
                break
            if folder.exists() and not folder.is_dir():
                raise InvalidInput(f"{ws.rel(folder)} is a file, not a folder: {rel} cannot be written",
                                   field="path")  # fmt: skip
        if "\0" in inp.content:
            raise InvalidInput("content holds NUL bytes: binary files are not written", field="content")
        if len(inp.content.encode()) > self.settings.max_file_bytes:
            raise InvalidInput(f"content is over max_file_bytes {self.settings.max_file_bytes}", field="content")
        exists = full.exists()
        if exists and full.is_dir():
            raise InvalidInput(f"{inp.path!r} is a folder", field="path")
        if exists and not full.is_file():  # a FIFO (its read would never end), a device
            raise InvalidInput(f"{rel} is not a regular file", field="path")
        if inp.mode == "create" and exists:
            raise AlreadyExists(f"{rel} already exists (mode create)", field="path")
        size = full.stat().st_size if exists else 0
        if inp.mode == "append" and size + len(inp.content.encode()) > self.settings.max_file_bytes:
            raise InvalidInput(f"{rel} would grow to {size + len(inp.content.encode()):,} bytes, over "
                               f"max_file_bytes {self.settings.max_file_bytes}", field="content")  # fmt: skip
        with full.open("rb") if exists else contextlib.nullcontext(None) as f:  # its head says if it is text
            head = f.read(BINARY_SNIFF) if f is not None else b""
        if is_binary(head):
            raise InvalidInput(f"{rel} is a binary file: it is not written as text", field="path")
        old = full.read_bytes() if exists and inp.mode == "append" else b""
        try:
            new = (old.decode() if inp.mode == "append" else "") + inp.content
        except UnicodeDecodeError:
            raise InvalidInput(f"{rel} is not UTF-8 text: it is not appended to", field="path") from None
        if full.suffix in (".py", ".pyi") and not inp.force:
            try:
                ast.parse(new, filename=rel)
            except RecursionError:
                raise InvalidInput(f"{rel} nests too deeply for Python to parse", field="content") from None
            except SyntaxError as exc:
                raise InvalidInput(
                    f"{rel} would not parse: line {ast_lines(new)(exc.lineno or 1)}: {exc.msg} "
                    "(send force=true to write it anyway)",
                    field="content",
                ) from None
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file made meanwhile where a folder goes, a full disk: said without the full path
            raise InvalidInput(f"cannot make the folder of {rel}: {exc.strerror}", field="path") from None
        if full.parent.resolve() != full.parent or ws.path not in full.parents:  # a folder link made meanwhile
            raise Forbidden(f"{inp.path!r} leads outside the workspace", field="path")
        for left in full.parent.glob(f".{glob.escape(full.name)}.*{gitops.TEMP_SUFFIX}"):  # by a write that was
            with contextlib.suppress(OSError):  # killed mid-way, an hour ago or more (not one running now)
                if time.time() - left.lstat().st_mtime > 3600:
                    left.unlink()
        fd, name = tempfile.mkstemp(
            prefix=f".{full.name}.", suffix=gitops.TEMP_SUFFIX, dir=full.parent
        )  # O_EXCL: never
        tmp = Path(name)  # a link the repository put there
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(new)
            os.chmod(tmp, full.stat().st_mode & 0o7777 if exists else 0o644)
            tmp.replace(full)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Result(
            workspace=ws.name, path=rel, mode=inp.mode, created=not exists, bytes=len(new.encode()),
            lines=len(text_lines(new)),
        )  # fmt: skip

    @capability("repo.search", scope="repo:use")
    def search(self, inp: SearchRequest) -> Result:
        """Lines matching a literal or a regex (path, line number, line); files matched; explicit when none."""
        ws = self._ws(inp.workspace)
        import regex  # the `regex` module: a search that can be given a timeout, which `re`'s cannot

        flags = 0 if inp.case_sensitive else regex.IGNORECASE
        try:
            if inp.regex:
                _compilable(inp.query)
            # not kept in the module's cache: each distinct pattern stayed there, up to hundreds of MB apiece
            pattern = regex.compile(inp.query if inp.regex else regex.escape(inp.query), flags | regex.VERSION0,
                                    cache_pattern=False)  # fmt: skip
        except (regex.error, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidInput(f"not a regular expression: {exc}", field="query") from None
        # '(a+)+$' against 'aaaa...!' backtracks for hours, holding the GIL (the worker would stop answering its
        # pipe): the whole search gets SEARCH_TIMEOUT_S of matching
        deadline = time.monotonic() + SEARCH_TIMEOUT_S
        wanted = _glob(inp.glob) if inp.glob else None
        hits: list[dict[str, Any]] = []
        files: dict[str, int] = {}
        truncated = False
        for rel in self._files(ws):
            if wanted is not None and not wanted(rel):
                continue
            data = _regular_bytes(ws.path / rel, self.settings.max_file_bytes)
            if data is None or is_binary(data):
                continue
            for n, line in enumerate(text_lines(data.decode("utf-8", errors="replace")), start=1):
                try:
                    found = pattern.search(line[:MAX_LINE_CHARS], timeout=max(0.001, deadline - time.monotonic()))
                except TimeoutError:
                    raise InvalidInput(
                        f"the expression took over {SEARCH_TIMEOUT_S:g} s to match (nested repetition such as "
                        "'(a+)+' backtracks without end): simplify it",
                        field="query",
                    ) from None
                if found:
                    files[rel] = files.get(rel, 0) + 1
                    if len(hits) < inp.limit:
                        hits.append({"path": rel, "line": n, "text": line[:MAX_LINE_CHARS]})
                    else:
                        truncated = True
        message = f"{sum(files.values())} matches in {len(files)} files" if files else f"no matches for {inp.query!r}"
        return Result(workspace=ws.name, query=inp.query, hits=hits, files=files, truncated=truncated, message=message)

    # -- git and commands -------------------------------------------------------------------------
    def _git_ws(self, name: str) -> Workspace:
        ws = self._ws(name)
        if not ws.git:
            raise InvalidInput(f"workspace {name!r} is not a git repository", field="workspace")
        return ws

    def _rel_paths(self, ws: Workspace, paths: list[str]) -> list[str]:
        return [ws.rel(ws.resolve(p, f"paths.{i}")) for i, p in enumerate(paths)]

    @capability("repo.diff", scope="repo:use")
    def diff(self, inp: DiffRequest) -> Result:
        """Uncommitted changes against HEAD (untracked files shown whole) and each changed file's status."""
        ws = self._git_ws(inp.workspace)
        return Result(workspace=ws.name, **gitops.diff(ws.path, self._rel_paths(ws, inp.paths)))

    @capability("repo.commit", scope="repo:use")
    def commit(self, inp: CommitRequest) -> Result:
        """Commit the changes in `paths` (default: all) with git, authored by the caller; hooks do not run."""
        ws = self._git_ws(inp.workspace)
        with self._index_lock(ws):
            out = gitops.commit(ws.path, inp.message, self._rel_paths(ws, inp.paths), inp.signoff, self._caller())
        return Result(workspace=ws.name, **out)

    @capability("repo.command", scope="repo:use", job=True)
    def command(self, inp: CommandRequest, progress: Progress) -> Result:
        """Run an allow-listed command in the workspace, sandboxed; its output streams as job progress."""
        ws = self._ws(inp.workspace)
        spec = self.settings.commands.get(inp.name)
        if spec is None:
            allowed = ", ".join(sorted(self.settings.commands)) or "none"
            raise Forbidden(f"command {inp.name!r} is not on the allow-list (allowed: {allowed})", field="name")
        env = sandbox.scrubbed_env(ws.path, spec.env)
        argv = sandbox.build_argv(inp.name, spec, inp.args, env)
        progress(0.0, f"$ {' '.join([inp.name, *inp.args])}\n")
        t0 = time.monotonic()
        stop = threading.Event()
        said = [t0]

        def out(text: str) -> None:  # from the output reader; a cancelled job's next report raises Cancelled
            said[0] = time.monotonic()
            try:
                progress(min(0.99, (said[0] - t0) / spec.timeout_s), text)
            except Cancelled:
                stop.set()

        def should_stop() -> bool:  # a silent command still notices a cancel within a second
            if time.monotonic() - said[0] > 1.0:
                out("")
            return stop.is_set()

        outcome = sandbox.run(argv, ws.path, env, spec.timeout_s, self.settings.limits, out, should_stop)
        # who ran it goes to the audit log (admin:audit), not to this log (plugins:read); cancelled too: it ran
        self._audited(ws.name, name=inp.name, exit_code=outcome.exit_code, cancelled=stop.is_set())
        if stop.is_set():
            raise Cancelled(f"repo.command {inp.name} was cancelled: its process group was killed")
        self.log.info("%s ran in %s: exit %s", inp.name, ws.name, outcome.exit_code)
        return Result(workspace=ws.name, name=inp.name, args=inp.args, **outcome.to_dict())

    def _audited(self, workspace: str, **detail: Any) -> None:
        """Record a command the caller ran in the audit log; one that ran is not undone by a failure to record it
        (the gateway gone, a call that ended): that failure is logged, naming the command, not the caller."""
        try:
            self.store.audit("command", workspace, **detail)
        except BkgError as exc:
            self.log.warning("%s in %s: not recorded in the audit log: %s", detail.get("name"), workspace, exc.message)

    # -- code intelligence ------------------------------------------------------------------------
    @capability("repo.index", scope="repo:use", job=True)
    def index(self, inp: IndexRequest, progress: Progress) -> Result:
        """Parse changed files (ast / tree-sitter), embed their symbol chunks into repo-<name>; drop removed ones."""
        return self._run_index(inp, progress)

    @capability("repo.symbols", scope="repo:use")
    def symbols(self, inp: SymbolsRequest) -> Result:
        """Symbols whose name matches `query` (exact, prefix, then substring), or every symbol of `path`."""
        ws = self._ws(inp.workspace)
        idx = self._index(ws)
        found = [s for s in idx.symbols() if not inp.kind or s["kind"] == inp.kind]
        if inp.path:
            rel = ws.rel(ws.resolve(inp.path))
            found = [s for s in found if s["path"] == rel or s["path"].startswith(rel.rstrip("/") + "/") or rel == "."]
        if inp.query:
            q = inp.query.lower()

            def grade(s: dict[str, Any]) -> int:
                name, qual = s["name"].lower(), s["qualname"].lower()
                if q in (name, qual):
                    return 0
                if name.startswith(q) or qual.startswith(q):
                    return 1
                return 2 if q in qual else 3

            found = sorted((s for s in found if grade(s) < 3), key=lambda s: (grade(s), len(s["qualname"]), s["path"]))
        out = found[: inp.limit]
        return Result(workspace=ws.name, symbols=out, total=len(found), message=None if out else "no symbols match")

    @capability("repo.refs", scope="repo:use")
    def refs(self, inp: RefsRequest) -> Result:
        """Where a symbol is defined, and every call, import or use of its name (with the enclosing symbol)."""
        ws = self._ws(inp.workspace)
        idx = self._index(ws)
        name = inp.symbol.rsplit(".", 1)[-1]
        defs = [s for s in idx.symbols() if s["qualname"] == inp.symbol or s["name"] == inp.symbol]
        def_lines = {(d["path"], d["start"]) for d in defs}
        uses = [r for r in idx.refs() if r["name"] == name and (r["path"], r["line"]) not in def_lines]
        uses.sort(key=lambda r: (r["path"], r["line"], r["kind"]))
        lines_of: dict[str, list[str]] = {}
        out = []
        for r in uses[: inp.limit]:
            if r["path"] not in lines_of:
                try:  # (a folder made a link out of the workspace since it was indexed: not read)
                    lines_of[r["path"]] = file_lines(ws.path / r["path"]) if inside(ws.path, r["path"]) else []
                except OSError:  # gone (or a folder now) since it was indexed: its line is not shown
                    lines_of[r["path"]] = []
            src = lines_of[r["path"]]
            out.append({**r, "text": src[r["line"] - 1].strip() if r["line"] <= len(src) else ""})
        callers = sorted({f"{r['path']}:{r['in']}" for r in uses if r["kind"] == "call"})
        return Result(
            workspace=ws.name, symbol=inp.symbol, definitions=defs, references=out, total=len(uses), callers=callers,
            message=None if defs or uses else f"{inp.symbol!r} is neither defined nor used in the index",
        )  # fmt: skip

    @capability("repo.map", scope="repo:use")
    def map(self, inp: MapRequest) -> Result:
        """The best-ranked definitions (PageRank over references, personalised by `focus`), signatures only."""
        ws = self._ws(inp.workspace)
        return Result(workspace=ws.name, **repomap.build(self._index(ws), inp.budget_tokens, inp.focus))

    def _search(self, ws: Workspace) -> Any:
        def search(question: str, k: int) -> list[dict[str, Any]]:
            return self.store.query(self._collection(ws), text=question, k=k, mode="hybrid")

        return search

    @capability("repo.ask", scope="repo:use")
    def ask(self, inp: AskRequest) -> Result:
        """Answer from the code (hybrid retrieval + repo map) with llmserver; citations are checked first
        (streamed as it is written: `POST /api/repo/{workspace}/ask`)."""
        ws = self._ws(inp.workspace)
        t0 = time.perf_counter()
        out = answers.ask(
            ws.path, self._index(ws), self._search(ws),
            lambda m, n: self._chat(m, n, "repo.ask"), inp.question, inp.top_k, self.settings.ask_map_tokens,
            self.settings.ask_max_tokens, self.settings.ask_context_tokens,
        )  # fmt: skip
        return Result(workspace=ws.name, **out, took_s=round(time.perf_counter() - t0, 3))

    def stream(self, capability_id: str, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """`repo.ask` as it is written: `{"sources": [...]}` once the code is found, `{"delta": text}` as the model
        writes, then `{"result": ...}` (what `repo.ask` answers, citations checked). Cancelled (the client left):
        the generation stops at its next token. Any other capability as the plugin contract streams it."""
        if capability_id != "repo.ask":
            yield from super().stream(capability_id, data, cancelled)
            return
        inp = self._validate(self.capabilities()[capability_id], data)
        assert isinstance(inp, AskRequest)
        ws = self._ws(inp.workspace)
        t0 = time.perf_counter()
        p = answers.prompt(ws.path, self._index(ws), self._search(ws), inp.question, inp.top_k,
                           self.settings.ask_map_tokens, self.settings.ask_context_tokens)  # fmt: skip
        yield {"sources": p.shown_sources()}
        parts: list[str] = []
        reply: dict[str, Any] = {}  # the model and the usage, as the last chunk says them
        if p.sources:
            body = self._chat_body(p.messages, self.settings.ask_max_tokens)
            for piece in self.store.chat_pieces(body, route="repo.ask", cancelled=cancelled, reply=reply):
                parts.append(piece)
                yield {"delta": piece}
        out = answers.answered(p, "".join(parts), reply.get("model"), reply.get("usage"))
        yield {"result": {"workspace": ws.name, **out, "took_s": round(time.perf_counter() - t0, 3)}}

    @capability("repo.document", scope="repo:use", job=True)
    def document(self, inp: DocumentRequest, progress: Progress) -> Result:
        """Markdown docs for a symbol or a file, callee-first, saved in the workspace's docs folder."""
        ws = self._ws(inp.workspace)
        idx = self._index(ws)
        if inp.path:
            rel = ws.rel(ws.resolve(inp.path))
            if rel not in idx.files:
                raise NotFound(f"{rel} is not in the index (an indexed source file?)", field="path")
            targets = [s for s in idx.files[rel]["symbols"] if s["kind"] != "module"]
            if not targets:
                raise InvalidInput(f"{rel} defines no symbols to document", field="path")
        else:
            targets = [s for s in idx.symbols() if s["qualname"] == inp.symbol] or [
                s for s in idx.symbols() if s["name"] == inp.symbol and s["kind"] != "module"
            ]
            if not targets:
                raise NotFound(f"no symbol {inp.symbol!r} in the index", field="symbol")
            targets = [t for t in targets if t["path"] == targets[0]["path"]][:1]
        docs = f"docs:{ws.name}"
        if not self.index_locks.acquire(docs, blocking=False):  # one at a time: each rewrites the docs folder's cache
            progress(0.0, f"waiting for another repo.document of {ws.name} to finish")
            self.index_locks.acquire(docs)
        try:
            out = answers.document(
                ws.path, idx, targets, self._dir(ws) / "docs", lambda m, n: self._chat(m, n, "repo.document"),
                self.settings.doc_max_tokens, inp.force, progress,
            )  # fmt: skip
        finally:
            self.index_locks.release(docs)
        return Result(workspace=ws.name, **out)
