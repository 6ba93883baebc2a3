"""One JSON error shape for every 4xx / 5xx: `{"error": {"status", "code", "message", "field"?}}`."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match, compile_path

from bkg_kernel.errors import BkgError, Unauthorized, name_hint, openai_shaped
from bkg_kernel.gateway.strictquery import takes
from bkg_kernel.runtime.bodyjson import TOO_DEEP

log = logging.getLogger("bkg.gateway")
INTERNAL = "internal error; the gateway log has the details"
PROBED = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")  # the methods a 405's Allow may name
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    *,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    **more_headers: str,
) -> JSONResponse:
    """Build the JSON error response (a lone surrogate that input put in the message or field is written as its
    escape: the response is always UTF-8); `retry_after` goes in the body too (as the call port sends it), for a
    client that reads only the body."""
    body: dict[str, Any] = {"status": status, "code": code, "message": _utf8(message)}
    if field is not None:
        body["field"] = _utf8(field)
    if retry_after is not None:
        body["retry_after"] = retry_after
    return JSONResponse({"error": body}, status_code=status, headers={**(headers or {}), **more_headers} or None)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def bkg_error(request: Request, exc: BkgError) -> JSONResponse:
    headers = {}
    retry = getattr(exc, "retry_after", None)  # as `BkgError.to_dict` reads it: a 429, a plugin still starting
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))  # whole seconds, never sooner than said
    if isinstance(exc, Unauthorized):  # RFC 9110: a 401 says how to authenticate
        headers["WWW-Authenticate"] = 'Bearer realm="bkg"'
        if "authorization" in request.headers or "x-api-key" in request.headers:
            headers["WWW-Authenticate"] += ', error="invalid_token"'

    if exc.status >= 500:
        method = request.scope.get("method", "WS")  # a WebSocket's handshake has none
        log.warning("%s %s -> %s: %s", method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.code, exc.message, exc.field, retry_after=retry, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    where = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":  # FastAPI's own parse: its loc is ("body", <character offset>)
        at = f" at character {where[1]}" if len(where) > 1 else ""
        reason = (err.get("ctx") or {}).get("error", "")
        return error_response(422, "invalid_input", f"the request body is not valid JSON{at}: {reason}".rstrip(": "),
                              "body")  # fmt: skip
    if where == ("body",):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if err.get("type") == "missing":
            return error_response(422, "invalid_input", "this route takes a JSON object body: none was sent", "body")
        if ctype != "application/json" and not ctype.endswith("+json"):
            sent = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
            return error_response(415, "unsupported_media_type",
                                  f"the body is read as JSON only under Content-Type: application/json ({sent} was "
                                  "given)", "content-type")  # fmt: skip
    msg = err.get("msg", "invalid request")
    if where[:1] == ("body",) and len(where) > 1:
        where, msg = _in_body(exc.errors(), exc.body)
    loc = [str(p) for p in where if p not in ("body",)]
    field = ".".join(loc) or ("body" if where[:1] == ("body",) else None)  # the body as a whole: not an object
    if err.get("type") == "extra_forbidden" and where[:1] == ("body",) and len(loc) == 1:
        msg = "not a field of this body" + _hint(loc[0], _body_fields(request))
    return error_response(422, "invalid_input", f"{field}: {msg}" if field else msg, field)


def _in_body(errors: Sequence[Any], body: Any) -> tuple[tuple[Any, ...], str]:
    """The first error's location in the body, and what to say of it. pydantic's location of an error in a field
    that takes several types names the branch it tried (`input.str`, `stop.list[str]`, `function-after[...]`, a
    tagged union's tag): no such field exists. A branch is what the location names that the body does not hold; it
    is dropped. When the value fits no branch, the message says what the field takes (`a string or a list of
    strings`); when it fits one and fails inside it (`messages.0.content.0` is not an object), that failure is
    said."""
    placed = [_placed(tuple(e.get("loc", ())), body, str(e.get("type", "")).startswith("missing")) for e in errors]
    loc, branch, _ = placed[0]
    msg = str(errors[0].get("msg", "invalid request"))
    if branch is None:
        return loc, msg
    # the same field's errors: one or more for each branch it has
    same = [(e, at, label) for e, (at, b, label) in zip(errors, placed, strict=True)
            if b == branch and at[:branch] == loc[:branch]]  # fmt: skip
    inside = [(e, at) for e, at, _ in same if len(at) > branch or not _mismatch(e)]
    if inside:  # the value is of a branch's type: what is wrong inside it
        e, at = inside[0]
        return at, str(e.get("msg", "invalid value"))
    taken = dict.fromkeys(_takes(e, label) for e, _, label in same)
    return loc, "should be " + " or ".join(taken)


def _placed(loc: tuple[Any, ...], body: Any, missing: bool) -> tuple[tuple[Any, ...], int | None, str]:
    """`loc` without the parts the body does not hold (a union's branch labels), where the first of those was in
    it (None: there was none) and what it said. The last part of a `missing` error names the field that is not
    there: kept."""
    out: list[Any] = [loc[0]]
    data, branch, label = body, None, ""
    for i, part in enumerate(loc[1:], 1):
        held = isinstance(data, dict) and isinstance(part, str) and part in data
        if held or (isinstance(data, list) and type(part) is int and 0 <= part < len(data)):
            data = data[part]
        elif not (missing and i == len(loc) - 1):
            if branch is None:
                branch, label = len(out), str(part)
            continue
        out.append(part)
    return tuple(out), branch, label


def _mismatch(err: Any) -> bool:
    """Whether a union branch's error says only that the value is not of the branch's type."""
    kind = str(err.get("type", ""))
    return kind.endswith("_type") or kind in ("none_required", "is_instance_of", "union_tag_invalid")


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "none": "null"}
_PLURALS = {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans", "none": "nulls"}


def _takes(err: Any, label: str) -> str:
    """What a union branch takes, in JSON's words, from pydantic's label of it (`list[str]`: a list of strings),
    else from the branch error's message (`Input should be a valid string`: a valid string)."""
    said = _label_words(str(label))
    return said or str(err.get("msg", "")).removeprefix("Input should be ")


def _label_words(label: str, plural: bool = False) -> str | None:
    inner = label[label.find("[") + 1 : -1] if label.endswith("]") else ""
    if label.startswith(("function-", "json-or-python[", "lax-or-strict[", "nullable[", "chain[")) and inner:
        return _label_words(inner.rpartition(", ")[2] or inner, plural)  # a validator around a type: that type
    base = label.removeprefix("constrained-")
    if base in _TYPE_WORDS:
        return _PLURALS[base] if plural else _TYPE_WORDS[base]
    if base.startswith(("list[", "set[", "frozenset[", "tuple[")) and inner:
        items = _label_words(inner.removesuffix(", ..."), plural=True)
        return ("lists" if plural else "a list") + (f" of {items}" if items else "")
    if base.startswith(("dict[", "model-fields", "typed-dict")) or (base[:1].isupper() and "[" not in base):
        return "objects" if plural else "an object"  # a dict, or a model (labelled by its class name)
    return None


def _body_fields(request: Request) -> list[str]:
    """The top-level field names of the JSON body of the route a request matched (none when it has no model)."""
    route = request.scope.get("route")
    return sorted(takes(route)[1]) if isinstance(route, APIRoute) else []


def _hint(name: str, names: list[str]) -> str:
    """` (did you mean 'x'?)` for a name close to one of `names`, else ` (it takes a, b, c)`; '' with no names."""
    return f" ({name_hint(name, names)})" if names else ""


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _CODES.get(exc.status_code, "http_error")
    if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing hit Python's nesting limit
        return error_response(400, code, "the request body nests too deeply to parse", "body")
    if exc.status_code == 422:  # a body refused as it was read (bodylimit.BadText)
        return error_response(422, "invalid_input", str(exc.detail), "body")
    if exc.status_code == 408:  # a body that stopped coming (bodylimit.BodyStalled): its connection goes
        return error_response(408, "timeout", str(exc.detail), "body", connection="close")
    headers = dict(exc.headers or {})  # a 405's Allow (RFC 9110: it must be there)
    if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):  # Starlette's own words
        allow = next((v for k, v in headers.items() if k.lower() == "allow"), None)
        if exc.status_code == 405:  # Starlette's Allow names the methods of the first route of the path only
            allow = allowed_methods(request) or allow
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | ({"Allow": allow} if allow else {})
        slashed = slashed_segment(request) if exc.status_code == 404 else None
        if slashed is not None:
            param, value = slashed
            said = f"{value!r} holds a '/' (sent as %2F in the path), which no id or name here does"
            return error_response(404, code, said, param, headers=headers)
        what = "no such route" if exc.status_code == 404 else "this route does not take that method"
        said = f"{what}: {request.method} {request.url.path}" + (f" (it takes {allow})" if allow else "")
        return error_response(exc.status_code, code, said, headers=headers)
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


_SLASH = re.compile(rb"%2f", re.IGNORECASE)


def has_slashed_segment(scope: Mapping[str, Any]) -> bool:
    """Whether the request's path, as sent, holds %2F (a '/' inside one of its segments)."""
    return _SLASH.search((scope.get("raw_path") or b"").split(b"?", 1)[0]) is not None


@dataclass(frozen=True)
class ErrorField:
    """The name a route's own errors give one of its path parameters, where it is not the parameter's name:
    `model_id: Annotated[str, ErrorField("model")]` on `/api/models/{model_id}`, whose 404 for an unknown model
    names `model`. The %2F 404 (`slashed_segment`) names the parameter so too: one name for one thing."""

    name: str


def slashed_segment(request: Request) -> tuple[str, str] | None:
    """The path parameter (the field the route's errors name it, value as sent) of a request no route took because
    a value in its path holds a '/' sent as %2F (`bkg keys revoke ../../admin`, `GET /api/jobs/..%2Fx`): the server
    decodes it before it routes, so the path has a segment too many, and the answer was "no such route" naming no
    field. Found by matching the path as sent, that segment whole, against the routes' paths; None when none
    matches."""
    if not has_slashed_segment(request.scope):
        return None
    raw = request.scope["raw_path"].split(b"?", 1)[0]
    parts = raw.decode("latin-1").split("/")
    path = "/".join(p if _SLASH.search(p.encode("latin-1")) else unquote(p) for p in parts)
    path = path.removeprefix(request.scope.get("root_path") or "") or "/"
    for template, methods, route in _route_paths(request.app.router.routes):
        m = compile_path(template)[0].match(path)
        if m is not None and (not methods or request.method in methods):
            for name, value in m.groupdict().items():
                if _SLASH.search(value.encode("latin-1")):
                    return error_field(route, name), unquote(value)
    return None


def error_field(route: Any, param: str) -> str:
    """The field a route's errors name its path parameter `param`: the `ErrorField` it declares, else its name."""
    dependant = getattr(route, "dependant", None)  # a FastAPI route's parameters (a mount or a plain route: none)
    for field in getattr(dependant, "path_params", ()):
        if field.alias == param:
            said = next((m for m in field.field_info.metadata if isinstance(m, ErrorField)), None)
            return said.name if said is not None else param
    return param


def _route_paths(routes: Sequence[Any], prefix: str = "") -> Iterator[tuple[str, set[str], Any]]:
    """Each route's full path template, methods and the route itself, routers included by `include_router` looked
    into."""
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included router
        if inner is not None:
            yield from _route_paths(inner.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
        elif isinstance(getattr(route, "path", None), str):
            yield prefix + route.path, set(getattr(route, "methods", None) or ()), route


def allowed_methods(request: Request) -> str:
    """Every method the app's routes take on the request's path, sorted and comma-separated (RFC 9110's `Allow`),
    HEAD wherever GET is, as the gateway answers it (`head.py`): each method is one the router would send to a route
    (asked through the routes' own matching, which also finds routes of included routers and under the Hub prefix);
    '' when none is."""
    taken: set[str] = set()
    for method in PROBED:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            taken.add(method)
    if "GET" in taken:
        taken.add("HEAD")
    return ", ".join(sorted(taken))


async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
    return error_response(422, "invalid_input", TOO_DEEP, "body")


async def internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    # Starlette raises the error again once this answer is sent, and uvicorn then drops the connection: said here,
    # the client opens a new one for its next request instead of sending it down one being closed (a reset)
    return error_response(500, "internal", INTERNAL, connection="close")


def _openai_on_v1(handler: Any) -> Any:
    """`handler`, answering in OpenAI's error shape on the OpenAI-compatible routes (`/v1/...`)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response: JSONResponse = await handler(request, exc)
        root = request.scope.get("root_path") or ""
        path: str = request.scope["path"]
        if not path.removeprefix(root).startswith("/v1/"):
            return response
        status, body = openai_shaped(orjson.loads(response.body)["error"])
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse(body, status_code=status, headers=headers)

    return handle


HANDLERS: dict[type[Exception], Any] = {
    cls: _openai_on_v1(handler)
    for cls, handler in {
        BkgError: bkg_error,
        RequestValidationError: validation_error,
        HTTPException: http_error,
        RecursionError: too_deep,
        Exception: internal,
    }.items()
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
