"""HEAD answered as GET without the body (RFC 9110 §9.3.2: a server that serves GET serves HEAD), as Starlette's own
routes do and FastAPI's do not: `curl -I` and uptime monitors that probe with HEAD got a 405 from every route.

The route runs as for GET (its checks, its status, its headers, Content-Length included); uvicorn, which still
sees the request as HEAD, sends no body."""

from __future__ import annotations

from typing import Any


class HeadAsGet:
    """Pure ASGI: a HEAD request reaches the app as GET."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
