"""Which notebooks may run as jobs (those under `job_roots`), and their parameters (papermill's `parameters` cell).

A notebook is named by its path relative to one of the roots (`jobs/index_documents.ipynb`) or absolutely; a name
that resolves outside every root (`..`, a symlink out) is refused before anything runs. Parameters are checked
against the names and inferred types of the notebook's `parameters` cell, so a typo or a string for an int is a
422 naming the parameter, not a failed run.
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

from bkg_kernel.errors import Forbidden, InvalidInput, NotFound, Unavailable, escaped, expand_home, is_utf8

log = logging.getLogger(__name__)

_SIMPLE = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
_OPTIONAL = re.compile(r"^(?:Optional\[(.+)\]|(.+?)\s*\|\s*None|None\s*\|\s*(.+))$")
_cache: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}


def default_roots(data_dir: Path) -> list[Path]:
    """The roots when `job_roots` is unset: ./notebooks and <data_dir>/notebooks."""
    return [Path("notebooks"), Path(data_dir) / "notebooks"]


def literal_path(path: Path | str) -> str:
    """`path` as papermill must be given it to use it as it is: it fills `{name}` in a path from the parameters."""
    return str(path).replace("{", "{{").replace("}", "}}")


def resolve(notebook: str, roots: Sequence[Path]) -> Path:
    """Return the notebook file `notebook` names, inside one of `roots` (403 outside, 404 missing, 422 not .ipynb)."""
    if not isinstance(notebook, str) or not notebook.strip() or "\x00" in notebook:
        raise InvalidInput("notebook must be a path to an .ipynb file", field="notebook")
    if not notebook.endswith(".ipynb"):
        raise InvalidInput(f"{notebook!r} is not a notebook (.ipynb)", field="notebook")
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    names = ", ".join(str(r) for r in real_roots)
    outside = Forbidden(f"{notebook!r} is outside the job roots ({names}): set job_roots to allow it", field="notebook")
    given = expand_home(notebook, "notebook")
    raw = [given] if given.is_absolute() else [r / given for r in real_roots]
    for path in raw:
        if os.path.lexists(path):  # the first root that holds the name decides: a link out of it is refused
            real = _resolved(path, notebook)
            if not any(real.is_relative_to(r) for r in real_roots):
                raise outside
            if real.is_file():
                return real
    if not any(_resolved(p, notebook).is_relative_to(r) for p in raw for r in real_roots):
        raise outside  # `../x.ipynb`, an absolute path elsewhere
    raise NotFound(f"no notebook {notebook!r} under the job roots", field="notebook")


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
    """Name a notebook by its path under the first root holding it (how runs and listings show it)."""
    for r in roots:
        real = Path(r).expanduser().resolve()
        if path.is_relative_to(real):
            return str(path.relative_to(real))
    return str(path)


def listing(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """Every notebook under the roots (checkpoints left out) with its parameters; one whose path is not UTF-8
    (which no request could name) is left out and logged."""
    out, seen = [], set()
    for r in roots:
        real = Path(r).expanduser().resolve()
        if not real.is_dir():
            continue
        for path in sorted(real.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in path.parts or path in seen:
                continue
            if not is_utf8(str(path)):
                log.warning("job notebooks: left out %s, its name is not UTF-8", escaped(str(path)))
                continue
            seen.add(path)
            try:
                params: dict[str, Any] | None = parameters(path)
            except (InvalidInput, OSError):  # not a notebook, or a dangling link
                params = None
            out.append({"notebook": str(path.relative_to(real)), "root": str(real), "parameters": params})
    return out


def parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The notebook's parameters: name -> {type, default, help} (papermill's inspect_notebook; cached by mtime)."""
    key = (str(path), path.stat().st_mtime)
    found = _cache.get(key)
    if found is None:
        try:
            from papermill import inspect_notebook
        except ImportError as exc:
            raise Unavailable("notebook jobs need papermill: pip install 'bkg-kernel[jobs]'", field="notebook") from exc

        try:
            found = {
                name: {"type": _type(p["inferred_type_name"], p["default"]), "default": p["default"], "help": p["help"]}
                for name, p in inspect_notebook(literal_path(path)).items()
            }
        except Exception as exc:  # a notebook that is not valid JSON / nbformat
            raise InvalidInput(f"cannot read notebook {path.name}: {exc}", field="notebook") from exc
        _cache[key] = found
    return found


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
    """Turn a command-line value into the parameter's type (`bkg jobs run -p n 5`); JSON for lists and objects."""
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
