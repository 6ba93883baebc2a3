"""What one gateway process holds: settings, the store, auth, the plugin supervisor and the event hub."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request

from bkg_kernel.errors import Forbidden, Unauthorized
from bkg_kernel.gateway.hub import Hub
from bkg_kernel.gateway.jobs import Jobs
from bkg_kernel.gateway.metrics import Metrics
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.plugins.apikeys.service import AuthService, Principal
from bkg_kernel.plugins.registry import discover
from bkg_kernel.runtime.supervisor import Supervisor
from bkg_kernel.settings import Settings
from bkg_kernel.store import Store

log = logging.getLogger("bkg.gateway")
STATE_FILE = "gateway.json"


class Gateway:
    """Opened at startup (takes the data dir lock), closed at shutdown."""

    def __init__(self, settings: Settings, plugins: list[str] | None = None) -> None:
        self.settings = settings
        self.only = plugins
        self.hub = Hub()
        self.metrics = Metrics()
        self.started = time.time()
        self.store: Store | None = None
        self.auth: AuthService | None = None
        self.supervisor: Supervisor | None = None
        self.admin_key_path: Path | None = None
        self.models: ModelRegistry | None = None
        self.models_ready = threading.Event()  # the packaged default models are registered
        self.jobs = Jobs(self.hub.publish)
        self.discovered = discover(plugins)

    def open(self) -> None:
        """Open the store (one owner per data dir), set up auth, start the plugins; a second call does nothing."""
        if self.store is not None:
            return
        self.store = Store(self.settings.data_dir, settings=self.settings)
        data_dir = self.store.data_dir
        self.auth = AuthService(self.store)
        self.admin_key_path = self.auth.bootstrap(data_dir, os.environ.get("BKG_ADMIN_KEY"))
        if self.admin_key_path is None and (data_dir / "admin.key").exists():
            self.admin_key_path = data_dir / "admin.key"
        model_dir = Path(self.settings.model_dir).resolve()
        self.models = ModelRegistry(model_dir, register_defaults=False)
        # hashing the packaged default models takes ~1 s: do it off the start-up path
        threading.Thread(target=self._register_defaults, name="bkg-model-defaults", daemon=True).start()
        services = {"auth": self.auth, "store": self.store, "models": self.models, "gateway_url": self.url()}
        self.supervisor = Supervisor(
            data_dir, self.hub.publish, self.only, services, model_dir, discovered=self.discovered
        )
        self.supervisor.start(wait=False)  # plugins come up in the background; /health shows them starting
        self.write_state()

    def _register_defaults(self) -> None:
        assert self.models is not None
        try:
            added = self.models.ensure_defaults()
        except Exception:
            log.exception("registering the default models failed")
            return
        finally:
            self.models_ready.set()
        if added:
            log.info("registered default models: %s", ", ".join(added))

    def url(self) -> str:
        """Return the base URL clients use."""
        return f"http://{self.settings.host}:{self.settings.port}"

    def write_state(self) -> None:
        """Record pid and URL in `<data_dir>/gateway.json` so `bkg.connect()` can find this gateway."""
        assert self.store is not None
        state = {"pid": os.getpid(), "url": self.url(), "started": self.started, "data_dir": str(self.store.data_dir)}
        path = self.store.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def close(self) -> None:
        """Stop plugins, flush, close the store and release the data dir (a second call does nothing)."""
        if self.store is None or self.store.closed:
            return
        if self.supervisor is not None:
            self.supervisor.shutdown()
        if self.auth is not None:
            self.auth.flush_last_used()
        if self.store is not None:
            (self.store.data_dir / STATE_FILE).unlink(missing_ok=True)
            self.store.close()

    # -- auth -------------------------------------------------------------------------------------
    def principal(self, request: Request, scope: str | None) -> Principal:
        """Authenticate a request (Bearer key or session) and check it holds `scope`."""
        assert self.auth is not None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not token:
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <API key or session token>'")
        p = self.auth.authenticate(token)
        if scope is not None and scope not in p.scopes:
            raise Forbidden(f"this route needs scope {scope!r}; the caller has {sorted(p.scopes)}")
        return p


def gateway(request: Request) -> Gateway:
    """Return the Gateway of the app serving this request."""
    gw: Gateway = request.app.state.gateway
    return gw


def need(scope: str | None) -> Any:
    """FastAPI dependency: the caller's Principal, after checking `scope` (None: any valid credentials)."""

    async def dep(request: Request) -> Principal:  # async: no thread-pool hop for an in-memory check
        return gateway(request).principal(request, scope)

    return dep


def store_of(request: Request) -> Store:
    """Return the gateway's store."""
    s = gateway(request).store
    assert s is not None
    return s


def snapshot_summary(gw: Gateway) -> dict[str, Any]:
    """Return the plugins' status and telemetry for /health, the WebSocket bootstrap and /metrics."""
    assert gw.supervisor is not None
    return {pid: h.status() for pid, h in gw.supervisor.hosts.items()}


def version() -> str:
    """Return the bkg version."""
    from bkg_kernel import __version__

    return __version__
