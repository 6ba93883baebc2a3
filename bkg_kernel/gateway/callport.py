"""The call port: plugin calls over a plain TCP socket beside HTTP, as Qdrant serves gRPC beside its REST API.

A notebook's plugin call is small and the work is often quicker than the HTTP exchange around it: a text query
takes ~0.7 ms in the store, and HTTP (parsing, the ASGI app, the event loop handing the work to a thread and the
answer back) adds ~0.8 ms more (`bench/hop.py`). Here a connection has a thread of its own that reads a call,
runs it and writes the answer, with no event loop and no HTTP in between: the same checks, limits and errors as
`POST /api/plugins/{plugin_id}/invoke/{capability_id}`, which stays the way for everything else (the lab, curl,
a job capability, an input over 1 MiB).

The wire, every message a frame (a 4-byte big-endian length, then the bytes):
- hello, the client's first frame: `{"hello": "bkg-call/1", "key": "<API key or session token>"}`;
- a call: `{"plugin": ..., "capability": ...}` + `\\n` + the input's JSON (the HTTP body);
- every answer: `{"status": <HTTP status>, "orjson"?: true}` + `\\n` + the JSON the HTTP route would send (the
  result, or the one error shape); `orjson` says orjson wrote it, so orjson may read it (faster; what orjson cannot
  write, an integer past 64 bits, it would read back as a float).
A hello refused (401) or a frame over the limit (413) is answered, then the connection closes.

Who calls is checked on every call as over HTTP (the key's rate limit, a key revoked or a role changed take effect
on the next call, not the next connection); a Hub token is not taken here (the client uses HTTP). A capability that
runs as a background job answers 421: the client sends that call over HTTP. A connection must say hello within
`HELLO_TIMEOUT_S`, send a frame it began within `FRAME_TIMEOUT_S`, and closes after `IDLE_TIMEOUT_S` idle;
past `max_connections` a new one is answered 503 and closed. Calls count in the metrics as method `CALL`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

import orjson

from bkg_kernel.auth import AuthService
from bkg_kernel.errors import (
    BadRequest,
    BkgError,
    InvalidInput,
    Misdirected,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from bkg_kernel.gateway.bodylimit import PARSED_BYTES
from bkg_kernel.gateway.jsonresp import dumps, encode
from bkg_kernel.gateway.metrics import Metrics
from bkg_kernel.runtime import bodyjson
from bkg_kernel.runtime.supervisor import Supervisor

log = logging.getLogger("bkg.gateway")
HELLO = "bkg-call/1"
HEAD_BYTES = 8 * 1024  # a call's header line, at most
MAX_FRAME = HEAD_BYTES + PARSED_BYTES
HELLO_TIMEOUT_S = 10.0
FRAME_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 900.0
INVOKE_ROUTE = "/api/plugins/{plugin_id}/invoke/{capability_id}"


class CallPort:
    """Listens on `host:port` (0: a free port; `.port` says which) until `close()`."""

    def __init__(
        self,
        auth: AuthService,
        supervisor: Supervisor,
        metrics: Metrics,
        host: str,
        port: int,
        max_connections: int = 64,
    ) -> None:
        self.auth, self.supervisor, self.metrics = auth, supervisor, metrics
        self.max_connections = max_connections
        self.sock = socket.create_server((host, port))
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="bkg-callport", daemon=True).start()

    def describe(self) -> dict[str, Any]:
        """What a client needs to use the port (in /health)."""
        return {"port": self.port, "protocol": HELLO, "max_input": PARSED_BYTES}

    def close(self) -> None:
        """Stop listening and close every connection (a call running finishes; its answer is dropped)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                refused = Unavailable(f"the call port has {self.max_connections} connections open: use HTTP")
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    _send(conn, *_error(refused))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="bkg-call", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token = self._hello(conn)
            while token is not None:
                frame = _read_frame(conn, IDLE_TIMEOUT_S)
                if frame is None:
                    return
                if isinstance(frame, BkgError):
                    _send(conn, *_error(frame))
                    return
                _send(conn, *self.call(token, frame))
        except (OSError, ValueError):  # the client went away, or a frame stalled
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _hello(self, conn: socket.socket) -> str | None:
        """The token a client's hello names, once checked (None: refused and answered, or gone)."""
        frame = _read_frame(conn, HELLO_TIMEOUT_S, limit=HEAD_BYTES)
        if frame is None:
            return None
        try:
            if isinstance(frame, BkgError):
                raise frame
            msg = _object(frame, "hello")
            if msg.get("hello") != HELLO:
                raise BadRequest(f"the first frame must be a hello: {{'hello': {HELLO!r}, 'key': ...}}", field="hello")
            token = msg.get("key")
            if not isinstance(token, str) or not token:
                raise BadRequest("the hello names no key", field="key")
            p = self.auth.authenticate(token, metered=False)
        except BkgError as exc:
            _send(conn, *_error(exc))
            return None
        _send(conn, 200, dumps({"user": p.username, "max_input": PARSED_BYTES}))
        return token

    def call(self, token: str, frame: bytes) -> tuple[int, bytes, bool]:
        """One call's answer, (status, body, whether orjson wrote it), as the HTTP route would give it."""
        t0 = time.perf_counter()
        fast = False
        try:
            body, fast = encode(self._invoke(token, frame))
            status = 200
        except BkgError as exc:
            status, body = _error(exc)
        except RecursionError:
            status, body = _error(InvalidInput("the request nests too deeply (JSON objects or filters)", field="body"))
        except Exception:
            log.exception("unhandled error on a call port call")
            status, body = (
                500,
                dumps(
                    {"error": {"status": 500, "code": "internal", "message": "internal error; the gateway log has it"}}
                ),
            )
        self.metrics.observe("CALL", INVOKE_ROUTE, status, time.perf_counter() - t0)
        return status, body, fast

    def _invoke(self, token: str, frame: bytes) -> Any:
        head, _, raw = frame.partition(b"\n")
        msg = _object(head, "call")
        plugin_id, capability_id = msg.get("plugin"), msg.get("capability")
        if not isinstance(plugin_id, str) or not isinstance(capability_id, str):
            raise BadRequest("a call names its plugin and capability: {'plugin': ..., 'capability': ...}")
        p = self.auth.authenticate(token)  # who is asking comes before what exists
        host = self.supervisor.get(plugin_id)
        cap = host.cls.capabilities().get(capability_id) if host.cls else None
        p.require(cap.scope if cap is not None else "plugins:read", "this route")
        if cap is not None and cap.job:
            raise Misdirected(f"{capability_id} runs as a background job: start it over HTTP")
        if cap is not None and not cap.big_input and len(raw) > PARSED_BYTES:
            raise PayloadTooLarge(f"{capability_id} takes inputs of at most {PARSED_BYTES // 2**20} MiB", field="body")
        result = host.invoke_here(capability_id, bodyjson.loads(raw) if raw else {}, p)
        if cap is not None and cap.books_usage and isinstance(result, dict):
            self.auth.book_usage(p, f"/api/plugins/{plugin_id}/invoke/{capability_id}", result)
        return result


