"""The notebook client's HTTP layer (`client.transport.Http`) against a real HTTP/1.1 server on 127.0.0.1: the
base URL's path prefix, query parameters and JSON bodies arrive as sent; connections are kept alive and shared
by threads; one the server closed while idle is replaced, not failed on; a stream arrives event by event while
the server is still sending; errors come back as the gateway's BkgError, or as Unavailable naming the URL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from gateway_harness import free_port

from bkg_kernel.client import transport
from bkg_kernel.errors import InvalidInput, Unavailable


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.second_event = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path.endswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in ('data: {"n": 1}\n\n', None, 'data: {"n": 2}\n\ndata: [DONE]\n\n'):
                if event is None:  # the second event waits until the client has the first one
                    self.server.second_event.wait(10)
                    continue
                raw = event.encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        self._answer(200, {"path": self.path}, close=self.path.endswith("/close"))
        if self.path.endswith("/drop"):  # closed after answering, without saying so (an idle keep-alive timeout)
            self.close_connection = True

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "body": body, "type": self.headers.get("Content-Type")})
        if body.get("bad"):
            self._answer(422, {"error": {"status": 422, "code": "invalid_input", "message": "no", "field": "bad"}})
            return
        self._answer(200, {"echo": body})


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_requests_keep_their_prefix_parameters_and_body_on_one_connection(server: Server) -> None:
    http = transport.Http(f"http://127.0.0.1:{server.server_port}/services/bkg/", {"Authorization": "Bearer k"})
    assert transport.request(http, "GET", "/health", params={"limit": 5, "level": None}) == {
        "path": "/services/bkg/health?limit=5"
    }
    assert transport.request(http, "POST", "/api/x", json={"text": "ünï", "n": [1, 2]}) == {
        "echo": {"text": "ünï", "n": [1, 2]}
    }
    assert server.seen[0]["auth"] == "Bearer k" and server.seen[1]["type"] == "application/json"
    assert server.connections == 1  # kept alive
    with pytest.raises(InvalidInput) as bad:
        transport.request(http, "POST", "/api/x", json={"bad": True})
    assert bad.value.field == "bad" and bad.value.status == 422
    assert transport.request(http, "GET", "/after-an-error") == {"path": "/services/bkg/after-an-error"}
    assert server.connections == 1


def test_a_connection_the_server_closed_is_replaced(server: Server) -> None:
    http = transport.Http(f"http://127.0.0.1:{server.server_port}")
    assert transport.request(http, "GET", "/close")["path"] == "/close"  # "Connection: close": not pooled
    assert transport.request(http, "GET", "/drop")["path"] == "/drop"  # pooled, then closed by the server
    time.sleep(0.2)
    assert transport.request(http, "POST", "/api/x", json={"n": 1}) == {"echo": {"n": 1}}  # sent once, on a new one
    assert server.connections == 3 and [s["path"] for s in server.seen].count("/api/x") == 1


def test_threads_share_one_client(server: Server) -> None:
    http = transport.Http(f"http://127.0.0.1:{server.server_port}")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                assert transport.request(http, "GET", f"/t{i}-{j}")["path"] == f"/t{i}-{j}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(server.seen) == 200
    assert server.connections <= 10 and len(http._idle) <= transport.POOL_SIZE


def test_a_stream_arrives_event_by_event(server: Server) -> None:
    http = transport.Http(f"http://127.0.0.1:{server.server_port}")
    events = transport.stream(http, "GET", "/sse")
    assert next(events) == {"n": 1}  # before the server has sent the rest
    server.second_event.set()
    assert list(events) == [{"n": 2}]
    assert transport.request(http, "GET", "/after")["path"] == "/after"


def test_an_unreachable_gateway_is_named() -> None:
    port = free_port()
    http = transport.Http(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(Unavailable) as down:
        transport.request(http, "GET", "/health")
    assert f"cannot reach the bkg gateway at http://127.0.0.1:{port}" in down.value.message
    with pytest.raises(ValueError):
        transport.Http("127.0.0.1:8000")
