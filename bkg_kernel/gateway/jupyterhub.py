"""The gateway as a JupyterHub service: Hub tokens and Hub OAuth logins are bkg callers.

When the Hub starts the gateway (`JUPYTERHUB_SERVICE_NAME` and `JUPYTERHUB_API_TOKEN` in its environment), a
request may carry a Hub token instead of a bkg key (`Authorization: token|Bearer <hub token>`, what a user's
server and its kernels hold), and a browser may log in through the Hub's OAuth (`/oauth_callback` sets a cookie
that GET requests may use). The Hub user `ana` is the bkg user `ana@hub`, created on first sight; their role
follows their Hub scopes on every request: `custom:bkg:admin` → admin, `custom:bkg:developer` → developer,
else viewer (the shipped `deploy/jupyterhub_config.py` maps groups to those scopes). Every route also answers
under the service prefix (`/services/bkg/...`), as the Hub's proxy forwards it.

A run (a scheduled notebook, a retry) acts as its owner with no token of theirs at hand, so the role it would
act with is only as fresh as the owner's last request. As JupyterHub refreshes a user's authentication before it
spawns their server (`refresh_pre_spawn`), the gateway asks the Hub before such a run starts: the Hub says of
another user only their admin flag, roles and groups (never their scopes), so each time a user's role is derived
from their own token the gateway also records that view of them, and a run starts only while the Hub's view is
still the recorded one. A user the Hub no longer has is disabled; one whose groups or roles changed is a viewer
until their next request through the Hub derives their role again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.auth.service import HUB_ACTOR
from bkg_kernel.auth.service import HUB_SUFFIX as SUFFIX
from bkg_kernel.errors import Forbidden, Unauthorized, Unavailable
from bkg_kernel.settings import Settings

ROLE_SCOPES = (("custom:bkg:admin", "admin"), ("custom:bkg:developer", "developer"))
COOKIE = "bkg-hub-token"
_BAD = re.compile(r"[^A-Za-z0-9_.@-]")
_TAGGED = re.compile(r"-[0-9a-f]{8}\Z")  # how a name that had to change ends: its hash tag
STATE_TTL = 600.0
_HUB_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")  # JupyterHub's tokens are 32 hex characters
RECORD_EVERY_S = 60.0  # the Hub's view of an active user is recorded again this often (HubAuth's cache age)
VIEW_SCOPES = "read:users:groups, read:roles:users and read:roles:groups"
log = logging.getLogger("bkg.jupyterhub")


def bkg_name(hub_name: str) -> str:
    """The bkg user name of a Hub user (`ana` → `ana@hub`); a name that had to change to fit bkg's rules gets a
    hash of the Hub name, so two Hub users never share one bkg user (`ana b` and `ana-b` stay apart). A name
    that already ends like such a tag (`-` and 8 hex digits) gets one too: kept as it is, `ana-b-1a2b3c4d` would be
    the bkg user of whichever Hub name was hashed to that. Local bkg users cannot be named `...@hub`."""
    clean = _BAD.sub("-", hub_name).lstrip("-_.@")
    if clean == hub_name and len(clean) <= 64 - len(SUFFIX) and not _TAGGED.search(clean):
        return clean + SUFFIX
    tag = hashlib.sha256(hub_name.encode()).hexdigest()[:8]
    return f"{clean[: 64 - len(SUFFIX) - 9] or 'user'}-{tag}{SUFFIX}"


def role_for(model: dict[str, Any]) -> str:
    """The bkg role a Hub user model's scopes give."""
    scopes = set(model.get("scopes") or ())
    return next((role for scope, role in ROLE_SCOPES if scope in scopes), "viewer")


