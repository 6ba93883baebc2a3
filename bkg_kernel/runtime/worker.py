"""The worker process: a thin host around one plugin object, talking to the gateway over a pipe.

Messages, parent to child: ("invoke", req_id, capability, data) | ("stream", req_id, capability, data) |
("cancel", req_id) | ("health", req_id) | ("stop",).
Child to parent: ("ready", pid) | ("failed", message) | ("chunk", req_id, data) | ("result", req_id, ok, data) |
("heartbeat", monotonic_time) | ("log", level, unix_time, message).
A stream sends its chunks, then one result (None when it ran to the end or was cancelled).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bkg_kernel.errors import BkgError

HEARTBEAT_S = 1.0


class _PipeLog(logging.Handler):
    def __init__(self, send: Any) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # the pipe is gone: the parent will notice the exit
            self.send(("log", record.levelname, record.created, self.format(record)))


def error_data(exc: BaseException) -> dict[str, Any]:
    """Return the JSON error body of an exception raised by a plugin."""
    if isinstance(exc, BkgError):
        return exc.to_dict()["error"]
    return {"status": 500, "code": "plugin_error", "message": f"{type(exc).__name__}: {exc}"}


def main(
    conn: Connection,
    module: str,
    class_name: str,
    settings: dict[str, Any],
    data_dir: str,
    model_dir: str,
    gateway: tuple[str, str] | None = None,
) -> None:
    """Run one plugin until told to stop or the parent goes away."""
    sys.setswitchinterval(0.0005)  # hand requests from the reader thread to the pool without a 5 ms GIL wait
    lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    root = logging.getLogger()
    root.handlers[:] = [_PipeLog(send)]
    root.setLevel(logging.INFO)
    try:
        cls = getattr(importlib.import_module(module), class_name)
        plugin = cls.create(
            cls.Settings.model_validate(settings), Path(data_dir), model_dir=Path(model_dir), gateway=gateway
        )
        plugin.start()
    except Exception as exc:
        logging.getLogger("bkg.worker").error("start failed: %s", traceback.format_exc())
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", os.getpid()))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                send(("heartbeat", time.monotonic()))
            except OSError:
                return

    threading.Thread(target=beat, daemon=True).start()
    pool = ThreadPoolExecutor(max_workers=plugin.settings.max_concurrent, thread_name_prefix="bkg-req")

    def run(req_id: int, fn: Any, *args: Any) -> None:
        try:
            send(("result", req_id, True, fn(*args)))
        except BaseException as exc:
            if not isinstance(exc, BkgError):
                logging.getLogger(f"bkg.plugin.{cls.id}").error("request failed: %s", traceback.format_exc())
            send(("result", req_id, False, error_data(exc)))

    cancels: dict[int, threading.Event] = {}

    def stream(req_id: int, capability_id: str, data: Any) -> None:
        cancelled = cancels[req_id]
        try:
            for chunk in plugin.stream(capability_id, data, cancelled):
                send(("chunk", req_id, chunk))
                if cancelled.is_set():
                    break
            send(("result", req_id, True, None))
        except BaseException as exc:
            if not isinstance(exc, BkgError):
                logging.getLogger(f"bkg.plugin.{cls.id}").error("stream failed: %s", traceback.format_exc())
            send(("result", req_id, False, error_data(exc)))
        finally:
            cancels.pop(req_id, None)

    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the gateway is gone
            if msg[0] == "invoke":
                pool.submit(run, msg[1], plugin.invoke, msg[2], msg[3])
            elif msg[0] == "stream":
                cancels[msg[1]] = threading.Event()
                pool.submit(stream, msg[1], msg[2], msg[3])
            elif msg[0] == "cancel":
                ev = cancels.get(msg[1])
                if ev is not None:
                    ev.set()
            elif msg[0] == "health":
                pool.submit(run, msg[1], plugin.health)
            elif msg[0] == "stop":
                break
    finally:
        stop.set()
        for ev in list(cancels.values()):
            ev.set()
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            plugin.stop()
        except Exception:
            logging.getLogger("bkg.worker").error("stop failed: %s", traceback.format_exc())
