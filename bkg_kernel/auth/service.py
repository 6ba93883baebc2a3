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

The service is composed of its parts, one module each: `records` (constants, `KeyRecord`), `base` (shared state, the
writer thread, the grant checks), `users` (roles and users), `apikeys`, `authentication` (keys and sessions checked,
logins) and `audit` (the audit log and usage); this module sets them up and makes the first admin.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from bkg_kernel import statefiles
from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.apikeys import ApiKeys
from bkg_kernel.auth.audit import AuditLog
from bkg_kernel.auth.authentication import Authentication
from bkg_kernel.auth.principal import BUILTIN_ROLES
from bkg_kernel.auth.records import (
    FORGET_BATCH,
    HUB_ACTOR,
    HUB_SUFFIX,
    RUN_KEY,
    RUN_KEY_PREFIX,
    SESSION_TTL,
    KeyRecord,
    _now,
)
from bkg_kernel.auth.throttle import AuditBudget, LoginThrottle
from bkg_kernel.auth.users import Users
from bkg_kernel.errors import Unavailable

__all__ = [
    "FORGET_BATCH",
    "HUB_ACTOR",
    "HUB_SUFFIX",
    "RUN_KEY",
    "RUN_KEY_PREFIX",
    "SESSION_TTL",
    "AuthService",
    "KeyRecord",
]


class AuthService(Users, ApiKeys, Authentication, AuditLog):
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

    def close(self) -> None:
        """Write what is pending (last-used times included) and stop the writer thread."""
        if not self._writer.is_alive():
            return
        self.flush_last_used()
        self._writes.put(None)
        self._writer.join(30)

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
        admin = self._local_admin()
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

    def workbench_key(self, data_dir: Path) -> Path:
        """The key clients use by default (the lab, its kernels, Voila, notebooks): `data_dir/workbench.key`,
        a listed, revocable key of the admin user with the developer role's scopes, made when the file is missing.
        The admin key stays in admin.key for a person who asks for it."""
        path = data_dir / "workbench.key"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if ks.parse_key(path.read_text().strip()) is not None:
                return path
        # missing, or not a key (a crash of an older bkg could leave it empty): a new one; an old key stays listed
        admin = self._local_admin()
        if admin is None:
            raise Unavailable("no enabled admin user other than JupyterHub's to own the workbench key (a Hub user "
                              "has no bkg keys): enable a local admin, or give a local user the admin role, and "
                              "start again")  # fmt: skip
        scopes = [s for s in BUILTIN_ROLES["developer"][0] if s in self.roles[admin["role"]]]
        _, token = self.create_key(
            admin["id"], "workbench (clients: lab, kernels, dashboards)", scopes, actor="bootstrap"
        )
        return _write_key_file(path, token)

    def _local_admin(self) -> dict[str, Any] | None:
        """The first enabled admin user who is not a JupyterHub user (one acts through the Hub, with no bkg key)."""
        return next(
            (
                u
                for u in sorted(self.users.values(), key=lambda u: u["created_at"])
                if u["role"] == "admin" and not u["disabled"] and not u["username"].endswith(HUB_SUFFIX)
            ),
            None,
        )


def _write_key_file(path: Path, token: str) -> Path:
    """Write a key to a file only its owner can read (mode 0600 from the start), whole or not at all."""
    return statefiles.write(path, token + "\n", private=True)