def token_of(conn: HTTPConnection) -> str:
    """The credential a request carries: `Authorization: Bearer|token <t>`, `X-API-Key`, or `?token=` (WebSocket)."""
    header = conn.headers.get("authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    if conn.scope["type"] == "websocket":  # a browser cannot set headers on a WebSocket
        return conn.headers.get("x-api-key", "") or conn.query_params.get("token", "")
    return conn.headers.get("x-api-key", "")


class HubTrust:
    """Hub tokens → bkg principals (cached by HubAuth for a minute), and the Hub OAuth login."""

    def __init__(self, settings: Settings, auth: AuthService) -> None:
        from jupyterhub.services.auth import HubOAuth

        self.auth, self.service = auth, settings.hub_service_name or "bkg"
        self.prefix = settings.hub_service_prefix or "/"
        self.oauth = HubOAuth(api_token=settings.hub_api_token, api_url=settings.hub_api_url or "",
                              cache_max_age=60)  # fmt: skip
        # signs a login's state cookie: the gateway keeps nothing per login, so no flood of anonymous `GET /` can
        # push a real user's login out (a login started before a restart is started again)
        self._state_key = secrets.token_bytes(32)
        self.lock = threading.Lock()
        self.api_url, self.api_token = (settings.hub_api_url or "").rstrip("/"), settings.hub_api_token
        self._recording: dict[str, asyncio.Task[None]] = {}
        self._tried: dict[str, tuple[str, float]] = {}  # user id -> (role, when) of the last try to record

    def is_hub_token(self, token: str) -> bool:
        """Whether a credential is for the Hub to judge: not a bkg key or session, and shaped like a Hub token
        (anything else is refused here, without asking the Hub)."""
        return not token.startswith(("bkg_", "bkgs_")) and _HUB_TOKEN.fullmatch(token) is not None

    async def principal(self, token: str) -> Principal:
        """The bkg caller for a Hub token (401 unknown, 403 without access to this service)."""
        try:
            model = await asyncio.wait_for(self.oauth.user_for_token(token, sync=False), 15)
        except Exception as exc:  # the Hub is down or answered 5xx: say so, never a 500
            raise Unavailable(f"JupyterHub did not answer the token check: {exc or 'timeout'}") from None
        if not model or model.get("kind", "user") != "user":
            raise Unauthorized("invalid API key or Hub token")
        if not self.oauth.check_scopes(self.oauth.access_scopes, model):
            need = " or ".join(sorted(self.oauth.access_scopes))
            raise Forbidden(f"Hub user {model['name']!r} has no access to the {self.service} service: the token needs "
                            f"{need} (a Hub admin grants it through a role)")  # fmt: skip
        role = role_for(model)
        name = bkg_name(model["name"])
        user = next((u for u in list(self.auth.users.values()) if u["username"] == name), None)
        if user is None or user["role"] != role:
            user = await asyncio.to_thread(self._sync_user, name, role)
        if user["disabled"]:
            raise Unauthorized(f"bkg user {name!r} is disabled")
        await self._remember(user["id"], token, model, role)
        return Principal(user["id"], name, role, frozenset(self.auth.roles.get(role, ())), None, "hub")

    # -- runs that act as a Hub user ---------------------------------------------------------------
    async def _remember(self, user_id: str, token: str, model: dict[str, Any], role: str) -> None:
        """Record the Hub's view of a user beside the role their token gives (when the role changed, or once a
        minute): what a run acting as them is checked against. One Hub call per user at a time; a Hub that does
        not answer leaves the last record (the request itself was already vouched for)."""
        rec = self.auth.hub_seen.get(user_id)
        if rec is not None and rec["role"] == role and _age(rec["confirmed_at"]) < RECORD_EVERY_S:
            return
        tried = self._tried.get(user_id)  # a Hub that refused or disagreed is asked again in a minute, not at once
        if tried is not None and tried[0] == role and time.monotonic() - tried[1] < RECORD_EVERY_S:
            return
        self._tried[user_id] = (role, time.monotonic())
        task = self._recording.get(user_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._record(user_id, token, model["name"]))
            self._recording[user_id] = task
            task.add_done_callback(lambda _t: self._recording.pop(user_id, None))
        await asyncio.shield(task)

    async def _record(self, user_id: str, token: str, hub_name: str) -> None:
        """The Hub's view of the user first, then their token asked again past HubAuth's one-minute cache: the role
        recorded is never older than the view beside it (a change in between shows as a changed view later, and
        the run it concerns fails rather than acting with the old role)."""
        try:
            seen = await self.hub_view(hub_name)
            fresh = await asyncio.wait_for(self.oauth.user_for_token(token, use_cache=False, sync=False), 15)
        except Exception as exc:  # a Hub that is slow, down, or answers what is not JSON: nothing recorded
            log.warning("the Hub's view of %r was not recorded: %s", hub_name, getattr(exc, "message", exc))
            return
        if seen is None or not fresh or fresh.get("name") != hub_name:
            return
        if sorted(seen["groups"]) != sorted(fresh.get("groups") or ()) or bool(fresh.get("admin")) != seen["admin"]:
            return  # the two answers straddle a change: the next request records them
        role = role_for(fresh)
        await asyncio.to_thread(self._sync_user, bkg_name(hub_name), role)  # the role follows the fresh answer
        await asyncio.to_thread(self.auth.hub_confirmed, user_id, hub_name, role, seen)

    async def hub_view(self, hub_name: str) -> dict[str, Any] | None:
        """What the Hub says of a user now (admin flag, roles, groups and each group's roles), None if it has no
        user of that name; 503 if it does not answer or does not let the service read users."""
        headers = {"Authorization": f"token {self.api_token}"}
        # made on a thread: a client loads the CA certificates into an SSL context (20-45 ms), not on the loop
        client = await asyncio.to_thread(httpx.AsyncClient, base_url=self.api_url, headers=headers, timeout=15)
        async with client as hub:
            user = await _hub_get(hub, f"/users/{quote(hub_name, safe='')}")
            if user is None:
                return None
            groups = {}
            for g in sorted(user.get("groups") or ()):
                group = await _hub_get(hub, f"/groups/{quote(g, safe='')}")
                groups[g] = sorted((group or {}).get("roles") or ())
        return {"admin": bool(user.get("admin")), "roles": sorted(user.get("roles") or ()), "groups": groups}

    async def confirm_owner(self, user: dict[str, Any]) -> None:
        """Before a run acts as `user` without a token of theirs: 403 unless they are a local user or the Hub's
        view of them is still the one their role was derived under."""
        name = user["username"]
        if not name.endswith(SUFFIX):
            return
        rec = self.auth.hub_seen.get(user["id"])
        if rec is None:  # never recorded (a gateway from before these records, or one the Hub let read no user)
            await self.hub_view(name.removesuffix(SUFFIX))  # 503 naming the scopes if the Hub refuses the read
            await asyncio.to_thread(self._unconfirmed, user, None, None)
            raise Forbidden(f"{name}'s role has not been confirmed with JupyterHub: runs acting as them start again "
                            "after their next request through the Hub", field="owner")  # fmt: skip
        seen = await self.hub_view(rec["hub_name"])
        rec = self.auth.hub_seen.get(user["id"]) or rec  # a request may have recorded a newer view meanwhile
        if seen is None:
            await asyncio.to_thread(self._retired, user, rec["hub_name"])
            raise Forbidden(f"JupyterHub has no user {rec['hub_name']!r} any more: bkg user {name!r} is disabled",
                            field="owner")  # fmt: skip
        if seen != rec["seen"]:
            await asyncio.to_thread(self._unconfirmed, user, rec["seen"], seen)
            what = changes(rec["seen"], seen)
            raise Forbidden(
                f"{rec['hub_name']!r} changed on JupyterHub since bkg derived their role ({what}): {name} is a "
                "viewer until their next request through the Hub derives their role again",
                field="owner",
            )

    def _unconfirmed(self, user: dict[str, Any], before: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
        with self.lock:
            if user["role"] != "viewer":
                self.auth.update_user(user["id"], role="viewer", actor=HUB_ACTOR)
            self.auth.hub_forget(user["id"])  # their next request records afresh, whatever role it gives
        self._tried.pop(user["id"], None)
        self.auth.audit(HUB_ACTOR, "user.hub_changed", user["username"], ok=False, before=before, now=now)

    def _retired(self, user: dict[str, Any], hub_name: str) -> None:
        with self.lock:
            if not user["disabled"]:
                self.auth.update_user(user["id"], disabled=True, actor=HUB_ACTOR)
        self.auth.audit(HUB_ACTOR, "user.hub_removed", user["username"], ok=False, hub_name=hub_name)

    def _sync_user(self, name: str, role: str) -> dict[str, Any]:
        """Create the bkg user of a Hub user on first sight; make their role follow the Hub's (one at a time: a
        user's first page load sends several requests at once)."""
        with self.lock:
            user = next((u for u in self.auth.users.values() if u["username"] == name), None)
            if user is None:
                self.auth.create_user(name, role, actor=HUB_ACTOR)
            elif user["role"] != role:
                self.auth.update_user(user["id"], role=role, actor=HUB_ACTOR)
            return next(u for u in self.auth.users.values() if u["username"] == name)

    # -- browser login (OAuth) --------------------------------------------------------------------
    def login_url(self, next_url: str) -> tuple[str, str]:
        """(the state cookie for this browser, where to send it to log in through the Hub), coming back to
        `next_url`. The cookie holds the state, when it was made, `next_url` and the PKCE verifier, signed by the
        gateway (as HubOAuth keeps its state in a cookie): a login is finished only in the browser that started it.
        """
        state = secrets.token_urlsafe(24)
        verifier, challenge, method = self.oauth.generate_pkce_code_challenge()
        body = base64.urlsafe_b64encode(json.dumps([state, time.time(), next_url, verifier]).encode()).decode()
        query = {"state": state, "code_challenge": challenge, "code_challenge_method": method}
        return f"{body}.{self._sign(body)}", f"{self.oauth.login_url}&{urlencode(query)}"

    def _sign(self, body: str) -> str:
        return hmac.new(self._state_key, body.encode(), hashlib.sha256).hexdigest()

    def _started(self, cookie: str, state: str) -> tuple[str, str]:
        """(next URL, PKCE verifier) of the login `state`, from the state cookie of the browser finishing it."""
        body, _, mac = cookie.rpartition(".")
        try:
            if not body or not hmac.compare_digest(mac.encode(), self._sign(body).encode()):
                raise ValueError("unsigned")
            started, made, next_url, verifier = json.loads(base64.urlsafe_b64decode(body))
        except (ValueError, TypeError):
            raise Unauthorized(
                "this login was not started in this browser (or the gateway restarted since): start again"
            ) from None
        if not hmac.compare_digest(str(started).encode(), state.encode()):
            raise Unauthorized("this login was not started in this browser: start again")
        if time.time() - made > STATE_TTL:
            raise Unauthorized("the login expired: start again")
        return str(next_url), str(verifier)

    async def finish_login(self, code: str, state: str, cookie: str) -> tuple[str, str]:
        """Trade the OAuth code for the user's token; return (token, where to go next)."""
        next_url, verifier = self._started(cookie, state)
        try:
            token = await asyncio.wait_for(self.oauth.token_for_code(code, code_verifier=verifier, sync=False), 15)
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"JupyterHub did not answer: {exc or 'timeout'}") from None
        except Exception as exc:  # the Hub refused the code (tornado's HTTPError)
            raise Unauthorized(f"JupyterHub refused the login: {exc}") from None
        return str(token), next_url


async def no_hub(user: dict[str, Any]) -> None:
    """A gateway JupyterHub did not start cannot ask it about a Hub user: runs acting as one do not start."""
    if user["username"].endswith(SUFFIX):
        raise Forbidden(
            f"{user['username']} is a JupyterHub user and this gateway was not started by JupyterHub: their role "
            "cannot be confirmed, so runs acting as them do not start",
            field="owner",
        )


async def _hub_get(hub: httpx.AsyncClient, path: str) -> dict[str, Any] | None:
    try:
        r = await hub.get(path)
    except httpx.HTTPError as exc:
        raise Unavailable(f"JupyterHub did not answer {path}: {exc or 'timeout'}") from None
    if r.status_code == 404:
        return None
    if r.status_code == 403:
        raise Unavailable(f"JupyterHub refused the bkg service's read of {path}: the service needs {VIEW_SCOPES} "
                          "(deploy/jupyterhub_config.py grants them)")  # fmt: skip
    if r.status_code != 200:
        raise Unavailable(f"JupyterHub answered {r.status_code} to {path}")
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Unavailable(f"JupyterHub's answer to {path} is not a JSON object")
    return body


def changes(before: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two views of a Hub user, in words (`groups left: bkg-developers`)."""
    said = [f"admin {before['admin']} → {now['admin']}"] if before["admin"] != now["admin"] else []
    for key in ("roles", "groups"):
        left, joined = sorted(set(before[key]) - set(now[key])), sorted(set(now[key]) - set(before[key]))
        said += [f"{key} left: {', '.join(left)}"] if left else []
        said += [f"{key} joined: {', '.join(joined)}"] if joined else []
    return "; ".join(said) or "a group's roles changed"


def _age(at: datetime) -> float:
    return (datetime.now(UTC).replace(tzinfo=None) - at).total_seconds()


class PrefixMiddleware:
    """Serve every route under the Hub's service prefix too (`/services/bkg/health` is `/health`)."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app, self.prefix = app, "/" + prefix.strip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        if (
            self.prefix != "/"
            and not scope.get("root_path")
            and (path == self.prefix or path.startswith(self.prefix + "/"))
        ):
            inner = dict(scope)
            inner["root_path"] = self.prefix  # routes match the rest; URLs (redirects) keep the prefix
            if path == self.prefix:
                inner["path"] = self.prefix + "/"
            try:
                await self.app(inner, receive, send)
            finally:  # the route that served it, for the metrics around this middleware
                if "route" in inner:
                    scope["route"] = inner["route"]
            return
        await self.app(scope, receive, send)


async def hub_caller(conn: HTTPConnection) -> None:
    """App-wide dependency: a request with a Hub token (or, for a GET, the Hub login cookie) gets its caller here,
    asynchronously, so every route's own check sees it (`request.state.principal`)."""
    trust: HubTrust | None = getattr(conn.app.state.gateway, "hub_trust", None)
    if trust is None or getattr(conn.state, "principal", None) is not None:  # none, or found already
        return
    token = token_of(conn)
    if trust.is_hub_token(token):
        conn.state.principal = await trust.principal(token)
        return
    cookie = conn.cookies.get(COOKIE, "")
    if cookie and is_home_page_visit(conn):
        with contextlib.suppress(Unauthorized, Forbidden):  # a stale cookie: the page sends the browser to log in
            conn.state.principal = await trust.principal(cookie)


def route_path(scope: Scope) -> str:
    """The path the app's routes match: without the root path the app is served under (the Hub's service prefix,
    or a server's root path, which the path still holds)."""
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    return path[len(root) :] if root and path.startswith(root) else path


def is_home_page_visit(conn: HTTPConnection) -> bool:
    """The login cookie counts only for a browser opening the gateway's page (a top-level GET of `/`): never
    for the API, so a page served by another user's server on the same origin cannot read bkg data with it."""
    if conn.scope["type"] != "http" or conn.scope.get("method") not in ("GET", "HEAD"):
        return False
    route = route_path(conn.scope)
    mode = conn.headers.get("sec-fetch-mode", "navigate")
    return route in ("", "/") and mode == "navigate"
