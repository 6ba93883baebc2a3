"""The call port's wire, both ends of it (`gateway/callport.py`, `client/callport.py`): frames (a 4-byte big-endian
length, then the bytes) on a blocking socket whose waits the kernel bounds (`SO_RCVTIMEO`, `SO_SNDTIMEO`).

A socket with a Python timeout polls before every read and write: two system calls where one does, four extra on
every call (the client's write and read, the gateway's read and write). Here a read is one `recv` of up to
`READ_BYTES` (a call, or a page of hits, comes in one), the bytes past a frame are kept for the next, and a frame
goes out in one `sendmsg` of its head and its body as they are (no copy of the body into one buffer). A frame that
comes or goes in pieces is held to its deadline as a whole, however slowly its bytes move.
"""

from __future__ import annotations

import socket
import struct
import time

READ_BYTES = 256 * 1024


class Wire:
    """One end of a connection: frames in (`read`) and out (`send`); `sock` stays blocking (its timeout None)."""

    __slots__ = ("sock", "pending", "_read_s", "_write_s")

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.pending = b""  # read past the last frame: the start of the next
        self._read_s = self._write_s = -1.0  # what the kernel has now

    def _waits(self, option: int, seconds: float) -> None:
        sec = int(seconds)
        usec = int((seconds - sec) * 1_000_000) or (0 if sec else 1)  # 0 s would mean no limit at all
        self.sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", sec, usec))

    def _read_wait(self, seconds: float) -> None:
        if seconds != self._read_s:
            self._waits(socket.SO_RCVTIMEO, seconds)
            self._read_s = seconds

    def _write_wait(self, seconds: float) -> None:
        if seconds != self._write_s:
            self._waits(socket.SO_SNDTIMEO, seconds)
            self._write_s = seconds

    def read(self, idle: float, limit: int, within: float, whole: bool = False) -> bytes | int | None:
        """The next frame's bytes: None when the other end closed the connection, or sent nothing for `idle`
        seconds; the size it announced, not read, when that is over `limit`. Once its first bytes are in, the rest
        must come within `within` seconds (`whole`: the whole frame within `idle`), else TimeoutError; ValueError
        when the other end closes inside a frame."""
        start = time.monotonic()
        buf: bytes | bytearray = self.pending
        if not buf:
            self._read_wait(idle)
            try:
                buf = self.sock.recv(READ_BYTES)
            except (TimeoutError, BlockingIOError):  # the kernel's wait ran out
                return None
            if not buf:
                return None
        deadline = 0.0  # set once the frame turns out to come in pieces (the usual one comes whole, in one read)
        while True:
            if len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if size > limit:
                    self.pending = b""
                    return size
                if len(buf) >= 4 + size:
                    self.pending = bytes(buf[4 + size :])
                    return bytes(buf[4 : 4 + size])
            if not deadline:
                deadline = (start + idle) if whole else time.monotonic() + within
                buf, self.pending = bytearray(buf), b""  # the pieces gather here
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("a frame came too slowly")
            self._read_wait(left)
            try:
                got = self.sock.recv(READ_BYTES)
            except BlockingIOError:
                raise TimeoutError("a frame came too slowly") from None
            if not got:
                raise ValueError("the connection closed inside a frame")
            buf += got

    def send(self, head: bytes, body: bytes = b"", within: float = 30.0) -> None:
        """Write one frame, `head` then `body`, all of it within `within` seconds (else TimeoutError)."""
        prefix = (len(head) + len(body)).to_bytes(4, "big") + head
        self._write_wait(within)
        try:
            sent = self.sock.sendmsg([prefix, body]) if body else self.sock.send(prefix)
        except BlockingIOError:
            raise TimeoutError("the other end did not take a frame in time") from None
        total = len(prefix) + len(body)
        if sent == total:
            return
        deadline = time.monotonic() + within
        rest = memoryview(prefix + body)[sent:]  # the rare frame that does not fit the socket's buffer at once
        while rest:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the other end did not take a frame in time")
            self._write_wait(left)
            try:
                rest = rest[self.sock.send(rest) :]
            except BlockingIOError:
                raise TimeoutError("the other end did not take a frame in time") from None
