"""Plugins over HTTP: list, describe, status, health, logs, telemetry, lifecycle, config, and invoke."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from bkg_kernel.auth import Principal
from bkg_kernel.auth.principal import SCOPES
from bkg_kernel.errors import NotFound, PayloadTooLarge
from bkg_kernel.gateway.bodylimit import PARSED_BYTES, takes_big_bodies
from bkg_kernel.gateway.errors import ErrorField
from bkg_kernel.gateway.jsonresp import FastJSONResponse, PagedJSONResponse
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.runtime import bodyjson
from bkg_kernel.runtime.contract import Capability, validate_input
from bkg_kernel.runtime.host import PluginHost
from bkg_kernel.runtime.supervisor import SAMPLE_EVERY_S
from bkg_kernel.strict import StrictBody

router = APIRouter(tags=["plugins"])


class Config(StrictBody):
    config: dict[str, Any] | None = None
    enabled: bool | None = None
    autostart: bool | None = None


read = Depends(need("plugins:read"))
# as the supervisor's and the invoke route's errors name them (`no plugin ...`: plugin)
PluginId = Annotated[str, ErrorField("plugin")]
CapabilityId = Annotated[str, ErrorField("capability")]


@router.get("/api/plugins", dependencies=[read])
async def list_plugins(request: Request) -> JSONResponse:
    """Every plugin with its status and latest telemetry."""
    sup = gateway(request).supervisor
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


@router.get("/api/plugins/telemetry/summary", dependencies=[read])
async def telemetry_summary(request: Request) -> dict[str, Any]:
    """Telemetry of every plugin plus totals."""
    sup = gateway(request).supervisor
    return sup.summary()


@router.get("/api/plugins/telemetry/history", dependencies=[read])
async def telemetry_history(
    request: Request, minutes: Annotated[float, Query(gt=0, le=60, description="How far back (at most an hour).")] = 60
) -> dict[str, Any]:
    """Every plugin's cpu, memory, p50/p95 latency and requests/min over the last `minutes`, as columns."""
    sup = gateway(request).supervisor
    since = time.time() - minutes * 60
    return {
        "interval_s": SAMPLE_EVERY_S,
        "plugins": {pid: h.telemetry.history_columns(since) for pid, h in sup.hosts.items()},
    }


@router.get("/api/plugins/{plugin_id}", dependencies=[read])
async def get_plugin(plugin_id: PluginId, request: Request) -> dict[str, Any]:
    """The plugin's declaration: capabilities with JSON Schemas, settings schema, config, status."""
    return _host(request, plugin_id).describe()


@router.get("/api/plugins/{plugin_id}/status", dependencies=[read])
async def plugin_status(plugin_id: PluginId, request: Request) -> dict[str, Any]:
    """Lifecycle state, reason, pid and uptime."""
    return _host(request, plugin_id).status()


@router.get("/api/plugins/{plugin_id}/health", dependencies=[read])
async def plugin_health(plugin_id: PluginId, request: Request) -> dict[str, Any]:
    """The plugin's own health report (asked of the running plugin: `{"ok": bool, ...}`)."""
    result: dict[str, Any] = await _host(request, plugin_id).health()
    return result


@router.get("/api/plugins/{plugin_id}/logs", dependencies=[read])
async def plugin_logs(
    plugin_id: PluginId,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=2000)] = 200,
    level: Annotated[
        str | None,
        Query(
            pattern="^[A-Za-z0-9_ -]{1,40}$",
            description="The lowest level shown: DEBUG, INFO, WARNING, ERROR, CRITICAL, a level a plugin named "
            "(NOTICE) or a number. A plugin's own level is shown under its name and ranked by its number, as in "
            "logging.",
        ),
    ] = None,
    search: str | None = None,
) -> dict[str, Any]:
    """The newest log lines, at or above a level, optionally containing a string (every level, a plugin's own
    too)."""
    return {"lines": _host(request, plugin_id).logs.query(limit, level, search)}


@router.get("/api/plugins/{plugin_id}/telemetry", dependencies=[read])
async def plugin_telemetry(plugin_id: PluginId, request: Request) -> dict[str, Any]:
    """cpu %, RSS, uptime, requests, errors, last error, p50 / p95 latency, queue depth."""
    return _host(request, plugin_id).telemetry.snapshot()


