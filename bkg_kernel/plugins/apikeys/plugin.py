"""The apikeys plugin: the panel and capabilities of the core auth service (`bkg_kernel.auth`), which the
/admin routes use too; it runs inline in the gateway, which hands it the service."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from bkg_kernel.errors import Unavailable
from bkg_kernel.runtime.contract import Plugin, capability


class Empty(BaseModel):
    """No input."""


class Rows(BaseModel):
    """A list of records."""

    items: list[dict[str, Any]]


class AuditQuery(BaseModel):
    """Which audit entries to return."""

    limit: int = Field(100, ge=1, le=10_000)
    action: str | None = None


class ApiKeys(Plugin):
    """Users, roles, keys and the audit log."""

    id = "apikeys"
    name = "API keys"
    version = "0.1.0"
    description = (
        "The panel of bkg's core auth (bkg_kernel.auth, stdlib hashing): users, roles and scopes, hashed API keys "
        "with expiry, rotation and rate limits, and the audit log."
    )
    mode = "inline"

    def _auth(self) -> Any:
        auth = self.context.services.get("auth") if self.context else None
        if auth is None:
            raise Unavailable("apikeys runs inside the gateway (no auth service here)")
        return auth

    @capability("apikeys.users", scope="admin:users")
    def users(self, inp: Empty) -> Rows:
        """List users."""
        return Rows(items=self._auth().list_users())

    @capability("apikeys.keys", scope="admin:keys")
    def keys(self, inp: Empty) -> Rows:
        """List API keys (never their secrets)."""
        return Rows(items=self._auth().list_keys())

    @capability("apikeys.roles", scope="admin:users")
    def roles(self, inp: Empty) -> Rows:
        """List roles and their scopes."""
        return Rows(items=self._auth().list_roles())

    @capability("apikeys.audit", scope="admin:audit")
    def audit(self, inp: AuditQuery) -> Rows:
        """Return recent audit entries."""
        return Rows(items=self._auth().list_audit(inp.limit, inp.action))
