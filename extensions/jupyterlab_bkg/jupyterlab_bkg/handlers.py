"""Forward `/bkg/api/<path>` and `/bkg/ws` to the bkg gateway, behind Jupyter's authentication.

Which gateway: `BkgLab.gateway_url` and `BkgLab.api_key` when set (their defaults are bkg's settings,
`BKG_GATEWAY_URL` / `BKG_API_KEY`); otherwise, with `bkg_kernel` installed, the gateway of the data dir,
started in the background when none runs (unless `BkgLab.start_gateway` is off) and kept as `bkg run` keeps it: one
that dies (killed, crashed) is started again at the same address, a few times a minute at most, and one stopped
cleanly is left stopped (`bkg_kernel.client.keeper`). A gateway found so that then
refuses a connection is looked for again, as `connect()` would (a gateway restarted on another port, `bkg serve
--port 0`, is found without restarting Jupyter). A gateway that cannot be reached is a 502 naming the URL, never a
hang.

`/bkg/ws` pings both sides, as Jupyter Server's kernel sockets ping the browser (see `keep_alive`): a browser gone
without a word (a laptop shut, a network dropped) closes the gateway's socket too, and a gateway gone silent closes
the browser's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode

import httpx
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WS_PING_INTERVAL, WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado import httpclient, web, websocket
from traitlets import Bool, Unicode, default
from traitlets.config import Configurable

REDISCOVER_S = 2.0  # a search for the data dir's gateway that found none is not repeated sooner (every request asks)
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "server", "date"}


class BkgLab(Configurable):
    """The lab server extension's settings (`c.BkgLab.<name>` in a Jupyter config); defaults: bkg's settings."""

    gateway_url = Unicode(
        None, allow_none=True, help="The bkg gateway to forward to (default: the data dir's, started if none runs)."
    ).tag(config=True)
    api_key = Unicode(
        None, allow_none=True, help="The API key the server side sends (default: BKG_API_KEY, else workbench.key)."
    ).tag(config=True)
    start_gateway = Bool(help="Start a gateway on the data dir when none runs (needs bkg_kernel).").tag(config=True)
    dashboards_url = Unicode(None, allow_none=True, help="Where Voila serves the dashboards.").tag(config=True)
    dashboards_dir = Unicode(help="The folder of dashboard notebooks the launcher lists.").tag(config=True)

    @default("gateway_url")
    def _gateway_url_default(self) -> str | None:
        url = _bkg_settings()["gateway_url"]
        return url if url is None or _trusted(url) else None  # None: `connect()` finds it, and says why not

    @default("api_key")
    def _api_key_default(self) -> str | None:
        return _bkg_settings()["api_key"]

    @default("start_gateway")
    def _start_gateway_default(self) -> bool:
        return bool(_bkg_settings()["lab_start_gateway"])

    @default("dashboards_url")
    def _dashboards_url_default(self) -> str | None:
        return _bkg_settings()["dashboards_url"]

    @default("dashboards_dir")
    def _dashboards_dir_default(self) -> str:
        return str(_bkg_settings()["dashboards_dir"])


def _trusted(url: str) -> bool:
    """Whether bkg's settings found `url` somewhere the key may go (`bkg_kernel.client.workbench.vet_gateway`): a
    `bkg.toml` in the server's working directory, a cloned repository's, alone cannot send the key elsewhere."""
    try:
        from bkg_kernel.client.workbench import vet_gateway
        from bkg_kernel.errors import Forbidden
        from bkg_kernel.settings import Settings
    except ImportError:  # without bkg_kernel only BKG_* variables are read: the user's own
        return True
    try:
        vet_gateway(url, Settings())
    except Forbidden as exc:
        logging.getLogger(__name__).warning("bkg: %s", exc)
        return False
    return True


@lru_cache(maxsize=1)
def _bkg_settings() -> dict[str, Any]:
    """The client fields of `bkg_kernel.settings.Settings`; without bkg_kernel, the same `BKG_*` variables."""
    names = ("gateway_url", "api_key", "lab_start_gateway", "dashboards_url", "dashboards_dir")
    try:
        from bkg_kernel.settings import Settings
    except ImportError:  # this extension installs without bkg_kernel: read the variables it would read
        env = {n: os.environ.get(f"BKG_{n.upper()}") for n in names}
        return env | {
            "lab_start_gateway": (env["lab_start_gateway"] or "1").lower() not in ("0", "false", "no", "off"),
            "dashboards_dir": env["dashboards_dir"] or "dashboards",
        }
    return Settings().model_dump(include=set(names))


class Target:
    """Where the gateway is and the key to use: `BkgLab`'s, else found as `connect()` finds it, lazily. What was
    found is forgotten when its gateway refuses a connection (`lost`) and looked for again, at most every
    `REDISCOVER_S` while none is found; only the first search starts a gateway (one stopped by hand is not started
    again behind the user's back: `bkg serve` would then find its data dir taken), and the one it started is kept
    (`keeper`: started again where it was if it dies)."""

    def __init__(self, lab: BkgLab) -> None:
        self.configured_url: str | None = lab.gateway_url
        self.configured_key: str | None = lab.api_key
        self.url: str | None = lab.gateway_url
        self.key: str | None = lab.api_key
        self.start: bool = lab.start_gateway
        self.started = False
        self.found = False  # a search has found a gateway once: later ones only look
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None  # when the last search found no gateway, and why
        self.keeper: Any = None  # the GatewayKeeper of the gateway this lab started, if it did

    async def resolve(self) -> tuple[str, str | None]:
        """Return the gateway's URL and key, looking for them when they are not known (yet, or any more)."""
        if self.url and self.key:
            return self.url, self.key
        async with self._lock:
            if not (self.url and self.key):
                if self._failed is not None and time.monotonic() - self._failed[0] < REDISCOVER_S:
                    raise GatewayUnreachable(self._failed[1])
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self._from_bkg_kernel)
                except GatewayUnreachable as exc:
                    self._failed = (time.monotonic(), str(exc))
                    raise
                self._failed = None
        assert self.url is not None
        return self.url, self.key

    def lost(self, url: str) -> bool:
        """Note that the gateway at `url` refused a connection; return whether another try may reach one.

        A URL and key that were found, not configured, are forgotten: the next `resolve` looks again."""
        if self.url == url:
            if self.configured_url:
                return False
            self.url, self.key = None, self.configured_key
        return True  # forgotten now, or already by another request (and maybe found again)

    def _from_bkg_kernel(self) -> None:
        try:
            import bkg_kernel
        except ImportError:
            self.url = self.url or "http://127.0.0.1:43119"
            return
        from bkg_kernel.client.workbench import SPAWNED

        start = self.start and not self.found
        before = set(SPAWNED)
        try:
            wb = bkg_kernel.connect(self.url, api_key=self.key, start=start)
        except Exception as exc:  # noqa: BLE001 - reported to the browser as a 502
            raise GatewayUnreachable(str(exc)) from None
        self.started = self.started or start
        if new := [SPAWNED[pid] for pid in set(SPAWNED) - before]:
            self._keep(new[-1], wb.url)
        self.found = True
        self.url = wb.url
        self.key = self.key or wb.api_key

    def _keep(self, proc: Any, url: str) -> None:
        """Keep the gateway this lab started (`proc`, at `url`) as `bkg run` does: started again if it dies."""
        from bkg_kernel.client.keeper import GatewayKeeper
        from bkg_kernel.settings import Settings

        settings = Settings()
        say = logging.getLogger(__name__).warning
        self.keeper = GatewayKeeper(proc, settings, settings.data_dir.resolve(), url, lambda line: say("bkg: %s", line))
        self.keeper.start()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


