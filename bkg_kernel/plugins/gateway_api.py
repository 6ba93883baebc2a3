"""How worker plugins call the gateway that hosts them (the store's owner): one request with the gateway's
errors raised as `BkgError` (status, code, field kept), and a scroll over a collection's points."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bkg_kernel.client import raise_for_error


def call(http: Any, method: str, path: str, **kw: Any) -> Any:
    """Send one request on `http` (the plugin's gateway client); return its JSON, or raise its error."""
    r = http.request(method, path, **kw)
    if r.status_code >= 400:
        raise_for_error(r)
    return r.json() if r.content else None


def scroll(
    http: Any, collection: str, filter: dict[str, Any] | None = None, *, with_vectors: bool = False
) -> Iterator[dict[str, Any]]:
    """Yield every point of a collection (matching a filter), page by page, in insertion order."""
    offset: int | None = 0
    while offset is not None:
        body = {"filter": filter, "limit": 10_000, "offset": offset, "with_vectors": with_vectors}
        page = call(http, "POST", f"/api/collections/{collection}/points/scroll", json=body)
        yield from page["points"]
        offset = page["next_offset"]
