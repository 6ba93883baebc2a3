"""A plugin's worker process, seen from the gateway: its pipe, the threads that read and write it, and the requests
in flight on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import ClientGone, InvalidInput, Unauthorized, Unavailable, error_data, from_dict
from bkg_kernel.runtime import pipe, worker
from bkg_kernel.runtime.bodyjson import TOO_DEEP

if TYPE_CHECKING:
    from bkg_kernel.runtime.host import PluginHost

log = logging.getLogger("bkg.supervisor")
# Serves workers' store requests (a store call may wait on another plugin, e.g. an embedding in candle): never
# on a pipe reader thread, which must keep delivering results.
_STORE_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="bkg-store")
# Every worker is started by this one thread, which lives as long as the gateway process. A worker asks the kernel to
# kill it when the thread that started it ends (PR_SET_PDEATHSIG): so when the gateway dies, however it dies, its
# workers go too, even one whose threads are stuck holding its GIL (the signal's default action needs no Python).
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bkg-spawn")


class _Request(Future[Any]):
    """A request sent to a worker: the future of its answer, its id, and the grant it carries (None: no caller)."""

    grant: str | None = None
    req_id: int = 0


class WorkerProcess:
    """A spawned worker and the thread that reads its pipe."""

    def __init__(self, host: PluginHost) -> None:
        assert host.cls is not None
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker.main,
            args=(
                child,
                host.cls.__module__,
                host.cls.__name__,
                host.settings.model_dump(),
                str(host.data_dir),
                str(host.model_dir),
                os.getpid(),
            ),
            name=f"bkg-plugin-{host.id}",
            daemon=True,
        )
        self.host = host
        self.ready = threading.Event()
        self.failed: str | None = None
        self.pid: int | None = None
        self.last_beat = time.monotonic()
        self.futures: dict[int, Future[Any]] = {}
        self.streams: dict[int, Callable[[tuple[Any, ...]], None]] = {}
        # grant -> caller, for the requests in flight: a store request from the worker acts as that caller
        self.grants: dict[str, Principal] = {}
        self.store_streaming: set[int] = set()  # streamed store answers being sent
        self.store_closed: set[int] = set()  # those of them the worker stopped reading
        self._ids = itertools.count(1)
        # Messages to the worker, pickled by the sender and written by one thread in order: the event loop never
        # writes to the pipe itself (a worker that stops reading, or a message bigger than the pipe's buffer,
        # would block it until the worker reads again, and stop() could not kill it meanwhile).
        self._outbox: queue.SimpleQueue[list[bytes | memoryview] | None] = queue.SimpleQueue()
        self._broken = False
        # The pipe's two threads (reader, writer) that may still use its descriptor: the last to end closes it. A
        # stop that closed it itself freed the number while a thread could still be about to read or write it;
        # the next worker's pipe took that number, and the old writer's ("stop",) reached the new worker, which
        # exited under the calls just sent to it (a CI run, a config change while the plugin was starting).
        self._users = 2
        self._users_lock = threading.Lock()
        _SPAWNER.submit(self.proc.start).result()
        child.close()
        threading.Thread(target=self._read, name=f"bkg-pipe-{host.id}", daemon=True).start()
        threading.Thread(target=self._write, name=f"bkg-pipe-out-{host.id}", daemon=True).start()

    def _read(self) -> None:
        try:
            self._read_until_the_end()
        finally:
            self.ready.set()
            self.fail_in_flight(f"the {self.host.id} worker exited while handling the request")
            self._leave()

    def _read_until_the_end(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "chunk":
                sink = self.streams.get(msg[1])
                if sink is not None:
                    sink(("chunk", msg[2]))
            elif kind == "result":
                sink = self.streams.pop(msg[1], None)  # one pop: a cancel may race this reader
                if sink is not None:
                    sink(("end", msg[2], msg[3]))
                    continue
                fut = self.futures.pop(msg[1], None)
                if fut is not None:
                    _settle(fut, msg[3] if msg[2] else None, None if msg[2] else from_dict(msg[3]))
            elif kind == "store":
                self._store_request(msg[1], msg[2], msg[3], msg[4])
            elif kind == "store_close":  # the worker stopped reading a streamed store answer (still going?)
                if msg[1] in self.store_streaming:
                    self.store_closed.add(msg[1])
            elif kind == "heartbeat":
                self.last_beat = time.monotonic()
            elif kind == "log":
                self.host.add_log(msg[1], msg[2], msg[3], msg[4])
            elif kind == "ready":
                self.pid = msg[1]
                self.last_beat = time.monotonic()
                self.ready.set()
            elif kind == "failed":
                self.failed = msg[1]
                self.ready.set()

    def _store_request(self, store_id: int, grant: str, op: str, args: dict[str, Any]) -> None:
        caller = self.grants.get(grant)
        if caller is None:
            err = Unauthorized(f"the {self.host.id} worker sent a store request for a call that is no longer running")
            self._send(("store_result", store_id, False, err.to_dict()["error"]))
            return
        if op == "chat_stream":  # held for a whole generation: a thread of its own, not one of the pool's
            threading.Thread(target=self._serve_store, args=(store_id, caller, op, args), daemon=True).start()
        else:
            _STORE_POOL.submit(self._serve_store, store_id, caller, op, args)

    def _serve_store(self, store_id: int, caller: Principal, op: str, args: dict[str, Any]) -> None:
        try:
            out = self.host.store_op(caller, op, args)
            if isinstance(out, Generator):  # a streamed answer (chat_stream): its chunks, then the end
                self._stream_store(store_id, out)
                out = None
            reply: tuple[Any, ...] = ("store_result", store_id, True, out)
        except Exception as exc:
            reply = ("store_result", store_id, False, error_data(exc))
        finally:
            self.store_closed.discard(store_id)
        self._send(reply)

    def _stream_store(self, store_id: int, chunks: Generator[Any, None, None]) -> None:
        """Send a streamed store answer's chunks as they come; stop it once the worker has closed its end (the
        plugin stopped reading: its own client left) or the worker is gone."""
        self.store_streaming.add(store_id)
        try:
            with contextlib.closing(chunks):
                for chunk in chunks:
                    if store_id in self.store_closed or not self._send(("store_chunk", store_id, chunk)):
                        return
        finally:
            self.store_streaming.discard(store_id)

    def _send(self, msg: tuple[Any, ...]) -> bool:
        """Queue a message for the worker (False once the pipe is known broken: the worker is gone)."""
        return self._put(_frames(msg))  # pickled here: errors are the caller's; a big body's bytes out of band

    def _put(self, data: list[bytes | memoryview]) -> bool:
        if self._broken:
            return False
        self._outbox.put(data)
        return True

    def _write(self) -> None:
        try:
            while (data := self._outbox.get()) is not None:
                try:
                    for frame in data:  # one writer: a message's frames go out together, in order
                        self.conn.send_bytes(frame)
                except (OSError, ValueError):  # the worker is gone: what waits on it gets its 503 now, not a timeout
                    self._broken = True
                    self.fail_in_flight(f"the {self.host.id} worker is not reachable")
                    return
        finally:
            self._leave()

    def _leave(self) -> None:
        """One of the pipe's threads ended; the last one closes the pipe."""
        with self._users_lock:
            self._users -= 1
            if self._users == 0:
                self.conn.close()

    def _hang_up(self) -> None:
        """Shut the pipe's socket down (its descriptor stays open): a reader blocked on it sees its end, and a writer
        blocked on a worker that stopped reading fails, so both threads end, even when a process the worker started
        still holds the other end."""
        with self._users_lock:  # under the lock: the descriptor is not closed (and its number reused) meanwhile
            if self._users == 0:
                return
            with contextlib.suppress(OSError):
                s = socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)  # a duplicate of it
                try:
                    s.shutdown(socket.SHUT_RDWR)
                finally:
                    s.close()

    def fail_in_flight(self, message: str) -> None:
        """Answer every request still waiting on this worker with a 503 (streams get it as their last event)."""
        for req_id in list(self.streams):
            sink = self.streams.pop(req_id, None)
            if sink is not None:
                sink(("end", False, Unavailable(message).to_dict()["error"]))
        for req_id in list(self.futures):
            fut = self.futures.pop(req_id, None)
            if fut is not None:
                _settle(fut, None, Unavailable(message))
        self.grants.clear()

    def submit(self, msg: tuple[Any, ...], caller: Principal | None = None) -> Future[Any]:
        """Send a request (as `caller`); the future resolves when the worker answers (or dies). The request's
        grant ends with it."""
        fut = _Request()
        req_id = next(self._ids)
        fut.req_id = req_id
        call = _call_data(caller) if caller is not None else None
        # pickled before anything is booked for it: a body that cannot be (nested too deep) leaves nothing behind
        data = _frames((msg[0], req_id, *msg[1:], *([call] if call is not None else [])))
        self.futures[req_id] = fut
        if call is not None and caller is not None:
            self.grants[call["grant"]] = caller
            fut.grant = call["grant"]
            fut.add_done_callback(lambda _: self.end_grant(fut))
        if not self._put(data) and self.futures.pop(req_id, None) is not None:  # else the reader's end failed it
            _settle(fut, None, Unavailable(f"the {self.host.id} worker is not reachable"))
        return fut

    def end_grant(self, fut: Future[Any]) -> None:
        """End the grant of a request: when it is answered, or when its caller stopped waiting (it timed out; its
        work may run on, but can no longer act in the store as that caller)."""
        grant = getattr(fut, "grant", None)
        if grant is not None:
            self.grants.pop(grant, None)

    def abandon(self, fut: Future[Any]) -> None:
        """Nobody waits for a request's answer any more (its caller timed out or went away): end its grant, and tell
        the worker, whose call's `stop` is set then (work that looks at it, a generation, ends early)."""
        self.end_grant(fut)
        req_id = getattr(fut, "req_id", 0)
        if req_id and not fut.done():
            self._send(("cancel", req_id))

    def open_stream(
        self,
        capability_id: str,
        data: Any,
        caller: Principal,
        sink: Callable[[tuple[Any, ...]], None],
        on_end: Callable[[], None],
    ) -> int:
        """Start a streaming request as `caller`; `sink` gets ("chunk", data)... then ("end", ok, data), until a
        `cancel`. The request's grant ends with the stream (its end, its cancel, or the worker's exit); `on_end()`
        once the worker is really done with it (its last message, or its exit), cancelled or not."""
        req_id = next(self._ids)
        call = _call_data(caller)
        data = _frames(("stream", req_id, capability_id, data, call))  # before anything is booked for it
        self.grants[call["grant"]] = caller
        lock, cancelled = threading.Lock(), [False]

        def ending(item: tuple[Any, ...]) -> None:
            if item[0] == "chunk":
                with lock:
                    if cancelled[0]:
                        return  # nobody reads this stream any more
                sink(item)
                return
            self.grants.pop(call["grant"], None)
            with lock:
                if item[0] == "cancelled":
                    cancelled[0] = True
                    return
                told = not cancelled[0]
            if told:
                sink(item)
            on_end()

        self.streams[req_id] = ending
        if not self._put(data) and self.streams.pop(req_id, None) is not None:  # else the reader's end ended it
            ending(("end", False, Unavailable(f"the {self.host.id} worker is not reachable").to_dict()["error"]))
        return req_id

    def cancel(self, req_id: int) -> None:
        """Tell the worker to stop a stream now (its client went away): its grant ends at once, its `on_end` comes
        when the worker has stopped it (a plugin sees the stop at its next chunk or progress)."""
        sink = self.streams.get(req_id)
        if sink is not None:
            sink(("cancelled",))
            self._send(("cancel", req_id))

    def alive(self) -> bool:
        """Return whether the process is still running."""
        try:
            return self.proc.is_alive()
        except ValueError:  # its handle was closed: it was stopped
            return False

    def exitcode(self) -> int | None:
        """The process's exit code (None while it runs, or once its handle was closed)."""
        try:
            return self.proc.exitcode
        except ValueError:
            return None

    def kill(self) -> None:
        """Kill the worker at once (one still starting: nothing of it is worth a graceful stop); its pipe's reader
        then ends, and whoever waits for it to be ready stops waiting."""
        with contextlib.suppress(ValueError, OSError):  # closed, or gone already
            self.proc.kill()

    def stop(self, timeout: float) -> None:
        """Ask the worker to stop; kill it if it has not exited within `timeout` seconds. A request sent from now on
        gets its 503 at once (it would wait behind the writer's end for its whole timeout)."""
        self._send(("stop",))
        self._broken = True
        self._outbox.put(None)  # the writer ends after it
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("worker %s did not stop in %.0fs: killing it", self.host.id, timeout)
            self.proc.kill()
            self.proc.join(5)
        self._hang_up()  # its threads end and close the pipe: closing it here could pull it from under them
        with contextlib.suppress(ValueError):  # still running after the kill: its handle stays
            self.proc.close()
        self.fail_in_flight(f"the {self.host.id} worker stopped")  # what slipped in while it stopped