class GatewayUnreachable(Exception):
    """No gateway answers."""


# A connection the gateway refused (or never accepted): nothing was sent, so the request may go again elsewhere
REFUSED = (httpx.ConnectError, httpx.ConnectTimeout)


JUPYTER_ONLY = frozenset({"token", "_xsrf"})  # query arguments for the Jupyter server, never forwarded
# What stays as the browser sent it; every other byte is percent-encoded. '#' is not among them (it would start a
# fragment), nor is '?' in the path (it would start the query).
PATH_SAFE = "/%:@!$&'()*+,;="
QUERY_SAFE = PATH_SAFE + "?"
# Close codes a browser accepts in a close frame; others (1005, 1006, 1015, unassigned ones) fail its connection.
SENDABLE_CLOSE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


def keep_alive(settings: dict[str, Any]) -> tuple[float, float]:
    """Seconds between pings on `/bkg/ws`, and how long a ping may go unanswered; (0, 0): no pings.

    Jupyter Server's `websocket_ping_interval` / `websocket_ping_timeout` when set (the timeout at most the
    interval, as tornado has it; unset, the interval); otherwise what its kernel sockets use, `ws_ping_interval` /
    `ws_ping_timeout` of `tornado_settings` in milliseconds, by default 30 s and 90 s (`ws_ping_interval` 0: none).
    """
    if interval := settings.get("websocket_ping_interval") or 0:
        timeout = settings.get("websocket_ping_timeout") or interval
        return float(interval), float(min(timeout, interval))
    interval_ms = settings.get("ws_ping_interval", WS_PING_INTERVAL)
    if (interval_ms or 0) <= 0:
        return 0.0, 0.0
    timeout_ms = settings.get("ws_ping_timeout", max(3 * interval_ms, WS_PING_INTERVAL))
    return interval_ms / 1000, timeout_ms / 1000


