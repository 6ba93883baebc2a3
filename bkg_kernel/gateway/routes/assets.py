"""Panel's own styles, icons and scripts, served by the gateway so that no page fetches them from a CDN.

Panel points notebooks and Voila at `cdn.holoviz.org` unless `PANEL_CDN_ROOT` says otherwise;
`bkg_kernel.pictures.use_panel` sets it to `<gateway>/static/panel/` (the same layout as the CDN:
`<version>/dist/<file>`). Open, like any CDN: these are the files of the installed panel package, nothing else.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from bkg_kernel.errors import NotFound

router = APIRouter(include_in_schema=False)


@cache
def panel_dist() -> tuple[str, Path] | None:
    """Return the installed panel's version and its `dist` folder (found without importing panel), or None."""
    spec = importlib.util.find_spec("panel")
    if spec is None or not spec.submodule_search_locations:
        return None
    return importlib.metadata.version("panel"), Path(next(iter(spec.submodule_search_locations))) / "dist"


@router.get("/static/panel/{version}/dist/{path:path}")
def panel_asset(version: str, path: str) -> FileResponse:
    """One file of the installed panel's dist folder (fonts included: any origin may load them). A plain `def`:
    resolving the path touches the disk, so it runs on a worker thread, never on the event loop."""
    found = panel_dist()
    if found is None or version != found[0]:
        raise NotFound(f"panel {version} is not installed here", field="version")
    root = found[1].resolve()
    try:
        target = (root / path).resolve()
        ok = target.is_relative_to(root) and target.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long: no such file either
        ok = False
    if not ok:
        raise NotFound(f"no panel asset {path[:200]!r}", field="path")
    return FileResponse(
        target,
        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=86400"},
    )