def _call_data(caller: Principal) -> dict[str, Any]:
    """The message data that carries a caller, and a new grant for one request of theirs, into the worker."""
    return {"caller": caller.to_dict(), "grant": secrets.token_urlsafe(18)}


def _frames(msg: tuple[Any, ...]) -> list[bytes | memoryview]:
    """`pipe.frames`, with a body nested too deep to pickle a 422 (it parsed, but pickling recurses deeper)."""
    try:
        return pipe.frames(msg)
    except RecursionError:
        raise InvalidInput(TOO_DEEP, field="body") from None


def _settle(fut: Future[Any], result: Any, error: BaseException | None) -> None:
    """Answer a request's future unless it has its answer already (a caller's timeout may cancel it meanwhile)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


WATCH_S = 0.25  # how often a call port's thread, waiting on a worker, looks whether its client left


def _result_while(work: Future[Any], timeout: float, gone: Callable[[], bool] | None) -> Any:
    """`work`'s result within `timeout` (else TimeoutError), given up (`ClientGone`) once `gone()` says nobody
    waits for it any more."""
    if gone is None:
        return work.result(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            return work.result(min(WATCH_S, max(0.0, end - time.monotonic())))
        except TimeoutError:
            if work.done():  # the work's own TimeoutError, not the wait's
                raise
            if time.monotonic() >= end:
                raise
            if gone():
                raise ClientGone("the client went away before its answer was ready") from None


async def _answer(work: Future[Any], timeout: float) -> Any:
    """The result of `work` (a worker's or an inline thread's future), awaited on the event loop for at most
    `timeout` seconds (then TimeoutError). The work itself is not cancelled here: the caller's `_settle` ends its
    call (work that looks at the call's `stop` ends early; other work runs on), and its slot frees when it really
    ends. One hand-over to the loop per answer (`wait_for(shield(wrap_future()))`
    chains three futures for the same)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def deliver(done: Future[Any]) -> None:
        if waiter.done():  # the caller timed out or went away
            return
        if done.cancelled():
            waiter.cancel()
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def wake(done: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits any more
            loop.call_soon_threadsafe(deliver, done)

    work.add_done_callback(wake)
    async with asyncio.timeout(timeout):
        return await waiter