def _error(handler: JupyterHandler, status: int, code: str, message: str) -> None:
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"error": {"status": status, "code": code, "message": message}}))


def _printable(raw: str, safe: str) -> str:
    """`raw` (a part of the request line, each byte a latin-1 character as tornado reads it) as printable ASCII."""
    return quote(raw.encode("latin-1"), safe=safe)


class ProxyHandler(APIHandler):
    """One REST call to the gateway; server-sent events stream through as they come."""

    target: Target

    def initialize(self, target: Target, prefix: str) -> None:
        self.target = target
        self.prefix = prefix

    def _dest(self, url: str) -> str:
        """The gateway URL of this request: its path and query still encoded, less Jupyter's own arguments."""
        # The route captures nothing: tornado would decode it, and a `%3F`, `%23` or `%2F` in a segment would then
        # reach the gateway as a query, a fragment or another route
        path = _printable(self.request.path[len(self.prefix) :], PATH_SAFE)
        # Jupyter's own credentials (`?token=`, `_xsrf`) stay here: the gateway takes the caller's key instead. The
        # other arguments go as they came: a value that is not UTF-8 is the gateway's to refuse
        kept = "&".join(
            a for a in self.request.query.split("&") if unquote_plus(a.partition("=")[0]) not in JUPYTER_ONLY
        )
        query = _printable(kept, QUERY_SAFE)
        return f"{url.rstrip('/')}/{path}" + (f"?{query}" if query else "")

    async def _forward(self) -> None:
        # A literal `.` or `..` segment would be resolved on the way (httpx does, as a browser does before it
        # sends): past a gateway URL with a path (`https://host/services/bkg`), with the lab's key. No gateway
        # route has one; an encoded `%2e%2e` goes on as sent and is the gateway's 404.
        if any(seg in (".", "..") for seg in self.request.path[len(self.prefix) :].split("/")):
            _error(self, 400, "bad_request", "the path holds a '.' or '..' segment; no bkg gateway route does")
            return
        content_type = self.request.headers.get("Content-Type")
        if content_type and not content_type.isascii():  # httpx sends headers as ASCII
            _error(self, 400, "bad_request", "the Content-Type header holds a character that is not ASCII")
            return
        body = self.request.body if self.request.method not in ("GET", "DELETE", "HEAD") else None
        for again in (True, False):  # a found gateway that refuses is looked for once more: it may have moved
            try:
                url, _ = await self.target.resolve()
            except GatewayUnreachable as exc:
                _error(self, 502, "gateway_unreachable", f"cannot reach or start the bkg gateway: {exc}")
                return
            headers = self.target.headers() | ({"Content-Type": content_type} if content_type else {})
            try:
                req = self.target.client.build_request(
                    self.request.method or "GET", self._dest(url), headers=headers, content=body
                )
            except (httpx.InvalidURL, ValueError) as exc:  # still unsendable: past httpx's URL length, say
                _error(self, 400, "bad_request", f"cannot forward this request to the bkg gateway: {exc}")
                return
            try:
                resp = await self.target.client.send(req, stream=True)
                break
            except httpx.TransportError as exc:
                if not (isinstance(exc, REFUSED) and self.target.lost(url) and again):
                    _error(self, 502, "gateway_unreachable", f"cannot reach the bkg gateway at {url}: {exc}")
                    return
        try:
            self.set_status(resp.status_code)
            for k, v in resp.headers.items():
                if k.lower() not in HOP_HEADERS:
                    self.set_header(k, v)
            async for chunk in resp.aiter_raw():
                self.write(chunk)
                await self.flush()  # SSE: every token reaches the browser at once
        except httpx.TransportError:
            pass  # the gateway went away mid-answer: what was sent stands
        finally:
            await resp.aclose()
        self.finish()

    @web.authenticated
    async def get(self) -> None:
        await self._forward()

    @web.authenticated
    async def post(self) -> None:
        await self._forward()

    @web.authenticated
    async def put(self) -> None:
        await self._forward()

    @web.authenticated
    async def patch(self) -> None:
        await self._forward()

    @web.authenticated
    async def delete(self) -> None:
        await self._forward()


