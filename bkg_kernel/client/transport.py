"""The HTTP layer between a client and a bkg gateway: one error decoder, one SSE parser, one request helper.

Every error the gateway sends has one JSON shape, `{"error": {"status", "code", "message", "field"?}}`;
`raise_for_error` turns it back into the `BkgError` subclass its code names (`errors.from_dict`). Streams are
server-sent events whose `data:` lines carry JSON, end with `[DONE]`, and carry an error the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from bkg_kernel.errors import Unavailable, from_dict


def raise_for_error(r: httpx.Response) -> None:
    """Raise the gateway's JSON error of a 4xx / 5xx response as its BkgError (nothing for a success)."""
    if r.status_code < 400:
        return
    try:
        content = r.read()  # a streamed response has not read its body yet
    except httpx.StreamError:  # the caller consumed it: only the status is left
        content = b""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        text = content.decode(errors="replace")[:300]
        body = {"error": {"code": "http_error", "message": text or r.reason_phrase}}
    raise from_dict(body, status=r.status_code)


def iter_sse(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Yield the JSON events of a server-sent event stream until `[DONE]`; an `{"error": ...}` event raises it."""
    data: list[str] = []
    for line in _with_end(lines):
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line or not data:  # a comment, another field, or a blank line with no event pending
            continue
        payload, data = "\n".join(data).strip(), []
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict) and "error" in event:
            raise from_dict(event)
        yield event


def decode(r: httpx.Response) -> Any:
    """Return a response's JSON body, or its text when it is not JSON."""
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return r.json() if r.content and is_json else r.text


def request(http: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    """Send one request and return its decoded body; an error response raises its BkgError."""
    try:
        r = http.request(method, path, **kw)
    except httpx.TransportError as exc:
        raise unreachable(http, exc) from None
    raise_for_error(r)
    return decode(r)


def stream(http: httpx.Client, method: str, path: str, **kw: Any) -> Iterator[dict[str, Any]]:
    """Send one request and yield the JSON events of its SSE answer as they come."""
    try:
        with http.stream(method, path, **kw) as r:
            raise_for_error(r)
            yield from iter_sse(r.iter_lines())
    except httpx.TransportError as exc:
        raise unreachable(http, exc) from None


def unreachable(http: httpx.Client, exc: Exception) -> Unavailable:
    """The error for a gateway that does not answer: it names the URL."""
    return Unavailable(f"cannot reach the bkg gateway at {str(http.base_url).rstrip('/')}: {exc}")


def _with_end(lines: Iterable[str]) -> Iterator[str]:
    yield from lines
    yield ""  # a stream that stops without a blank line still delivers its last event
