"""The auth service: users, roles, API keys, sessions, rate limits and the audit log, kept in the store's DuckDB.

Every key and every live session is also held in memory (the gateway is the only writer), so checking a request
costs a dict lookup and one sha256, not a query, and never waits for the store's lock: the gateway's event loop
authenticates every request. Audit rows, LLM usage rows and last-used times are written by one writer thread in
order (`audit()` returns at once); reading them (`list_audit`, `usage_report`, `list_keys`) waits for the rows
written before.

Nobody grants what they do not hold: every change made `by` a principal (an /admin route's caller) may only
create, hand out or manage scopes that principal holds. A key for someone gets at most the caller's scopes
that its owner's role also has; a role is created, edited, given or taken away only when its scopes are all the
caller's; a user (their role, password, keys) is managed only when their role's scopes are all the caller's.
`by=None` is the gateway itself (first start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.principal import BUILTIN_ROLES, SCOPES, Principal
from bkg_kernel.auth.throttle import AuditBudget, LoginThrottle
from bkg_kernel.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

SESSION_TTL = timedelta(hours=12)
FORGET_BATCH = 20_000  # old audit or usage rows deleted per hold of the store's lock
HUB_SUFFIX = "@hub"  # the bkg users of JupyterHub users (made by the gateway under a Hub only)
HUB_ACTOR = "jupyterhub"  # who the gateway's changes on the Hub's word are made and audited as (a reserved name)
RUN_KEY = "job run "  # a notebook run's key is named this and the run's id (run-...)
RUN_KEY_PREFIX = RUN_KEY + "run-"  # the one kind of key a Hub user gets: a notebook run's, made by the gateway
log = logging.getLogger("bkg.auth")
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
            "rate_limit_per_min": self.rate_limit_per_min,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "rotated_at": iso(self.rotated_at),
            "revoked_at": iso(self.revoked_at),
            "state": state,
        }


class AuthService:
    """Users, roles, keys, sessions and audit; `store` is the gateway's open Store (its connection and mutex are
    shared)."""

    def __init__(self, store: Any) -> None:
        self.con = store._con  # noqa: SLF001
        self.mutex = store._mutex  # noqa: SLF001
        self._lock = threading.Lock()
        self._writes: queue.Queue[tuple[str, list[Any]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="bkg-auth-writer", daemon=True)
        self._writer.start()
        self.throttle = LoginThrottle()
        ks.check_password("", None)  # makes the stand-in hash now, so no first login pays for it
        self.failed_audit = AuditBudget()
        with self.mutex:
            for name, (scopes, desc) in BUILTIN_ROLES.items():
                self.con.execute(
                    "INSERT INTO roles (name, scopes, builtin, description) VALUES (?, ?, TRUE, ?) "
                    "ON CONFLICT (name) DO UPDATE SET scopes = excluded.scopes, description = excluded.description",
                    [name, list(scopes), desc],
                )
            self.roles: dict[str, list[str]] = dict(self.con.execute("SELECT name, scopes FROM roles").fetchall())
            self.users: dict[str, dict[str, Any]] = {u["id"]: u for u in self._rows("SELECT * FROM users")}
            self.keys: dict[str, KeyRecord] = {
                r["prefix"]: KeyRecord(**r) for r in self._rows("SELECT * FROM api_keys WHERE revoked_at IS NULL")
            }
            # the same keys by id: every store operation of a plugin call looks its caller's key up (`as_now`)
            self.key_ids: dict[str, KeyRecord] = {k.id: k for k in self.keys.values()}
            now = _now()
            self.con.execute("DELETE FROM sessions WHERE expires_at <= ?", [now])
            # token hash -> (user id, expiry): a session check is a dict lookup
            self.sessions: dict[str, tuple[str, datetime]] = {
                r["token_hash"]: (r["user_id"], r["expires_at"])
                for r in self._rows("SELECT token_hash, user_id, expires_at FROM sessions")
            }
            # user id -> what JupyterHub said of that Hub user when their role was last derived from their token
            self.hub_seen: dict[str, dict[str, Any]] = {
                r["user_id"]: {**r, "seen": json.loads(r["seen"])} for r in self._rows("SELECT * FROM hub_users")
            }

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # -- nobody grants what they do not hold ------------------------------------------------------
    @staticmethod
    def _grantable(by: Principal | None, scopes: Any, what: str, field: str) -> None:
        """403 unless `by` holds every scope in `scopes` (None: the gateway itself, which holds all)."""
        if by is not None:
            by.require_all(scopes, what, field)

    def _manageable(self, by: Principal | None, u: dict[str, Any], field: str) -> None:
        """403 unless `by` holds every scope of user `u`'s role (managing them cannot lift anyone above `by`)."""
        self._grantable(by, self.roles.get(u["role"], ()), f"managing user {u['username']!r} (role {u['role']})", field)

    def _may_act_as(self, by: Principal | None, u: dict[str, Any], what: str, field: str) -> None:
        """403 unless `by` is user `u` or holds every scope of their role: a credential that acts as someone (their
        jobs and runs, their workspaces, audit rows in their name) is only for who could manage them."""
        if by is None or by.user_id == u["id"]:
            return
        self._grantable(by, self.roles.get(u["role"], ()), f"{what} (it acts as {u['username']!r}, role {u['role']})",
                        field)  # fmt: skip

    def _key_of(self, by: Principal) -> KeyRecord | None:
        """The live key `by` came with (None: a login session, a Hub token, or a key revoked since)."""
        return self.key_ids.get(by.key_id) if by.key_id is not None else None

    def _follows(self, by: Principal) -> bool:
        """Whether `by` holds whatever its user's role holds, now and later: a login session, or a key following
        the role (not one with fixed scopes, such as a key someone else made for the user)."""
        if by.via == "session":
            return True
        rec = self._key_of(by)
        return rec is not None and bool(rec.follows_role)

    def _whole(self, by: Principal) -> bool:
        """Whether `by` stands for all of its user: a login session, or a key that follows the role (or holds every
        scope) with no expiry, no rate limit and no key it derives from. A fixed key made for the user, a delegate
        of a key and a notebook run's key are less than their user: what they hand out must not be more."""
        if by.via == "session":
            return True
        rec = self._key_of(by)
        return (
            rec is not None
            and (bool(rec.follows_role) or set(SCOPES) <= by.scopes)
            and rec.parent_id is None
            and rec.expires_at is None
            and rec.rate_limit_per_min is None
        )

    def _derives_from(self, rec: KeyRecord, key_id: str) -> bool:
        """Whether key `rec` is key `key_id` or derives from it, however deep (then it expires no later, is limited
        no more loosely and is revoked with it)."""
        seen: set[str] = set()
        k: KeyRecord | None = rec
        while k is not None and k.id not in seen:
            if k.id == key_id:
                return True
            seen.add(k.id)
            k = self.key_ids.get(k.parent_id) if k.parent_id is not None else None
        return False

    def key_scopes(self, rec: KeyRecord) -> frozenset[str]:
        """The scopes a key holds now: its user's role's, narrowed to the key's own list unless it follows the role."""
        user = self.users.get(rec.user_id)
        role = frozenset(self.roles.get(user["role"], ())) if user else frozenset()
        return role if rec.follows_role else frozenset(rec.scopes) & role

    # -- the writer thread -------------------------------------------------------------------------
    def _write_later(self, sql: str, params: list[Any]) -> None:
        self._writes.put((sql, params))

    def _write_loop(self) -> None:
        while True:
            batch = [self._writes.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            try:
                rows = [b for b in batch if b is not None]
                if rows:
                    with self.mutex:
                        for sql, params in rows:
                            self.con.execute(sql, params)
            except Exception:
                log.exception("auth writer: %d rows not written", len(batch))
            finally:
                for _ in batch:
                    self._writes.task_done()
            if None in batch:
                return

    def sync(self) -> None:
        """Wait until every row handed to the writer so far is written."""
        self._writes.join()

    def close(self) -> None:
        """Write what is pending (last-used times included) and stop the writer thread."""
        if not self._writer.is_alive():
            return
        self.flush_last_used()
        self._writes.put(None)
        self._writer.join(30)

    # -- audit ------------------------------------------------------------------------------------
    def audit(self, actor: str | None, action: str, target: str | None = None, ok: bool = True, **detail: Any) -> None:
        """Append an audit entry (written in order by the writer thread; this returns at once)."""
        self._write_later(
            "INSERT INTO audit (created_at, actor, action, target, ok, detail) VALUES (?, ?, ?, ?, ?, ?)",
            [_now(), actor, action, target, ok, json.dumps(detail, default=str)],
        )

    def record_usage(self, p: Principal, route: str, model: str | None, prompt: int, completion: int) -> None:
        """Record one LLM request's exact token counts against the caller's key (and user); returns at once."""
        self._write_later(
            "INSERT INTO usage (created_at, key_id, user_id, username, route, model, prompt_tokens, completion_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [_now(), p.key_id, p.user_id, p.username, route, model, prompt, completion],
        )

    def book_usage(self, p: Principal, route: str, result: Any) -> None:
        """Record an LLM answer's token usage (OpenAI `usage`) against the caller: nothing when it has none, and
        a count that is not an integer counts 0 (the answer the caller already has never fails for this)."""
        usage = result.get("usage") if isinstance(result, dict) else None
        if not isinstance(usage, dict) or not usage:
            return
        count = [v if isinstance(v, int) and not isinstance(v, bool) else 0
                 for v in (usage.get("prompt_tokens"), usage.get("completion_tokens"))]  # fmt: skip
        self.record_usage(p, route, result.get("model"), count[0], count[1])

    def forget_old(self, key_days: float, audit_days: float, usage_days: float) -> dict[str, int]:
        """Delete what has been over for longer than its retention (0: kept for good): keys revoked or expired more
        than `key_days` ago (a notebook run's key, revoked as its run ends, among them), audit entries older than
        `audit_days`, usage rows older than `usage_days`; return how many of each went."""
        self.sync()  # what the writer holds goes in first
        now = _now()
        gone = {"keys": 0, "audit": 0, "usage": 0}
        with self.mutex:
            if key_days > 0:
                cut = now - timedelta(days=key_days)
                ids = {r["id"] for r in self._rows(
                    "SELECT id FROM api_keys WHERE revoked_at < ? OR expires_at < ?", [cut, cut])}  # fmt: skip
                if ids:
                    self.con.execute("DELETE FROM api_keys WHERE id IN (SELECT unnest(?::VARCHAR[]))", [sorted(ids)])
                    for k in [k for k in self.keys.values() if k.id in ids]:  # expired ones are still looked up
                        del self.keys[k.prefix]
                        self.key_ids.pop(k.id, None)
                gone["keys"] = len(ids)
        for table, days in (("audit", audit_days), ("usage", usage_days)):
            cut = now - timedelta(days=days)
            while days > 0:  # in batches, the lock let go between them: a first pass over years of rows never
                with self.mutex:  # holds every collection and login behind it
                    row = self.con.execute(
                        f"DELETE FROM {table} WHERE rowid IN "
                        f"(SELECT rowid FROM {table} WHERE created_at < ? LIMIT {FORGET_BATCH})",
                        [cut],
                    ).fetchone()
                n = int(row[0]) if row else 0  # DuckDB answers a DELETE with its count
                gone[table] += n
                if n < FORGET_BATCH:
                    break
        return gone

    def usage_report(self, group_by: str = "key", since: datetime | None = None) -> list[dict[str, Any]]:
        """Sum token usage per key, user, model, day or key and day (optionally since a time)."""
        cols = {
            "key": "key_id, username",
            "user": "user_id, username",
            "model": "model",
            "day": "CAST(created_at AS DATE) AS day",
            "key_day": "key_id, username, CAST(created_at AS DATE) AS day",
        }
        if group_by not in cols:
            raise InvalidInput(f"group_by must be one of {', '.join(cols)}, not {group_by!r}", field="group_by")
        where, params = ("WHERE created_at >= ?", [since]) if since else ("", [])
        sql = (
            f"SELECT {cols[group_by]}, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens, "
            f"sum(completion_tokens) AS completion_tokens, sum(prompt_tokens + completion_tokens) AS total_tokens "
            f"FROM usage {where} GROUP BY ALL ORDER BY total_tokens DESC"
        )
        self.sync()
        with self.mutex:
            rows = self._rows(sql, params)
        for r in rows:
            if "day" in r:
                r["day"] = r["day"].isoformat()
        return rows

    def list_audit(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        """Return the newest audit entries, optionally of one action."""
        if not 1 <= limit <= 10_000:
            raise InvalidInput("limit must be from 1 to 10000", field="limit")
        where, params = ("WHERE action = ?", [action]) if action else ("", [])
        self.sync()
        with self.mutex:
            rows = self._rows(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        for r in rows:
            r["created_at"] = r["created_at"].isoformat() + "Z"
            r["detail"] = json.loads(r["detail"]) if r["detail"] else {}
        return rows

    # -- roles ------------------------------------------------------------------------------------
    def list_roles(self) -> list[dict[str, Any]]:
        """Return every role with its scopes."""
        with self.mutex:
            return self._rows("SELECT name, scopes, builtin, description FROM roles ORDER BY name")

    def create_role(
        self, name: str, scopes: list[str], description: str = "", actor: str | None = None, by: Principal | None = None
    ) -> dict[str, Any]:
        """Create a custom role (with scopes `by` holds)."""
        actor = by.username if by else actor
        _check_name(name, "name")
        self._check_scopes(scopes, SCOPES, "scopes")
        self._grantable(by, scopes, f"creating role {name!r}", "scopes")
        with self.mutex:
            if name in self.roles:
                raise AlreadyExists(f"role {name!r} already exists", field="name")
            self.con.execute(
                "INSERT INTO roles (name, scopes, description) VALUES (?, ?, ?)", [name, scopes, description]
            )
            self.roles[name] = list(scopes)
        self.audit(actor, "role.create", name, scopes=scopes)
        return {"name": name, "scopes": scopes, "builtin": False, "description": description}

    def update_role(
        self,
        name: str,
        scopes: list[str] | None = None,
        description: str | None = None,
        actor: str | None = None,
        by: Principal | None = None,
    ) -> dict[str, Any]:
        """Change a custom role's scopes or description; its users' keys hold the new scopes at once. `by` must
        hold the role's scopes, before and after."""
        actor = by.username if by else actor
        if name not in self.roles:
            raise NotFound(f"no role {name!r}", field="name")
        if name in BUILTIN_ROLES:
            raise InvalidInput(f"role {name!r} is built in", field="name")
        self._grantable(by, self.roles[name], f"editing role {name!r}", "name")
        if scopes is not None:
            self._check_scopes(scopes, SCOPES, "scopes")
            self._grantable(by, scopes, f"giving role {name!r} these scopes", "scopes")
        with self.mutex:  # checked and changed at once (see update_user)
            if by is not None and scopes is not None and not self._an_admin_remains({**self.roles, name: list(scopes)}):
                raise Conflict(f"after this change no enabled user would hold the admin role's scopes (role {name!r} "
                               "gives them to the last ones)", field="scopes")  # fmt: skip
            if scopes is not None:
                self.con.execute("UPDATE roles SET scopes = ? WHERE name = ?", [scopes, name])
                self.roles[name] = list(scopes)
            if description is not None:
                self.con.execute("UPDATE roles SET description = ? WHERE name = ?", [description, name])
            row = self._rows("SELECT name, scopes, builtin, description FROM roles WHERE name = ?", [name])[0]
        self.audit(actor, "role.update", name, scopes=scopes, description=description)
        return row

    def delete_role(self, name: str, actor: str | None = None, by: Principal | None = None) -> None:
        """Delete a custom role that no user has (one whose scopes `by` holds)."""
        actor = by.username if by else actor
        with self.mutex:
            if name not in self.roles:
                raise NotFound(f"no role {name!r}", field="name")
            if name in BUILTIN_ROLES:
                raise InvalidInput(f"role {name!r} is built in", field="name")
            self._grantable(by, self.roles[name], f"deleting role {name!r}", "name")
            if any(u["role"] == name for u in self.users.values()):
                raise InvalidInput(f"role {name!r} is still given to users", field="name")
            self.con.execute("DELETE FROM roles WHERE name = ?", [name])
            del self.roles[name]
        self.audit(actor, "role.delete", name)

    # -- users ------------------------------------------------------------------------------------
    def create_user(
        self,
        username: str,
        role: str = "viewer",
        password: str | None = None,
        actor: str | None = None,
        by: Principal | None = None,
    ) -> dict[str, Any]:
        """Create a user with a role whose scopes `by` holds (the password, if given, is stored as a scrypt hash)."""
        actor = by.username if by else actor
        _check_name(username, "username")
        if username.endswith(HUB_SUFFIX) and (by is not None or actor != HUB_ACTOR or password is not None):
            raise InvalidInput(f"names ending in {HUB_SUFFIX!r} belong to JupyterHub users", field="username")
        if username == HUB_ACTOR:  # the name the gateway's own Hub changes are made and audited under
            raise InvalidInput(f"the name {HUB_ACTOR!r} is reserved", field="username")
        if role not in self.roles:
            raise NotFound(f"no role {role!r} (have {', '.join(sorted(self.roles))})", field="role")
        self._grantable(by, self.roles[role], f"giving role {role!r}", "role")
        if password is not None:
            _check_password(password)
            if by is not None and not set(SCOPES) <= by.scopes:
                raise _password_for_another(username)
        with self.mutex:
            if any(u["username"] == username for u in self.users.values()):
                raise AlreadyExists(f"user {username!r} already exists", field="username")
            uid = "u_" + uuid.uuid4().hex[:12]
            pw = ks.hash_password(password) if password else None
            self.con.execute(
                "INSERT INTO users (id, username, role, password_hash) VALUES (?, ?, ?, ?)", [uid, username, role, pw]
            )
            self.users[uid] = self._rows("SELECT * FROM users WHERE id = ?", [uid])[0]
        self.audit(actor, "user.create", username, role=role)
        return _public_user(self.users[uid])

    def user(self, user_id: str) -> dict[str, Any]:
        """Return one user or raise 404."""
        u = self.users.get(user_id) or next((u for u in self.users.values() if u["username"] == user_id), None)
        if u is None:
            raise NotFound(f"no user {user_id!r}", field="user_id")
        return u

    def list_users(self) -> list[dict[str, Any]]:
        """Return all users (never their password hashes)."""
        return [_public_user(u) for u in sorted(self.users.values(), key=lambda u: u["created_at"])]

    def update_user(
        self,
        user_id: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        password: str | None = None,
        actor: str | None = None,
        by: Principal | None = None,
    ) -> dict[str, Any]:
        """Change a user's role, disable / enable them, or set their password (a user, and a role, whose scopes
        `by` holds): everything is checked before anything changes, so a refused part leaves the user as it was."""
        actor = by.username if by else actor
        u = self.user(user_id)
        if role is not None and role not in self.roles:
            raise NotFound(f"no role {role!r} (have {', '.join(sorted(self.roles))})", field="role")
        if password is not None:
            _check_password(password)
        self._manageable(by, u, "user_id")
        if password is not None:
            self._may_set_password(by, u)
        if role is not None:
            self._grantable(by, self.roles[role], f"giving role {role!r}", "role")
        if by is not None and by.user_id == u["id"] and (disabled or (role is not None and role != u["role"])):
            raise InvalidInput("you cannot disable yourself or change your own role: another admin can",
                               field="disabled" if disabled else "role")  # fmt: skip
        with self.mutex:  # the last-admin check and the change at once: two admins disabling each other, one wins
            if by is not None:
                self._keeps_an_admin(u, role, disabled)
            if password is not None:
                self.set_password(user_id, password, actor=actor, by=by)
            if role is not None:
                self.con.execute("UPDATE users SET role = ? WHERE id = ?", [role, u["id"]])
                u["role"] = role
            if disabled is not None:
                self.con.execute("UPDATE users SET disabled = ? WHERE id = ?", [disabled, u["id"]])
                if disabled:
                    self._end_sessions(u["id"])
                u["disabled"] = disabled
        self.audit(actor, "user.update", u["username"], role=role, disabled=disabled)
        return _public_user(u)

    def _an_admin_remains(
        self, roles: dict[str, list[str]] | None = None, changed: dict[str, tuple[str, bool] | None] | None = None
    ) -> bool:
        """Whether an enabled user would hold the admin role's scopes with `roles` for the roles and `changed`
        (user id -> (role, disabled), None: deleted) applied to the users."""
        roles, changed = roles or self.roles, changed or {}
        full = set(self.roles["admin"])
        for u in self.users.values():
            if u["id"] not in changed:
                role, disabled = u["role"], u["disabled"]
            else:
                role, disabled = changed[u["id"]] or ("", True)  # a deleted user holds nothing
            if not disabled and full <= set(roles.get(role, ())):
                return True
        return False

    def _keeps_an_admin(
        self, u: dict[str, Any], role: str | None = None, disabled: bool | None = None, deleted: bool = False
    ) -> None:
        """409 when a change someone makes to user `u` would leave no enabled user with the admin role's scopes
        (nobody could manage users, roles or keys again: the admin key's user disabled, say, stays disabled)."""
        after = None if deleted else (role or u["role"], u["disabled"] if disabled is None else disabled)
        if self._an_admin_remains(changed={u["id"]: after}) or not self._an_admin_remains():
            return  # still one; or none before this change either, which it cannot make worse
        raise Conflict(f"{u['username']} is the last enabled user with the admin role's scopes: give another user "
                       "that role first", field="user_id")  # fmt: skip

    def hub_confirmed(self, user_id: str, hub_name: str, role: str, seen: dict[str, Any]) -> None:
        """Record that a Hub user's role was derived from their own token while the Hub's view of them was `seen`."""
        now = _now()
        with self.mutex:
            self.con.execute(
                "INSERT OR REPLACE INTO hub_users (user_id, hub_name, role, seen, confirmed_at) VALUES (?, ?, ?, ?, ?)",
                [user_id, hub_name, role, json.dumps(seen, sort_keys=True), now],
            )
            self.hub_seen[user_id] = {"user_id": user_id, "hub_name": hub_name, "role": role, "seen": seen,
                                      "confirmed_at": now}  # fmt: skip

    def hub_forget(self, user_id: str) -> None:
        """Drop what was recorded of a Hub user (their role no longer stands: the next request records again)."""
        with self.mutex:
            self.con.execute("DELETE FROM hub_users WHERE user_id = ?", [user_id])
            self.hub_seen.pop(user_id, None)

    def set_password(self, user_id: str, password: str, actor: str | None = None, by: Principal | None = None) -> None:
        """Set a user's password (a login as them holds their role's scopes: `by` must hold them all)."""
        actor = by.username if by else actor
        u = self.user(user_id)
        _check_password(password)
        self._manageable(by, u, "user_id")
        self._may_set_password(by, u)
        pw = ks.hash_password(password)
        with self.mutex:
            self.con.execute("UPDATE users SET password_hash = ? WHERE id = ?", [pw, u["id"]])
            self._end_sessions(u["id"])  # a new password ends old logins
            u["password_hash"] = pw
        self.audit(actor, "user.password", u["username"])

    def delete_user(self, user_id: str, actor: str | None = None, by: Principal | None = None) -> None:
        """Delete a user (one whose scopes `by` holds); their keys are revoked and their sessions end."""
        actor = by.username if by else actor
        u = self.user(user_id)
        self._manageable(by, u, "user_id")
        with self.mutex:  # checked and deleted at once (see update_user)
            if by is not None:
                self._keeps_an_admin(u, deleted=True)
            for k in [k for k in self.keys.values() if k.user_id == u["id"]]:
                with contextlib.suppress(NotFound):  # gone already with a key it derives from
                    self.revoke_key(k.id, actor=actor)  # managing u covers their keys: all within u's role
            self._end_sessions(u["id"])
            self.con.execute("DELETE FROM users WHERE id = ?", [u["id"]])
            self.con.execute("DELETE FROM hub_users WHERE user_id = ?", [u["id"]])
            del self.users[u["id"]]
            self.hub_seen.pop(u["id"], None)
        self.audit(actor, "user.delete", u["username"])

    # -- keys -------------------------------------------------------------------------------------
    def create_key(
        self,
        user_id: str,
        name: str,
        scopes: list[str] | None = None,
        expires_at: datetime | None = None,
        rate_limit_per_min: int | None = None,
        actor: str | None = None,
        token: str | None = None,
        by: Principal | None = None,
        parent: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Create a key for a user; return (its public record, the token, shown this once).

        A key made with a key for that key's own user (or a notebook run's key, whose `parent` is the key that
        started the run) derives from it: it expires no later, is rate-limited no more loosely, and is revoked
        with it. A key made for someone else is theirs: it stands alone.

        Without `scopes` the key follows its owner's role when its maker could give that user any role: the owner
        themselves through a credential that follows it too (a login, a key following the role: a fixed key makes
        fixed keys), a maker holding every scope, or the gateway. A key for someone
        else acts as them, so its maker must hold every scope of their role (as for managing them); it holds the
        role's scopes of today, fixed: it would otherwise gain whatever the owner's role gains later, which its
        maker may not hold. Explicit scopes must be the owner's and `by`'s."""
        actor = by.username if by else actor
        u = self.user(user_id)
        if u["username"].endswith(HUB_SUFFIX) and (by is not None or not str(name).startswith(RUN_KEY_PREFIX)):
            # their rights follow the Hub on every request; a bkg key would keep today's role after the Hub changes it
            raise Forbidden(f"{u['username']!r} is a JupyterHub user: they use their Hub token, not bkg keys",
                            field="user_id")  # fmt: skip
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise InvalidInput("key name must be 1 to 100 characters", field="name")
        self._may_act_as(by, u, "a key for another user", "user_id")
        allowed = self.roles[u["role"]]
        follows = scopes is None and (
            by is None
            or set(SCOPES) <= by.scopes
            or (by.user_id == u["id"] and set(allowed) <= by.scopes and self._follows(by))
        )  # a fixed key makes fixed keys: following the role, its key would gain what it never held
        if scopes is None:
            scopes = [s for s in allowed if by is None or s in by.scopes]
        self._check_scopes(scopes, tuple(allowed), "scopes", owner=u)
        self._grantable(by, scopes, f"a key for {u['username']!r} with these scopes", "scopes")
        if expires_at is not None and expires_at <= _now():
            raise InvalidInput("expires_at is in the past", field="expires_at")
        if rate_limit_per_min is not None and not 1 <= rate_limit_per_min <= 1_000_000:
            raise InvalidInput("rate_limit_per_min must be from 1 to 1000000", field="rate_limit_per_min")
        if parent is None and by is not None and by.key_id is not None and by.user_id == u["id"]:
            parent = by.key_id
        if token is None:
            token, prefix, secret = ks.new_key()
        else:
            parsed = ks.parse_key(token)
            if parsed is None:
                raise InvalidInput("key must look like bkg_<12 hex>_<32+ url-safe characters>", field="key")
            prefix, secret = parsed
        with self.mutex:  # the parent found and the key stored at once: a revoke cannot come between
            if prefix in self.keys:
                raise AlreadyExists("a key with this prefix exists", field="key")
            if parent is not None:
                try:
                    up = self._key(parent)
                except NotFound:
                    raise Forbidden(f"key {parent} it would derive from is revoked", field="key_id") from None
                if up.expires_at is not None:
                    expires_at = min(expires_at or up.expires_at, up.expires_at)
                if up.rate_limit_per_min is not None:
                    rate_limit_per_min = min(rate_limit_per_min or up.rate_limit_per_min, up.rate_limit_per_min)
            rec = KeyRecord(
                "k_" + uuid.uuid4().hex[:12], prefix, ks.hash_secret(secret), name, u["id"], scopes,
                rate_limit_per_min, _now(), expires_at, None, None, None, follows, parent,
            )  # fmt: skip
            self.con.execute(
                "INSERT INTO api_keys (id, prefix, secret_hash, name, user_id, scopes, rate_limit_per_min, created_at, "
                "expires_at, follows_role, parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    rec.id,
                    prefix,
                    rec.secret_hash,
                    name,
                    u["id"],
                    scopes,
                    rate_limit_per_min,
                    rec.created_at,
                    expires_at,
                    follows,
                    parent,
                ],
            )
            self.key_ids[rec.id] = rec
            self.keys[prefix] = rec
        self.audit(actor, "key.create", rec.id, name=name, user=u["username"], scopes=scopes)
        return rec.public(), token

    def _key(self, key_id: str) -> KeyRecord:
        rec = self.key_ids.get(key_id)
        if rec is None:
            raise NotFound(f"no active key {key_id!r}", field="key_id")
        return rec

    def list_keys(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """Return keys (active and revoked), newest first, without secrets."""
        self.flush_last_used()
        self.sync()
        where, params = ("WHERE user_id = ?", [user_id]) if user_id else ("", [])
        with self.mutex:
            rows = self._rows(f"SELECT * FROM api_keys {where} ORDER BY created_at DESC", params)
        out = []
        for r in rows:
            rec = KeyRecord(**r)
            if rec.follows_role and rec.user_id in self.users:
                rec.scopes = list(self.roles.get(self.users[rec.user_id]["role"], ()))
            out.append(rec.public())
        return out

    def rotate_key(
        self, key_id: str, actor: str | None = None, by: Principal | None = None
    ) -> tuple[dict[str, Any], str]:
        """Give a key a new secret (same id, name, scopes); the old token stops working at once. The new secret
        is shown to `by`, who must hold every scope the key does; a key that is less than its user (fixed, expiring,
        limited or derived) may only renew itself or a key derived from it."""
        actor = by.username if by else actor
        rec = self._key(key_id)
        if rec.name.startswith(RUN_KEY_PREFIX):  # a running notebook holds it: a new secret would be someone else's
            raise Forbidden(f"key {rec.id} belongs to a notebook run; cancel the run or revoke the key", field="key_id")
        self._grantable(by, self.key_scopes(rec), f"rotating key {rec.id}", "key_id")
        if rec.follows_role and by is not None and by.user_id != rec.user_id and not set(SCOPES) <= by.scopes:
            # its new secret would hold whatever the owner's role gains later (as create_key refuses to make)
            raise Forbidden(f"key {rec.id} follows its owner's role: only its owner, or someone holding every scope, "
                            "may take a new secret of it", field="key_id")  # fmt: skip
        if by is not None and by.user_id == rec.user_id and not self._whole(by):
            # the new secret must be no more than the credential asking for it: no longer-lived, no less limited,
            # not outliving its revocation, and following the role only if it does
            if not self._derives_from(rec, by.key_id or ""):
                raise Forbidden(f"key {rec.id} does not derive from the key asking for its new secret, which is "
                                f"less than {by.username} (fixed scopes, an expiry, a rate limit or a parent): use "
                                "a login session or a key that stands for all of them", field="key_id")  # fmt: skip
            if rec.follows_role and not self._follows(by):
                raise Forbidden(f"key {rec.id} follows its owner's role and the key asking for its new secret does "
                                "not: it would gain what that key never held", field="key_id")  # fmt: skip
        owner = self.users.get(rec.user_id)
        if owner is not None:
            if owner["username"].endswith(HUB_SUFFIX):
                raise Forbidden(
                    f"{owner['username']!r} is a JupyterHub user: their keys are not handed out", field="key_id"
                )
            self._may_act_as(by, owner, f"rotating key {rec.id}", "key_id")
        token, prefix, secret = ks.new_key()
        with self.mutex:
            self.con.execute(
                "UPDATE api_keys SET prefix = ?, secret_hash = ?, rotated_at = ? WHERE id = ?",
                [prefix, ks.hash_secret(secret), _now(), rec.id],
            )
            old = rec.prefix
            rec.prefix, rec.secret_hash, rec.rotated_at = prefix, ks.hash_secret(secret), _now()
            self.keys[prefix] = rec  # in before the old prefix goes: a lock-free lookup by id always finds it
            del self.keys[old]
        self.audit(actor, "key.rotate", rec.id, name=rec.name)
        return rec.public(), token

    def revoke_key(self, key_id: str, actor: str | None = None, by: Principal | None = None) -> dict[str, Any]:
        """Revoke a key for good: one's own, or one whose scopes `by` holds."""
        actor = by.username if by else actor
        rec = self._key(key_id)
        if by is not None and rec.user_id != by.user_id:
            self._grantable(by, self.key_scopes(rec), f"revoking key {rec.id}", "key_id")
        gone: list[KeyRecord] = []
        with self.mutex:
            if self.keys.get(rec.prefix) is not rec:  # revoked (or rotated) since it was looked up
                raise NotFound(f"no active key {key_id!r}", field="key_id")
            children: dict[str, list[KeyRecord]] = {}  # one pass over the keys, however long the chain
            for d in self.keys.values():
                if d.parent_id is not None:
                    children.setdefault(d.parent_id, []).append(d)
            todo = [rec]  # and what derives from it (a run's key, a key it made for its own user), however deep
            now = _now()
            while todo:
                k = todo.pop()
                k.revoked_at = now
                del self.key_ids[k.id]  # first: a store call that looks it up by id from now on finds it revoked
                del self.keys[k.prefix]
                gone.append(k)
                todo += children.get(k.id, [])
            self.con.executemany("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [[now, k.id] for k in gone])
        for k in gone:
            if k is rec:
                self.audit(actor, "key.revoke", k.id, name=k.name)
            else:
                self.audit(actor, "key.revoke", k.id, name=k.name, derived_from=rec.id)
        return rec.public()

    # -- authentication ---------------------------------------------------------------------------
    def authenticate(self, token: str, *, metered: bool = True) -> Principal:
        """Return the principal of an API key or session token, or raise 401 / 429.

        `metered=False` checks a credential again without counting a request against the key's rate limit or
        its last use (a WebSocket that stays open re-checks who it serves)."""
        if token.startswith("bkgs_"):
            return self._session(token)
        parsed = ks.parse_key(token)
        rec = self.keys.get(parsed[0]) if parsed else None
        if parsed is None or rec is None or not ks.same(ks.hash_secret(parsed[1]), rec.secret_hash):
            raise Unauthorized("invalid API key")
        now = _now()
        if rec.expires_at is not None and rec.expires_at <= now:
            raise Unauthorized(f"API key {rec.id} expired at {rec.expires_at.isoformat()}Z")
        user = self.users.get(rec.user_id)
        if user is None or user["disabled"]:
            raise Unauthorized("the key's user is disabled or deleted")
        if metered:
            self._rate(rec)
            rec.last_used_at = now
            if time.monotonic() - rec.flushed > 60:
                self._flush(rec)
        return Principal(user["id"], user["username"], user["role"], self.key_scopes(rec), rec.id, "key")

    def as_now(self, p: Principal) -> Principal:
        """The caller of a call that began earlier (a queued plugin job, a long one reaching the store), as they are
        now: 401 once their user is disabled or deleted, their key revoked or expired, or the login session it came
        from ended (logged out, expired, or ended by a new password); their scopes narrowed to what they still
        hold. A credential never outlives what it stood for."""
        user = self.users.get(p.user_id)
        if user is None or user["disabled"]:
            raise Unauthorized(f"{p.username} has been disabled or deleted: this call no longer acts for them")
        if p.session is not None and self._live_session(p.session) is None:
            raise Unauthorized(f"the login session of {p.username} that made this call has ended: it no longer "
                               "acts for them")  # fmt: skip
        held = frozenset(self.roles.get(user["role"], ()))
        if p.key_id is not None:
            live = self.live_key_scopes(p.key_id)
            if live is None:
                raise Unauthorized(f"key {p.key_id} has been revoked or has expired: this call no longer acts for "
                                   f"{p.username}")  # fmt: skip
            held = live
        scopes = p.scopes & held
        return p if scopes == p.scopes else dataclasses.replace(p, scopes=scopes)

    def live_key(self, key_id: str) -> KeyRecord | None:
        """Key `key_id` while it works; None once it is revoked (or gone) or has expired."""
        try:
            rec = self._key(key_id)
        except NotFound:  # revoked keys leave `keys`
            return None
        return None if rec.expires_at is not None and rec.expires_at <= _now() else rec

    def live_key_scopes(self, key_id: str) -> frozenset[str] | None:
        """The scopes key `key_id` holds now; None once it is revoked (or gone) or has expired."""
        rec = self.live_key(key_id)
        return None if rec is None else self.key_scopes(rec)

    def _rate(self, rec: KeyRecord) -> None:
        limit = rec.rate_limit_per_min
        if not limit:
            return
        with self._lock:
            now = time.monotonic()
            if rec.refilled == 0.0:
                rec.tokens, rec.refilled = float(limit), now
            rec.tokens = min(float(limit), rec.tokens + (now - rec.refilled) * limit / 60.0)
            rec.refilled = now
            if rec.tokens < 1.0:
                wait = (1.0 - rec.tokens) * 60.0 / limit
                raise TooManyRequests(
                    f"rate limit of {limit} requests per minute reached for key {rec.id}", retry_after=wait
                )
            rec.tokens -= 1.0

    def _flush(self, rec: KeyRecord) -> None:
        rec.flushed = time.monotonic()
        self._write_later("UPDATE api_keys SET last_used_at = ? WHERE id = ?", [rec.last_used_at, rec.id])

    def flush_last_used(self) -> None:
        """Write the in-memory last-used times to DuckDB."""
        for rec in list(self.keys.values()):
            if rec.last_used_at is not None:
                self._flush(rec)

    def login(self, username: str, password: str, address: str = "") -> tuple[str, Principal]:
        """Check a password and open a session; return (session token, principal).

        Throttled per user name and per client address (429 with Retry-After); an unknown name costs the same
        scrypt work as a known one; failed attempts are audited at most `failed_audit.per_min` rows a minute."""
        self.throttle.check(username, address)
        u = next((u for u in self.users.values() if u["username"] == username), None)
        right = ks.check_password(password, u["password_hash"] if u else None)
        if u is None or u["disabled"] or not right or u["username"].endswith(HUB_SUFFIX):
            self.throttle.failed(username, address)
            held = self.failed_audit.take()
            if held is not None:
                extra = {"held_back": held} if held else {}
                self.audit(username[:64], "auth.login", username[:64], ok=False, address=address, **extra)
            raise Unauthorized("wrong username or password")
        self.throttle.succeeded(username)
        token = "bkgs_" + secrets.token_urlsafe(32)
        token_hash, now = ks.hash_secret(token), _now()
        with self.mutex:
            self.con.execute("DELETE FROM sessions WHERE expires_at <= ?", [now])  # expired ones go as new ones come
            for h in [h for h, (_, exp) in self.sessions.items() if exp <= now]:
                self.sessions.pop(h, None)
            self.con.execute(
                "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
                [token_hash, u["id"], now + SESSION_TTL],
            )
            self.sessions[token_hash] = (u["id"], now + SESSION_TTL)
            if ks.needs_rehash(u["password_hash"]):  # made with older, weaker parameters: upgrade it now
                pw = ks.hash_password(password)
                self.con.execute("UPDATE users SET password_hash = ? WHERE id = ?", [pw, u["id"]])
                u["password_hash"] = pw
        self.audit(username, "auth.login", username, address=address)
        return token, self._principal(u, "session", token_hash)

    def _session(self, token: str) -> Principal:
        token_hash = ks.hash_secret(token)
        user_id = self._live_session(token_hash)
        if user_id is None:
            raise Unauthorized("session expired or unknown: log in again")
        u = self.users.get(user_id)
        if u is None or u["disabled"]:
            raise Unauthorized("the session's user is disabled or deleted")
        return self._principal(u, "session", token_hash)

    def _live_session(self, token_hash: str) -> str | None:
        """The user id of a session that has not ended (logged out, expired, ended by a new password); else None."""
        found = self.sessions.get(token_hash)
        return found[0] if found is not None and found[1] > _now() else None

    def _principal(self, u: dict[str, Any], via: str, session: str | None = None) -> Principal:
        role = frozenset(self.roles.get(u["role"], ()))
        return Principal(u["id"], u["username"], u["role"], role, None, via, session)

    def logout(self, token: str) -> None:
        """End a session (at once in memory; the row goes by the writer thread)."""
        self.end_session(ks.hash_secret(token))

    def end_session(self, token_hash: str) -> None:
        """End the session a principal came from (`Principal.session`)."""
        self.sessions.pop(token_hash, None)
        self._write_later("DELETE FROM sessions WHERE token_hash = ?", [token_hash])

    def _may_set_password(self, by: Principal | None, u: dict[str, Any]) -> None:
        """403 when `by` may not set user `u`'s password: a JupyterHub user logs in through the Hub, someone else's
        password takes every scope, and one's own needs a credential that stands for all of oneself (a login
        follows the role, never expires with a key and outlives every key's revocation)."""
        if u["username"].endswith(HUB_SUFFIX):
            raise Forbidden(f"{u['username']!r} is a JupyterHub user: they log in through the Hub", field="password")
        if by is None:
            return
        if by.user_id != u["id"] and not set(SCOPES) <= by.scopes:
            raise _password_for_another(u["username"])
        if by.user_id == u["id"] and not self._whole(by):
            raise Forbidden(f"a password for {u['username']!r} gives a login that follows their role and outlives "
                            "every key: set it with a login session or a key that stands for all of them (follows "
                            "the role, no expiry, rate limit or parent), not with this key",
                            field="password")  # fmt: skip

    # -- first start ------------------------------------------------------------------------------
    def bootstrap(self, data_dir: Path, env_key: str | None) -> Path | None:
        """On first start, create the admin user and key: `BKG_ADMIN_KEY` if set, else a new key in admin.key."""
        if self.users:
            return None
        token = env_key or ks.new_key()[0]
        path = None if env_key else _write_key_file(data_dir / "admin.key", token)  # before the key exists: a
        # file that cannot be written leaves no admin behind without a key file, and the next start tries again
        with self.mutex:  # the connection's other users (the audit writer) wait: the transaction is this alone
            self.con.begin()  # the user and their key, or neither
            try:
                admin = self.create_user("admin", "admin", actor="bootstrap")
                self.create_key(admin["id"], "admin (bootstrap)", actor="bootstrap", token=token)
                self.con.commit()
            except BaseException:
                self.con.rollback()
                raise
        return path

    def recover_admin_key(self, data_dir: Path) -> Path:
        """A new key for the first enabled admin user, written to `data_dir/admin.key` (mode 0600), for someone who
        holds the data dir (its database and every key's hash are theirs already) and lost the admin key. Any key
        the admin had stays, listed and revocable."""
        admin = next(
            (
                u
                for u in sorted(self.users.values(), key=lambda u: u["created_at"])
                if u["role"] == "admin" and not u["disabled"] and not u["username"].endswith(HUB_SUFFIX)
            ),
            None,
        )  # a JupyterHub admin acts through the Hub, with no bkg key
        if admin is None:
            raise Unavailable("no enabled admin user (other than JupyterHub's) to give a key to")
        token = ks.new_key()[0]
        path = data_dir / "admin.key"
        before = path.read_bytes() if path.exists() else None
        _write_key_file(path, token)  # first: a key stored without its file helps nobody
        try:
            name = f"admin (recovered {_now():%Y-%m-%d %H:%M} UTC)"
            self.create_key(admin["id"], name, actor="bkg keys recover-admin", token=token)
        except BaseException:  # the file goes back to what it was: it never holds a key that was not stored
            if before is None:
                path.unlink(missing_ok=True)
            else:
                statefiles.write(path, before, private=True)
            raise
        return path

    def _end_sessions(self, user_id: str) -> None:
        """End every session of a user (under `self.mutex`)."""
        self.con.execute("DELETE FROM sessions WHERE user_id = ?", [user_id])
        for h in [h for h, (uid, _) in self.sessions.items() if uid == user_id]:
            self.sessions.pop(h, None)

    def workbench_key(self, data_dir: Path) -> Path:
        """The key clients use by default (the lab, its kernels, Voila, notebooks): `data_dir/workbench.key`,
        a listed, revocable key of the admin user with the developer role's scopes, made when the file is missing.
        The admin key stays in admin.key for a person who asks for it."""
        path = data_dir / "workbench.key"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if ks.parse_key(path.read_text().strip()) is not None:
                return path
        # missing, or not a key (a crash of an older bkg could leave it empty): a new one; an old key stays listed
        admin = next((u for u in self.users.values() if u["role"] == "admin" and not u["disabled"]), None)
        if admin is None:
            raise Unavailable("no enabled admin user to own the workbench key")
        scopes = [s for s in BUILTIN_ROLES["developer"][0] if s in self.roles[admin["role"]]]
        _, token = self.create_key(
            admin["id"], "workbench (clients: lab, kernels, dashboards)", scopes, actor="bootstrap"
        )
        return _write_key_file(path, token)

    def _check_scopes(
        self, scopes: Any, allowed: tuple[str, ...], field: str, owner: dict[str, Any] | None = None
    ) -> None:
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise InvalidInput("scopes must be a list of strings", field=field)
        for i, s in enumerate(scopes):
            if s not in SCOPES:
                raise InvalidInput(f"unknown scope {s!r} (known: {', '.join(SCOPES)})", field=f"{field}[{i}]")
            if s not in allowed:
                who = f"user {owner['username']!r} (role {owner['role']})" if owner else "this role"
                raise Forbidden(f"scope {s!r} is not held by {who}", field=f"{field}[{i}]")


def _write_key_file(path: Path, token: str) -> Path:
    """Write a key to a file only its owner can read (mode 0600 from the start), whole or not at all."""
    return statefiles.write(path, token + "\n", private=True)


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
    """The 403 for a password set for someone else by who does not hold every scope: a login as them holds their
    role as it is then, whatever it gains later (as a key following their role would, which create_key refuses)."""
    return Forbidden(f"a password for {username!r} lets whoever knows it log in as them, with whatever their role "
                     "gains later: only someone holding every scope may set one (give them a key with fixed scopes "
                     "instead)", field="password")  # fmt: skip


def _check_password(password: Any) -> None:
    if not isinstance(password, str) or not 8 <= len(password) <= 256:
        raise InvalidInput("password must have 8 to 256 characters", field="password")
