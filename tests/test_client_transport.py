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


def test_what_a_notebook_holds_is_sent_as_json_or_named() -> None:
    """Found by a review: numpy ints, arrays and pandas Series inside a request were a `TypeError` ten frames deep
    in `json`, and a NaN a `ValueError` naming no field."""
    import numpy as np
    import pandas as pd

    body = {"ids": [np.int64(1), np.int32(2)], "top_k": np.int64(3), "vector": np.array([0.5, 1.0]),
            "labels": pd.Series(["a", "b"]), "tags": {"x"}}  # fmt: skip
    assert json.loads(transport.dumps(body)) == {
        "ids": [1, 2], "top_k": 3, "vector": [0.5, 1.0], "labels": ["a", "b"], "tags": ["x"],
    }  # fmt: skip
    with pytest.raises(InvalidInput) as nan:
        transport.dumps({"points": [{"id": 1, "vector": [1.0, 2.0]}, {"id": 2, "vector": np.array([1.0, np.nan])}]})
    assert nan.value.field == "points[1].vector[1]" and "nan" in nan.value.message
    with pytest.raises(InvalidInput) as odd:
        transport.dumps({"texts": [object()]})
    assert odd.value.field == "texts[0]" and "object" in odd.value.message


def test_names_stay_one_path_segment_and_lengths_are_checked() -> None:
    from bkg_kernel.client.collections import _points

    assert transport.seg("my docs/2\n") == "my%20docs%2F2%0A"
    with pytest.raises(InvalidInput) as short:
        _points([1, 2], [[0.1], [0.2], [0.3]], None, None)
    assert short.value.field == "vectors" and "3 of them for 2 ids" in short.value.message
    with pytest.raises(InvalidInput) as few:
        _points([1, 2], [[0.1], [0.2]], [{"a": 1}], None)
    assert few.value.field == "payloads"


def test_a_collection_name_with_a_space_reaches_the_gateway_as_one_name(server: Server) -> None:
    from bkg_kernel.client import Workbench

    wb = Workbench(f"http://127.0.0.1:{server.server_address[1]}", "k", call_port=False)
    base = wb.collection("my docs/x").base
    assert base == "/api/collections/my%20docs%2Fx" and wb.call("GET", base)["path"] == base


def test_connect_refuses_a_url_without_a_scheme_before_starting_anything(tmp_path: Any) -> None:
    """Found by a review: `connect("127.0.0.1:50999")` found nothing answering there, so it started a gateway of its
    own in the data dir, and then said none answered."""
    from bkg_kernel.client import connect

    with pytest.raises(InvalidInput) as bad:
        connect("127.0.0.1:50999", data_dir=tmp_path / "data")
    assert bad.value.field == "url" and not (tmp_path / "data").exists()


def test_chat_magic_uses_the_notebook_s_own_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: `%%chat` called `connect()` with no arguments: another gateway (or a new one started in
    ./data) than the one the notebook connected to, with another key."""
    from IPython.core.error import UsageError

    from bkg_kernel.client import Workbench, magics

    asked: list[Any] = []

    class FakeLlm:
        """A fake: the test is about which connection the magic uses, not what a model answers."""

        def chat(self, messages: Any, **opts: Any) -> None:
            asked.append((messages, opts))

    wb = Workbench("http://127.0.0.1:9", "bkg_x", call_port=False)
    monkeypatch.setattr(Workbench, "llm", property(lambda self: FakeLlm() if self is wb else None))
    monkeypatch.setattr(magics, "connect", lambda *a, **k: pytest.fail("connect() was called"))
    magics.chat_magic("--max-tokens 5", "hello")
    assert asked == [([{"role": "user", "content": "hello"}], {"max_tokens": 5})]
    with pytest.raises(UsageError):
        magics.chat_magic("--no-such-flag", "hello")


def test_a_wait_to_retry_crosses_every_boundary_with_its_error() -> None:
    """An upstream's Retry-After once became 1 s crossing the worker's pipe (to_dict had no room for it)."""
    from bkg_kernel.errors import TooManyRequests, Unavailable, from_dict

    back = from_dict(TooManyRequests("slow down", retry_after=30.0).to_dict())
    assert isinstance(back, TooManyRequests) and back.retry_after == 30.0
    starting = from_dict(Unavailable("starting", retry_after=5.0).to_dict())
    assert isinstance(starting, Unavailable) and starting.retry_after == 5.0
    assert "retry_after" not in Unavailable("stopped").to_dict()["error"]


def test_upserts_are_batched_under_the_gateway_s_body_limit(tmp_path: Any) -> None:
    """Found by a review: `upsert` sent 1,000 points a request whatever their size; 1,000 vectors of 3,072 floats
    are ~65 MB of JSON, past the gateway's 32 MB limit (a 413 on the first batch). Batches now stay under half the
    limit /health gives (a gateway at 1 MB here: 300 points of 384 floats, ~2.3 MB, arrive in several)."""
    import numpy as np
    from gateway_harness import ADMIN_KEY, start_gateway

    from bkg_kernel.client import Workbench

    g = start_gateway(tmp_path / "data", env={"BKG_MAX_BODY_MB": "1"}, plugins=["apikeys"])
    try:
        wb = Workbench(g.url, ADMIN_KEY)
        assert wb.health()["max_body_bytes"] == 2**20
        coll = wb.create_collection("wide", dim=384)
        vecs = np.random.default_rng(0).standard_normal((300, 384)).astype(np.float32)
        assert coll.upsert(ids=list(range(300)), vectors=vecs) == 300
        assert coll.count() == 300
    finally:
        g.stop()
