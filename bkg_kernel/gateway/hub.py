"""WebSocket fan-out: plugin threads publish status / logs / telemetry events; subscribed clients get them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)  # hashed by identity: each client is its own subscriber
class Subscriber:
    """One WebSocket client and what it listens to: (topic, plugin or None for all). `sees(msg)` says whether
    this client may see an event (a job's events go to its owner and auditors only); `missed` counts the events
    dropped because the client fell 1000 behind, which it is told about."""

    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))
    topics: set[tuple[str, str | None]] = field(default_factory=set)
    sees: Callable[[dict[str, Any]], bool] = lambda msg: True
    missed: int = 0
    user: str | None = None  # whose socket it is (sockets per user are counted)

    def wants(self, topic: str, plugin: str) -> bool:
        return (topic, None) in self.topics or (topic, plugin) in self.topics


class Hub:
    """Thread-safe publish into the gateway's event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subscribers: set[Subscriber] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop (at gateway start)."""
        self.loop = loop

    def publish(self, topic: str, plugin: str, payload: dict[str, Any]) -> None:
        """Queue an event for every subscriber of (topic, plugin); callable from any thread."""
        loop = self.loop
        if loop is None or loop.is_closed() or not self.subscribers:
            return
        msg = {"type": topic, "plugin": plugin, "payload": payload, "time": time.time()}
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._fanout, topic, plugin, msg)

    def _fanout(self, topic: str, plugin: str, msg: dict[str, Any]) -> None:
        for sub in list(self.subscribers):
            if sub.wants(topic, plugin) and sub.sees(msg):
                try:
                    sub.queue.put_nowait(msg)
                except asyncio.QueueFull:  # a stuck client misses events (and is told so), never blocks others
                    sub.missed += 1
