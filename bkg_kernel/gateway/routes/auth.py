"""Sessions: log in with a password, who am I, log out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from bkg_kernel.auth import Principal
from bkg_kernel.errors import InvalidInput
from bkg_kernel.gateway.lanes import Lane
from bkg_kernel.gateway.state import gateway, need

router = APIRouter(tags=["auth"])
# A login hashes its password with scrypt (~50-100 ms of CPU): on threads of its own, so that a burst of logins by
# anyone (no credentials needed) takes no thread from the pool every route's store work and every worker's answer
# use; past `max_pending` running or waiting, a 429 at once. The throttle counts only finished failures.
_LOGINS = Lane("bkg-login", threads=2, max_pending=16, what="logins")


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(..., max_length=256)
    password: str = Field(..., max_length=1024)


@router.post("/auth/login")
async def login(body: Login, request: Request) -> dict[str, Any]:
    """Exchange username + password for a session token (12 h)."""
    auth = gateway(request).auth
    address = request.client.host if request.client else ""
    token, p = await _LOGINS.run(auth.login, body.username, body.password, address)
    return {"token": token, "token_type": "bearer", "user": p.to_dict()}


@router.get("/auth/me")
async def me(p: Annotated[Principal, Depends(need(None))]) -> dict[str, Any]:
    """Who the credentials belong to, and their scopes."""
    return p.to_dict()


@router.post("/auth/logout")
async def logout(request: Request, p: Annotated[Principal, Depends(need(None))]) -> dict[str, Any]:
    """End the current session (API keys are revoked under /admin/keys instead)."""
    auth = gateway(request).auth
    if p.via != "session" or p.session is None:
        raise InvalidInput("logout ends a session; this request used an API key", field="authorization")
    auth.end_session(p.session)  # the very session the check above accepted, however the request sent it
    auth.audit(p.username, "auth.logout", p.username)
    return {"ok": True}
