"""The floor of any process boundary, for the benches that time bkg's gateway against work done in one process
(`bench/brainml.py`, `bench/hop.py`): the same work answered by a bare process of its own over a raw TCP socket on
loopback, nothing between the socket and the work (no HTTP, no framework, no authentication, no plugin host).

The wire: a 4-byte big-endian length, then JSON, each way; one thread per connection waits on its socket itself,
so a call costs what every call between two processes must: the request's and the answer's trips through the
kernel, the two wake-ups (the server's, then the client's), and the JSON of both.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson


def recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    """`n` bytes from `conn`, or None when the other side closed it."""
    buf = bytearray()
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return bytes(buf)


def serve(port: int, answer: Callable[[dict[str, Any]], Any], ready: Any = None) -> None:
    """Answer `{"results": answer(request)}` to every framed JSON request on 127.0.0.1:`port`, a thread per
    connection, until the process ends; `ready.set()` once listening. A SIGTERM (`Process.terminate`) ends it as a
    normal exit, so the process's own clean-up runs (a semaphore left behind is a warning from Python's resource
    tracker)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while (head := recv_exactly(conn, 4)) is not None:
                body = recv_exactly(conn, int.from_bytes(head, "big"))
                if body is None:
                    return
                out = orjson.dumps({"results": answer(orjson.loads(body))})
                conn.sendall(len(out).to_bytes(4, "big") + out)

    with socket.create_server(("127.0.0.1", port)) as server:
        if ready is not None:
            ready.set()
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def client(port: int, wait_s: float = 300.0) -> Callable[[dict[str, Any]], Any]:
    """`ask(request) -> results` over one connection to `serve` (connected once it listens)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ask(request: dict[str, Any]) -> Any:
        body = json.dumps(request).encode()
        conn.sendall(len(body).to_bytes(4, "big") + body)
        head = recv_exactly(conn, 4)
        assert head is not None, "the floor process closed the socket"
        out = recv_exactly(conn, int.from_bytes(head, "big"))
        assert out is not None, "the floor process closed the socket"
        return orjson.loads(out)["results"]

    return ask
