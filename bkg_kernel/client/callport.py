"""The client's side of the gateway's call port (`bkg_kernel/gateway/callport.py`): plugin calls over a plain TCP
socket, with HTTP as the way whenever the port cannot serve a call.

A `CallPort` keeps a few open connections, each greeted once with the client's key, that any thread may share. A
call it cannot make returns None and the caller sends it over HTTP instead: no port (an old gateway, or one
started with `call_port = -1`), a port that does not answer, a key it does not take (a Hub token), an input over
its limit. A call already sent is never sent again: if the gateway goes away before answering, that is the
caller's 503, as over HTTP.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import orjson

from bkg_kernel.client.transport import too_slow
from bkg_kernel.errors import Unavailable
from bkg_kernel.wire import Wire

HELLO = "bkg-call/1"
POOL_SIZE = 8  # idle connections kept
IDLE_REUSE_S = 300.0  # an idle connection older than this is not reused (the gateway closes them after 900 s)
CONNECT_TIMEOUT_S = 2.0
RETRY_AFTER_S = 30.0  # a port that was full, or could not be reached, is tried (or looked up) again after this


class CallPort:
    """Calls to the call port at `host:port` as the holder of `key`."""

    def __init__(self, host: str, port: int, key: str, timeout: float, max_input: int) -> None:
        self.host, self.port, self.key, self.timeout, self.max_input = host, port, key, timeout, max_input
        self._idle: list[tuple[Wire, float]] = []  # with when each went idle
        self._heads: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.busy_until = 0.0  # the port was full: HTTP until then
        self.stale = False  # a connection could not be opened: the gateway may have a new port (ask /health)
        self.refused = False

    def __repr__(self) -> str:
        return f"CallPort({self.host}:{self.port})"

    def usable(self) -> bool:
        """Whether calls should try the port now."""
        return not self.refused and not self.stale and time.monotonic() >= self.busy_until

    def call(self, plugin: str, capability: str, body: bytes) -> tuple[int, bytes, bool] | None:
        """The gateway's answer (HTTP status, JSON bytes, whether orjson wrote them); None when the call was not
        sent (use HTTP)."""
        if len(body) > self.max_input or not self.usable():
            return None
        head = self._heads.get((plugin, capability))
        if head is None:
            head = json.dumps({"plugin": plugin, "capability": capability}, separators=(",", ":")).encode() + b"\n"
            if len(self._heads) < 256:
                self._heads[(plugin, capability)] = head
        for fresh in (False, True):  # a send that fails reached no call: one more try, on a new connection
            wire = self._connection(fresh)
            if wire is None:
                return None
            try:
                wire.send(head, body, self.timeout)
                break
            except OSError:
                wire.sock.close()
            except BaseException:  # interrupted (Ctrl-C): half a frame may be out, the connection is done
                wire.sock.close()
                raise
        else:
            return None
        try:
            status, answer, fast, close = _answer(wire, self.timeout)
        except TimeoutError:  # the gateway took the call and is still at work: the client's wait ran out, a 504
            wire.sock.close()
            raise too_slow(f"{self.host}:{self.port} (its call port)", self.timeout) from None
        except (OSError, ValueError) as exc:
            wire.sock.close()
            where = f"{self.host}:{self.port}"
            raise Unavailable(f"the bkg gateway's call port {where} went away mid-call: {exc}") from None
        except BaseException:  # interrupted while the gateway works: closing tells it its caller left (it stops)
            wire.sock.close()
            raise
        if close:  # the gateway closes it (a call that overran its timeout still runs there)
            wire.sock.close()
        else:
            self._release(wire)
        return status, answer, fast

    def _connection(self, fresh: bool = False) -> Wire | None:
        """An idle connection still open, or a new one greeted with the key (None: the port cannot be used)."""
        if not fresh:
            with self._lock:
                while self._idle:
                    wire, since = self._idle.pop()
                    fresh_enough = time.monotonic() - since < IDLE_REUSE_S  # never one the gateway may be closing
                    if fresh_enough and not wire.pending and not select.select([wire.sock], [], [], 0)[0]:
                        return wire  # (readable while idle: closed)
                    wire.sock.close()
        try:
            conn = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            self.stale = True  # never again to this port number without asking the gateway which it is
            return None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire = Wire(conn)
            wire.send(json.dumps({"hello": HELLO, "key": self.key}).encode(), within=CONNECT_TIMEOUT_S)
            status, _, _, _ = _answer(wire, CONNECT_TIMEOUT_S)
        except (OSError, ValueError):
            conn.close()
            self.stale = True
            return None
        if status == 401 or status == 400:
            conn.close()
            self.refused = True  # this key is not for the port (a Hub token): HTTP from now on
            return None
        if status != 200:  # full (503): HTTP for a while
            conn.close()
            self.busy_until = time.monotonic() + RETRY_AFTER_S
            return None
        return wire

    def _release(self, wire: Wire) -> None:
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append((wire, time.monotonic()))
                return
        wire.sock.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for wire, _ in idle:
            wire.sock.close()


def _answer(wire: Wire, timeout: float) -> tuple[int, bytes, bool, bool]:
    """One answer frame: (status, JSON bytes, whether orjson wrote them, whether the gateway closes the
    connection after it)."""
    start = time.monotonic()
    frame = wire.read(timeout, 1 << 62, timeout)
    if frame is None:
        if time.monotonic() - start >= timeout:  # the wait ran out (a closed connection ends it at once)
            raise TimeoutError(f"no answer within {timeout:g}s")
        raise ConnectionError("the gateway closed the connection")
    assert not isinstance(frame, int)
    cut = frame.find(b"\n")
    top = orjson.loads(frame[:cut])
    return int(top["status"]), frame[cut + 1 :], top.get("orjson") is True, top.get("close") is True
