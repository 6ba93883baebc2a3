"""The browser's way in when the gateway runs under JupyterHub: `/` (who you are, or off to the Hub's login) and
`/oauth_callback` (the Hub sends the browser back here with a code; its token becomes a cookie)."""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bkg_kernel.errors import InvalidInput, NotFound
from bkg_kernel.gateway.jupyterhub import COOKIE, HubTrust
from bkg_kernel.gateway.state import gateway, version

router = APIRouter(tags=["gateway"])
STATE_COOKIE = "bkg-hub-oauth-state"  # the OAuth state, held by the browser that started the login


def _trust(request: Request) -> HubTrust:
    trust: HubTrust | None = getattr(gateway(request), "hub_trust", None)
    if trust is None:
        raise NotFound("this gateway does not run under JupyterHub", field="path")
    return trust


@router.get("/", response_model=None, include_in_schema=False)
async def home(request: Request) -> Any:
    """Under JupyterHub: who the browser is logged in as (else off to the Hub's login); otherwise a pointer."""
    trust: HubTrust | None = getattr(gateway(request), "hub_trust", None)
    if trust is None:
        return {"name": "bkg gateway", "version": version(), "docs": "/docs", "health": "/health"}
    p = getattr(request.state, "principal", None)
    if p is None:
        started, url = trust.login_url(trust.prefix)
        response = RedirectResponse(url, status_code=302)
        response.delete_cookie(COOKIE, path=trust.prefix)  # stale, if there was one
        secure = request.url.scheme == "https"
        response.set_cookie(
            STATE_COOKIE, started, path=trust.prefix, httponly=True, samesite="lax", max_age=600, secure=secure
        )
        return response
    scopes = "".join(f"<li><code>{escape(s)}</code></li>" for s in sorted(p.scopes))
    base = escape(trust.prefix.rstrip("/"))
    body = (
        f"<!doctype html><title>bkg</title><h1>bkg gateway</h1>"
        f"<p>Logged in as <b>{escape(p.username)}</b> ({escape(p.role)}) through JupyterHub.</p>"
        f"<p>Scopes:</p><ul>{scopes}</ul><p><a href='{base}/docs'>API</a> · <a href='{base}/health'>health</a></p>"
    )
    return HTMLResponse(body, headers={"Content-Security-Policy": "frame-ancestors 'none'"})


@router.get("/oauth_callback", include_in_schema=False)
async def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
    """Finish a Hub login: trade the code for the user's token, keep it in a cookie, go where they were going."""
    trust = _trust(request)
    if not code or not state:
        raise InvalidInput("the Hub's answer lacks its code or state: start the login again", field="code")
    # a login started in another browser (another state cookie, or none) is not finished here
    token, next_url = await trust.finish_login(code, state, request.cookies.get(STATE_COOKIE, ""))
    if not _local_path(next_url):
        next_url = trust.prefix  # only paths on this site
    response = RedirectResponse(next_url, status_code=302)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, token, path=trust.prefix, httponly=True, samesite="lax", secure=secure)
    response.delete_cookie(STATE_COOKIE, path=trust.prefix)
    return response


def _local_path(url: str) -> bool:
    """A path on this site: not `//host`, nor `/\\host` or a control character, which browsers read as one."""
    return url.startswith("/") and not url.startswith(("//", "/\\")) and "\\" not in url and url.isprintable()
