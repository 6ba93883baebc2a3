"""The HTTP layer between a client and a bkg gateway: one connection pool, one error decoder, one SSE parser.

Every error the gateway sends has one JSON shape, `{"error": {"status", "code", "message", "field"?}}`;
`raise_for_error` turns it back into the `BkgError` subclass its code names (`errors.from_dict`). Streams are
server-sent events whose `data:` lines carry JSON, end with `[DONE]`, and carry an error the same way.

`Http` is a keep-alive client on the standard library's `http.client`, with a small pool any thread may share. A
notebook call is one small request after another to one local gateway, where httpx's own layers cost more than
the request itself: a round trip here is ~0.8 ms shorter (bench/README.md, "The client's share").
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import select
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import orjson

from bkg_kernel.errors import (
    BkgError,
    InvalidInput,
    PayloadTooLarge,
    Timeout,
    Unauthorized,
    Unavailable,
    from_dict,
)

POOL_SIZE = 8  # idle connections kept per client


class _Answer(Protocol):
    status_code: int
    reason_phrase: str

    def read(self) -> bytes: ...


class Response:
    """One answer of the gateway: status, headers, and the body (read at once, or line by line for a stream)."""

    def __init__(self, raw: http.client.HTTPResponse, done: Any, timeout: float = 0.0) -> None:
        self.raw, self._done = raw, done
        self.timeout = timeout  # how long each read waits (a read that outlives it is the client's `Timeout`)
        self.status_code = raw.status
        self.reason_phrase = raw.reason or ""
        self.headers = raw.headers
        self._content: bytes | None = None

    def read(self) -> bytes:
        """The whole body (read once, then kept); the connection goes back to the pool."""
        if self._content is None:
            try:
                self._content = self.raw.read()
            finally:
                self._done(reusable=self._content is not None)
        return self._content

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        """The body's lines as they arrive (a server-sent event stream), without their line ends."""
        while line := self.raw.readline():
            yield line.rstrip(b"\r\n").decode("utf-8", errors="replace")
        self._content = b""  # read to the end: the connection can serve the next request
        self._done(reusable=True)

    def close(self) -> None:
        """End the answer; a stream left half-read closes its connection (the pool opens another)."""
        if self._content is None:
            self._done(reusable=False)


class Http:
    """Requests to one gateway (`base_url`, which may carry a path prefix, e.g. a JupyterHub service's) with the
    client's headers, over kept-alive connections that any thread may share."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        if not is_http_url(self.base_url):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        parts = urlsplit(self.base_url)
        self._https, self._host, self._port = parts.scheme == "https", str(parts.hostname), parts.port
        self._prefix = parts.path.rstrip("/")
        self.headers = {"Accept": "*/*", "User-Agent": "bkg-client", **(headers or {})}
        self.timeout = timeout
        # what to say when the gateway asks for a key this client has none of (set by `connect`: the key file that
        # is missing), instead of the gateway's "missing credentials"
        self.no_key: str | None = None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Http({self.base_url!r})"

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    conn.sock.settimeout(timeout)  # idle and still open (readable would mean closed by the server)
                    return conn
                conn.close()
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _release(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse, reusable: bool) -> None:
        if reusable and not raw.will_close:
            with self._lock:
                if len(self._idle) < POOL_SIZE:
                    self._idle.append(conn)
                    return
        conn.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Response:
        target = self._prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode({k: v for k, v in params.items() if v is not None})
        headers, body = self.headers, None
        if json is not None:
            body = dumps(json)
            headers = {**headers, "Content-Type": "application/json"}
        wait = timeout or self.timeout
        conn = self._connection(wait)
        try:
            if conn.sock is None:  # a new connection: not reaching the gateway is a 503, not a slow answer
                try:
                    conn.connect()
                except (OSError, http.client.HTTPException) as exc:
                    raise unreachable(self, exc) from None
            conn.request(method, target, body=body, headers=headers)
            raw = conn.getresponse()
        except TimeoutError:  # connected, and the gateway is slower than this client waits: it may still be at work
            conn.close()
            raise too_slow(self.base_url, wait) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise unreachable(self, exc) from None
        except BaseException:  # interrupted (Ctrl-C in a notebook): the gateway sees its client leave and stops
            conn.close()
            raise
        released = False

        def done(reusable: bool) -> None:
            nonlocal released
            if not released:
                released = True
                self._release(conn, raw, reusable)

        return Response(raw, done, wait)

    def request(self, method: str, path: str, **kw: Any) -> Response:
        """Send one request and read its whole answer."""
        r = self._send(method, path, **kw)
        try:
            r.read()
        except TimeoutError:
            raise too_slow(self.base_url, r.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(self, exc) from None
        return r

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[Response]:
        """Send one request and hand over its answer unread (`iter_lines`)."""
        r = self._send(method, path, **kw)
        try:
            yield r
        finally:
            r.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def is_http_url(url: str) -> bool:
    """Whether `url` names an http(s) server (`127.0.0.1:8000`, without a scheme, does not; nor does one whose host
    or port cannot be read: `http://[::1`, `http://[zz]:1`, `http://h:abc`, `http://h:99999`)."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:
        return False


