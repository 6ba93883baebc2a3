"""`bkg serve`: run the gateway in the foreground until SIGINT / SIGTERM, then stop plugins and exit."""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.abc
import importlib.machinery
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from types import FrameType, ModuleType

import uvicorn

from bkg_kernel.errors import Conflict, InvalidInput
from bkg_kernel.gateway.app import create_app
from bkg_kernel.gateway.state import Gateway
from bkg_kernel.runtime.discovery import discover
from bkg_kernel.settings import SECRET_ENV, Settings


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown; a clean stop should exit 0 instead. A start in
    progress ends at the signal: uvicorn waits for the requests in flight, and a Start request waits for its plugin
    (a model loading, up to two minutes) unless that start ends."""

    def __init__(self, config: uvicorn.Config, gw: Gateway) -> None:
        super().__init__(config)
        self.gw = gw
        self.aborted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.aborted:  # once: a second signal may come while the first handler sets the start's event
            self.aborted = True
            self.gw.supervisor.abort_starts()  # events only start threads wait on, and kills
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class PandasBlocker(importlib.abc.MetaPathFinder):
    """Refuse to import pandas in the gateway process.

    DuckDB's Python binding tries to import pandas on every query with bound parameters, only to recognise
    pandas values (which the gateway never passes); that one import costs ~50 MB of RSS and ~0.5 s of start-up
    (pandas pulls in pyarrow.compute). Plugins that need pandas run as workers, in their own processes.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ModuleNotFoundError(
                "pandas is not loaded in the bkg gateway process (it keeps the gateway small); "
                "run a plugin that needs pandas as a worker",
                name=fullname,
            )
        return None


def keep_pandas_out() -> None:
    """Install the pandas blocker once, unless something already imported pandas."""
    if "pandas" not in sys.modules and not any(isinstance(f, PandasBlocker) for f in sys.meta_path):
        sys.meta_path.insert(0, PandasBlocker())


def listen(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """The gateway's listening sockets, one per address `host` resolves to, bound as asyncio's `create_server`
    (which uvicorn called) binds them: an IPv6 socket takes IPv6 only. Port 0 takes any free port, the same one on
    every address: nothing can take it between a pick and a bind, as it can from a caller that picks a free port
    and passes it on."""
    where = f"{host}:{port}"
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {where}: {exc.strerror or exc}", field="host") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a gateway just stopped leaves TIME_WAITs
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:  # the port the first address took, for port 0
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(
                f"cannot listen on {where}: the port is in use (`bkg status` says whether a gateway runs there); "
                "choose another with --port, or --port 0 for any free one"
            ) from None
        field = "port" if exc.errno == errno.EACCES else "host"  # a port below 1024; an address not this machine's
        raise InvalidInput(f"cannot listen on {where}: {exc.strerror or exc}", field=field) from None
    return sockets


def serve(settings: Settings, plugins: list[str] | None = None) -> None:
    """Open the data dir first (so a second gateway fails with one clear line), then take the port (one clear line
    if it is in use, before any plugin starts), then serve HTTP."""
    keep_pandas_out()
    # Worker replies arrive on a reader thread that must take the GIL from the event loop; with the default
    # 5 ms switch interval that hand-over alone added milliseconds to every plugin call.
    sys.setswitchinterval(0.0005)
    for name in SECRET_ENV:  # read into `settings` already; plugin workers and job kernels must not inherit them
        os.environ.pop(name, None)
    sockets: list[socket.socket] = []

    def take_port() -> int:
        sockets.extend(listen(settings.host, settings.port))
        return int(sockets[0].getsockname()[1])

    found = discover(plugins)
    if unknown := [p for p in plugins or [] if p not in found]:  # a typo hosted nothing, and said nothing
        known = ", ".join(sorted(discover()))
        raise InvalidInput(f"no plugin {', '.join(map(repr, unknown))} (plugins here: {known})", field="plugins")
    try:  # raises DataDirLocked naming the holder before any socket is bound
        gw = Gateway.open(settings, found, plugins, listen=take_port)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    app = create_app(gateway=gw)
    # What start-up made (modules, the app, the store's catalog) lives as long as the process: move it out of
    # the collector's reach, so a full collection walks only what requests made since (it holds the GIL).
    gc.freeze()
    key = gw.admin_key_path
    print(f"bkg gateway on {gw.url()} (data dir {gw.store.data_dir})", file=sys.stderr, flush=True)
    if key is not None:
        print(f"admin API key: {key} (mode 0600)", file=sys.stderr, flush=True)
    config = uvicorn.Config(  # /ws takes subscriptions of a few dozen bytes: a frame over 64 KiB closes it
        app,
        host=gw.settings.host,
        port=gw.settings.port,
        log_level="warning",
        access_log=False,
        ws_max_size=2**16,
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # a request that never ends cannot hold the exit
    )
    server = _Server(config, gw)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        gw.close()
    if not server.started:
        raise SystemExit(1)
