"""`/bkg/ws` keep-alive, between a real Jupyter server with the extension and a real gateway on 127.0.0.1: the proxy
pings the browser at Jupyter Server's `websocket_ping_interval`; a browser that stops answering is closed, and so is
the proxy's socket to the gateway (it stayed open until TCP gave up, hours); one that answers stays; a gateway that
stops answering closes the browser's socket."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator

import psutil
import pytest
from gateway_harness import Gateway, wait_for
from helpers import jupyter_server
from tornado import websocket

PLUGINS = ["apikeys"]  # the module's gateway (conftest's `gw`) starts no plugin worker it does not use
TOKEN = "bkg-ping-test-token"
PING_S = 1  # Jupyter Server's websocket_ping_interval and websocket_ping_timeout here (whole seconds: Integer traits)


@pytest.fixture(scope="module")
def lab(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pings = (f"--ServerApp.websocket_ping_interval={PING_S}", f"--ServerApp.websocket_ping_timeout={PING_S}")
    with jupyter_server(tmp_path_factory.mktemp("pingroot"), gw.url, TOKEN, *pings) as url:
        yield url


def gateway_sockets(gw: Gateway) -> int:
    """Connections the gateway's process holds open on its port (the proxy's sockets to it, here)."""
    port = int(gw.url.rsplit(":", 1)[1])
    conns = psutil.Process(gw.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port and c.raddr)


class MuteBrowser:
    """A WebSocket client on a raw socket that reads every frame and answers none, pings included: a browser whose
    laptop was shut (tornado's client would answer pings by itself)."""

    def __init__(self, lab: str) -> None:
        host, port = lab.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /bkg/ws?token={TOKEN} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the TCP connection")
        return data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self, timeout: float) -> tuple[int, bytes]:
        """The next frame from the server (unmasked, unfragmented here): its opcode and payload."""
        self.sock.settimeout(timeout)
        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._take(8))
        return b0 & 0x0F, self._take(n)

    def close(self) -> None:
        self.sock.close()


def test_jupyter_server_s_ping_settings_are_honoured_with_its_defaults_otherwise() -> None:
    """`websocket_ping_interval` / `websocket_ping_timeout` (seconds) when set; otherwise what Jupyter Server's
    kernel sockets use (`ws_ping_interval` / `ws_ping_timeout` in ms: 30 s and 90 s by default; 0: no pings)."""
    from jupyterlab_bkg.handlers import keep_alive

    jupyter_defaults = {"websocket_ping_interval": 0, "websocket_ping_timeout": 0}  # ServerApp's, traits unset
    assert keep_alive(jupyter_defaults) == (30.0, 90.0)
    assert keep_alive({}) == (30.0, 90.0)
    assert keep_alive({"websocket_ping_interval": 5, "websocket_ping_timeout": 0}) == (5.0, 5.0)
    assert keep_alive({"websocket_ping_interval": 5, "websocket_ping_timeout": 2}) == (5.0, 2.0)
    assert keep_alive({"websocket_ping_interval": 5, "websocket_ping_timeout": 60}) == (5.0, 5.0)  # as tornado
    assert keep_alive({**jupyter_defaults, "ws_ping_interval": 10_000}) == (10.0, 30.0)
    assert keep_alive({**jupyter_defaults, "ws_ping_interval": 10_000, "ws_ping_timeout": 15_000}) == (10.0, 15.0)
    assert keep_alive({**jupyter_defaults, "ws_ping_interval": 0}) == (0.0, 0.0)


def test_a_browser_that_stops_answering_pings_is_closed_and_so_is_the_gateway_s_socket(lab: str, gw: Gateway) -> None:
    """Found by a review: the proxy sent no pings, so a browser gone without a close (a laptop shut, a network
    dropped) held the proxy's socket to the gateway, and one of the user's 32 live sockets there, until TCP gave up.
    """
    before = gateway_sockets(gw)
    browser = MuteBrowser(lab)
    try:
        opcode, payload = browser.frame(timeout=30)
        assert opcode == 0x1 and json.loads(payload)["type"] == "bootstrap", (opcode, payload[:200])
        assert gateway_sockets(gw) == before + 1
        started, seen = time.monotonic(), list[int]()
        while True:
            try:
                opcode, payload = browser.frame(timeout=4 * PING_S)
            except TimeoutError:
                raise AssertionError(f"not closed {4 * PING_S} s after the last frame; frames seen: {seen}") from None
            seen.append(opcode)
            if opcode == 0x8:
                break
        waited = time.monotonic() - started
    finally:
        browser.close()
    # pinged, unanswered, then closed "going away", within one interval and one timeout (and the loop's slack)
    assert seen[0] == 0x9 and seen[-1] == 0x8, seen
    assert waited < 2 * PING_S + 1.5, waited
    assert struct.unpack(">H", payload[:2])[0] == 1001 and payload[2:] == b"no answer to pings", payload
    # the gateway's side is closed too, at once (not when TCP gives up)
    wait_for(lambda: gateway_sockets(gw) == before, timeout=2 * PING_S)


def test_a_browser_that_answers_pings_keeps_its_socket(lab: str, gw: Gateway) -> None:
    """Pings close only a socket that does not answer: an idle browser (tornado's client answers pings) still has
    its socket, and the gateway's, after several timeouts."""

    async def idle() -> tuple[dict[str, object], int]:
        ws = await websocket.websocket_connect(lab.replace("http://", "ws://") + f"/bkg/ws?token={TOKEN}")
        try:
            first = await asyncio.wait_for(ws.read_message(), 30)
            assert first is not None and json.loads(first)["type"] == "bootstrap"
            open_there = gateway_sockets(gw)
            await asyncio.sleep(3.5 * PING_S)
            await ws.write_message(json.dumps({"action": "sub", "topic": "status"}))
            answer = await asyncio.wait_for(ws.read_message(), 10)
            assert answer is not None, (ws.close_code, ws.close_reason)
            assert gateway_sockets(gw) == open_there
            return json.loads(answer), open_there
        finally:
            ws.close()

    before = gateway_sockets(gw)
    answer, open_there = asyncio.run(idle())
    assert answer["type"] == "ack", answer
    assert open_there == before + 1


def test_a_gateway_that_stops_answering_closes_the_browser_s_socket(lab: str, gw: Gateway) -> None:
    """The proxy pings the gateway too: one that went silent (here: stopped with SIGSTOP; a machine gone, a network
    dropped) closes the browser's socket with 1011 and why, and the panel reconnects. Last in the module: it
    freezes the module's gateway for a while."""

    async def frozen() -> tuple[str | bytes | None, int | None, str | None, float]:
        ws = await websocket.websocket_connect(lab.replace("http://", "ws://") + f"/bkg/ws?token={TOKEN}")
        try:
            first = await asyncio.wait_for(ws.read_message(), 30)
            assert first is not None and json.loads(first)["type"] == "bootstrap"
            os.kill(gw.proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            # one interval and one timeout, then tornado's 5 s for a closing handshake the gateway never answers
            msg = await asyncio.wait_for(ws.read_message(), 2 * PING_S + 10)
            return msg, ws.close_code, ws.close_reason, time.monotonic() - started
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)
            ws.close()

    msg, code, reason, waited = asyncio.run(frozen())
    assert msg is None and code == 1011 and reason == "lost the connection to the bkg gateway", (msg, code, reason)
    assert waited < 2 * PING_S + 7, waited