@router.get("/api/plugins/{plugin_id}/config", dependencies=[read])
async def get_config(plugin_id: PluginId, request: Request) -> dict[str, Any]:
    """The plugin's settings, their JSON Schema, and enabled / autostart."""
    h = _host(request, plugin_id)
    schema = h.cls.describe()["settings_schema"] if h.cls else {}
    return {
        "config": h.settings.public(),
        "schema": schema,
        "enabled": h.entry.enabled,
        "autostart": h.entry.autostart,
    }


@router.put("/api/plugins/{plugin_id}/config")
async def put_config(
    plugin_id: PluginId, body: Config, request: Request, p: Annotated[Principal, Depends(need("plugins:write"))]
) -> dict[str, Any]:
    """Validate and save settings (422 names the bad field); a running plugin restarts to apply them, unless only
    its limits (`live_fields`: the gateway applies those from the next call on) and what it takes as it runs
    (`retunable_fields`) changed."""
    gw = gateway(request)
    h = _host(request, plugin_id)
    restarted = False
    changed: list[str] = []
    if body.config is not None and isinstance(body.config, dict):
        body.config = h.settings.keep_secrets(body.config)
    if body.config is not None:
        new = await asyncio.to_thread(h.checked_config, body.config)  # a validator may look at the disk
        # settings of another class (a stored config that no longer validates left the base settings): every
        # setting of the new config counts as changed
        changed = h.settings.changed(new) if type(h.settings) is type(new) else sorted(type(new).model_fields)
        guarded = [k for k in changed if k not in new.tunable_fields]
        if guarded:  # they decide what the plugin reaches for every caller: every scope (the admin role's)
            tunable = ", ".join(new.tunable_fields)
            what = f"changing {plugin_id}'s {', '.join(guarded)} (anyone with plugins:write may change {tunable})"
            p.require_all(SCOPES, what, f"config.{guarded[0]}")
        h.configure(new)
    if body.enabled is not None:
        h.entry.enabled = body.enabled
    if body.autostart is not None:
        h.entry.autostart = body.autostart
    await asyncio.to_thread(gw.supervisor.save_registry)
    gw.auth.audit(p.username, "plugin.config", plugin_id, config=h.settings.public(), enabled=body.enabled)
    # a start under way took the old settings: it is ended and made again with these (found by a review: the worker
    # kept the old ones while the config API showed the new); the live fields are read by the gateway, not the
    # plugin, and a running plugin takes its retunable ones as it runs
    own = [k for k in changed if k not in h.settings.live_fields]
    if own and h.state in ("running", "degraded", "starting"):
        retunable = all(k in h.settings.retunable_fields for k in own)
        if not (retunable and await h.retune(h.settings)):
            await asyncio.to_thread(h.restart)
            restarted = True
    return {"config": h.settings.public(), "restarted": restarted, "status": h.status()}


@router.post("/api/plugins/{plugin_id}/invoke/{capability_id}")
@takes_big_bodies
async def invoke(plugin_id: PluginId, capability_id: CapabilityId, request: Request) -> Any:
    """Run a capability with its JSON input; the capability's own scope is required."""
    gw = gateway(request)
    gw.principal(request, None)  # who is asking comes before what exists
    h = _host(request, plugin_id)
    cap = h.cls.capabilities().get(capability_id) if h.cls else None
    p = gw.principal(request, cap.scope if cap else "plugins:read")
    if cap is None and h.cls is not None:  # before its body is read: parsing one costs the whole gateway time
        raise NotFound(f"plugin {plugin_id!r} has no capability {capability_id!r}", field="capability")
    if cap is not None and not cap.big_input:  # said from the header when it is there, before anything is read
        _small_input(cap.id, request.headers.get("content-length"))
    raw = await request.body()
    if cap is not None and not cap.big_input:
        _small_input(cap.id, len(raw))
    big = len(raw) > bodyjson.BIG_BODY
    as_job = cap is not None and cap.job
    if big and h.worker is not None and not as_job:
        # parsed by the worker: pickling what a parse made would hold the loop as long as the parse itself
        result = _booked(request, p, cap, await h.invoke(capability_id, bodyjson.RawJSON(raw), p))
        return await _answer(result, True)
    # an inline plugin's big body (documents to index) is parsed on a thread, in pieces
    body = (
        await asyncio.to_thread(bodyjson.loads, raw, None, "input")
        if big
        else bodyjson.loads(raw, None, "input")
        if raw
        else {}
    )
    if cap is not None and as_job:
        # a bad input is the caller's 422 now, not a failed job later (a big one checked on a thread)
        try:
            if big:
                await asyncio.to_thread(validate_input, cap.input, body)
            else:
                validate_input(cap.input, body)
            if cap.check is not None:  # what the job would refuse at its start, refused now: nothing is queued
                await h.invoke(cap.check, bodyjson.RawJSON(raw) if big and h.worker is not None else body, p)
        except BaseException:
            if big:  # what the parse made, freed a slice at a time on a thread, not at once on the loop
                await asyncio.to_thread(bodyjson.release, body)
            raise
        data = bodyjson.RawJSON(raw) if big and h.worker is not None else body  # the worker parses it again
        if data is not body:
            await asyncio.to_thread(bodyjson.release, body)
        work = h.stream(capability_id, data, p, queued=True)  # a job waits for its slot, however long
        job = gw.jobs.start_stream(capability_id, work, plugin=plugin_id, owner=p, scope=cap.scope)
        return JSONResponse({"job": job.to_dict()}, status_code=202)
    # The worker's answer is JSON data already (the capability's output model, dumped in JSON mode): sent as is, not
    # walked again by FastAPI's encoder (~1 ms for a brainml page of hits), and encoded by orjson. A big body is the
    # call's own: the plugin's thread frees it once done with it (after a timeout too, not when this returns).
    result = _booked(request, p, cap, await h.invoke(capability_id, body, p, owned=big))
    return await _answer(result, h.worker is not None)


