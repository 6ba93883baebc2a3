"""The package's import graph (read with `ast`, nothing imported): plugins and the client never reach into the
gateway; the core never imports a plugin except through discovery (by name); no cycle between subpackages."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "bkg_kernel"
CORE = ("auth", "store", "runtime", "models", "gateway")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from bkg_kernel import widgets`
    return {m for m in found if m == "bkg_kernel" or m.startswith("bkg_kernel.")}


def _package(module: str) -> str | None:
    """The top-level subpackage (or module) of `bkg_kernel.x.y`: `x`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[Path, set[str]]:
    return {p: _imports(p) for p in ROOT.rglob("*.py")}


def _where(path: Path) -> tuple[str, ...]:
    return path.relative_to(ROOT).with_suffix("").parts


def test_plugins_and_client_do_not_import_the_gateway() -> None:
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p, mods in _graph().items()
        if _where(p)[0] in ("plugins", "client")
        for m in mods
        if m == "bkg_kernel.gateway" or m.startswith("bkg_kernel.gateway.")
    ]
    assert bad == []


def test_core_does_not_import_plugins() -> None:
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p, mods in _graph().items()
        if _where(p)[0] in CORE
        for m in mods
        if m.startswith("bkg_kernel.plugins")
    ]
    assert bad == []  # discovery finds plugins with importlib, by name: no import statement


def test_no_cycle_between_subpackages() -> None:
    deps: dict[str, set[str]] = {}
    for p, mods in _graph().items():
        src = _where(p)[0]
        if src == "__init__":
            continue  # bkg_kernel/__init__.py is the facade over everything
        for m in mods:
            dst = _package(m)
            if dst is not None and dst != src and ((ROOT / dst).is_dir() or (ROOT / f"{dst}.py").exists()):
                deps.setdefault(src, set()).add(dst)
    try:
        order = list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle between subpackages: {' -> '.join(exc.args[1])}") from None
    assert order.index("errors") < order.index("store") < order.index("gateway")


def test_the_checks_see_real_imports() -> None:
    # The walk must find the edges that do exist, or the tests above would pass on nothing.
    graph = _graph()
    gw = {m for p, mods in graph.items() if _where(p)[0] == "gateway" for m in mods}
    assert "bkg_kernel.runtime.supervisor" in gw and "bkg_kernel.auth" in gw
    brain = graph[ROOT / "plugins" / "brainml" / "plugin.py"]
    assert "bkg_kernel.runtime.contract" in brain
