"""Plugins on the gateway: `wb.plugins` renders as a table, `wb.plugin(id)` starts, stops, configures, invokes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bkg_kernel.client.transport import seg
from bkg_kernel.display import Table
from bkg_kernel.errors import InvalidInput

if TYPE_CHECKING:
    from bkg_kernel.client.workbench import Workbench

# what a plugin id is (the gateway's live socket takes no other: gateway/routes/live.py)
PLUGIN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def checked_plugin_id(value: Any) -> str:
    """Refuse what cannot be a plugin id before it is sent: in a URL, a '/' (the gateway decodes %2F before it
    routes) or a '.' / '..' segment reached another route, whose answer was `no such route: GET /api/...`."""
    if not isinstance(value, str) or not PLUGIN_ID.fullmatch(value) or not value.strip("."):
        raise InvalidInput(
            f"{value!r} cannot be a plugin id (letters, digits, '_', '-', '.'; at most 64; not '.' or '..'): "
            "`wb.plugins` lists the gateway's plugins",
            field="plugin",
        )
    return value


class PluginTable(Table):
    """Plugins as a notebook table."""

    headers = ("plugin", "state", "mode", "uptime s", "RSS MB", "req/min", "reason")
    caption = "bkg plugins"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one plugin's cells."""
        t = row["telemetry"]
        return (
            row["id"], row["state"], row["mode"], t["uptime_s"], t["rss_bytes"] >> 20, t["requests_per_min"],
            row["reason"] or "",
        )  # fmt: skip


class LogTable(Table):
    """A plugin's log lines, oldest first."""

    headers = ("time", "level", "message")
    noun = "log line"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one line's cells."""
        at = datetime.fromtimestamp(row["time"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]  # this machine's clock
        return (at, row["level"], row["message"])


class RemotePlugin:
    """One plugin on the gateway."""

    def __init__(self, wb: Workbench, plugin_id: str) -> None:
        self.wb, self.id = wb, checked_plugin_id(plugin_id)

    def __repr__(self) -> str:
        return f"RemotePlugin({self.id!r})"

    def _call(self, method: str, action: str, **kw: Any) -> Any:
        return self.wb.call(method, f"/api/plugins/{seg(self.id)}{action}", **kw)

    def describe(self) -> dict[str, Any]:
        """Capabilities, settings schema, config and status."""
        return dict(self._call("GET", ""))

    def status(self) -> dict[str, Any]:
        """Lifecycle state."""
        return dict(self._call("GET", "/status"))

    def start(self) -> dict[str, Any]:
        """Start the plugin."""
        return dict(self._call("POST", "/start"))

    def stop(self) -> dict[str, Any]:
        """Stop the plugin."""
        return dict(self._call("POST", "/stop"))

    def restart(self) -> dict[str, Any]:
        """Restart the plugin."""
        return dict(self._call("POST", "/restart"))

    def logs(self, limit: int = 100, level: str | None = None) -> LogTable:
        """Newest log lines, at or above `level`, oldest first (a table in a notebook)."""
        params: dict[str, Any] = {"limit": limit} | ({"level": level} if level else {})
        table = LogTable(self._call("GET", "/logs", params=params)["lines"])
        table.caption = f"plugin {self.id}"
        return table

    def telemetry(self) -> dict[str, Any]:
        """cpu, memory, requests, errors, latency."""
        return dict(self._call("GET", "/telemetry"))

    def configure(self, **config: Any) -> dict[str, Any]:
        """Validate and save settings (the plugin restarts if running)."""
        return dict(self._call("PUT", "/config", json={"config": config}))

    def invoke(self, capability: str, **data: Any) -> Any:
        """Run one capability."""
        return self.wb.invoke(self.id, capability, data)