def seg(value: Any) -> str:
    """`value` as one segment of a URL path: a name with a space, a slash or a control character stays one name."""
    return quote(str(value), safe="")


def _plain(value: Any) -> Any:
    """What `json` cannot write but a notebook often holds: numpy and pandas arrays and scalars, sets."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    for method in ("tolist", "item"):  # numpy arrays and scalars, pandas Series and Index
        fn = getattr(value, method, None)
        if callable(fn):
            return fn()
    raise TypeError(type(value).__name__)


def dumps(data: Any) -> bytes:
    """A request body as the client sends it: compact UTF-8 JSON, no NaN; numpy and pandas values as plain lists and
    numbers. What JSON cannot carry is the caller's 422 naming where it is (`points[0].vector[2]`)."""
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_plain).encode()
    except (TypeError, ValueError) as exc:
        where, what = _unsendable(data, "")
        if where is None:
            raise InvalidInput(f"the request cannot be sent as JSON: {exc}", field="body") from None
        raise InvalidInput(f"{where or 'body'}: {what} cannot be sent as JSON", field=where or "body") from None


def _unsendable(value: Any, at: str) -> tuple[str | None, str]:
    """Where in `value` the first thing JSON cannot carry is (None: nowhere found), and what it is."""
    if isinstance(value, float):
        finite = not (math.isnan(value) or math.isinf(value))
        return (None, "") if finite else (at, f"{value!r} (not a number a gateway takes)")
    if value is None or isinstance(value, (str, int, bool)):
        return None, ""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return at, f"a key of type {type(k).__name__}"
            found = _unsendable(v, f"{at}.{k}" if at else str(k))
            if found[0] is not None:
                return found
        return None, ""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _unsendable(v, f"{at}[{i}]")
            if found[0] is not None:
                return found
        return None, ""
    try:
        plain = _plain(value)
    except TypeError:
        return at, f"a {type(value).__name__}"
    return _unsendable(plain, at)


def raise_for_error(r: _Answer) -> None:
    """Raise the gateway's JSON error of a 4xx / 5xx response (ours, or an httpx one) as its BkgError."""
    if r.status_code < 400:
        return
    try:
        content = r.read()  # a streamed response has not read its body yet
    except Exception:  # the caller consumed it (httpx.StreamError, a closed stream): only the status is left
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


def misdirected(status: int, content: bytes) -> bool:
    """Whether a call port answer says "send this over HTTP" (421 with the code `misdirected`; a plugin's own
    421, an upstream's, is an answer like any other)."""
    if status != 421:
        return False
    try:
        return bool(json.loads(content)["error"]["code"] == "misdirected")
    except (ValueError, KeyError, TypeError):
        return False


def answer(status: int, content: bytes, fast: bool = False) -> Any:
    """A call port answer's result; an error status raises its BkgError, as `raise_for_error` does for HTTP.
    `fast`: the gateway wrote it with orjson, so orjson reads it the same (a third of the standard library's time
    for a page of hits; what orjson cannot write, an integer past 64 bits, it would read as a float)."""
    if fast and status < 400:
        return orjson.loads(content)
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if status >= 400:
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = {"error": {"code": "http_error", "message": content.decode(errors="replace")[:300]}}
        raise from_dict(body, status=status)
    return body


