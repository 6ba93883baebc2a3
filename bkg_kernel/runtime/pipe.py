"""Messages from the gateway to a plugin worker: pickled, with a big body's bytes sent beside the pickle.

A worker plugin's big call travels as `RawJSON` (its request body's bytes, up to `max_body_mb`). Pickled the usual
way, those bytes are copied into the pickle in one C call that holds the interpreter lock (a 32 MB body: ~16 ms
during which the gateway's event loop cannot run, whichever thread pickles). Here they go out of band (pickle
protocol 5): the pickle refers to them, and the pipe writes them as they are, in chunks, the lock released while
each chunk is written. A message with such buffers is one header frame (`OOB` and how many buffers follow), the
pickle, then each buffer; any other message is its pickle alone, as `Connection.send` writes it.
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.connection import Connection
from typing import Any

OOB = b"\x00bkg-oob"  # a pickle of protocol 2 or later starts with 0x80: this header cannot be one


def frames(msg: Any) -> list[bytes | memoryview]:
    """The frames that carry `msg` (raises what pickling raises: the sender's error)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickle.Pickler(out, 5, buffer_callback=buffers.append).dump(msg)  # plain data: no process handles cross here
    data = out.getbuffer()
    if not buffers:
        return [data]
    return [OOB + len(buffers).to_bytes(4, "big"), data, *(b.raw() for b in buffers)]


def recv(conn: Connection) -> Any:
    """The next message `frames` made, read from `conn` (EOFError / OSError when the other side is gone)."""
    first = conn.recv_bytes()
    if not first.startswith(OOB):
        return pickle.loads(first)
    count = int.from_bytes(first[len(OOB) :], "big")
    data = conn.recv_bytes()
    return pickle.loads(data, buffers=[conn.recv_bytes() for _ in range(count)])
