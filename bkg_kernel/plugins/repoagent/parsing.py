"""Symbols and references of one source file: Python through `ast`, other languages through tree-sitter.

A symbol is a module, class, function or method (plus interfaces, types, structs where a grammar tags
them) with its qualified name, line span (1-based, inclusive), one-line signature and docstring. A
reference is an identifier the file uses (a call, an import, an attribute or a name) with its line and
the symbol it sits in. Each grammar wheel ships its own `tags.scm`; TypeScript adds the JavaScript tags.
A file in a language without a grammar gets no symbols: it is still chunked and searchable as text.

Lines are counted as git and tree-sitter count them (`workspace.text_lines`: a line ends at a newline). Python's
parser also ends a line at a lone CR (a classic Mac line end); a file that has one is parsed as Python reads it, and
its line numbers are mapped onto newline-counted lines, so they agree with repo.file.read, repo.search and git.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Callable
from functools import cache
from pathlib import PurePosixPath
from typing import Any

from bkg_kernel.plugins.repoagent.workspace import text_lines

LANGUAGES = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".go": "go", ".rs": "rust", ".java": "java",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
}  # fmt: skip
# grammar module and its language function, per language
GRAMMARS = {
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}
# syntax nodes whose name qualifies the definitions inside them (Foo.bar)
CONTAINERS = {
    "class_declaration", "class", "abstract_class_declaration", "interface_declaration", "impl_item",
    "trait_item", "struct_item", "enum_item", "mod_item", "class_specifier", "struct_specifier",
    "namespace_definition", "enum_declaration", "record_declaration", "module",
}  # fmt: skip
NAMESPACES = {"namespace_definition", "mod_item", "module"}  # they qualify names but hold functions, not methods
# calls the C and C++ wheels' tags queries leave out
EXTRA_TAGS = {
    "c": "(call_expression function: (identifier) @name) @reference.call",
    "cpp": "(call_expression function: [(identifier) @name (field_expression field: (field_identifier) @name)"
    " (qualified_identifier name: (identifier) @name)]) @reference.call",
}
SIGNATURE_CHARS = 240
LONE_CR = re.compile(r"\r(?!\n)")
PY_LINE_END = re.compile(r"\r\n|\r|\n")  # what ends a line for Python's parser


def language_of(path: str) -> str | None:
    """The language of a file by its extension (None: text only)."""
    return LANGUAGES.get(PurePosixPath(path).suffix.lower())


def module_name(path: str) -> str:
    """A dotted module name from a path: `pkg/sub/mod.py` -> `pkg.sub.mod`, `pkg/__init__.py` -> `pkg`."""
    p = PurePosixPath(path)
    parts = [x for x in p.parent.parts if x not in (".", "")]
    if p.stem != "__init__" or not parts:
        parts.append(p.stem)
    return ".".join(parts)


def parse(path: str, source: str) -> dict[str, Any]:
    """Return `{"language", "symbols", "refs", "error"}` for one file (a syntax error leaves what was found)."""
    lang = language_of(path)
    if lang == "python":
        return _python(path, source)
    if lang in GRAMMARS:
        return _treesitter(path, source, lang)
    return {"language": lang, "symbols": [], "refs": [], "error": None}


# -- Python (ast) ---------------------------------------------------------------------------------


def _python(path: str, source: str) -> dict[str, Any]:
    mod = module_name(path)
    n_lines = _line_count(source)
    at = ast_lines(source)
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # 1,500 terms in a row: RecursionError
        line = getattr(exc, "lineno", None)
        err = f"line {at(line)}: {getattr(exc, 'msg', exc)}" if line else str(exc)
        return {"language": "python", "symbols": [_module(mod, path, n_lines, None)], "refs": [], "error": err}
    symbols = [_module(mod, path, n_lines, ast.get_docstring(tree))]
    refs: list[dict[str, Any]] = []
    seen: set[tuple[str, int, str, str]] = set()

    def ref(name: str, kind: str, line: int, where: str) -> None:
        line = at(line)
        key = (name, line, where, kind)
        if key not in seen:
            seen.add(key)
            refs.append({"name": name, "kind": kind, "line": line, "in": where})

    def visit(node: ast.AST, scope: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                qual = f"{scope}.{child.name}" if scope != mod else child.name
                if isinstance(child, ast.ClassDef):
                    bases = ", ".join(ast.unparse(b) for b in [*child.bases, *child.keywords])
                    kind, sig = "class", f"class {child.name}" + (f"({bases})" if bases else "")
                else:
                    kind = "method" if in_class else "function"
                    ret = f" -> {ast.unparse(child.returns)}" if child.returns else ""
                    sig = f"{'async ' if isinstance(child, ast.AsyncFunctionDef) else ''}def {child.name}"
                    sig += f"({ast.unparse(child.args)}){ret}"
                for d in child.decorator_list:
                    _names(d, lambda n, k, ln: ref(n, k, ln, scope))
                symbols.append(
                    {
                        "name": child.name, "qualname": qual, "kind": kind,
                        "path": path, "start": at(start), "end": at(child.end_lineno or child.lineno),
                        "signature": _clip(sig), "doc": ast.get_docstring(child) or "", "language": "python",
                    }
                )  # fmt: skip
                visit(child, qual, isinstance(child, ast.ClassDef))
                continue
            if isinstance(child, ast.ImportFrom):
                for a in child.names:
                    ref(a.name, "import", child.lineno, scope)
                if child.module:
                    ref(child.module.rsplit(".", 1)[-1], "import", child.lineno, scope)
            elif isinstance(child, ast.Import):
                for a in child.names:
                    ref(a.name.rsplit(".", 1)[-1], "import", child.lineno, scope)
            else:
                _names(child, lambda n, k, ln: ref(n, k, ln, scope), recurse=False)
            visit(child, scope, False if isinstance(child, ast.ClassDef) else in_class)

    try:
        visit(tree, mod, False)
    except RecursionError:  # parsed, but nested past what a walk of it can follow (~1,000 terms in a row)
        return {"language": "python", "symbols": symbols[:1], "refs": [], "error": "nests too deeply to index"}
    return {"language": "python", "symbols": symbols, "refs": refs, "error": None}


def _line_count(source: str) -> int:
    """How many lines a file has (at least 1: a module's span)."""
    return max(1, len(text_lines(source)))


def ast_lines(source: str) -> Callable[[int], int]:
    """Return what maps a line number of Python's parser onto the file's newline-counted line (the same number
    unless the file has a lone CR, which ends a line for Python but not for git, editors or `text_lines`)."""
    if LONE_CR.search(source) is None:
        return lambda n: n
    starts, line = [1], 1  # the newline-counted line each of the parser's lines starts on
    for m in PY_LINE_END.finditer(source):
        line += m.group() != "\r"
        starts.append(line)
    return lambda n: starts[min(n, len(starts)) - 1]


def _names(node: ast.AST, emit: Any, recurse: bool = True) -> None:
    """Emit the names one node uses: calls, attributes and loaded names."""
    nodes = ast.walk(node) if recurse else [node]
    for n in nodes:
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name):
                emit(f.id, "call", n.lineno)
            elif isinstance(f, ast.Attribute):
                emit(f.attr, "call", n.lineno)
        elif isinstance(n, ast.Attribute):
            emit(n.attr, "attr", n.lineno)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            emit(n.id, "name", n.lineno)


