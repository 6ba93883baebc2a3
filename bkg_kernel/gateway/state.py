"""What one gateway process holds: settings, the store, auth, the model registry, the plugin supervisor, jobs and
the event hub, all built together by `Gateway.open()` (which takes the data dir lock) and closed together."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.errors import Unauthorized
from bkg_kernel.gateway.callport import CallPort
from bkg_kernel.gateway.embedcheck import check_embed_model
from bkg_kernel.gateway.hub import Hub
from bkg_kernel.gateway.jobs import Jobs
from bkg_kernel.gateway.jupyterhub import HubTrust, no_hub, token_of
from bkg_kernel.gateway.metrics import Metrics
from bkg_kernel.gateway.plugin_store import PluginStore
from bkg_kernel.jobs.service import JobService
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.runtime.discovery import Discovered, discover
from bkg_kernel.runtime.supervisor import Supervisor
from bkg_kernel.settings import Settings
from bkg_kernel.store import Store

log = logging.getLogger("bkg.gateway")
STATE_FILE = "gateway.json"


class Gateway:
    """An open gateway: every part is there from construction to `close()`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        auth: AuthService,
        models: ModelRegistry,
        supervisor: Supervisor,
        hub: Hub,
        metrics: Metrics,
        jobs: Jobs,
        admin_key_path: Path | None,
    ) -> None:
        self.settings, self.store, self.auth, self.models = settings, store, auth, models
        self.supervisor, self.hub, self.metrics, self.jobs = supervisor, hub, metrics, jobs
        self.admin_key_path = admin_key_path
        self.started = time.time()
        self.models_ready = threading.Event()  # the packaged default models are registered
        self.runs: JobService | None = None  # notebook jobs (set by open())
        self.hub_trust: HubTrust | None = None  # Hub tokens and logins, under JupyterHub (set by open())
        self.call_port: CallPort | None = None  # plugin calls beside HTTP (set by open() unless turned off)

    @classmethod
    def open(
        cls,
        settings: Settings,
        discovered: dict[str, Discovered] | None = None,
        plugins: list[str] | None = None,
        metrics: Metrics | None = None,
        listen: Callable[[], int] | None = None,
    ) -> Gateway:
        """Open the store (one owner per data dir), set up auth, start the plugins in the background. `listen`
        takes the HTTP port once the data dir is owned and before anything starts, returning the port it took."""
        store = Store(settings.data_dir, settings=settings)
        try:
            if listen is not None:  # a port in use fails here, in a moment, not after every plugin came up
                settings = settings.model_copy(update={"port": listen()})
            auth = AuthService(store)
            data_dir = store.data_dir
            key_path = auth.bootstrap(data_dir, settings.admin_key)
            if key_path is None and (data_dir / "admin.key").exists():
                key_path = data_dir / "admin.key"
            auth.workbench_key(data_dir)
            model_dir = Path(settings.model_dir).resolve()
            models = ModelRegistry(model_dir, register_defaults=False)
            hub = Hub()
            plugin_store = PluginStore(store, auth, hub)
            supervisor = Supervisor(
                data_dir,
                hub.publish,
                plugins,
                {"auth": auth, "plugin_store": plugin_store},
                model_dir,
                discovered=discovered if discovered is not None else discover(plugins),
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
                hung_restart_s=settings.hung_restart_s,
            )
            plugin_store.supervisor = supervisor
            metrics = metrics or Metrics()
            call_port = None
            # under JupyterHub every client reaches the gateway through the Hub with a Hub token, which the port
            # does not take: no port unless one is set
            if settings.call_port > 0 or (settings.call_port == 0 and not settings.hub_service_name):
                try:
                    call_port = CallPort(auth, supervisor, metrics, settings.host, settings.call_port)
                except OSError as exc:
                    if settings.call_port:  # a port asked for that cannot be had is the operator's to fix
                        where = f"{settings.host}:{settings.call_port}"
                        raise OSError(f"cannot open the call port {where}: {exc}") from None
                    log.warning("no call port on %s (%s): plugin calls go over HTTP only", settings.host, exc)
        except BaseException:
            store.close()
            raise
        gw = cls(settings, store, auth, models, supervisor, hub, metrics, Jobs(hub.publish), key_path)
        gw.call_port = call_port
        plugin_store.check_embed = functools.partial(check_embed_model, gw)
        if settings.hub_service_name and settings.hub_api_token:  # started by JupyterHub as a service
            gw.hub_trust = HubTrust(settings, auth)
        confirm = gw.hub_trust.confirm_owner if gw.hub_trust is not None else no_hub  # a Hub user's run asks the Hub
        gw.runs = JobService(settings, store, auth, hub.publish, gw.url(), confirm=confirm)  # started in the lifespan
        # hashing the packaged default models takes ~1 s: do it off the start-up path
        threading.Thread(target=gw._register_defaults, name="bkg-model-defaults", daemon=True).start()
        supervisor.start(wait=False)  # plugins come up in the background; /health shows them starting
        gw.write_state()
        return gw

    def _register_defaults(self) -> None:
        from bkg_kernel.models.download import sweep_partial

        if left := sweep_partial(self.models.dir):
            log.info("deleted %d files that downloads which never finished left in .partial/", len(left))
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
        state = {"pid": os.getpid(), "url": self.url(), "started": self.started, "data_dir": str(self.store.data_dir)}
        path = self.store.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def close(self) -> None:
        """Stop plugins, flush, close the store and release the data dir (a second call does nothing)."""
        if self.store.closed:
            return
        if self.call_port is not None:
            self.call_port.close()
        self.supervisor.shutdown()
        self.auth.close()
        (self.store.data_dir / STATE_FILE).unlink(missing_ok=True)
        self.store.close()

    # -- auth -------------------------------------------------------------------------------------
    def principal(self, request: Request, scope: str | None) -> Principal:
        """Authenticate a request (Bearer key or session; under JupyterHub also a Hub token, found beforehand by
        the app-wide `hub_caller` dependency) and check it holds `scope`."""
        p: Principal | None = getattr(request.state, "principal", None)
        if p is None:
            token = token_of(request)
            if not token:
                raise Unauthorized("missing credentials: send 'Authorization: Bearer <API key or session token>'")
            p = self.auth.authenticate(token)
            request.state.principal = p  # once per request: a route that asks again (invoke does) gets this one
        if scope is not None:
            p.require(scope, "this route")
        return p

    async def caller_now(self, token: str) -> Principal:
        """The caller a credential stands for as of now, not counted against its key's rate limit: a key or session
        checked again, or a Hub token (HubAuth's cache: at most a minute old)."""
        if self.hub_trust is not None and self.hub_trust.is_hub_token(token):
            return await self.hub_trust.principal(token)
        return self.auth.authenticate(token, metered=False)

    def snapshot_summary(self) -> dict[str, Any]:
        """Return every plugin's status (for /health and the WebSocket bootstrap)."""
        return {pid: h.status() for pid, h in self.supervisor.hosts.items()}


def gateway(request: Request) -> Gateway:
    """Return the Gateway of the app serving this request."""
    gw: Gateway = request.app.state.gateway
    return gw


class Need:
    """FastAPI dependency: the caller's Principal, after checking `checks_scope` (None: any valid credentials). A
    `CheckedJSONRoute` runs it before it reads the body (a caller without the scope gets the 403, not the body's
    422)."""

    def __init__(self, scope: str | None) -> None:
        self.checks_scope = scope

    async def __call__(self, request: Request) -> Principal:  # async: no thread-pool hop for an in-memory check
        return gateway(request).principal(request, self.checks_scope)


def need(scope: str | None) -> Any:
    """FastAPI dependency: the caller's Principal, after checking `scope` (None: any valid credentials)."""
    return Need(scope)


def version() -> str:
    """Return the bkg version."""
    from bkg_kernel import __version__

    return __version__
