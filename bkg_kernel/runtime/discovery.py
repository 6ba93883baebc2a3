"""Plugin discovery (built-in folders + the `bkg_kernel.plugins` entry point group) and the registry file
`<data_dir>/plugins.json` that records enabled / autostart / config per plugin."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.errors import CorruptData
from bkg_kernel.runtime.contract import Plugin

ENTRY_POINT_GROUP = "bkg_kernel.plugins"
BUILTIN_PACKAGE = "bkg_kernel.plugins"
log = logging.getLogger("bkg.plugins")


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
    """`plugins.json`: enabled / autostart / config per plugin, written whole or not at all (`statefiles`).

    A damaged file (not JSON, or not an object) is set aside and the plugins start with their defaults (a gateway
    that will not start over it helps no one; one that cannot be read at all raises its OSError); what an entry
    holds that this version does not know is left out with a warning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        statefiles.sweep(path)
        if not path.exists():
            return
        try:
            raw = statefiles.load(path)
        except CorruptData as exc:
            statefiles.set_aside(path, exc.message)
            return
        for plugin_id, v in raw.items():
            if not isinstance(v, dict):
                log.warning("%s: the entry of %r is not an object; left out", path, plugin_id)
                continue
            kept: dict[str, Any] = {k: x for k, x in v.items() if k in _KINDS and isinstance(x, _KINDS[k])}
            if len(kept) < len(v):
                log.warning("%s: left out what %r holds that bkg does not take: %s", path, plugin_id,
                            ", ".join(sorted(set(v) - set(kept))))  # fmt: skip
            self.entries[plugin_id] = Entry(**kept)

    def get(self, plugin_id: str) -> Entry:
        """Return the entry of a plugin (defaults if it has none)."""
        return self.entries.setdefault(plugin_id, Entry())

    def save(self) -> None:
        """Write the file (one writer at a time, each from what the entries hold when it begins)."""
        with self._lock:
            statefiles.write_json(self.path, {k: dict(vars(v)) for k, v in list(self.entries.items())})


_KINDS: dict[str, type] = {"enabled": bool, "autostart": bool, "config": dict}