async def _answer(result: Any, from_worker: bool) -> FastJSONResponse:
    """A plugin's answer, encoded. A worker's may be big (embeddings of a batch, a file, a command's output):
    encoded on a thread, the hop (~0.2 ms) small beside the worker's round trip. An inline plugin's (brainml's
    pages of hits, at most ~1 MB: under a millisecond for orjson) on the loop, where the hop would double a text
    query's time over HTTP; unless it holds a long list (apikeys.audit's 10,000 entries, 17 MB), on a thread too."""
    if from_worker or _long(result):
        return await asyncio.to_thread(PagedJSONResponse.of, result)
    return FastJSONResponse(result)


def _long(result: Any) -> bool:
    """Whether an answer holds a list longer than a page of hits (top_k is at most 1,000)."""
    return isinstance(result, dict) and any(isinstance(v, list) and len(v) > 1000 for v in result.values())


def _small_input(capability_id: str, size: int | str | None) -> None:
    """413 for an input over `PARSED_BYTES` to a capability not made for big inputs (checking one holds the
    interpreter as long as it takes: a viewer's 25 MB query held the gateway a second)."""
    try:
        n = int(size) if size is not None else 0
    except ValueError:
        return  # a malformed length is the server's to refuse
    if n > PARSED_BYTES:
        raise PayloadTooLarge(
            f"{capability_id} takes inputs of at most {PARSED_BYTES // 2**20} MiB; this one has {n:,} bytes "
            "(capabilities made for big inputs say so: big_input)",
            field="body",
        )


def _booked(request: Request, p: Principal, cap: Capability | None, result: Any) -> Any:
    """`result`, its LLM tokens booked to the caller when the capability says it spends them (as /v1 books the
    same answer): a key with llm:use is counted whichever route it takes."""
    if cap is None or not cap.books_usage or not isinstance(result, dict):
        return result
    gateway(request).auth.book_usage(p, f"/api/plugins/{request.path_params.get('plugin_id')}/invoke/{cap.id}", result)
    return result


def _lifecycle_route(action: str) -> None:
    async def route(
        plugin_id: PluginId, request: Request, p: Annotated[Principal, Depends(need("plugins:write"))]
    ) -> Any:
        gw = gateway(request)
        h = _host(request, plugin_id)
        status = await asyncio.to_thread(getattr(h, action))
        gw.auth.audit(p.username, f"plugin.{action}", plugin_id, state=status["state"])
        return status

    route.__doc__ = f"{action.capitalize()} the plugin and return its status."
    router.post(f"/api/plugins/{{plugin_id}}/{action}", name=f"plugin_{action}")(route)


def _host(request: Request, plugin_id: str) -> PluginHost:
    return gateway(request).supervisor.get(plugin_id)


for _action in ("start", "stop", "restart"):
    _lifecycle_route(_action)