def _module(mod: str, path: str, n_lines: int, doc: str | None) -> dict[str, Any]:
    return {
        "name": mod.rsplit(".", 1)[-1], "qualname": mod, "kind": "module", "path": path, "start": 1,
        "end": n_lines, "signature": f"module {mod}", "doc": doc or "", "language": language_of(path),
    }  # fmt: skip


def _clip(sig: str) -> str:
    sig = " ".join(sig.split())
    return sig if len(sig) <= SIGNATURE_CHARS else sig[: SIGNATURE_CHARS - 3] + "..."


# -- tree-sitter ----------------------------------------------------------------------------------


@cache
def _grammar(lang: str) -> tuple[Any, Any]:
    """The parser and tags query of a language (built once per process)."""
    import tree_sitter as ts

    module, fn = GRAMMARS[lang]
    mod = importlib.import_module(module)
    language = ts.Language(getattr(mod, fn)())
    query_text = getattr(mod, "TAGS_QUERY", None) or _query_file(mod)
    if lang in ("typescript", "tsx"):  # the TypeScript wheel tags only TS-specific nodes; JS covers the rest
        query_text = importlib.import_module("tree_sitter_javascript").TAGS_QUERY + "\n" + query_text
    query_text += "\n" + EXTRA_TAGS.get(lang, "")
    return ts.Parser(language), ts.Query(language, query_text)


def _query_file(mod: Any) -> str:
    from pathlib import Path

    return (Path(mod.__file__).parent / "queries" / "tags.scm").read_text(encoding="utf-8")


