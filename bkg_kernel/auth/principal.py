"""Who is calling: the principal every request carries, from the gateway's auth check into every plugin call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bkg_kernel.errors import Forbidden

SCOPES = (
    "plugins:read",
    "plugins:write",
    "collections:read",
    "collections:write",
    "models:read",
    "models:write",
    "llm:use",
    "faces:use",
    "repo:use",
    "jobs:run",
    "admin:users",
    "admin:keys",
    "admin:audit",
)
BUILTIN_ROLES = {
    "admin": (SCOPES, "Everything, including users, keys and the audit log."),
    "developer": (
        tuple(s for s in SCOPES if not s.startswith("admin:")),
        "Use and operate plugins and collections.",
    ),
    "viewer": (("plugins:read", "collections:read", "models:read"), "Read-only."),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling, with the scopes they hold right now; plugins get it as `context.caller`."""

    user_id: str
    username: str
    role: str
    scopes: frozenset[str]
    key_id: str | None = None
    via: str = "key"
    # the login session a "session" principal came from (the hash the store keeps, never the token): what it
    # started stops acting for the user once that session ends (`AuthService.as_now`); never shown or carried
    session: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the principal as JSON data."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "role": self.role,
            "scopes": sorted(self.scopes),
            "key_id": self.key_id,
            "via": self.via,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Principal:
        """Rebuild a principal from `to_dict()` (how a call carries its caller into a worker)."""
        return cls(
            str(data["user_id"]), str(data["username"]), str(data["role"]), frozenset(data["scopes"]),
            data.get("key_id"), str(data.get("via", "key")),
        )  # fmt: skip

    def require_all(self, scopes: Any, what: str, field: str | None = None) -> None:
        """Raise 403 naming the missing ones unless the principal holds every scope in `scopes`: nobody grants
        (or lets work act with) what they do not hold."""
        missing = sorted(set(scopes) - self.scopes)
        if missing:
            raise Forbidden(
                f"{what} needs scopes you ({self.username}) do not hold: {', '.join(missing)}; "
                "nobody grants what they do not hold",
                field=field,
            )

    def require(self, scope: str, what: str = "this call") -> None:
        """Raise 403 naming `scope` unless the principal holds it."""
        if scope not in self.scopes:
            raise Forbidden(f"{what} needs scope {scope!r}; the caller ({self.username}) has {sorted(self.scopes)}")
