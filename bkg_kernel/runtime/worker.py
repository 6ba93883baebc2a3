"""The worker process: a thin host around one plugin object, talking to the gateway over a pipe.

Messages, parent to child: ("invoke", req_id, capability, data, call) | ("stream", req_id, capability, data, call) |
("cancel", req_id) | ("health", req_id) | ("store_chunk", store_id, data) | ("store_result", store_id, ok, data) |
("stop",). Child to parent: ("ready", pid) | ("failed", message) | ("chunk", req_id, data) |
("result", req_id, ok, data) | ("store", store_id, grant, op, arguments) | ("store_close", store_id) |
("heartbeat", monotonic_time) | ("log", level, unix_time, message, level_number).
A stream sends its chunks, then one result (None when it ran to the end or was cancelled); so does a streamed
store answer (`chat_stream`), whose reader says `store_close` when it stops reading early.

`call` is `{"caller": Principal.to_dict(), "grant": str}`. The grant is the worker's only credential: the gateway
made it for that one request and honours store requests that carry it while the request runs, as its caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import BkgError, Unavailable, error_data, from_dict
from bkg_kernel.runtime import calls, pipe
from bkg_kernel.runtime.bodyjson import RawJSON
from bkg_kernel.runtime.contract import MAX_CONCURRENT, QUICK_CONCURRENT
from bkg_kernel.runtime.storehandle import StoreHandle

HEARTBEAT_S = 1.0


class _PipeLog(logging.Handler):
    def __init__(self, send: Any) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # the pipe is gone: the parent will notice the exit
            self.send(("log", record.levelname, record.created, self.format(record), record.levelno))


def _call(data: dict[str, Any] | None) -> calls.Call | None:
    if data is None:
        return None
    return calls.Call(Principal.from_dict(data["caller"]), data.get("grant"))


def _data(data: Any) -> Any:
    """A call's input: a big request body comes as its JSON bytes (`RawJSON`), parsed here on the request's own
    thread rather than in the gateway, so the plugin always gets JSON data."""
    return data.object() if isinstance(data, RawJSON) else data


WORKER_NICE = 5
PR_SET_PDEATHSIG = 1


def die_with_gateway(gateway_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the gateway's worker-starting thread ends, i.e. when the gateway
    process ends (Linux). Reading the pipe's end is not enough: a call that holds the GIL (a regular expression
    backtracking without end) keeps the reader from ever running, and such a worker outlived its gateway."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != gateway_pid:  # the gateway was gone before the request took effect
        os._exit(0)


def main(
    conn: Connection,
    module: str,
    class_name: str,
    settings: dict[str, Any],
    data_dir: str,
    model_dir: str,
    gateway_pid: int,
) -> None:
    """Run one plugin until told to stop or the parent goes away."""
    die_with_gateway(gateway_pid)
    sys.setswitchinterval(0.0005)  # hand requests from the reader thread to the pool without a 5 ms GIL wait
    # Workers run the models; the gateway answers everyone (health, auth, routing). Under CPU contention the
    # scheduler favours the gateway, so a busy plugin never makes /health or another plugin's requests wait.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    pending: dict[int, Future[Any]] = {}
    streamed: dict[int, queue.SimpleQueue[tuple[Any, ...]]] = {}  # streamed store answers being read
    store_ids = itertools.count(1)

    def store_send(op: str, args: dict[str, Any]) -> Any:
        call = calls.for_store()
        if call.grant is None:  # a call the gateway did not send: it holds no grant to act with
            raise Unavailable("this call holds no grant from the gateway: it cannot reach the store")
        fut: Future[Any] = Future()
        sid = next(store_ids)
        pending[sid] = fut
        try:
            send(("store", sid, call.grant, op, args))
            return fut.result()
        finally:
            pending.pop(sid, None)

    def store_stream(op: str, args: dict[str, Any]) -> Iterator[Any]:
        """A streamed store answer's chunks as the gateway sends them; closed early, the gateway stops it."""
        call = calls.for_store()
        if call.grant is None:
            raise Unavailable("this call holds no grant from the gateway: it cannot reach the store")
        sid = next(store_ids)
        got: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        streamed[sid] = got
        try:
            send(("store", sid, call.grant, op, args))
        except BaseException:
            streamed.pop(sid, None)
            raise

        def chunks() -> Iterator[Any]:
            ended = False
            try:
                while True:
                    item = got.get()
                    if item[0] == "chunk":
                        yield item[1]
                        continue
                    ended = True
                    if not item[1]:
                        raise from_dict(item[2])
                    return
            finally:
                streamed.pop(sid, None)
                if not ended:
                    with contextlib.suppress(OSError):
                        send(("store_close", sid))

        return chunks()

    root = logging.getLogger()
    root.handlers[:] = [_PipeLog(send)]
    root.setLevel(logging.INFO)
    for chatty in ("httpx", "httpcore"):  # a line per request, the whole address in it (a password too): not shown
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        cls = getattr(importlib.import_module(module), class_name)
        plugin = cls.create(
            cls.Settings.model_validate(settings),
            Path(data_dir),
            model_dir=Path(model_dir),
            store=StoreHandle(store_send, open_stream=store_stream),
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
    # a thread for each call the gateway lets through (its slots: `max_concurrent`, which it changes without a
    # restart); threads are made as calls come and kept, never more than calls ran at once
    pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="bkg-req")
    # `quick` capabilities (a model list) run on threads of their own: the request threads may all be generating
    quick_pool = ThreadPoolExecutor(max_workers=QUICK_CONCURRENT, thread_name_prefix="bkg-quick")
    quick = {c.id for c in cls.capabilities().values() if c.quick}
    retunes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bkg-retune")  # one at a time, first come first

    def run(req_id: int, call: calls.Call | None, fn: Any, *args: Any) -> None:
        try:
            with calls.running(call):
                result = fn(*args)
            send(("result", req_id, True, result))
        except BaseException as exc:
            if not isinstance(exc, BkgError):
                logging.getLogger(f"bkg.plugin.{cls.id}").error("request failed: %s", traceback.format_exc())
            send(("result", req_id, False, error_data(exc)))
        finally:
            running.pop(req_id, None)

    running: dict[int, calls.Call] = {}  # the calls under way, by request: a ("cancel", id) ends one (sets its stop)

    def begun(req_id: int, data: dict[str, Any] | None) -> calls.Call | None:
        call = _call(data)
        if call is not None:
            running[req_id] = call
        return call

    def stream(req_id: int, capability_id: str, data: Any, call: calls.Call | None) -> None:
        cancelled = call.stop if call is not None else threading.Event()
        try:
            with calls.running(call):
                for chunk in plugin.stream(capability_id, _data(data), cancelled):
                    send(("chunk", req_id, chunk))
                    if cancelled.is_set():
                        break
            send(("result", req_id, True, None))
        except BaseException as exc:
            if not isinstance(exc, BkgError):
                logging.getLogger(f"bkg.plugin.{cls.id}").error("stream failed: %s", traceback.format_exc())
            send(("result", req_id, False, error_data(exc)))
        finally:
            running.pop(req_id, None)

    try:
        while True:
            try:
                msg = pipe.recv(conn)  # the gateway sends with pipe.frames
            except (EOFError, OSError):
                break  # the gateway is gone
            if msg[0] == "store_chunk":
                if (got := streamed.get(msg[1])) is not None:
                    got.put(("chunk", msg[2]))
            elif msg[0] == "store_result":
                if (got := streamed.get(msg[1])) is not None:
                    got.put(("end", msg[2], msg[3]))
                    continue
                fut = pending.get(msg[1])
                if fut is not None:
                    fut.set_result(msg[3]) if msg[2] else fut.set_exception(from_dict(msg[3]))
            elif msg[0] == "invoke":
                call = begun(msg[1], msg[4])
                on = quick_pool if msg[2] in quick else pool
                on.submit(run, msg[1], call, lambda cap, data: plugin.invoke(cap, _data(data)), msg[2], msg[3])
            elif msg[0] == "stream":
                pool.submit(stream, msg[1], msg[2], msg[3], begun(msg[1], msg[4]))
            elif msg[0] == "cancel":  # a stream's client went away, or nobody waits for an answer any more
                if (abandoned := running.get(msg[1])) is not None:
                    abandoned.end()
            elif msg[0] == "retune":  # new settings the plugin takes while running: in the order they came
                retunes.submit(run, msg[1], None, lambda d: plugin.retune(cls.Settings.model_validate(d)), msg[2])
            elif msg[0] == "health":  # its own thread: a health check never queues behind busy request slots
                threading.Thread(target=run, args=(msg[1], None, plugin.health), name="bkg-health", daemon=True).start()
            elif msg[0] == "stop":
                break
    finally:
        stop.set()
        for abandoned in list(running.values()):
            abandoned.end()
        for fut in list(pending.values()):
            fut.set_exception(Unavailable("the gateway is gone"))
        for got in list(streamed.values()):
            got.put(("end", False, Unavailable("the gateway is gone").to_dict()["error"]))
        pool.shutdown(wait=True, cancel_futures=True)
        quick_pool.shutdown(wait=True, cancel_futures=True)
        retunes.shutdown(wait=True, cancel_futures=True)
        try:
            plugin.stop()
        except Exception:
            logging.getLogger("bkg.worker").error("stop failed: %s", traceback.format_exc())