class StatusHandler(APIHandler):
    """Where the extension sends requests, and whether the gateway answers."""

    def initialize(self, target: Target) -> None:
        self.target = target

    @web.authenticated
    async def get(self) -> None:
        url = self.target.url
        for again in (True, False):  # as `_forward`: a found gateway that refuses is looked for once more
            try:
                url, _ = await self.target.resolve()
                r = await self.target.client.get(f"{url}/health", timeout=5)
                self.finish({"gateway": url, "reachable": r.status_code == 200, "health": r.json()})
                return
            except REFUSED as exc:
                if not (url is not None and self.target.lost(url) and again):
                    self.finish({"gateway": url, "reachable": False, "error": str(exc)})
                    return
            except (GatewayUnreachable, httpx.TransportError, ValueError) as exc:
                self.finish({"gateway": self.target.url, "reachable": False, "error": str(exc)})
                return


class DashboardsHandler(APIHandler):
    """The Voila dashboards the launcher offers: `BkgLab.dashboards_url` (set by `bkg run`) and the notebooks in
    `BkgLab.dashboards_dir` (default ./dashboards)."""

    def initialize(self, lab: BkgLab) -> None:
        self.lab = lab

    @web.authenticated
    def get(self) -> None:
        folder = Path(self.lab.dashboards_dir)
        names = sorted(p.stem for p in folder.glob("*.ipynb")) if folder.is_dir() else []
        self.finish({"url": self.lab.dashboards_url, "dashboards": names})


