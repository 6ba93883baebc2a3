"""The FastAPI app: the core routers (`gateway/routes/`), each plugin's own routes (from its `routes()` hook),
the error shape and the metrics middleware; the gateway itself opens in the lifespan unless given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI

from bkg_kernel.gateway import errors, openapi, routes
from bkg_kernel.gateway.bodylimit import BodyLimitMiddleware
from bkg_kernel.gateway.fastpath import FastInvoke
from bkg_kernel.gateway.head import HeadAsGet
from bkg_kernel.gateway.jupyterhub import PrefixMiddleware, hub_caller
from bkg_kernel.gateway.metrics import Metrics, MetricsMiddleware
from bkg_kernel.gateway.plugin_api import AppGatewayAPI
from bkg_kernel.gateway.slashes import SlashInName
from bkg_kernel.gateway.state import Gateway, version
from bkg_kernel.gateway.strictquery import known_query_only
from bkg_kernel.runtime.discovery import discover
from bkg_kernel.settings import Settings

log = logging.getLogger("bkg.gateway")


FORGET_EVERY_S = 6 * 3600


async def forget_old(gw: Gateway) -> None:
    """Delete old revoked and expired keys, audit entries and usage rows (`*_keep_days`) now and every six hours,
    on a thread."""
    s = gw.settings
    while True:
        try:
            gone = await asyncio.to_thread(gw.auth.forget_old, s.key_keep_days, s.audit_keep_days, s.usage_keep_days)
            if any(gone.values()):
                log.info("retention: deleted %s", ", ".join(f"{n} {what}" for what, n in gone.items() if n))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retention never takes the gateway down; it tries again later
            log.exception("deleting old keys, audit entries and usage rows")
        await asyncio.sleep(FORGET_EVERY_S)


def create_app(
    settings: Settings | None = None, plugins: list[str] | None = None, gateway: Gateway | None = None
) -> FastAPI:
    """Build the gateway app; without `gateway`, it opens one (store, auth, plugins) in its lifespan."""
    settings = gateway.settings if gateway is not None else settings or Settings()
    metrics = gateway.metrics if gateway is not None else Metrics()
    discovered = discover(plugins) if gateway is None else {h.id: h.found for h in gateway.supervisor.hosts.values()}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw: Gateway | None = getattr(app.state, "gateway", None)
        if gw is None:
            gw = await asyncio.to_thread(Gateway.open, settings, discovered, plugins, metrics)
            app.state.gateway = gw
        # the threads `asyncio.to_thread` uses (store work, worker answers): Python's default is cpu + 4, six here, so
        # a few requests waiting on the store's lock (a snapshot holds it) took every one; a wait costs no CPU
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(settings.io_threads, "bkg-io"))
        gw.hub.bind(asyncio.get_running_loop())
        if gw.runs is not None:
            await gw.runs.start()
        forgetting = asyncio.create_task(forget_old(gw))
        try:
            yield
        finally:
            forgetting.cancel()
            if gw.runs is not None:
                await gw.runs.close()
            await asyncio.to_thread(gw.close)

    app = FastAPI(
        # a Hub token's caller, found asynchronously before any route runs; query parameters a route does not take
        dependencies=[Depends(hub_caller), Depends(known_query_only)],
        title="bkg gateway",
        version=version(),
        description="One process owns the store and supervises the plugins; everything else is a client.",
        lifespan=lifespan,
        redirect_slashes=False,  # `/health/` is a 404 in the error shape, not a bare 307 sent before any check
    )
    if gateway is not None:
        app.state.gateway = gateway
    errors.install(app)
    routes.install(app)
    # Middlewares, innermost first: plugin calls taken beside the router, a name with a slash (under the Hub
    # prefix, so its routes are matched as the router matches them), the Hub prefix, the body limit, metrics,
    # HEAD as GET.
    app.add_middleware(FastInvoke)
    app.add_middleware(SlashInName)  # a '/' inside a name (%2F): its 404 before any route sees the path
    if settings.hub_service_prefix and settings.hub_service_name:
        app.add_middleware(PrefixMiddleware, prefix=settings.hub_service_prefix)
    prefix = settings.hub_service_prefix if settings.hub_service_prefix and settings.hub_service_name else ""
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * 2**20), prefix=prefix, idle_s=settings.body_idle_s
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(HeadAsGet)  # outermost: HEAD is GET to everything inside (uvicorn drops the body)
    api = AppGatewayAPI(app)
    for found in discovered.values():
        if found.cls is None:
            continue
        try:  # a plugin whose routes fail to build is logged; the rest still mount
            router = found.cls.routes(api)
        except Exception:
            log.exception("plugin %s: cannot build its routes", found.id)
            continue
        if router is not None:
            app.include_router(router)
    openapi.install(app, discovered)
    return app
