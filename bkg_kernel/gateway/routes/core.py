"""The gateway's own routes: /health (open) and /metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from bkg_kernel.gateway.state import gateway, need, version

router = APIRouter(tags=["gateway"])


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Overall status and each plugin's status (no auth)."""
    gw = gateway(request)
    plugins = gw.snapshot_summary()
    states = {s["state"] for s in plugins.values()}
    status = "degraded" if states & {"error", "degraded"} else "starting" if "starting" in states else "ok"
    return {
        "status": status,
        "version": version(),
        "uptime_s": round(time.time() - gw.started, 1),
        "plugins": {p: s["state"] for p, s in plugins.items()},
        "call_port": gw.call_port.describe() if gw.call_port is not None else None,
    }


@router.get("/metrics", dependencies=[Depends(need("plugins:read"))])
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latencies, plugin states."""
    gw = gateway(request)
    text = gw.metrics.render(gw.supervisor.summary()["plugins"])
    return Response(text, media_type="text/plain; version=0.0.4")
