"""The live WebSocket (`/ws`): plugin status, logs, telemetry and job events to subscribed clients."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from bkg_kernel.auth import Principal
from bkg_kernel.errors import BkgError, NotFound, json_kind, name_hint
from bkg_kernel.gateway import jobs
from bkg_kernel.gateway.hub import Subscriber
from bkg_kernel.gateway.jsonresp import dumps
from bkg_kernel.gateway.jupyterhub import token_of
from bkg_kernel.gateway.state import Gateway
from bkg_kernel.jobs import service

TOPICS = ("status", "logs", "telemetry", "jobs")
MAX_SOCKETS = 512  # live sockets the gateway holds: each event is encoded once per socket, on the event loop
MAX_PER_USER = 32  # of them, one user's (a lab, its panels and dashboards use a few)
PLUGIN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RECHECK_S = 1.0  # how stale the socket's view of its caller may get before an event goes out
router = APIRouter()


@router.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    """Live events: send {"action": "sub"|"unsub", "topic": "status"|"logs"|"telemetry"|"jobs", "plugin"?}."""
    await _websocket(websocket)


async def _websocket(websocket: WebSocket) -> None:
    gw: Gateway = websocket.app.state.gateway
    token = token_of(websocket)
    try:
        p = getattr(websocket.state, "principal", None) or (gw.auth.authenticate(token) if token else None)
        if p is None or "plugins:read" not in p.scopes:
            raise BkgError("needs a key with scope plugins:read (?token=...)")
    except BkgError as exc:
        await websocket.close(code=4401, reason=exc.message[:120])
        return
    assert p is not None
    subs = gw.hub.subscribers
    mine = sum(1 for s in subs if s.user == p.user_id)
    if len(subs) >= MAX_SOCKETS or mine >= MAX_PER_USER:
        said = (f"{p.username} has {mine} live sockets open (at most {MAX_PER_USER})" if mine >= MAX_PER_USER
                else f"the gateway holds {len(subs)} live sockets (at most {MAX_SOCKETS})")  # fmt: skip
        await websocket.accept()  # then closed with the reason (closed before, it is a bare HTTP 403)
        await websocket.close(code=4429, reason=f"{said}: close one first"[:120])
        return
    await websocket.accept()
    caller = [p]  # who the socket serves, checked again as events go out (a key revoked, a role changed)
    sub = Subscriber(sees=lambda msg: _sees(caller[0], msg), user=p.user_id)
    gw.hub.subscribers.add(sub)
    await websocket.send_json(
        {"type": "bootstrap", "payload": {"plugins": gw.snapshot_summary(), "telemetry": gw.supervisor.summary()}}
    )

    async def pump() -> None:
        checked = time.monotonic()
        while True:
            msg = await sub.queue.get()
            if time.monotonic() - checked > RECHECK_S:
                try:
                    caller[0] = await gw.caller_now(token)
                    if "plugins:read" not in caller[0].scopes:
                        raise BkgError("the caller no longer holds scope plugins:read")
                except BkgError as exc:
                    await websocket.close(code=4401, reason=exc.message[:120])
                    return
                checked = time.monotonic()
                if not _sees(caller[0], msg):
                    continue
            if msg["type"] == "jobs":  # who owns a job decided who gets it, and how much of it
                msg = {**msg, "payload": _shown(caller[0], msg["payload"])}
                # a run's event carries its parameters (up to 1 MiB): encoded on a thread, not on the loop
                await websocket.send_text(await asyncio.to_thread(_text, msg))
                continue
            await websocket.send_text(_text(msg))
            if sub.missed:
                missed, sub.missed = sub.missed, 0
                await websocket.send_json({"type": "missed", "payload": {"events": missed}, "time": time.time()})

    sender = asyncio.create_task(pump())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                answer = await _subscription(gw, sub, message.get("text"))
            except NotFound as exc:  # a name no event is ever sent for: said, never acknowledged
                wrong = {"message": f"{exc.field}: {exc.message}", "field": exc.field}
                await websocket.send_json({"type": "error", "payload": wrong})
                continue
            if isinstance(answer, str):
                await websocket.send_json({"type": "error", "payload": {"message": answer}})
            else:
                await websocket.send_json({"type": "ack", "payload": answer})
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        sender.cancel()
        gw.hub.subscribers.discard(sub)


def _sees(p: Principal, msg: dict[str, Any]) -> bool:
    if msg["type"] != "jobs":
        return True
    return jobs.visible(p, msg["payload"].get("owner"), msg["payload"].get("owner_id"))


def _shown(p: Principal, job: dict[str, Any]) -> dict[str, Any]:
    """A `jobs` event's job as `p` sees it, by the rule GET /api/jobs/{id} shows it by: a notebook run's as
    `service.shown`, a background job's as `Job.shown` (without what decides who gets it and how much of it)."""
    if str(job.get("id")).startswith("run-"):  # a notebook run
        return service.shown(job, p)
    return jobs.shown_event(job, p)


async def _subscription(gw: Gateway, sub: Subscriber, text: str | None) -> dict[str, Any] | str:
    """Apply one client message to `sub`; return the ack's payload, or what was wrong with the message (a `plugin`
    that no event of the topic names: NotFound)."""
    usage = "send JSON text {action: sub|unsub, topic: status|logs|telemetry|jobs, plugin?: <plugin id | job kind>}"
    if text is None:
        return f"binary frames are not understood: {usage}"
    try:
        msg = json.loads(text)
    except ValueError:
        return f"not JSON: {usage}"
    if not isinstance(msg, dict):
        return f"a JSON object is expected, not {json_kind(msg)}: {usage}"
    action, topic, plugin = msg.get("action"), msg.get("topic"), msg.get("plugin")
    if action not in ("sub", "unsub") or topic not in TOPICS:
        return usage
    if plugin is not None and (not isinstance(plugin, str) or not PLUGIN_ID.fullmatch(plugin)):
        return "plugin must be a plugin id (letters, digits, '_', '-', '.'; at most 64)"
    if plugin is not None and action == "sub":  # letting go of a name (a plugin since stopped) is always fine
        await _check_named(gw, topic, plugin)
    key = (topic, plugin)
    if action == "sub":
        sub.topics.add(key)
    else:
        sub.topics.discard(key)
    return {"action": action, "topic": topic, "plugin": plugin}


async def _check_named(gw: Gateway, topic: str, plugin: str) -> None:
    """Raise NotFound (field `plugin`) unless events of `topic` can name `plugin`: a plugin this gateway hosts, or
    on `jobs` a job's kind (the id of a hosted plugin's job capability, `models.download`, `notebook`), which is
    what its events carry."""
    if topic != "jobs":
        if plugin not in gw.supervisor.hosts:  # says so, with the hosted ones (a first miss discovers: a thread)
            await asyncio.to_thread(gw.supervisor.get, plugin)
        return
    kinds = {"models.download"} | ({"notebook"} if gw.runs is not None else set())
    for h in gw.supervisor.hosts.values():
        kinds |= {cap.id for cap in (h.cls.capabilities().values() if h.cls else ()) if cap.job}
    if plugin not in kinds:
        raise NotFound(f"no job kind {plugin!r} on topic jobs, where plugin names the kind of job "
                       f"({name_hint(plugin, kinds)})", field="plugin")  # fmt: skip


def _text(msg: dict[str, Any]) -> str:
    """An event as JSON text, written by orjson (a NaN as null: the standard library's encoder writes `NaN`, which
    a browser's JSON.parse refuses)."""
    return dumps(msg).decode()
