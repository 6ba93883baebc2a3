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
- every answer: `{"status": <HTTP status>, "orjson"?: true, "close"?: true}` + `\\n` + the JSON the HTTP route
  would send (the result, or the one error shape); `orjson` says orjson wrote it, so orjson may read it (faster;
  what orjson cannot write, an integer past 64 bits, it would read back as a float); `close` says the gateway
  closes the connection after this answer (a hello refused, a frame over the limit, a call that overran its
  timeout and still runs).

Who calls is checked on every call as over HTTP (the key's rate limit, a key revoked or a role changed take effect
on the next call, not the next connection); a Hub token is not taken here (the client uses HTTP). A capability that
runs as a background job answers 421 (code `misdirected`): the client sends that call over HTTP. A connection
must finish its hello within `HELLO_TIMEOUT_S` and a frame it began within `FRAME_TIMEOUT_S` (each as a whole,
however slowly its bytes come), and closes after `IDLE_TIMEOUT_S` idle. At most `max_connections` are open,
`MAX_GREETING` of them still without a hello and `MAX_PER_USER` for one user; past that a new one is answered
503 and closed (the client uses HTTP). Calls count in the metrics as method `CALL`.
"""

from __future__ import annotations

import contextlib
import logging
import select
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
    NotFound,
    PayloadTooLarge,
    Timeout,
    Unavailable,
)
from bkg_kernel.gateway.bodylimit import PARSED_BYTES
from bkg_kernel.gateway.errors import INTERNAL
from bkg_kernel.gateway.jsonresp import dumps, encode
from bkg_kernel.gateway.metrics import Metrics
from bkg_kernel.runtime import bodyjson
from bkg_kernel.runtime.supervisor import Supervisor
from bkg_kernel.wire import Wire

log = logging.getLogger("bkg.gateway")
HELLO = "bkg-call/1"
HEAD_BYTES = 8 * 1024  # a call's header line, at most
MAX_FRAME = HEAD_BYTES + PARSED_BYTES
HELLO_TIMEOUT_S = 10.0
FRAME_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 900.0
MAX_GREETING = 8  # connections open without a hello yet
MAX_PER_USER = 16
INVOKE_ROUTE = "/api/plugins/{plugin_id}/invoke/{capability_id}"


class _Connection:
    """One client's connection: answers go out one at a time, exactly one a call (the deadline thread may answer a
    call that overran its timeout while the plugin still runs on the connection's thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wire = Wire(sock)
        self.lock = threading.Lock()
        self.user: str | None = None  # set by the hello
        self.calls = 0  # calls read so far: the number of the running one
        self.answered = 0  # the last call answered
        self.closing = False  # an answer that closes the connection went out: nothing more does

    def read(self, idle: float, limit: int = MAX_FRAME, whole: bool = False) -> bytes | BkgError | None:
        """The next frame; None when the client closed the connection (or sent nothing for `idle` seconds); a 413
        when it announces more than `limit` bytes (not read: the connection closes after the answer). Once its
        first byte is in, the rest must come within `FRAME_TIMEOUT_S`, however slowly; `whole`: the whole frame
        within `idle`."""
        frame = self.wire.read(idle, limit, FRAME_TIMEOUT_S, whole)
        if isinstance(frame, int):
            return PayloadTooLarge(f"a call port frame holds at most {limit:,} bytes; this one has {frame:,}: use HTTP")
        return frame

    def gone(self) -> bool:
        """Whether the client closed its end (looked at without reading: bytes it sent early stay for `read`)."""
        try:
            ready = select.poll()  # poll, not select: any descriptor number
            ready.register(self.sock, select.POLLIN)
            if not ready.poll(0):
                return False
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset, or closed on this side
            return True

    def send(
        self,
        status: int,
        body: bytes,
        fast: bool = False,
        close: bool = False,
        timeout: float = FRAME_TIMEOUT_S,
        call: int | None = None,
    ) -> bool:
        """Write one answer, to call number `call` (None: not to a call) unless that call was answered already or
        an answer closed the connection (False then); a client that does not take it within `timeout` seconds
        loses the connection."""
        flags = (b',"orjson":true' if fast else b"") + (b',"close":true' if close else b"")
        head = b'{"status":%d%s}\n' % (status, flags)
        with self.lock:
            # the deadline thread's answer and the connection's thread's can both come for one call that overran
            # (the latter once the deadline fired, if the former was held up before it answered): the first goes
            if self.closing or (call is not None and call <= self.answered):
                return False
            if call is not None:
                self.answered = call
            self.closing = close
            self.wire.send(head, body, timeout)
            return True


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
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self._conns: set[_Connection] = set()
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
                conn.sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("call port: cannot accept a connection now (%s)", exc)  # out of descriptors...
                time.sleep(0.1)
                continue
            conn = _Connection(sock)
            with self._lock:
                greeting = sum(1 for c in self._conns if c.user is None)
                refused = (
                    f"the call port has {self.max_connections} connections open: use HTTP"
                    if len(self._conns) >= self.max_connections
                    else f"the call port has {greeting} connections waiting for their hello: use HTTP"
                    if greeting >= MAX_GREETING
                    else None
                )
                if refused is None:
                    self._conns.add(conn)
            if refused is not None:
                self._refuse(conn, Unavailable(refused))
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="bkg-call", daemon=True).start()
            except RuntimeError:  # no thread to be had
                self._drop(conn)
                self._refuse(conn, Unavailable("the call port cannot take a connection now: use HTTP"))

    @staticmethod
    def _refuse(conn: _Connection, err: BkgError) -> None:
        with contextlib.suppress(OSError):  # the accept thread waits on no client
            conn.send(*_error(err), close=True, timeout=1.0)
        conn.sock.close()

    def _drop(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token = self._hello(conn)
            while token is not None:
                frame = conn.read(IDLE_TIMEOUT_S)
                if frame is None:
                    return
                if isinstance(frame, BkgError):
                    conn.send(*_error(frame), close=True)
                    return
                conn.calls += 1
                status, body, fast = self.call(token, frame, conn)
                if not conn.send(status, body, fast, call=conn.calls):
                    return  # answered at its deadline: the plugin ran on; the connection closes
        except (OSError, ValueError):  # the client went away, or a frame stalled
            return
        finally:
            self._drop(conn)
            conn.sock.close()

    def _hello(self, conn: _Connection) -> str | None:
        """The token a client's hello names, once checked (None: refused and answered, or gone)."""
        frame = conn.read(HELLO_TIMEOUT_S, limit=HEAD_BYTES, whole=True)
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
            with self._lock:
                mine = sum(1 for c in self._conns if c.user == p.user_id)
                if mine >= MAX_PER_USER:
                    raise Unavailable(f"{p.username} has {mine} call port connections open: use HTTP")
                conn.user = p.user_id
        except BkgError as exc:
            conn.send(*_error(exc), close=True)
            return None
        conn.send(200, dumps({"user": p.username, "max_input": PARSED_BYTES}))
        return token

    def call(self, token: str, frame: bytes, conn: _Connection | None = None) -> tuple[int, bytes, bool]:
        """One call's answer, (status, body, whether orjson wrote it), as the HTTP route would give it; a call
        that overruns its timeout is answered on `conn` at that moment."""
        t0 = time.perf_counter()
        fast = False
        try:
            body, fast = encode(self._invoke(token, frame, conn))
            status = 200
        except BkgError as exc:
            if exc.status >= 500:
                log.warning("CALL %s -> %s: %s", INVOKE_ROUTE, exc.status, exc.message)
            status, body = _error(exc)
        except RecursionError:
            status, body = _error(InvalidInput(bodyjson.TOO_DEEP, field="body"))
        except Exception:
            log.exception("unhandled error on a call port call")
            status, body = _error(BkgError(INTERNAL))  # a 500, code internal, in the words of the HTTP routes
        self.metrics.observe("CALL", INVOKE_ROUTE, status, time.perf_counter() - t0)
        return status, body, fast

    def _invoke(self, token: str, frame: bytes, conn: _Connection | None) -> Any:
        head, _, raw = frame.partition(b"\n")
        msg = _object(head, "call")
        plugin_id, capability_id = msg.get("plugin"), msg.get("capability")
        if not isinstance(plugin_id, str) or not plugin_id:
            raise BadRequest("a call names its plugin: {'plugin': <id>, 'capability': <id>}", field="plugin")
        if not isinstance(capability_id, str) or not capability_id:
            raise BadRequest("a call names its capability: {'plugin': <id>, 'capability': <id>}", field="capability")
        found = self.supervisor.hosts.get(plugin_id)
        cap = found.cls.capabilities().get(capability_id) if found is not None and found.cls else None
        job = cap is not None and cap.job
        # who is asking comes before what exists; a job's call is counted once, when it comes over HTTP
        p = self.auth.authenticate(token, metered=not job)
        host = self.supervisor.get(plugin_id)
        p.require(cap.scope if cap is not None else "plugins:read", "this route")
        if cap is None and found is not None and found.cls is not None:
            raise NotFound(f"plugin {plugin_id!r} has no capability {capability_id!r}", field="capability")
        if job:
            raise Misdirected(f"{capability_id} runs as a background job: start it over HTTP")
        if cap is not None and not cap.big_input and len(raw) > PARSED_BYTES:
            raise PayloadTooLarge(f"{capability_id} takes inputs of at most {PARSED_BYTES // 2**20} MiB", field="body")
        big = len(raw) > bodyjson.BIG_BODY
        data: Any = {}
        if big and host.worker is not None:
            data = bodyjson.RawJSON(raw)  # parsed by the worker, as over HTTP: not parsed and pickled here
        elif raw:
            data = bodyjson.loads(raw, root="input")

        mine = conn.calls if conn is not None else 0

        def overran(err: Timeout) -> None:
            if conn is not None:
                with contextlib.suppress(OSError):  # the deadline thread serves every call: it waits on no client
                    conn.send(*_error(err), close=True, timeout=1.0, call=mine)

        owned = big and not isinstance(data, bodyjson.RawJSON)
        gone = conn.gone if conn is not None else None
        result = host.invoke_here(capability_id, data, p, on_timeout=overran, owned=owned, gone=gone)
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
    return exc.status, dumps(exc.to_dict())  # a wait to retry (a 429, a plugin starting) is in it
