"""Which notebooks may run as jobs (those under `job_roots`), and their parameters (papermill's `parameters` cell).

A notebook is named by its path relative to one of the roots (`jobs/index_documents.ipynb`) or absolutely; a name
that resolves outside every root (`..`, a symlink out) is refused before anything runs, and so is a relative name
that more than one root holds (which one would run, and which one a retry or a schedule's next fire would run,
would depend on the roots' order and on files added later): such a notebook is named by its full path, as runs,
schedules and the listing name it. Parameters are checked against the names and inferred types of the notebook's
`parameters` cell, so a typo or a string for an int is a 422 naming the parameter, not a failed run. Jobs run in
Python kernels: a notebook that declares another kernel (`ir`) is refused; one that declares none runs in python3.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bkg_kernel.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable, escaped, expand_home, is_utf8

log = logging.getLogger(__name__)

_SIMPLE = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
_OPTIONAL = re.compile(
    r"^(?:Optional\[(.+)\]|(.+?)\s*\|\s*None|None\s*\|\s*(.+)|Union\[(.+?),\s*None\]|Union\[None,\s*(.+)\])$"
)
KERNEL = "python3"  # what a notebook that declares no kernel runs in (as `papermill -k python3`)
_cache: dict[tuple[str, float], dict[str, Any]] = {}


def default_roots(data_dir: Path) -> list[Path]:
    """The roots when `job_roots` is unset: ./notebooks and <data_dir>/notebooks."""
    return [Path("notebooks"), Path(data_dir) / "notebooks"]


def literal_path(path: Path | str) -> str:
    """`path` as papermill must be given it to use it as it is: it fills `{name}` in a path from the parameters."""
    return str(path).replace("{", "{{").replace("}", "}}")


def resolve(notebook: str, roots: Sequence[Path]) -> Path:
    """Return the notebook file `notebook` names, inside one of `roots` (403 outside, 404 missing, 422 not .ipynb,
    409 a relative name that more than one root holds)."""
    if not isinstance(notebook, str) or not notebook.strip() or "\x00" in notebook:
        raise InvalidInput("notebook must be a path to an .ipynb file", field="notebook")
    if not notebook.endswith(".ipynb"):
        raise InvalidInput(f"{notebook!r} is not a notebook (.ipynb)", field="notebook")
    real_roots = _real(roots)
    names = ", ".join(str(r) for r in real_roots)
    outside = Forbidden(f"{notebook!r} is outside the job roots ({names}): set job_roots to allow it", field="notebook")
    given = expand_home(notebook, "notebook")
    raw = [given] if given.is_absolute() else [r / given for r in real_roots]
    held = _holding(raw)
    if len(held) > 1:
        raise Conflict(
            f"{notebook!r} is in {len(held)} job roots ({', '.join(str(p) for p in held)}): name the one to run by "
            f"its full path, e.g. {str(held[0])!r}",
            field="notebook",
        )
    for path in held:  # the one root that holds the name: a link out of it is refused
        real = _resolved(path, notebook)
        if not any(real.is_relative_to(r) for r in real_roots):
            raise outside
        if real.is_file():
            return real
    if not any(_resolved(p, notebook).is_relative_to(r) for p in raw for r in real_roots):
        raise outside  # `../x.ipynb`, an absolute path elsewhere
    raise NotFound(f"no notebook {notebook!r} under the job roots", field="notebook")


def _real(roots: Sequence[Path]) -> list[Path]:
    """The roots resolved, each once, in order."""
    return list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))


def _holding(paths: Sequence[Path]) -> list[Path]:
    """Those of `paths` that exist (a dangling link too), one per file they lead to: two roots' links to one
    notebook are one notebook."""
    found: dict[Path, Path] = {}
    for path in paths:
        if os.path.lexists(path):
            try:
                real = path.resolve()
            except (RuntimeError, OSError):  # a loop of links: `resolve` names it
                real = path
            found.setdefault(real, path)
    return list(found.values())


def _resolved(path: Path, notebook: str) -> Path:
    """`path` with its links followed; a loop of links on the way (which Python 3.11 raises as a RuntimeError)
    is the caller's 422 naming `notebook`."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise InvalidInput(
            f"{notebook!r} cannot be opened: {exc.__class__.__name__}: {exc}", field="notebook"
        ) from None


