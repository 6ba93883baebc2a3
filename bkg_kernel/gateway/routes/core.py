"""The gateway's own routes: /health, /livez and /readyz (open) and /metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from bkg_kernel.gateway.state import gateway, need, version
from bkg_kernel.runtime.host import RETRY_STARTING_S

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
        "max_body_bytes": int(gw.settings.max_body_mb * 2**20),  # what a client's batches must stay under
    }


@router.get("/livez")
async def livez() -> dict[str, Any]:
    """200 while the gateway answers at all (a liveness probe, as Qdrant's /livez; no auth)."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 once the boot's autostarts are done and no plugin is starting or restarting, else 503 naming those it
    waits for (a readiness probe, as Qdrant's /readyz, for a load balancer or Kubernetes; /health answers 200
    whatever its status). A plugin in error does not hold readiness back (the rest is served; /health says
    degraded), nor one stopped by hand. No auth."""
    gw = gateway(request)
    sup = gw.supervisor
    waiting = {
        pid: s["state"]
        for pid, s in gw.snapshot_summary().items()
        if s["state"] in ("starting", "stopping")
        and sup.hosts[pid].want_running
        or not sup.autostarted
        and _boots(sup.hosts[pid])
        and s["state"] not in ("running", "degraded", "error")
    }
    if waiting:
        body = {"status": "not ready", "plugins": waiting}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(math.ceil(RETRY_STARTING_S))})
    return JSONResponse({"status": "ready", "plugins": {}})


def _boots(h: Any) -> bool:
    """Whether the boot starts this plugin (enabled, autostart, loadable)."""
    return h.cls is not None and h.entry.enabled and h.entry.autostart


@router.get("/metrics", dependencies=[Depends(need("plugins:read"))])
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latencies, plugin states."""
    gw = gateway(request)
    text = gw.metrics.render(gw.supervisor.summary()["plugins"])
    return Response(text, media_type="text/plain; version=0.0.4")
