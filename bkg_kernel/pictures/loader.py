"""Panel, set up so that every style, icon and script it needs comes from the gateway, never from a CDN.

Panel reads `PANEL_CDN_ROOT` once, when it is first imported (its stylesheet URLs are built at import), so
`use_panel` sets it before the import; its Bokeh and Panel scripts are inlined into the page
(`pn.extension(inline=True)`). In a notebook a view renders through Panel's own output; inside the Voila
dashboards' ipywidgets, as a `jupyter_bokeh` widget (`as_widget`).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

_loaded = False


def import_panel(gateway_url: str | None = None) -> Any:
    """Import Panel with its resources served by the gateway at `gateway_url` (default: the configured one)."""
    if gateway_url is None:
        from bkg_kernel.settings import gateway_url as default_url

        gateway_url = default_url()
    root = f"{gateway_url.rstrip('/')}/static/panel/"
    if "panel" not in sys.modules:
        os.environ["PANEL_CDN_ROOT"] = root
    import panel as pn
    from panel.io import resources

    if not resources.CDN_ROOT.startswith(("http://127.0.0.1", "http://localhost", root)):
        warnings.warn(
            f"panel was imported before bkg set its resources: its styles come from {resources.CDN_ROOT}",
            stacklevel=3,
        )
    return pn


def use_panel(gateway_url: str | None = None, dark: bool = False) -> Any:
    """Import Panel (`import_panel`) and load its scripts into this page once per kernel (call it while a cell
    runs: that cell's output carries them), in Panel's dark theme if `dark`. Return the `panel` module."""
    global _loaded
    pn = import_panel(gateway_url)
    if not _loaded:
        if dark:
            pn.config.theme = "dark"
        pn.extension(inline=True)
        _loaded = True
    return pn


def as_widget(obj: Any) -> Any:
    """Return a Panel object as an ipywidget (for the dashboards' ipywidgets layouts)."""
    import panel as pn

    return pn.ipywidget(obj)


class PanelView:
    """A view built as a Panel layout (`panel()`): shown by Panel in a notebook, as an ipywidget in a dashboard."""

    def panel(self) -> Any:
        """Return the whole view as a Panel layout."""
        raise NotImplementedError

    def widget(self) -> Any:
        """Return the view as an ipywidget."""
        return as_widget(self.panel())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        # Panel's own notebook output: its renderer waits for the scripts `use_panel` loaded in the same cell
        return self.panel()._repr_mimebundle_(include=include, exclude=exclude)