def relative_name(path: Path, roots: Sequence[Path]) -> str:
    """Name a notebook as runs, schedules and listings show it: its path under the first root holding it, unless
    another root holds a notebook of that name too; then its full path (what `resolve` takes back to this file)."""
    real_roots = _real(roots)
    for real in real_roots:
        if path.is_relative_to(real):
            name = path.relative_to(real)
            return str(name) if len(_holding([r / name for r in real_roots])) <= 1 else str(path)
    return str(path)


def listing(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """Every notebook under the roots (checkpoints left out) with its parameters; one whose path is not UTF-8
    (which no request could name) is left out and logged, and so is a link that leads out of the roots or to
    nothing (`resolve` refuses to run it; listed, its parameters were read from the file outside)."""
    out, seen = [], set()
    real_roots = _real(roots)
    for real in real_roots:
        if not real.is_dir():
            continue
        for path in sorted(real.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in path.parts or path in seen:
                continue
            if not _runnable(path, real_roots):
                continue
            if not is_utf8(str(path)):
                log.warning("job notebooks: left out %s, its name is not UTF-8", escaped(str(path)))
                continue
            seen.add(path)
            out.append(entry(path, roots))
    return out


def _runnable(path: Path, real_roots: Sequence[Path]) -> bool:
    """Whether `path`, its links followed, is a file inside one of the roots (what `resolve` would run)."""
    try:
        target = path.resolve()
    except (RuntimeError, OSError):  # a loop of links
        return False
    return target.is_file() and any(target.is_relative_to(r) for r in real_roots)


def entry(path: Path, roots: Sequence[Path]) -> dict[str, Any]:
    """A notebook as the listing shows it: its name, its root and its parameters (None: it cannot be read)."""
    root = next((r for r in _real(roots) if path.is_relative_to(r)), path.parent)
    try:
        params: dict[str, Any] | None = parameters(path)
    except (InvalidInput, OSError):  # not a notebook, or a dangling link
        params = None
    return {"notebook": relative_name(path, roots), "root": str(root), "parameters": params}


def parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The notebook's parameters: name -> {type, default, help} (cached by mtime)."""
    return dict(_read(path)["parameters"])


def check_kernel(path: Path) -> None:
    """Refuse a notebook that declares a kernel other than Python's (422 naming `notebook` and the kernel): jobs run
    in the job workers' warm python3 kernels. One that declares none runs in python3, as `papermill -k python3`."""
    name, language = _read(path)["kernel"]
    python = language.lower() == "python" if language else not name or name.lower().startswith("python")
    if not python:
        said = f"{name!r}" + (f" ({language})" if language else "")
        raise InvalidInput(
            f"{path.name} declares the kernel {said}: jobs run in Python kernels ({KERNEL}); set the notebook's "
            "kernel to Python 3 to run it as a job",
            field="notebook",
        )


def _read(path: Path) -> dict[str, Any]:
    """The notebook's parameters and its declared kernel (name, language), read once per mtime."""
    key = (str(path), path.stat().st_mtime)
    found = _cache.get(key)
    if found is None:
        try:
            import nbformat
            from papermill.translators import PythonTranslator
        except ImportError as exc:
            raise Unavailable("notebook jobs need papermill: pip install 'bkg-kernel[jobs]'", field="notebook") from exc

        try:
            nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
            spec = nb.metadata.get("kernelspec") or {}
            language = spec.get("language") or (nb.metadata.get("language_info") or {}).get("name")
            kernel = (str(spec.get("name") or "") or None, str(language) if language else None)
            cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])),
                        None)  # fmt: skip
            params = _declared(cell.source, PythonTranslator.inspect(cell)) if cell is not None else {}
        except Exception as exc:  # a notebook that is not valid JSON / nbformat
            raise InvalidInput(f"cannot read notebook {path.name}: {exc}", field="notebook") from exc
        found = _cache[key] = {"parameters": params, "kernel": kernel}
    return found