def _object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        msg = orjson.loads(raw)
    except ValueError:
        raise BadRequest(f"the {what} header is not JSON", field=what) from None
    if not isinstance(msg, dict):
        raise BadRequest(f"the {what} header must be a JSON object", field=what)
    return msg


def _error(exc: BkgError) -> tuple[int, bytes]:
    body = exc.to_dict()
    if isinstance(exc, TooManyRequests):
        body["error"]["retry_after"] = exc.retry_after
    return exc.status, dumps(body)


def _send(conn: socket.socket, status: int, body: bytes, fast: bool = False) -> None:
    head = b'{"status":%d,"orjson":true}\n' % status if fast else b'{"status":%d}\n' % status
    conn.sendall((len(head) + len(body)).to_bytes(4, "big") + head + body)


def _read_frame(conn: socket.socket, idle: float, limit: int = MAX_FRAME) -> bytes | BkgError | None:
    """The next frame; None when the client closed the connection (or stayed idle `idle` seconds); a 413 when it
    announces more than `limit` bytes (not read: the connection closes after the answer)."""
    conn.settimeout(idle)
    try:
        head = _exactly(conn, 4)
    except TimeoutError:
        return None
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > limit:
        return PayloadTooLarge(f"a call port frame holds at most {limit:,} bytes; this one has {size:,}: use HTTP")
    conn.settimeout(FRAME_TIMEOUT_S)
    body = _exactly(conn, size)
    if body is None:
        raise ValueError("the connection closed inside a frame")
    return body


def _exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        got = conn.recv(min(n - len(buf), 1 << 20))
        if not got:
            return None
        buf += got
    return bytes(buf)
