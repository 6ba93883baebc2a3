"""A request body limit in front of every route (like Qdrant's 32 MB default): a declared Content-Length over the
limit is refused before a byte of the body is read; a chunked body is counted as it arrives and refused the
moment it passes the limit. Either way a 413 in the gateway's error shape that names the limit and the setting.

A big body needs credentials before it is read: FastAPI reads and parses a route's JSON body before the route's
authentication runs, on the event loop (a 25 MB body held `/health` for 270 ms), so anyone who can reach the port
could stall the gateway at will. A body over 64 KiB (or of unknown length) without a valid key, session or Hub
token is a 401 from its headers alone; logins and every other anonymous request are far smaller.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from bkg_kernel.errors import BkgError, Unauthorized
from bkg_kernel.gateway.errors import error_response
from bkg_kernel.gateway.jupyterhub import token_of

ANONYMOUS_BYTES = 64 * 1024  # the biggest body read without credentials


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

    def _refusal(self, size: str) -> JSONResponse:
        return error_response(413, "body_too_large", self._message(size), "body")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal(f"{int(declared):,} bytes")(scope, receive, send)
            return
        big = b"transfer-encoding" in headers or (
            declared is not None and (not declared.isdigit() or int(declared) > ANONYMOUS_BYTES)
        )
        try:
            refused = big and not await _credentialed(scope)
        except BkgError as exc:  # the Hub is down (503) or refuses this user the service (403): said before reading
            await error_response(exc.status, exc.code, exc.message, exc.field)(scope, receive, send)
            return
        if refused:
            message = (
                f"a request body over {ANONYMOUS_BYTES:,} bytes (or of unknown length) needs valid credentials, "
                "checked before it is read: send 'Authorization: Bearer <API key or session token>'"
            )
            await error_response(401, "unauthorized", message)(scope, receive, send)
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
            await self._refusal(f"over {self.max_bytes:,} bytes")(scope, receive, send)


async def _credentialed(scope: dict[str, Any]) -> bool:
    """Whether the request carries a valid key, session or Hub token (not counted against a key's rate limit: the
    route counts it; HubAuth caches a Hub token's answer for a minute, so the route's own check is free)."""
    token = token_of(HTTPConnection(scope))
    if not token:
        return False
    try:
        await scope["app"].state.gateway.caller_now(token)
    except Unauthorized:
        return False
    return True