def decode(r: Response) -> Any:
    """Return a response's JSON body, or its text when it is not JSON."""
    is_json = (r.headers.get("content-type") or "").startswith("application/json")
    return r.json() if r.content and is_json else r.text


def request(client: Http, method: str, path: str, **kw: Any) -> Any:
    """Send one request and return its decoded body; an error response raises its BkgError."""
    r = client.request(method, path, **kw)
    _raise_for(client, r)
    return decode(r)


def request_bytes(client: Http, method: str, path: str, max_bytes: int | None = None, **kw: Any) -> bytes:
    """Send one request and return its body as bytes (a file); an error response raises its BkgError. With
    `max_bytes`, a body longer than that is a 413 naming `max_bytes`, read no further than one byte past it (a file
    that grew since it was listed is not pulled into memory whole)."""
    if max_bytes is None:
        r = client.request(method, path, **kw)
        _raise_for(client, r)
        return r.content
    with client.stream(method, path, **kw) as r:
        if r.status_code >= 400:
            r.read()
            _raise_for(client, r)
        try:
            data = r.raw.read(max_bytes + 1)
        except TimeoutError:
            raise too_slow(client.base_url, r.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(client, exc) from None
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{path} is more than {max_bytes:,} bytes", field="max_bytes")
        r.read()  # to its end (nothing left): the connection serves the next request
        return data


def _raise_for(client: Http, r: Response) -> None:
    """`raise_for_error`, where a 401 to a client that sent no key says why it had none (`Http.no_key`)."""
    try:
        raise_for_error(r)
    except Unauthorized:
        if client.no_key is None or "Authorization" in client.headers:
            raise
        raise Unauthorized(client.no_key) from None


def stream(client: Http, method: str, path: str, **kw: Any) -> Iterator[dict[str, Any]]:
    """Send one request and yield the JSON events of its SSE answer as they come."""
    with client.stream(method, path, **kw) as r:
        _raise_for(client, r)
        try:
            yield from iter_sse(r.iter_lines())
        except TimeoutError:  # nothing came for the client's call timeout
            raise too_slow(client.base_url, r.timeout) from None
        except (OSError, http.client.HTTPException) as exc:  # the gateway went away mid-stream
            raise unreachable(client, exc) from None


def unreachable(client: Http, exc: Exception) -> Unavailable:
    """The error for a gateway that does not answer: it names the URL."""
    return Unavailable(f"cannot reach the bkg gateway at {client.base_url}: {exc or type(exc).__name__}")


def too_slow(where: str, seconds: float) -> Timeout:
    """The error for a gateway that took a call but did not answer within the client's call timeout: a 504 naming
    the wait and how to make it longer (the gateway may still be at work; `unreachable` is for one not there)."""
    return Timeout(
        f"the bkg gateway at {where} did not answer within {seconds:g}s, this client's call timeout (it may still "
        "be at work); wait longer with bkg.connect(call_timeout=...)"
    )


def _with_end(lines: Iterable[str]) -> Iterator[str]:
    yield from lines
    yield ""  # a stream that stops without a blank line still delivers its last event


_ITEM_REF = r"({items}\.|{items}\[)(\d+)"  # `points[3]`, `points.3`: an item of the request, by its index


def renumber(exc: BkgError, items: str, start: int, before: str = "") -> None:
    """Make a refused request's error name its item (`points[3]`, `documents.3`) by its place in the caller's whole
    list, of which the request sent the items from `start` on; `before` (what the requests before it did) is added
    to the message."""
    ref = re.compile(_ITEM_REF.format(items=re.escape(items)))

    def shifted(text: str) -> str:
        return ref.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + start}", text)

    exc.message = shifted(exc.message)
    if exc.field:
        exc.field = shifted(exc.field)
    if before:
        exc.message = f"{exc.message} ({before})"
    exc.args = (exc.message,)
