"""What the gateway hands a plugin's `routes(api)` hook (the `GatewayAPI` of the plugin contract): the auth
dependency and calls into plugins as the request's caller, so plugin route modules import nothing from the
gateway."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI

from bkg_kernel.auth import Principal
from bkg_kernel.gateway.bodylimit import CheckedJSONRoute, takes_big_bodies
from bkg_kernel.gateway.state import Gateway, need


class AppGatewayAPI:
    """The `GatewayAPI` of one FastAPI app (the gateway is looked up at call time: it opens in the lifespan)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    @property
    def gw(self) -> Gateway:
        gw: Gateway = self.app.state.gateway
        return gw

    def need(self, scope: str | None) -> Any:
        """Return the FastAPI dependency that authenticates and checks `scope`, yielding the Principal."""
        return need(scope)

    @property
    def route_class(self) -> type[Any]:
        """Routes whose JSON bodies may be big (`bodylimit.CheckedJSONRoute`)."""
        return CheckedJSONRoute

    def big_bodies(self, endpoint: Any) -> Any:
        """Mark an endpoint that reads its body itself off the loop or streamed (`bodylimit.takes_big_bodies`)."""
        return takes_big_bodies(endpoint)

    async def invoke(self, plugin_id: str, capability_id: str, data: Any, caller: Principal) -> Any:
        """Run a capability of a plugin as `caller`."""
        return await self.gw.supervisor.get(plugin_id).invoke(capability_id, data, caller)

    def stream(self, plugin_id: str, capability_id: str, data: Any, caller: Principal) -> AsyncGenerator[Any, None]:
        """Run a streaming capability as `caller`; closing the iterator cancels it."""
        return self.gw.supervisor.get(plugin_id).stream(capability_id, data, caller)

    def record_usage(self, caller: Principal, route: str, result: dict[str, Any]) -> None:
        """Book an LLM result's token usage to the caller (never fails the answer the caller already has)."""
        self.gw.auth.book_usage(caller, route, result)
