"""The live WebSocket (`/ws`): plugin status, logs, telemetry and job events to subscribed clients."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from bkg_kernel.errors import BkgError
from bkg_kernel.gateway import jobs
from bkg_kernel.gateway.hub import Subscriber
from bkg_kernel.gateway.jupyterhub import token_of
from bkg_kernel.gateway.state import Gateway

TOPICS = ("status", "logs", "telemetry", "jobs")
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
    await websocket.accept()
    sub = Subscriber(
        sees=lambda msg: msg["type"] != "jobs" or jobs.visible(msg["payload"].get("owner"), p.scopes, p.username)
    )
    gw.hub.subscribers.add(sub)
    await websocket.send_json(
        {"type": "bootstrap", "payload": {"plugins": gw.snapshot_summary(), "telemetry": gw.supervisor.summary()}}
    )

    async def pump() -> None:
        while True:
            await websocket.send_json(await sub.queue.get())
            if sub.missed:
                missed, sub.missed = sub.missed, 0
                await websocket.send_json({"type": "missed", "payload": {"events": missed}, "time": time.time()})

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
