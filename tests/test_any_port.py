"""BKG_PORT=0, any free port: `bkg.connect()` finds the port the data dir's gateway took in its gateway.json, starts
one there when none runs, and never trusts the port of a gateway.json that no gateway holds (one killed outright
leaves it behind, and with ports taken at random, that port may be anybody's by now)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from gateway_harness import ADMIN_KEY, start_gateway, wait_for

import bkg_kernel


@pytest.fixture
def any_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings that name a data dir under tmp_path, port 0 and the admin key; the data dir's path."""
    for name in ("BKG_GATEWAY_URL", "BKG_HOST", "BKG_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BKG_PORT", "0")
    monkeypatch.setenv("BKG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BKG_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("BKG_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("BKG_ADMIN_KEY", ADMIN_KEY)  # the admin key a gateway connect() starts makes at first start
    return tmp_path / "data"


@pytest.fixture
def stranger() -> Iterator[tuple[str, list[int]]]:
    """Something else listening on 127.0.0.1: its URL, and a list that grows by one per connection it takes."""
    taken: list[int] = []
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            taken.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", taken
    server.close()


def _stop_the_one_started(data: Path) -> None:
    pid = json.loads((data / "gateway.json").read_text())["pid"]
    proc = psutil.Process(pid)
    os.kill(pid, signal.SIGTERM)
    proc.wait(30)


def test_connect_starts_a_gateway_on_any_port_past_a_record_no_gateway_holds(
    any_port: Path, stranger: tuple[str, list[int]]
) -> None:
    url, taken = stranger
    any_port.mkdir()
    (any_port / "gateway.json").write_text(json.dumps({"pid": 1, "url": url}))  # left by a gateway killed outright
    wb = bkg_kernel.connect(timeout=90)
    try:
        assert wb.url != url and not wb.url.endswith(":0")
        assert wb.me()["username"] == "admin"
        wait_for(lambda: wb.health()["status"] == "ok", 90)  # its plugins come up in the background
        assert json.loads((any_port / "gateway.json").read_text())["url"] == wb.url
        assert taken == []  # nothing, not even /health, went to the port the old record named
    finally:
        _stop_the_one_started(any_port)


def test_connect_finds_the_running_gateway_on_the_port_it_took(any_port: Path) -> None:
    g = start_gateway(any_port, plugins=["sysinfo"])  # `bkg serve --port 0`
    try:
        wb = bkg_kernel.connect(timeout=5)
        assert wb.url == g.url and not g.url.endswith(":0")
        assert wb.plugins[0]["id"] == "sysinfo"
    finally:
        g.stop()


def test_a_port_picked_for_a_later_bind_is_outside_the_range_outgoing_connections_use() -> None:
    """What a server that cannot take port 0 gets (`bkg hub`'s Hub, proxy and gateway; the tests' Voila): a free
    port below `ip_local_port_range`, so no connection opened before the server binds it can have taken it."""
    from bkg_kernel import hub

    low, high = hub._outgoing_ports()
    ports = {hub.free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports) and len(ports) > 1, ports
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as out:
        assert low <= out.getsockname()[1] <= high  # where outgoing connections (and port 0) take theirs
