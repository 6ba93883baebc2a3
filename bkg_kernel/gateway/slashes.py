"""A request whose path holds a '/' inside a name (sent as %2F) is answered before routing: 404 naming the path
parameter it is in (`errors.slashed_segment`). The server decodes %2F before it routes, so such a path has a
segment too many, and it reached another route: `bkg keys revoke ../../admin` was "no such route" naming no field,
and `GET /api/collections/a%2Fsnapshots` listed collection a's snapshots. No id or name bkg keeps holds a '/'."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from bkg_kernel.gateway import errors


class SlashInName:
    """Pure ASGI: an HTTP request with %2F in its path gets its 404 here, never a route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and errors.has_slashed_segment(scope):
            response = await errors.render(Request(scope, receive), HTTPException(404))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
