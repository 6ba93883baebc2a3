"""A request body limit in front of every route (like Qdrant's 32 MB default): a declared Content-Length over the
limit is refused before a byte of the body is read; a chunked body is counted as it arrives and refused the
moment it passes the limit. Either way a 413 in the gateway's error shape that names the limit and the setting.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    """Raised inside the app when a streamed body passes the limit (an HTTPException, so that FastAPI's body
    parsing passes it on as the 413 it is instead of a 400 'error parsing the body')."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyLimitMiddleware:
    """Pure ASGI: `max_bytes` per request body (HTTP only; WebSocket messages have their own limit)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        mb = self.max_bytes / 2**20
        return (
            f"the request body is {size}; the limit is {self.max_bytes:,} bytes ({mb:g} MB, setting max_body_mb): "
            "send fewer points or smaller files per request"
        )

    def _refusal(self, size: str) -> tuple[dict[str, Any], dict[str, Any]]:
        body = {"error": {"status": 413, "code": "body_too_large", "message": self._message(size), "field": "body"}}
        raw = json.dumps(body).encode()
        start = {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
        return start, {"type": "http.response.body", "body": raw}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            start, body = self._refusal(f"{int(declared):,} bytes")
            await send(start)
            await send(body)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self._message(f"over {self.max_bytes:,} bytes"))
            return message

        async def tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking)
        except BodyTooLarge:
            if started:
                raise
            start, body = self._refusal(f"over {self.max_bytes:,} bytes")
            await send(start)
            await send(body)
