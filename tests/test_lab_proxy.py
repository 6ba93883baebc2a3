"""The lab server extension's proxy, between a real Jupyter server and a real gateway on 127.0.0.1: a hostile URL
reaches the gateway as it was sent or is a 400, never a 500; `/bkg/ws` opens the gateway's socket only for a
handshake Jupyter accepts, and the browser learns how the gateway closed it."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, free_port, start_gateway
from helpers import jupyter_server, recording_server
from tornado import httpclient, websocket

from bkg_kernel.gateway.routes.live import MAX_PER_USER

TOKEN = "bkg-proxy-test-token"
AUTH = {"Authorization": f"token {TOKEN}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("proxy") / "data", plugins=["apikeys"])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def lab(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with jupyter_server(tmp_path_factory.mktemp("proxyroot"), gw.url, TOKEN) as url:
        yield url


def raw_request(lab: str, head: bytes, body: bytes = b"") -> tuple[int, str]:
    """Send `head` (request line and headers, as bytes: httpx would encode them) with Jupyter's token; return the
    status and the answer."""
    host, port = lab.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        extra = f"Host: {host}:{port}\r\nAuthorization: token {TOKEN}\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head + b"\r\n" + extra.encode() + b"Connection: close\r\n\r\n" + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.read().decode()


async def first_message(url: str, headers: dict[str, str] | None = None) -> tuple[Any, int | None, str | None]:
    """Open a WebSocket; return its first message (None when it was closed instead), close code and reason."""
    ws = await websocket.websocket_connect(httpclient.HTTPRequest(url, headers=headers))
    try:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        return (json.loads(msg) if msg is not None else None), ws.close_code, ws.close_reason
    finally:
        ws.close()


def test_hostile_urls_reach_the_gateway_as_sent_never_a_500(lab: str) -> None:
    """Found by a review: a query value not in UTF-8 and a control character in the path were 500s with a
    traceback, and the path went on decoded, so an encoded '?' or '#' in a segment cut the route short."""
    c = httpx.Client(base_url=lab, headers=AUTH, timeout=30)
    # the gateway's own answer (x is no argument of /api/plugins); `token`, Jupyter's, is not forwarded
    r = c.get(f"/bkg/api/api/plugins?x=%ff&token={TOKEN}")
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.x", r.text
    r = c.get("/bkg/api/api/nothing%3Fx%23y")  # one segment (decoded: a path `nothing`, a query, a fragment)
    assert r.status_code == 404 and r.json()["error"]["message"].endswith("GET /api/nothing%3Fx%23y"), r.text
    for path in ("/bkg/api/api/plugins%0Ax", "/bkg/api/api/%ff"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    # what cannot be sent on is a 400 in the proxy's error shape: a URL past httpx's limit once encoded, a
    # Content-Type that is not ASCII
    status, answer = raw_request(lab, b"GET /bkg/api/api/" + "\u00e9".encode() * 12_000 + b" HTTP/1.1")
    assert status == 400 and json.loads(answer)["error"]["code"] == "bad_request", answer
    assert "URL too long" in json.loads(answer)["error"]["message"]
    head = b"POST /bkg/api/api/collections HTTP/1.1\r\nContent-Type: application/json\xff"
    status, answer = raw_request(lab, head, b"{}")
    assert status == 400 and json.loads(answer)["error"] == {
        "status": 400, "code": "bad_request", "message": "the Content-Type header holds a character that is not ASCII"
    }, answer  # fmt: skip


def test_dot_segments_never_leave_the_gateway_url_s_path(tmp_path: Path) -> None:
    """Found by a review: with the gateway behind a path (`<host>/services/bkg`), `GET /bkg/api/../../hub/api/user`
    reached `<host>/hub/api/user`, with the lab's key (httpx resolves dot segments, as a browser would have)."""
    with (
        recording_server(lambda path: (200, {"path": path})) as behind,
        jupyter_server(tmp_path, f"{behind.url}/services/bkg", TOKEN) as url,
    ):
        for raw in (b"/bkg/api/../../hub/api/user", b"/bkg/api/api/./plugins", b"/bkg/api/..", b"/bkg/api/."):
            status, answer = raw_request(url, b"GET " + raw + b" HTTP/1.1")
            assert status == 400 and "'..' segment" in json.loads(answer)["error"]["message"], (raw, answer)
        assert behind.seen == []  # nothing was sent on
        status, answer = raw_request(url, b"GET /bkg/api/api/plugins HTTP/1.1")
        assert status == 200 and behind.seen == [("/services/bkg/api/plugins", f"Bearer {ADMIN_KEY}")], answer
        status, answer = raw_request(url, b"GET /bkg/api/%2e%2e/%2e%2e/hub HTTP/1.1")  # encoded: stays inside
        assert status == 200 and behind.seen[-1][0].startswith("/services/bkg/"), behind.seen


