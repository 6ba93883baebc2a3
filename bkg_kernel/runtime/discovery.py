"""Plugin discovery (built-in folders + the `bkg_kernel.plugins` entry point group) and the registry file
`<data_dir>/plugins.json` that records enabled / autostart / config per plugin."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bkg_kernel.runtime.contract import Plugin

ENTRY_POINT_GROUP = "bkg_kernel.plugins"
BUILTIN_PACKAGE = "bkg_kernel.plugins"


@dataclass
class Discovered:
    """A plugin found at start: its class, or why it could not be loaded."""

    id: str
    source: str
    cls: type[Plugin] | None = None
    error: str | None = None


def _load(module: str, source: str, fallback_id: str) -> Discovered:
    try:
        mod = importlib.import_module(module)
        cls = getattr(mod, "PLUGIN", None)
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            return Discovered(fallback_id, source, error=f"{module} has no PLUGIN class deriving from Plugin")
        cls.capabilities()  # a malformed declaration fails here, at discovery, not at first call
        return Discovered(cls.id, source, cls)
    except ModuleNotFoundError as exc:
        return Discovered(
            fallback_id, source, error=f"cannot import {module}: missing module {exc.name!r} (install it)"
        )
    except Exception as exc:  # a broken plugin is listed with its reason; the rest still start
        return Discovered(fallback_id, source, error=f"cannot import {module}: {type(exc).__name__}: {exc}")


def discover(only: list[str] | None = None) -> dict[str, Discovered]:
    """Find built-in plugins (sub-packages of bkg_kernel.plugins) and entry-point plugins."""
    found: dict[str, Discovered] = {}
    pkg = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            d = _load(f"{BUILTIN_PACKAGE}.{info.name}", "builtin", info.name)
            found[d.id] = d
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        d = _load(ep.value.split(":")[0], f"entry point {ep.name}", ep.name)
        if d.cls is None and ":" in ep.value:
            try:
                cls = ep.load()
                d = Discovered(cls.id, f"entry point {ep.name}", cls)
            except Exception as exc:
                d = Discovered(ep.name, f"entry point {ep.name}", error=f"cannot load {ep.value}: {exc}")
        found.setdefault(d.id, d)
    if only is not None:
        found = {k: v for k, v in found.items() if k in only}
    return found


@dataclass
class Entry:
    """What the registry file says about one plugin."""

    enabled: bool = True
    autostart: bool = True
    config: dict[str, Any] = field(default_factory=dict)


class RegistryFile:
    """`plugins.json`: enabled / autostart / config per plugin, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        if path.exists():
            raw = json.loads(path.read_text() or "{}")
            self.entries = {k: Entry(**v) for k, v in raw.items()}

    def get(self, plugin_id: str) -> Entry:
        """Return the entry of a plugin (defaults if it has none)."""
        return self.entries.setdefault(plugin_id, Entry())

    def save(self) -> None:
        """Write the file (temp file + rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: vars(v) for k, v in self.entries.items()}, indent=2))
        os.replace(tmp, self.path)