def _declared(source: str, inspected: list[Any]) -> dict[str, dict[str, Any]]:
    """The parameters cell's names in order: papermill's reading of each, and the assignments it skips read with
    `ast` (papermill's pattern takes no `|` nor `.` in an annotation: `tag: str | None = None` was unknown)."""
    by_papermill = {p.name: p for p in inspected}
    out: dict[str, dict[str, Any]] = {}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # IPython syntax (a magic): what papermill read
        tree = ast.Module(body=[], type_ignores=[])
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, annotation = node.targets[0].id, None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, annotation = node.target.id, ast.unparse(node.annotation)
        else:
            continue
        p = by_papermill.pop(name, None)
        if p is not None and (annotation is None or "|" not in annotation and "." not in annotation):
            out[name] = _param(p.inferred_type_name, p.default, p.help)
            continue
        value = ast.get_source_segment(source, node.value) if node.value is not None else None
        rest = lines[node.end_lineno - 1][node.end_col_offset :].strip() if node.end_lineno else ""
        out[name] = _param(annotation, value, rest[1:].strip() if rest.startswith("#") else "")
    for name, p in by_papermill.items():  # what papermill read that `ast` did not (an indented assignment)
        out[name] = _param(p.inferred_type_name, p.default, p.help)
    return out


def _param(declared: str | None, default: str | None, text: str) -> dict[str, Any]:
    kind = re.sub(r"\btyping\.", "", declared) if declared else declared  # `typing.Optional[str]`: Optional[str]
    return {"type": _type(kind, default), "default": default, "help": text}


def _type(declared: str | None, default: str | None) -> str:
    """The parameter's type: its annotation, else the type of its literal default (`n = 5` is an int)."""
    if declared and declared != "None":
        return declared
    try:
        value = ast.literal_eval(default or "None")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "None"  # an expression papermill cannot type either: any value
    name = type(value).__name__
    return name if name in _SIMPLE else "None"


def check_parameters(path: Path, given: Any) -> dict[str, Any]:
    """Return `given` when every name is a parameter of the notebook and every value fits its type (else 422)."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise InvalidInput("parameters must be an object of name: value", field="parameters")
    known = parameters(path)
    for name, value in given.items():
        if name not in known:
            names = ", ".join(sorted(known)) or "none: the notebook has no cell tagged 'parameters'"
            raise InvalidInput(
                f"unknown parameter {name!r} (the notebook's parameters: {names})", field=f"parameters.{name}"
            )
        kind = str(known[name]["type"] or "None")
        if not fits(value, kind):
            raise InvalidInput(
                f"parameter {name!r} must be {kind}, got {type(value).__name__} {json.dumps(value)[:60]}",
                field=f"parameters.{name}",
            )
    return dict(given)


def fits(value: Any, kind: str) -> bool:
    """Whether a JSON value fits a parameter's inferred type (unknown types and `None` defaults take anything)."""
    m = _OPTIONAL.match(kind.strip())
    if m:
        return value is None or fits(value, next(g for g in m.groups() if g))
    base = kind.split("[", 1)[0].strip()
    accepted = _SIMPLE.get(base)
    if accepted is None:
        return True  # 'None' (a None default) or a type papermill could not name: any JSON value
    if isinstance(value, bool) and bool not in accepted:
        return False  # True is an int to Python, not to a parameter declared int
    return isinstance(value, accepted)


def coerce(text: str, kind: str | None) -> Any:
    """Turn a command-line value into the parameter's type (`bkg jobs run -p n 5`); JSON for lists and objects. For
    an optional type (`Optional[str]`, `int | None`) `None` (or `null`) is None and anything else is read as the type
    inside (`-p label 123` for `label: Optional[str]` is "123")."""
    m = _OPTIONAL.match((kind or "").strip())
    if m:
        return None if text in ("None", "null") else coerce(text, next(g for g in m.groups() if g))
    base = (kind or "").split("[", 1)[0].strip()
    if base == "str":
        return text
    if base == "bool":
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
    if base == "int":
        try:
            return int(text)
        except ValueError:
            pass
    if base == "float":
        try:
            return float(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except ValueError:
        return text
