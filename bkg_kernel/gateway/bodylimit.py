"""A request body limit in front of every route (like Qdrant's 32 MB default): a declared Content-Length over the
limit is refused before a byte of the body is read; a chunked body is counted as it arrives and refused the
moment it passes the limit. Either way a 413 in the gateway's error shape that names the limit and the setting.

Most routes take small bodies (a user, a query, a filter), which FastAPI parses and validates on the event loop:
those take at most `PARSED_BYTES` (1 MiB). The routes made for big bodies take up to `max_body_mb`, and none of
them holds the loop with it: a plugin call and the points upsert parse their bodies on a thread in pieces, a
`CheckedJSONRoute` (embeddings, chat, rerank) too, and multipart uploads are streamed.

A big body needs credentials before it is read: FastAPI reads and parses a route's JSON body before the route's
authentication runs, on the event loop (a 25 MB body held `/health` for 270 ms), so anyone who can reach the port
could stall the gateway at will. A body over 64 KiB (or of unknown length) without a valid key, session or Hub
token is a 401 from its headers alone; logins and every other anonymous request are far smaller.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from bkg_kernel.errors import BkgError, InvalidInput, Unauthorized
from bkg_kernel.gateway.errors import error_response
from bkg_kernel.gateway.jupyterhub import hub_caller, route_path, token_of
from bkg_kernel.runtime import bodyjson

ANONYMOUS_BYTES = 64 * 1024  # the biggest body read without credentials
PARSED_BYTES = 2**20  # the biggest body of a route that FastAPI parses on the event loop
DEFAULT_ITEMS = 1000  # a CheckedJSONRoute's top-level array that its model does not cap

F = TypeVar("F", bound=Callable[..., Any])


def takes_big_bodies(endpoint: F) -> F:
    """Mark a route's endpoint as reading its body off the event loop, or streaming it (a form upload): it takes
    bodies up to `max_body_mb`."""
    endpoint.__dict__["takes_big_bodies"] = True
    return endpoint


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every route with the prefix it is included under (FastAPI keeps an included router as one entry)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is None:
            yield prefix, r
        else:
            yield from _routes(
                inner.routes, prefix + (getattr(getattr(r, "include_context", None), "prefix", "") or "")
            )


def _route_limit(route: Any, max_bytes: int) -> int | None:
    """The body limit of a route made for big bodies, else None (`PARSED_BYTES` applies)."""
    if isinstance(route, CheckedJSONRoute) and route.body_field is not None:
        return min(max_bytes, int(getattr(route.body_model(), "MAX_BODY_BYTES", PARSED_BYTES)))
    if getattr(getattr(route, "endpoint", None), "takes_big_bodies", False):
        return max_bytes
    return None


class BodyTooLarge(HTTPException):
    """Raised inside the app when a streamed body passes the limit (an HTTPException, so that FastAPI's body
    parsing passes it on as the 413 it is instead of a 400 'error parsing the body')."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BadText(HTTPException):
    """Raised inside the app when a JSON body holds a lone surrogate (`bodyjson.check_text`): a 422 naming `body`,
    an HTTPException so that FastAPI's body parsing passes it on as it is."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=422, detail=message)


class BodyStalled(HTTPException):
    """Raised inside the app when a request body stops coming for `idle_s`: a 408, and the connection goes
    (a client that sent half a body and went quiet held its socket, and the gateway's exit, for good)."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=408, detail=message)


class BodyLimitMiddleware:
    """Pure ASGI: `max_bytes` per request body (HTTP only; WebSocket messages have their own limit)."""

    def __init__(self, app: Any, max_bytes: int, prefix: str = "", idle_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.idle_s = app, max_bytes, idle_s  # idle_s: a body's next piece, at most
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""  # as PrefixMiddleware normalises it
        self._big: list[tuple[set[str] | None, re.Pattern[str], int]] | None = None

    def _limit(self, scope: dict[str, Any]) -> int:
        """The body limit of the route this request goes to: its own for a route made for big bodies, else
        `PARSED_BYTES` (never over `max_bytes`)."""
        if self._big is None:  # the app's routes, plugin routes included, are all there by the first request
            under = f"(?:{re.escape(self.prefix)})?" if self.prefix else ""  # the Hub's service prefix
            self._big = [
                (r.methods, re.compile("^" + under + re.escape(inc) + r.path_regex.pattern.removeprefix("^")), limit)
                for inc, r in _routes(getattr(scope.get("app"), "routes", []))
                if (limit := _route_limit(r, self.max_bytes)) is not None
            ]
        method, path = scope["method"], route_path(scope)
        for methods, rx, limit in self._big:
            if (methods is None or method in methods) and rx.match(path):
                return limit
        return min(self.max_bytes, PARSED_BYTES)

    def _message(self, size: str, limit: int) -> str:
        if limit < self.max_bytes:
            return (
                f"the request body is {size}; this route takes at most {limit:,} bytes: big data goes to the routes "
                "made for it (points upserts, plugin calls, embeddings, ids in batches)"
            )
        mb = self.max_bytes / 2**20
        return (
            f"the request body is {size}; the limit is {self.max_bytes:,} bytes ({mb:g} MB, setting max_body_mb): "
            "send fewer points or smaller files per request"
        )

    def _refusal(self, size: str, limit: int) -> JSONResponse:
        return error_response(413, "body_too_large", self._message(size, limit), "body")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        limit = self._limit(scope)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refusal(f"{int(declared):,} bytes", limit)(scope, receive, send)
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
            auth = {"www-authenticate": 'Bearer realm="bkg"'}
            await error_response(401, "unauthorized", message, headers=auth)(scope, receive, send)
            return
        seen = 0
        started = False
        # the JSON body of a route that FastAPI parses (on the loop: at most PARSED_BYTES) is checked for lone
        # surrogates once whole; a route made for big bodies checks them as it parses (bodyjson)
        kind = headers.get(b"content-type")
        json_body = kind is None or _is_json(kind.decode("latin-1"))  # FastAPI reads a body of no type as JSON
        kept: list[bytes] | None = [] if json_body and limit <= PARSED_BYTES else None

        body_done = False

        async def counted() -> Any:
            nonlocal seen, kept, body_done
            if body_done:  # after the body, a receive waits for the client to leave: as long as it takes
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(self.idle_s):
                        message = await receive()
                except TimeoutError:
                    raise BodyStalled(f"the request body stopped coming for {self.idle_s:g}s") from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > limit:
                    raise BodyTooLarge(self._message(f"over {limit:,} bytes", limit))
                if kept is not None:
                    kept.append(chunk)
                    if not message.get("more_body", False):
                        try:
                            bodyjson.check_raw(b"".join(kept))
                        except BkgError as exc:
                            raise BadText(exc.message) from None
                        kept = None
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
            await self._refusal(f"over {limit:,} bytes", limit)(scope, receive, send)
        except BadText as exc:
            if started:
                raise
            await error_response(422, "invalid_input", str(exc.detail), "body")(scope, receive, send)
        except BodyStalled as exc:
            if started:
                raise
            await error_response(408, "timeout", str(exc.detail), "body", connection="close")(scope, receive, send)


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


_NONE = object()


class CheckedJSONRoute(APIRoute):
    """A route whose JSON body may be big (texts to embed, a chat's messages, ids to fetch): FastAPI would parse it on
    the event loop in one call, and pydantic validates every element of an over-long list before it says the list is
    too long (2,000,000 numbers as `input`: 16 s holding the interpreter). Here the body is parsed first, in pieces
    (on a thread when over 64 KiB): it must be a JSON object, and a top-level array over its cap is refused as it is
    read (the body model's `MAX_ITEMS` class attribute, field -> most elements; any other array `DEFAULT_ITEMS`).
    FastAPI then validates what is left, a bounded amount, as usual. The route takes bodies up to the model's
    `MAX_BODY_BYTES` (class attribute; default `PARSED_BYTES`; never over the gateway's `max_body_mb`). A body of JSON
    `null` to a route whose body may be left out (a count, a restore) is no body, as its schema says it may be."""

    def body_model(self) -> Any:
        return self.body_field.field_info.annotation if self.body_field is not None else None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        caps: dict[str, int] = {"*": DEFAULT_ITEMS, **getattr(self.body_model(), "MAX_ITEMS", {})}
        # the route's caller checks (`state.Need`), run before the body is read: who may not call it learns nothing
        # of what its body should be, and costs no parsing
        needs = [s for d in self.dependant.dependencies if (s := getattr(d.call, "checks_scope", _NONE)) is not _NONE]
        optional = not self.body_field.field_info.is_required()

        async def checked(request: Request) -> Response:
            if needs:
                await hub_caller(request)  # a Hub token's caller (asynchronously), as the app-wide dependency finds it
                gw = request.app.state.gateway
                for scope in needs:
                    gw.principal(request, scope)  # kept on the request: the route's own check gets this one
            body = await request.body()
            if 0 < len(body) <= 64:  # only a tiny body can be one of these words
                word = body.strip(b" \t\r\n")
                if word == b"null" and optional:  # a body that may be left out, sent as JSON null: no body
                    request._body = body = b""  # what `request.body()` answers from now on
                elif word in (b"NaN", b"Infinity", b"-Infinity"):  # Python's parser reads these; JSON has not
                    raise InvalidInput(f"request body is not valid JSON ({word.decode()} is not a JSON value)",
                                       field="body")  # fmt: skip
            if not body or not _is_json(request.headers.get("content-type", "")):
                return await handler(request)
            big = len(body) > ANONYMOUS_BYTES
            # fields named as a route's own checks name them (`rrf_k`, not `body.rrf_k`)
            data = await asyncio.to_thread(bodyjson.loads, body, caps, "") if big else bodyjson.loads(body, caps, "")
            request._json = data  # what FastAPI's own `await request.json()` returns
            try:
                return await handler(request)
            finally:
                if big:  # freed a slice at a time on a thread, not all at once on the loop
                    await asyncio.to_thread(bodyjson.release, data)

        return checked


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")
