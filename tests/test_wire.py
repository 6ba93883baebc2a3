"""The call port's wire on real sockets: frames whole or in pieces, the bytes past a frame kept for the next, and
every wait bounded by the kernel (a socket pair; the call port itself is tested in test_callport.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bkg_kernel.wire import Wire


@pytest.fixture
def pair() -> Iterator[tuple[Wire, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield Wire(a), b
    finally:
        a.close()
        b.close()


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_frames_come_whole_or_in_pieces_and_a_second_one_waits_its_turn(pair: tuple[Wire, socket.socket]) -> None:
    wire, other = pair
    assert wire.sock.gettimeout() is None  # blocking: the kernel bounds the waits, no poll before each read
    other.sendall(_frame(b"one") + _frame(b"two") + _frame(b"thr"))  # three in one write
    assert [wire.read(1.0, 100, 1.0) for _ in range(3)] == [b"one", b"two", b"thr"]
    data = _frame(b"x" * 1000)

    def trickle() -> None:
        for i in range(0, len(data), 97):
            other.sendall(data[i : i + 97])
            time.sleep(0.002)

    threading.Thread(target=trickle).start()
    assert wire.read(1.0, 2000, 2.0) == b"x" * 1000
    other.sendall(_frame(b"") + _frame(b"z"))
    assert wire.read(1.0, 10, 1.0) == b"" and wire.read(1.0, 10, 1.0) == b"z"


def test_a_frame_over_the_limit_is_not_read(pair: tuple[Wire, socket.socket]) -> None:
    wire, other = pair
    other.sendall(_frame(b"y" * 500))
    assert wire.read(1.0, 100, 1.0) == 500  # its size, for the 413; the connection closes after the answer


def test_silence_a_stalled_frame_and_a_close_mid_frame(pair: tuple[Wire, socket.socket]) -> None:
    wire, other = pair
    t0 = time.monotonic()
    assert wire.read(0.2, 100, 1.0) is None  # nothing for `idle` seconds
    assert time.monotonic() - t0 > 0.15  # the kernel's wait, which never ends early
    other.sendall(_frame(b"abcdef")[:6])  # the length and two bytes, then nothing
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        wire.read(60.0, 100, 0.3)
    # `within` (0.3 s) fired, not `idle` (60 s): far apart, so this says which one, not how fast
    assert time.monotonic() - t0 < 30
    wire.pending = b""
    other.sendall(_frame(b"abcdef")[:7])
    other.shutdown(socket.SHUT_WR)
    with pytest.raises(ValueError, match="closed inside a frame"):
        wire.read(1.0, 100, 1.0)
    assert wire.read(0.2, 100, 1.0) is None  # closed


def test_a_frame_trickled_past_its_whole_deadline_is_cut_off(pair: tuple[Wire, socket.socket]) -> None:
    wire, other = pair
    data = _frame(b"h" * 1200)
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(data)):
            if stop.is_set():
                return
            other.sendall(data[i : i + 1])
            time.sleep(0.05)  # 1204 bytes at 20 a second: a minute, each byte well within `idle`

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        with pytest.raises(TimeoutError):
            wire.read(0.5, 2000, 600.0, whole=True)  # a hello: all of it within `idle`, however steadily it comes
        # cut off while the bytes still come: neither `within` nor an `idle` per read would have ended it
        assert sender.is_alive()
    finally:
        stop.set()
        sender.join(5)  # done with the socket before the fixture closes it


def test_a_frame_bigger_than_the_sockets_buffer_goes_whole_or_times_out(pair: tuple[Wire, socket.socket]) -> None:
    wire, other = pair
    body = bytes(range(256)) * 40_000  # 10 MB: more than a socket buffer holds
    got = bytearray()

    def drain() -> None:
        while len(got) < 4 + len(body):
            got.extend(other.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    wire.send(b"head\n", body, within=10.0)
    reader.join(10)
    assert bytes(got) == _frame(b"head\n" + body)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):  # nobody reads: the frame does not go, and the write gives up in time
        wire.send(b"head\n", body, within=0.3)
    assert time.monotonic() - t0 < 15  # its own `within`, not the default 30 s: which deadline, not how fast
