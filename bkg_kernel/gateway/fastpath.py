"""Plugin calls served beside the router, not through it.

`POST /api/plugins/{plugin_id}/invoke/{capability_id}` is the gateway's hot route: every notebook call of a
capability takes it. Starlette's router finds it by trying each of ~150 route patterns in turn, and FastAPI then
solves the route's dependencies and wraps it in its request / response machinery: 0.1-0.2 ms of a text query's
~1.8 ms through the gateway on this machine (`bench/hop.py`), where the search itself takes ~0.7 ms. This
middleware recognises the route by its shape and runs the same route function (`routes.plugins.invoke`) with the
same checks: the app-wide Hub caller dependency first, then the route's own authentication and the capability's
scope, errors in the one error shape (`errors.render`). The route stays registered for the OpenAPI document;
requests the middleware does not take (another method, another shape) go to the router as before.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from bkg_kernel.gateway import errors
from bkg_kernel.gateway.jupyterhub import hub_caller, route_path
from bkg_kernel.gateway.routes import plugins
from bkg_kernel.gateway.strictquery import known_query_only

INVOKE_PATH = "/api/plugins/{plugin_id}/invoke/{capability_id}"


class FastInvoke:
    """Pure ASGI, inside the other middlewares (the body limit, metrics and the Hub prefix still apply)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # the registered route, so that metrics label the call as the router would
        self.route: BaseRoute = next(r for r in plugins.router.routes if getattr(r, "path", None) == INVOKE_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ids = invoke_ids(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if ids is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        scope["path_params"] = {"plugin_id": ids[0], "capability_id": ids[1]}
        request = Request(scope, receive)
        try:
            await hub_caller(request)
            await known_query_only(request)
            response: Any = await plugins.invoke(ids[0], ids[1], request)
        except Exception as exc:  # the same shape and log lines as the router's exception handlers
            response = await errors.render(request, exc)
        await response(scope, receive, send)


def invoke_ids(scope: Scope) -> tuple[str, str] | None:
    """(plugin id, capability id) when the path is an invoke (under the Hub prefix too), else None."""
    parts = route_path(scope).split("/")
    if len(parts) != 6 or parts[0] or parts[1] != "api" or parts[2] != "plugins" or parts[4] != "invoke":
        return None
    if not parts[3] or not parts[5]:
        return None
    return parts[3], parts[5]
