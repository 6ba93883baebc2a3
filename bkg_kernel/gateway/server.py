"""`bkg serve`: run the gateway in the foreground until SIGINT / SIGTERM, then stop plugins and exit."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

import uvicorn

from bkg_kernel.gateway.app import create_app
from bkg_kernel.settings import Settings


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown; a clean stop should exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(settings: Settings, plugins: list[str] | None = None) -> None:
    """Open the data dir first (so a second gateway fails with one clear line), then serve HTTP."""
    app = create_app(settings, plugins)
    gw = app.state.gateway
    gw.open()  # raises DataDirLocked naming the holder before any socket is bound
    key = gw.admin_key_path
    print(f"bkg gateway on {gw.url()} (data dir {gw.store.data_dir})", file=sys.stderr, flush=True)
    if key is not None:
        print(f"admin API key: {key} (mode 0600)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    server = _Server(config)
    try:
        server.run()
    finally:
        gw.close()
    if not server.started:
        raise SystemExit(1)