class LiveHandler(WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """The gateway's WebSocket, relayed both ways; closes when the gateway does, with its code and reason (the
    panel reconnects), and when either side stops answering pings."""

    target: Target
    upstream: websocket.WebSocketClientConnection | None = None
    pump: asyncio.Task[None] | None = None  # held here: the event loop keeps only a weak reference to a task
    pinger: asyncio.Task[None] | None = None
    unanswered: float | None = None  # when the oldest ping the browser has not answered went out

    def initialize(self, target: Target) -> None:
        self.target = target

    # tornado's own pinger stays off: it would read WebSocketMixin's milliseconds as seconds, and on a timeout it
    # closes the browser's side alone. `_ping_browser` pings instead, and closes the gateway's side too
    @property
    def ping_interval(self) -> float:
        return 0

    @property
    def ping_timeout(self) -> float:
        return 0

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.current_user is None:
            raise web.HTTPError(403)
        await super().get(*args, **kwargs)

    async def open(self, *args: Any, **kwargs: Any) -> None:
        # The gateway's socket is opened only here, once tornado and Jupyter have accepted the handshake (Upgrade,
        # Origin): one opened before a refused handshake stayed open, and 32 of them used up the user's sockets
        interval, timeout = keep_alive(self.settings)
        for again in (True, False):  # as `_forward`: a found gateway that refuses is looked for once more
            url = None
            try:
                url, key = await self.target.resolve()
                ws_url = url.replace("http://", "ws://").replace("https://", "wss://")
                # tornado pings the gateway: one that stops answering ends the socket, the pump closes the browser's
                self.upstream = await websocket.websocket_connect(
                    f"{ws_url}/ws?" + urlencode({"token": key or ""}),
                    ping_interval=interval or None,
                    ping_timeout=min(timeout, interval) or None,
                )
                break
            except (GatewayUnreachable, OSError, websocket.WebSocketError, httpclient.HTTPClientError) as exc:
                # no connection at all (an HTTP error is the gateway's answer): it may have moved
                if not (isinstance(exc, OSError) and url is not None and self.target.lost(url) and again):
                    self._close(1011, f"cannot reach the bkg gateway: {exc}")
                    return
        if self.ws_connection is None or self.ws_connection.is_closing():  # the browser left meanwhile
            self.upstream.close(1001, "the browser left")
            return
        self.pump = asyncio.ensure_future(self._pump())
        if interval > 0:
            self.pinger = asyncio.ensure_future(self._ping_browser(interval, timeout))

    async def _pump(self) -> None:
        assert self.upstream is not None
        while True:
            msg = await self.upstream.read_message()
            if msg is None:
                code, reason = self.upstream.close_code, self.upstream.close_reason
                said = "the bkg gateway closed the connection" if code else "lost the connection to the bkg gateway"
                self._close(code if code in SENDABLE_CLOSE else 1011, reason or said)
                return
            try:
                await self.write_message(msg)
            except websocket.WebSocketClosedError:
                return

    async def _ping_browser(self, interval: float, timeout: float) -> None:
        """Ping the browser every `interval` s; a ping unanswered for `timeout` s closes both sides."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + interval
        while True:
            due = next_ping if self.unanswered is None else min(next_ping, self.unanswered + timeout)
            await asyncio.sleep(due - loop.time())
            now = loop.time()
            if self.unanswered is not None and now >= self.unanswered + timeout:
                # Gone without a close (a laptop shut, a network dropped): TCP alone would hold both sockets for
                # hours. The browser gets a close frame too, in case it is only slow
                self.log.warning("bkg: /bkg/ws: no pong for %.1f s, closing both sides", now - self.unanswered)
                if self.upstream is not None:
                    self.upstream.close(1001, "the browser stopped answering pings")
                self._close(1001, "no answer to pings")
                return
            if now >= next_ping:
                try:
                    self.ping()
                except websocket.WebSocketClosedError:
                    return
                if self.unanswered is None:
                    self.unanswered = now
                next_ping = now + interval

    def on_pong(self, data: bytes) -> None:
        self.unanswered = None

    def _close(self, code: int, reason: str) -> None:
        # A close frame holds at most 123 bytes of reason
        self.close(code, reason.encode()[:123].decode(errors="ignore"))

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            with contextlib.suppress(websocket.WebSocketClosedError):  # gone: the pump closes this side, with why
                await self.upstream.write_message(message)

    def on_close(self) -> None:
        if self.pinger is not None:
            self.pinger.cancel()
        if self.upstream is not None:
            # The browser's own code and reason go on; without them (it vanished, or sent none): "going away"
            code = self.close_code if self.close_code in SENDABLE_CLOSE else 1001
            self.upstream.close(code, (self.close_reason or "the browser left").encode()[:123].decode(errors="ignore"))


def setup_handlers(server_app: Any) -> None:
    """Register the routes on the Jupyter server."""
    web_app = server_app.web_app
    base = web_app.settings["base_url"]
    lab = BkgLab(parent=server_app)
    target = Target(lab)
    api = url_path_join(base, "bkg", "api") + "/"
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "bkg", "status"), StatusHandler, {"target": target}),
            (url_path_join(base, "bkg", "dashboards"), DashboardsHandler, {"lab": lab}),
            (url_path_join(base, "bkg", "ws"), LiveHandler, {"target": target}),
            (url_path_join(base, "bkg", "api", ".*"), ProxyHandler, {"target": target, "prefix": api}),
        ],
    )
    server_app.log.info("jupyterlab_bkg: /bkg/api and /bkg/ws forward to the bkg gateway")
