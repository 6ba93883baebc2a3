"""The FastAPI app: health, auth, plugins, metrics and the WebSocket; store and admin routes in their modules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from bkg_kernel.errors import BkgError, InvalidInput
from bkg_kernel.gateway import errors, routes_admin, routes_models, routes_store
from bkg_kernel.gateway.hub import Subscriber
from bkg_kernel.gateway.metrics import MetricsMiddleware
from bkg_kernel.gateway.state import Gateway, gateway, need, snapshot_summary, version
from bkg_kernel.plugins.apikeys.service import Principal
from bkg_kernel.plugins.base import invalid_from_pydantic
from bkg_kernel.settings import Settings

TOPICS = ("status", "logs", "telemetry", "jobs")


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    password: str


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | None = None
    enabled: bool | None = None
    autostart: bool | None = None


def create_app(settings: Settings | None = None, plugins: list[str] | None = None) -> FastAPI:
    """Build the gateway app; it opens the store and starts plugins in its lifespan."""
    gw = Gateway(settings or Settings(), plugins)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw.hub.bind(asyncio.get_running_loop())
        await asyncio.to_thread(gw.open)
        try:
            yield
        finally:
            await asyncio.to_thread(gw.close)

    app = FastAPI(
        title="bkg gateway",
        version=version(),
        description="One process owns the store and supervises the plugins; everything else is a client.",
        lifespan=lifespan,
    )
    app.state.gateway = gw
    errors.install(app)
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)
    # Routes match in registration order (a linear scan): the health and plugin routes the panels poll
    # come first, the store and admin routers after them.
    _core_routes(app)
    app.include_router(routes_store.router)
    app.include_router(routes_store.embed_router)
    app.include_router(routes_admin.router)
    app.include_router(routes_models.router)
    for found in gw.discovered.values():
        if found.cls is not None and found.cls.router:
            _mount_plugin_router(app, found.id, found.cls.router)
    return app


def _core_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["gateway"])
    async def health(request: Request) -> dict[str, Any]:
        """Overall status and each plugin's status (no auth)."""
        gw = gateway(request)
        plugins = snapshot_summary(gw) if gw.supervisor else {}
        states = {s["state"] for s in plugins.values()}
        status = "degraded" if states & {"error", "degraded"} else "starting" if "starting" in states else "ok"
        return {
            "status": status,
            "version": version(),
            "uptime_s": round(time.time() - gw.started, 1),
            "plugins": {p: s["state"] for p, s in plugins.items()},
        }

    # -- auth -------------------------------------------------------------------------------------
    @app.post("/auth/login", tags=["auth"])
    async def login(body: Login, request: Request) -> dict[str, Any]:
        """Exchange username + password for a session token (12 h)."""
        auth = gateway(request).auth
        assert auth is not None
        token, p = await asyncio.to_thread(auth.login, body.username, body.password)
        return {"token": token, "token_type": "bearer", "user": p.to_dict()}

    @app.get("/auth/me", tags=["auth"])
    async def me(p: Annotated[Principal, Depends(need(None))]) -> dict[str, Any]:
        """Who the credentials belong to, and their scopes."""
        return p.to_dict()

    @app.post("/auth/logout", tags=["auth"])
    async def logout(request: Request, p: Annotated[Principal, Depends(need(None))]) -> dict[str, Any]:
        """End the current session (API keys are revoked under /admin/keys instead)."""
        auth = gateway(request).auth
        assert auth is not None
        if p.via != "session":
            raise InvalidInput("logout ends a session; this request used an API key", field="authorization")
        auth.logout(request.headers["authorization"][7:].strip())
        auth.audit(p.username, "auth.logout", p.username)
        return {"ok": True}

    # -- plugins ----------------------------------------------------------------------------------
    read = Depends(need("plugins:read"))

    @app.get("/api/plugins", tags=["plugins"], dependencies=[read])
    async def list_plugins(request: Request) -> JSONResponse:
        """Every plugin with its status and latest telemetry."""
        sup = gateway(request).supervisor
        assert sup is not None
        # Plain JSON data already: skip FastAPI's recursive encoder on the route the panels poll most.
        return JSONResponse(
            {
                "plugins": [
                    {
                        "id": h.id,
                        "name": h.cls.name if h.cls else h.id,
                        "version": h.cls.version if h.cls else "",
                        "description": h.cls.description if h.cls else "",
                        **h.status(),
                        "telemetry": h.telemetry.snapshot(),
                    }
                    for h in sup.hosts.values()
                ]
            }
        )

    @app.get("/api/plugins/telemetry/summary", tags=["plugins"], dependencies=[read])
    async def telemetry_summary(request: Request) -> dict[str, Any]:
        """Telemetry of every plugin plus totals."""
        sup = gateway(request).supervisor
        assert sup is not None
        return sup.summary()

    @app.get("/api/plugins/{plugin_id}", tags=["plugins"], dependencies=[read])
    async def get_plugin(plugin_id: str, request: Request) -> dict[str, Any]:
        """The plugin's declaration: capabilities with JSON Schemas, settings schema, config, status."""
        return _host(request, plugin_id).describe()

    @app.get("/api/plugins/{plugin_id}/status", tags=["plugins"], dependencies=[read])
    async def plugin_status(plugin_id: str, request: Request) -> dict[str, Any]:
        """Lifecycle state, reason, pid and uptime."""
        return _host(request, plugin_id).status()

    @app.get("/api/plugins/{plugin_id}/health", tags=["plugins"], dependencies=[read])
    async def plugin_health(plugin_id: str, request: Request) -> dict[str, Any]:
        """The plugin's own health report (asked of the running plugin: `{"ok": bool, ...}`)."""
        result: dict[str, Any] = await _host(request, plugin_id).health()
        return result

    @app.get("/api/plugins/{plugin_id}/logs", tags=["plugins"], dependencies=[read])
    async def plugin_logs(
        plugin_id: str,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=2000)] = 200,
        level: Annotated[str | None, Query(pattern="^(?i)(debug|info|warning|error|critical)$")] = None,
        search: str | None = None,
    ) -> dict[str, Any]:
        """The newest log lines, at or above a level, optionally containing a string."""
        return {"lines": _host(request, plugin_id).logs.query(limit, level, search)}

    @app.get("/api/plugins/{plugin_id}/telemetry", tags=["plugins"], dependencies=[read])
    async def plugin_telemetry(plugin_id: str, request: Request) -> dict[str, Any]:
        """cpu %, RSS, uptime, requests, errors, last error, p50 / p95 latency, queue depth."""
        return _host(request, plugin_id).telemetry.snapshot()

    for action in ("start", "stop", "restart"):
        _lifecycle_route(app, action)

    @app.get("/api/plugins/{plugin_id}/config", tags=["plugins"], dependencies=[read])
    async def get_config(plugin_id: str, request: Request) -> dict[str, Any]:
        """The plugin's settings, their JSON Schema, and enabled / autostart."""
        h = _host(request, plugin_id)
        schema = h.cls.Settings.model_json_schema() if h.cls else {}
        return {
            "config": h.settings.public(),
            "schema": schema,
            "enabled": h.entry.enabled,
            "autostart": h.entry.autostart,
        }

    @app.put("/api/plugins/{plugin_id}/config", tags=["plugins"])
    async def put_config(
        plugin_id: str, body: Config, request: Request, p: Annotated[Principal, Depends(need("plugins:write"))]
    ) -> dict[str, Any]:
        """Validate and save settings (422 names the bad field); a running plugin restarts to apply them."""
        gw = gateway(request)
        h = _host(request, plugin_id)
        restarted = False
        if body.config is not None and isinstance(body.config, dict):
            body.config = h.settings.keep_secrets(body.config)
        if body.config is not None:
            h.configure(body.config)
        if body.enabled is not None:
            h.entry.enabled = body.enabled
        if body.autostart is not None:
            h.entry.autostart = body.autostart
        assert gw.supervisor is not None and gw.auth is not None
        gw.supervisor.save_registry()
        gw.auth.audit(p.username, "plugin.config", plugin_id, config=h.settings.public(), enabled=body.enabled)
        if body.config is not None and h.state in ("running", "degraded"):
            await asyncio.to_thread(h.restart)
            restarted = True
        return {"config": h.settings.public(), "restarted": restarted, "status": h.status()}

    @app.post("/api/plugins/{plugin_id}/invoke/{capability_id}", tags=["plugins"])
    async def invoke(plugin_id: str, capability_id: str, request: Request) -> Any:
        """Run a capability with its JSON input; the capability's own scope is required."""
        gw = gateway(request)
        gw.principal(request, None)  # who is asking comes before what exists
        h = _host(request, plugin_id)
        cap = h.cls.capabilities().get(capability_id) if h.cls else None
        p = gw.principal(request, cap.scope if cap else "plugins:read")
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            raise InvalidInput("request body is not valid JSON", field="body") from None
        if cap is not None and cap.job:
            try:  # a bad input is the caller's 422 now, not a failed job later
                cap.input.model_validate(body)
            except ValidationError as exc:
                raise invalid_from_pydantic(exc, "input") from None
            job = gw.jobs.start_stream(capability_id, h.stream(capability_id, body), plugin=plugin_id, owner=p.username)
            return JSONResponse({"job": job.to_dict()}, status_code=202)
        return await h.invoke(capability_id, body)

    @app.get("/metrics", tags=["gateway"], dependencies=[read])
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: requests, latencies, plugin states."""
        gw = gateway(request)
        assert gw.supervisor is not None
        text = gw.metrics.render(gw.supervisor.summary()["plugins"])
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        """Live events: send {"action": "sub"|"unsub", "topic": "status"|"logs"|"telemetry", "plugin"?}."""
        await _websocket(websocket)


def _mount_plugin_router(app: FastAPI, plugin_id: str, ref: str) -> None:
    """Mount the routes a plugin declares (e.g. llmserver's /v1); a broken one is logged, the rest still mount."""
    import importlib

    module, _, attr = ref.partition(":")
    try:
        app.include_router(getattr(importlib.import_module(module), attr))
    except Exception:
        logging.getLogger("bkg.gateway").exception("plugin %s: cannot mount its routes %s", plugin_id, ref)


def _lifecycle_route(app: FastAPI, action: str) -> None:
    async def route(plugin_id: str, request: Request, p: Annotated[Principal, Depends(need("plugins:write"))]) -> Any:
        gw = gateway(request)
        h = _host(request, plugin_id)
        status = await asyncio.to_thread(getattr(h, action))
        assert gw.auth is not None
        gw.auth.audit(p.username, f"plugin.{action}", plugin_id, state=status["state"])
        return status

    route.__doc__ = f"{action.capitalize()} the plugin and return its status."
    app.post(f"/api/plugins/{{plugin_id}}/{action}", tags=["plugins"], name=f"plugin_{action}")(route)


def _host(request: Request, plugin_id: str) -> Any:
    sup = gateway(request).supervisor
    assert sup is not None
    return sup.get(plugin_id)


async def _websocket(websocket: WebSocket) -> None:
    gw: Gateway = websocket.app.state.gateway
    token = websocket.query_params.get("token") or websocket.headers.get("authorization", "")[7:].strip()
    try:
        assert gw.auth is not None
        p = gw.auth.authenticate(token) if token else None
        if p is None or "plugins:read" not in p.scopes:
            raise BkgError("needs a key with scope plugins:read (?token=...)")
    except BkgError as exc:
        await websocket.close(code=4401, reason=exc.message[:120])
        return
    await websocket.accept()
    sub = Subscriber()
    gw.hub.subscribers.add(sub)
    assert gw.supervisor is not None
    await websocket.send_json(
        {"type": "bootstrap", "payload": {"plugins": snapshot_summary(gw), "telemetry": gw.supervisor.summary()}}
    )

    async def pump() -> None:
        while True:
            await websocket.send_json(await sub.queue.get())

    sender = asyncio.create_task(pump())
    try:
        while True:
            msg = await websocket.receive_json()
            action, topic = msg.get("action"), msg.get("topic")
            if action not in ("sub", "unsub") or topic not in TOPICS:
                await websocket.send_json(
                    {
                        "type": "error",
                        "payload": {"message": "send {action: sub|unsub, topic: status|logs|telemetry|jobs}"},
                    }
                )
                continue
            key = (topic, msg.get("plugin"))
            if action == "sub":
                sub.topics.add(key)
            else:
                sub.topics.discard(key)
            await websocket.send_json({"type": "ack", "payload": {"action": action, "topic": topic, "plugin": key[1]}})
    except (WebSocketDisconnect, ValueError, RuntimeError):
        pass
    finally:
        sender.cancel()
        gw.hub.subscribers.discard(sub)
