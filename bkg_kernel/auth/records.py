"""What the parts of the auth service share: its constants, a key as held in memory (`KeyRecord`), a user's public
form, and the checks of names and passwords."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bkg_kernel.errors import Forbidden, InvalidInput

SESSION_TTL = timedelta(hours=12)
FORGET_BATCH = 20_000  # old audit or usage rows deleted per hold of the store's lock
HUB_SUFFIX = "@hub"  # the bkg users of JupyterHub users (made by the gateway under a Hub only)
HUB_ACTOR = "jupyterhub"  # who the gateway's changes on the Hub's word are made and audited as (a reserved name)
RUN_KEY = "job run "  # a notebook run's key is named this and the run's id (run-...): a name no caller may give a key
RUN_KEY_PREFIX = RUN_KEY + "run-"  # the one kind of key a Hub user gets: a notebook run's, made by the gateway
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class KeyRecord:
    id: str
    prefix: str
    secret_hash: str
    name: str
    user_id: str
    scopes: list[str]
    rate_limit_per_min: int | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    rotated_at: datetime | None
    revoked_at: datetime | None
    follows_role: bool | None = False  # no explicit scopes: the key holds what its user's role holds now
    parent_id: str | None = None  # the key it was made with (for its own user) or a run's: it goes when that one goes
    # the key that made it for its user, when that key had an expiry or a rate limit: the key stays within that
    # key's bounds (its expiry, its rate limit's bucket) and goes when it goes. None: made by a key with neither,
    # a login, the gateway, for its own user, or before bkg kept the link
    maker_id: str | None = None
    # the notebook run it was made for (its id), when the gateway made it as that run's key; what a key is, is
    # read here and never from its name (any maker could name a key like a run's before such names were refused)
    run_id: str | None = None
    tokens: float = field(default=0.0, repr=False)
    refilled: float = field(default=0.0, repr=False)
    flushed: float = field(default=0.0, repr=False)

    def public(self) -> dict[str, Any]:
        """Return the key without its hash."""
        iso = lambda d: d.isoformat() + "Z" if d else None  # noqa: E731
        now = _now()
        state = "revoked" if self.revoked_at else "expired" if self.expires_at and self.expires_at <= now else "active"
        return {
            "id": self.id,
            "prefix": f"bkg_{self.prefix}",
            "name": self.name,
            "user_id": self.user_id,
            "scopes": list(self.scopes),
            "follows_role": bool(self.follows_role),
            "parent_id": self.parent_id,
            "maker_id": self.maker_id,
            "run_id": self.run_id,
            "rate_limit_per_min": self.rate_limit_per_min,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "rotated_at": iso(self.rotated_at),
            "revoked_at": iso(self.revoked_at),
            "state": state,
        }


def _public_user(u: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": u["id"],
        "username": u["username"],
        "role": u["role"],
        "disabled": u["disabled"],
        "has_password": bool(u["password_hash"]),
        "created_at": u["created_at"].isoformat() + "Z",
    }


def _check_name(name: Any, field: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"{field} must be 1-64 letters, digits, '_', '.', '@' or '-'", field=field)


def _password_for_another(username: str) -> Forbidden:
    """The 403 for a password set for someone else by who does not hold every scope, or with a key that expires or
    is rate-limited: a login as them holds their role as it is then, whatever it gains later (as a key following
    their role would, which create_key refuses), and outlives the key that set it."""
    return Forbidden(f"a password for {username!r} lets whoever knows it log in as them, with whatever their role "
                     "gains later and after the credential that set it expired or was revoked: only someone holding "
                     "every scope, with a login session or a key with no expiry and no rate limit, may set one (give "
                     "them a key with fixed scopes instead)", field="password")  # fmt: skip


def _check_password(password: Any) -> None:
    if not isinstance(password, str) or not 8 <= len(password) <= 256:
        raise InvalidInput("password must have 8 to 256 characters", field="password")
