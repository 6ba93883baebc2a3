"""Fetch a model from a URL into the model dir, then register it; nothing half-written stays behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from bkg_kernel.errors import InvalidInput, Unavailable
from bkg_kernel.models.registry import ModelEntry, ModelRegistry, slug

Progress = Callable[[float, str], None]


def check_url(url: str) -> str:
    """Return the file name a URL names; refuse anything but http(s) URLs of one file."""
    u = urlparse(url)
    name = Path(u.path).name
    if u.scheme not in ("http", "https") or not u.netloc:
        raise InvalidInput(f"source must be an http(s) URL, not {url!r}", field="url")
    if not name:
        raise InvalidInput(f"the URL {url!r} does not name a file", field="url")
    return name


def download(
    registry: ModelRegistry,
    url: str,
    progress: Progress,
    *,
    id: str | None = None,
    kind: str | None = None,
    license: str | None = None,
) -> ModelEntry:
    """Stream `url` to `<model_dir>/.partial/`, check it, move it in and register it (`source` is the URL)."""
    import httpx

    name = check_url(url)
    partial_dir = registry.dir / ".partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / name
    final = registry.dir / name
    try:
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=30) as r:
                if r.status_code != 200:
                    raise Unavailable(f"cannot download {url}: the server answered HTTP {r.status_code}")
                total = int(r.headers.get("content-length") or 0)
                done = 0
                with partial.open("wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        progress(done / total if total else 0.0, f"{done / 2**20:,.1f} MB")
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"cannot download {url}: {type(exc).__name__}: {exc}. This machine may have no network access; "
                "copy the file into the model dir and add it by path instead"
            ) from None
        if final.exists():
            raise InvalidInput(f"{final} already exists in the model dir", field="url")
        shutil.move(str(partial), final)
        try:
            return registry.add(final, id=id or slug(name), kind=kind, license=license, source=url)
        except Exception:
            final.unlink(missing_ok=True)  # not what its kind says (or the id is taken): do not keep it
            raise
    finally:
        partial.unlink(missing_ok=True)
