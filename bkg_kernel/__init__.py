"""bkg_kernel: the library behind bkg, a notebook-first ML research workbench.

Importing it is cheap: heavy libraries (faiss, torch, llama_cpp, insightface) load inside the code that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bkg_kernel.errors import BkgError

if TYPE_CHECKING:
    from bkg_kernel.client import Workbench
    from bkg_kernel.runtime.contract import Plugin

__version__ = "0.1.0"
__all__ = ["BkgError", "__version__", "connect", "load_ipython_extension", "local"]


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext bkg_kernel`: add the `%%chat` cell magic."""
    from bkg_kernel.client.magics import load_ipython_extension as load

    load(ipython)


def connect(url: str | None = None, **kwargs: Any) -> Workbench:
    """Connect to the gateway of this data dir (starting one in the background when none runs)."""
    from bkg_kernel.client import connect as _connect

    return _connect(url, **kwargs)


def local(plugin_id: str, data_dir: str | None = None, **settings: Any) -> Plugin:
    """Run one plugin in this process, without a gateway (tests, experiments); return it started."""
    from pathlib import Path

    from pydantic import ValidationError

    from bkg_kernel.errors import Unavailable, invalid_from_pydantic
    from bkg_kernel.runtime.discovery import discover
    from bkg_kernel.runtime.supervisor import unknown_plugin
    from bkg_kernel.settings import folder_named, get_settings

    folder_named(data_dir, "data_dir")
    discovered = discover()  # every plugin here runs in-process: none is "not hosted"
    found = discovered.get(plugin_id)
    if found is None:
        raise unknown_plugin(plugin_id, discovered)
    if found.cls is None:
        raise Unavailable(f"plugin {plugin_id!r} cannot load: {found.error}")
    try:
        config = found.cls.Settings.model_validate(settings)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, "settings") from None
    root = Path(data_dir) if data_dir is not None else get_settings().data_dir
    plugin = found.cls.create(config, root, model_dir=get_settings().model_dir)
    plugin.start()
    return plugin