def test_a_refused_handshake_opens_no_gateway_socket(lab: str) -> None:
    """Found by a review: the gateway's socket was opened before tornado and Jupyter checked the handshake, and a
    refused one (no Upgrade: 400; another origin: 403) left it open; past 32 the user's live socket was refused."""
    c = httpx.Client(base_url=lab, timeout=30)
    live = lab.replace("http://", "ws://") + "/bkg/ws"
    for _ in range(MAX_PER_USER + 1):
        assert c.get("/bkg/ws", headers=AUTH).status_code == 400
    msg, code, reason = asyncio.run(first_message(f"{live}?token={TOKEN}"))
    assert msg is not None and msg["type"] == "bootstrap", (code, reason)
    c.get(f"/login?token={TOKEN}")  # a cookie, as a page of another site would send along
    elsewhere = {"Cookie": "; ".join(f"{k}={v}" for k, v in c.cookies.items()), "Origin": "http://elsewhere.example"}

    async def from_elsewhere() -> None:
        for _ in range(MAX_PER_USER + 1):
            with pytest.raises(httpclient.HTTPClientError) as refused:
                await websocket.websocket_connect(httpclient.HTTPRequest(live, headers=elsewhere))
            assert refused.value.code == 403

    asyncio.run(from_elsewhere())
    msg, code, reason = asyncio.run(first_message(f"{live}?token={TOKEN}"))
    assert msg is not None and msg["type"] == "bootstrap", (code, reason)


def test_the_browser_gets_the_gateway_s_close_code_and_reason(lab: str, gw: Gateway) -> None:
    """Found by a review: every close by the gateway reached the browser as 1011 "the bkg gateway closed the
    connection", a refusal for too many sockets included."""
    direct = gw.url.replace("http://", "ws://") + f"/ws?token={ADMIN_KEY}"

    async def refused_when_full() -> tuple[Any, int | None, str | None]:
        held: list[websocket.WebSocketClientConnection] = []
        try:
            # filled twice, a moment apart: a socket an earlier test closed may leave the gateway meanwhile
            for _ in range(2):
                for _ in range(MAX_PER_USER + 1):
                    ws = await websocket.websocket_connect(direct)
                    if await asyncio.wait_for(ws.read_message(), 30) is None:  # refused: the user has them all
                        break
                    held.append(ws)
                await asyncio.sleep(0.5)
            assert len(held) <= MAX_PER_USER
            return await first_message(lab.replace("http://", "ws://") + f"/bkg/ws?token={TOKEN}")
        finally:
            for ws in held:
                ws.close()

    msg, code, reason = asyncio.run(refused_when_full())
    assert msg is None and code == 4429, (msg, code, reason)
    assert reason is not None and f"live sockets open (at most {MAX_PER_USER})" in reason


def test_a_gateway_that_cannot_be_reached_closes_the_socket_saying_so(tmp_path: Path) -> None:
    """The browser's socket is open before the gateway's is tried: a gateway that does not answer closes it with
    1011 and why (it was an HTTP 502 the browser never sees)."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    with jupyter_server(tmp_path, nowhere, TOKEN) as url:
        msg, code, reason = asyncio.run(first_message(url.replace("http://", "ws://") + f"/bkg/ws?token={TOKEN}"))
        assert msg is None and code == 1011 and reason is not None, (msg, code, reason)
        assert reason.startswith("cannot reach the bkg gateway")
        r = httpx.get(f"{url}/bkg/api/api/plugins", headers=AUTH, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "gateway_unreachable", r.text
