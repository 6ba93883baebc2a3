"""One JSON error shape for every 4xx / 5xx: `{"error": {"status", "code", "message", "field"?}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bkg_kernel.errors import BkgError, TooManyRequests
from bkg_kernel.runtime.bodyjson import TOO_DEEP

log = logging.getLogger("bkg.gateway")
INTERNAL = "internal error; the gateway log has the details"
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def error_response(status: int, code: str, message: str, field: str | None = None, **headers: str) -> JSONResponse:
    """Build the JSON error response (a lone surrogate that input put in the message or field is written as its
    escape: the response is always UTF-8)."""
    body: dict[str, Any] = {"status": status, "code": code, "message": _utf8(message)}
    if field is not None:
        body["field"] = _utf8(field)
    return JSONResponse({"error": body}, status_code=status, headers=headers or None)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def bkg_error(request: Request, exc: BkgError) -> JSONResponse:
    headers = {}
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(max(1, round(exc.retry_after + 0.5)))
    if exc.status >= 500:
        method = request.scope.get("method", "WS")  # a WebSocket's handshake has none
        log.warning("%s %s -> %s: %s", method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.code, exc.message, exc.field, **headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return error_response(422, "invalid_input", f"{field}: {msg}" if field else msg, field)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _CODES.get(exc.status_code, "http_error")
    if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing hit Python's nesting limit
        return error_response(400, code, "the request body nests too deeply to parse", "body")
    if exc.status_code == 422:  # a body refused as it was read (bodylimit.BadText)
        return error_response(422, "invalid_input", str(exc.detail), "body")
    if exc.status_code == 408:  # a body that stopped coming (bodylimit.BodyStalled): its connection goes
        return error_response(408, "timeout", str(exc.detail), "body", connection="close")
    return error_response(exc.status_code, code, str(exc.detail))


async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
    return error_response(422, "invalid_input", TOO_DEEP, "body")


async def internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", INTERNAL)


HANDLERS: dict[type[Exception], Any] = {
    BkgError: bkg_error,
    RequestValidationError: validation_error,
    HTTPException: http_error,
    RecursionError: too_deep,
    Exception: internal,
}


async def render(request: Request, exc: Exception) -> JSONResponse:
    """The error response for `exc`, by the first of its classes that has a handler (as Starlette looks them up):
    for the routes served outside the router (`gateway/fastpath.py`)."""
    handler = next(HANDLERS[c] for c in type(exc).__mro__ if c in HANDLERS)
    response: JSONResponse = await handler(request, exc)
    return response


def install(app: FastAPI) -> None:
    """Register the handlers that map every error to the one shape; tracebacks stay in the log."""
    for cls, handler in HANDLERS.items():
        app.add_exception_handler(cls, handler)