def _treesitter(path: str, source: str, lang: str) -> dict[str, Any]:
    import tree_sitter as ts

    parser, query = _grammar(lang)
    data = source.encode()
    tree = parser.parse(data)
    n_lines = _line_count(source)
    mod = module_name(path)
    symbols = [_module(mod, path, n_lines, None)]
    defs: list[tuple[int, int, str]] = []  # start byte, end byte, qualname: to place references
    raw_refs: list[tuple[str, str, int, int]] = []
    seen_defs: set[tuple[int, int]] = set()
    for _, caps in ts.QueryCursor(query).matches(tree.root_node):
        names = caps.get("name")
        role = next((k for k in caps if k.startswith(("definition.", "reference."))), None)
        if not names or role is None:
            continue
        name_node, node = names[0], caps[role][0]
        name = (name_node.text or b"").decode(errors="replace")
        kind = role.split(".", 1)[1]
        if role.startswith("reference."):
            raw_refs.append((name, "call" if kind == "call" else kind, name_node.start_point[0] + 1, node.start_byte))
            continue
        while node.type.endswith("declarator") and node.parent is not None:  # C: int add(...) {...} is the whole
            node = node.parent
        if (node.start_byte, node.end_byte) in seen_defs or not name:
            continue
        seen_defs.add((node.start_byte, node.end_byte))
        owners = _owners(node)
        if kind == "function" and _in_class(node):
            kind = "method"
        if node.type == "method_declaration" and lang == "go":  # func (t *T) M(): the receiver's type owns M
            recv = node.child_by_field_name("receiver")
            tname = next((n for n in _walk(recv) if n.type == "type_identifier"), None) if recv else None
            owners = [tname.text.decode(errors="replace")] if tname is not None and tname.text else owners
        qual = ".".join([*owners, name])
        symbols.append(
            {
                "name": name, "qualname": qual, "kind": kind, "path": path, "start": node.start_point[0] + 1,
                "end": node.end_point[0] + 1, "signature": _signature(node, data), "doc": _doc(node),
                "language": lang,
            }
        )  # fmt: skip
        defs.append((node.start_byte, node.end_byte, qual))
    refs, seen = [], set()
    places = _innermost(defs, [r[3] for r in raw_refs], mod)
    for (name, kind, line, _), where in zip(raw_refs, places, strict=True):
        if (name, line, where, kind) not in seen:
            seen.add((name, line, where, kind))
            refs.append({"name": name, "kind": kind, "line": line, "in": where})
    error = "the parser recovered from syntax errors" if tree.root_node.has_error else None
    return {"language": lang, "symbols": symbols, "refs": refs, "error": error}


def _innermost(defs: list[tuple[int, int, str]], points: list[int], outside: str) -> list[str]:
    """The qualname of the innermost definition `(start, end, qualname)` holding each byte offset (start inclusive,
    end exclusive), `outside` where none does. Syntax nodes nest or are apart, so one sweep over spans sorted by
    start (outer first) and points sorted by offset, with a stack of the open spans, places every point in
    n log n (a scan of every span per point took 5 s for a file of 8,000 functions)."""
    spans = sorted(defs, key=lambda d: (d[0], -d[1]))
    out = [outside] * len(points)
    stack: list[tuple[int, int, str]] = []
    j = 0
    for i in sorted(range(len(points)), key=points.__getitem__):
        at = points[i]
        while j < len(spans) and spans[j][0] <= at:
            while stack and stack[-1][1] <= spans[j][0]:  # closed before this one opens
                stack.pop()
            stack.append(spans[j])
            j += 1
        while stack and stack[-1][1] <= at:
            stack.pop()
        if stack:
            out[i] = stack[-1][2]
    return out


def _walk(node: Any) -> Any:
    yield node
    for c in node.children:
        yield from _walk(c)


def _in_class(node: Any) -> bool:
    p = node.parent
    while p is not None:
        if p.type in CONTAINERS and p.type not in NAMESPACES:
            return True
        p = p.parent
    return False


def _owners(node: Any) -> list[str]:
    """Names of the classes, impls, traits or namespaces around a definition, outermost first."""
    out: list[str] = []
    p = node.parent
    while p is not None:
        if p.type in CONTAINERS:
            n = p.child_by_field_name("name") or p.child_by_field_name("type")
            if n is not None and n.text:
                out.append(n.text.decode(errors="replace"))
        p = p.parent
    return out[::-1]


def _signature(node: Any, data: bytes) -> str:
    """The definition's text up to its body (one line), or its first line."""
    body = node.child_by_field_name("body")
    end = body.start_byte if body is not None and body.start_byte > node.start_byte else None
    text = data[node.start_byte : end].decode(errors="replace") if end else ""
    if not text.strip():
        text = data[node.start_byte : node.end_byte].decode(errors="replace").split("\n", 1)[0]
    return _clip(text.rstrip(" {:=\n"))


def _doc(node: Any) -> str:
    """The comment lines right above a definition (a doc comment), markers stripped."""
    lines: list[str] = []
    if node.parent is not None and node.parent.type in ("export_statement", "decorated_definition"):
        node = node.parent  # `export function f` / decorators: the comment sits above the whole statement
    prev, top = node.prev_named_sibling, node.start_point[0]
    while prev is not None and "comment" in prev.type and prev.end_point[0] >= top - 1:
        lines.insert(0, (prev.text or b"").decode(errors="replace"))
        top = prev.start_point[0]
        prev = prev.prev_named_sibling
    cleaned = []
    for block in lines:
        for ln in text_lines(block):
            ln = ln.strip()
            for mark in ("///", "//!", "//", "/**", "/*", "*/", "*", "#"):
                if ln.startswith(mark):
                    ln = ln[len(mark) :].strip()
                    break
            if ln.endswith("*/"):
                ln = ln[:-2].strip()
            if ln:
                cleaned.append(ln)
    return "\n".join(cleaned)
