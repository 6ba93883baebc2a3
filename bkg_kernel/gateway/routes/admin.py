"""Admin routes: users, roles, API keys and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field, field_validator

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.errors import InvalidInput, NotFound
from bkg_kernel.gateway.jsonresp import PagedJSONResponse
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.strict import StrictBody

router = APIRouter(prefix="/admin", tags=["admin"])
USERS, KEYS, AUDIT = need("admin:users"), need("admin:keys"), need("admin:audit")


# The rules the auth service enforces, stated in the schema (generated clients and fuzzers see them).
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
Scope = Literal[
    "plugins:read", "plugins:write", "collections:read", "collections:write", "models:read", "models:write",
    "llm:use", "faces:use", "repo:use", "jobs:run", "admin:users", "admin:keys", "admin:audit",
]  # fmt: skip
Password = Field(None, min_length=8, max_length=256)


class NewUser(StrictBody):
    username: str = Field(..., pattern=NAME)
    role: str = Field("viewer", pattern=NAME, description="An existing role.")
    password: str | None = Password


class UserPatch(StrictBody):
    role: str | None = Field(None, pattern=NAME)
    disabled: bool | None = None
    password: str | None = Password


class NewRole(StrictBody):
    name: str = Field(..., pattern=NAME)
    scopes: list[Scope]
    description: str = ""


class RolePatch(StrictBody):
    scopes: list[Scope] | None = None
    description: str | None = None


class NewKey(StrictBody):
    name: str = Field(..., min_length=1, max_length=100)
    user_id: str | None = Field(None, description="Owner (default: the caller).")
    scopes: list[Scope] | None = Field(None, description="A subset of the owner's scopes (default: all of them).")
    expires_in_days: float | None = Field(None, gt=0, le=3650)
    expires_at: datetime | None = Field(None, strict=False)  # an ISO 8601 string, read as a time
    rate_limit_per_min: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("expires_at")
    @classmethod
    def _in_utc(cls, v: datetime | None) -> datetime | None:
        return in_utc(v)


def in_utc(v: datetime | None) -> datetime | None:
    """A time in UTC without a zone, as bkg stores times (one given without a zone is UTC already); one that has no
    UTC time (9999-12-31T23:59-14:00) is a ValueError."""
    if v is None or v.tzinfo is None:
        return v
    try:
        return v.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        raise ValueError("the time is out of range once moved to UTC") from None


def _scopes(scopes: list[Scope] | None) -> list[str] | None:
    return None if scopes is None else list(scopes)


def _auth(request: Request) -> AuthService:
    return gateway(request).auth


# The listing routes answer with their JSON made here, on the route's thread: a dict would be encoded by FastAPI
# on the event loop (an audit of 10,000 entries, 17 MB: the loop held for up to 80 ms).


@router.get("/users", response_model=None)
def list_users(request: Request, p: Annotated[Principal, Depends(USERS)]) -> PagedJSONResponse:
    """All users."""
    return PagedJSONResponse({"users": _auth(request).list_users()}, "users")


@router.post("/users", status_code=201)
def create_user(body: NewUser, request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """Create a user."""
    return _auth(request).create_user(body.username, body.role, body.password, by=p)


@router.get("/users/{user_id}")
def get_user(user_id: str, request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """One user."""
    auth = _auth(request)
    return next(u for u in auth.list_users() if u["id"] == auth.user(user_id)["id"])


@router.patch("/users/{user_id}")
def update_user(
    user_id: str, body: UserPatch, request: Request, p: Annotated[Principal, Depends(USERS)]
) -> dict[str, Any]:
    """Change role, disable / enable, or set the password."""
    return _auth(request).update_user(user_id, role=body.role, disabled=body.disabled, password=body.password, by=p)


@router.delete("/users/{user_id}")
def delete_user(user_id: str, request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """Delete a user (their keys are revoked)."""
    if _auth(request).user(user_id)["id"] == p.user_id:
        raise InvalidInput("you cannot delete yourself", field="user_id")
    _auth(request).delete_user(user_id, by=p)
    return {"deleted": user_id}


@router.get("/roles")
def list_roles(request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """Roles and their scopes."""
    return {"roles": _auth(request).list_roles()}


@router.post("/roles", status_code=201)
def create_role(body: NewRole, request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """Create a custom role."""
    return _auth(request).create_role(body.name, list(body.scopes), body.description, by=p)


@router.patch("/roles/{name}")
def update_role(
    name: str, body: RolePatch, request: Request, p: Annotated[Principal, Depends(USERS)]
) -> dict[str, Any]:
    """Change a custom role's scopes or description (its users' keys follow at once)."""
    return _auth(request).update_role(name, _scopes(body.scopes), body.description, by=p)


@router.delete("/roles/{name}")
def delete_role(name: str, request: Request, p: Annotated[Principal, Depends(USERS)]) -> dict[str, Any]:
    """Delete a custom role no user has."""
    _auth(request).delete_role(name, by=p)
    return {"deleted": name}


@router.get("/keys", response_model=None)
def list_keys(
    request: Request, p: Annotated[Principal, Depends(KEYS)], user_id: str | None = None
) -> PagedJSONResponse:
    """API keys (never their secrets); `user_id`: one user's, by id or username (a deleted user's by id)."""
    auth = _auth(request)
    if user_id is None:
        return PagedJSONResponse({"keys": auth.list_keys()}, "keys")
    try:
        user_id = auth.user(user_id)["id"]
    except NotFound:
        keys = auth.list_keys(user_id)  # a deleted user's revoked keys still name them
        if not keys:
            raise
        return PagedJSONResponse({"keys": keys}, "keys")
    return PagedJSONResponse({"keys": auth.list_keys(user_id)}, "keys")


@router.post("/keys", status_code=201)
def create_key(body: NewKey, request: Request, p: Annotated[Principal, Depends(KEYS)]) -> dict[str, Any]:
    """Create a key; the response holds the secret, shown this once."""
    expires = body.expires_at
    if body.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=body.expires_in_days)
    if expires is not None and expires.tzinfo is not None:  # expires_in_days' time (expires_at is UTC already)
        expires = expires.astimezone(UTC).replace(tzinfo=None)
    rec, token = _auth(request).create_key(
        body.user_id or p.user_id, body.name, _scopes(body.scopes), expires, body.rate_limit_per_min, by=p
    )
    return {**rec, "key": token}


@router.post("/keys/{key_id}/rotate")
def rotate_key(key_id: str, request: Request, p: Annotated[Principal, Depends(KEYS)]) -> dict[str, Any]:
    """New secret, same id and scopes; the old secret stops working now."""
    rec, token = _auth(request).rotate_key(key_id, by=p)
    return {**rec, "key": token}


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: str, request: Request, p: Annotated[Principal, Depends(KEYS)]) -> dict[str, Any]:
    """Revoke a key."""
    return _auth(request).revoke_key(key_id, by=p)


@router.get("/audit", response_model=None)
def audit(
    request: Request,
    p: Annotated[Principal, Depends(AUDIT)],
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    action: str | None = None,
) -> PagedJSONResponse:
    """Recent audit entries, newest first."""
    return PagedJSONResponse({"entries": _auth(request).list_audit(limit, action)}, "entries")


@router.get("/usage", response_model=None)
def usage(
    request: Request,
    p: Annotated[Principal, Depends(AUDIT)],
    group_by: Literal["key", "user", "model", "day", "key_day"] = "key",
    since: datetime | None = None,
) -> PagedJSONResponse:
    """Token usage of the LLM routes, summed per key, user, model, day, or key and day (`key_day`); `since` with a
    zone (`2026-12-06T09:00+09:00`) is that moment, without one it is UTC."""
    try:
        since = in_utc(since)
    except ValueError as exc:
        raise InvalidInput(f"since: {exc}", field="query.since") from None
    return PagedJSONResponse({"group_by": group_by, "usage": _auth(request).usage_report(group_by, since)}, "usage")
