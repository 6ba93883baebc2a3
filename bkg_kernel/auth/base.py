"""The state every part of the auth service shares (the store's connection and mutex, the users, roles, keys and
sessions held in memory), its writer thread, and the checks that nobody grants what they do not hold."""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bkg_kernel.auth.principal import SCOPES, Principal
from bkg_kernel.auth.records import KeyRecord
from bkg_kernel.errors import Forbidden, InvalidInput

if TYPE_CHECKING:
    from bkg_kernel.auth.throttle import AuditBudget, LoginThrottle

log = logging.getLogger("bkg.auth")


class AuthBase:
    """What `AuthService`'s parts share; `AuthService.__init__` sets it up."""

    con: Any
    mutex: Any
    _lock: threading.Lock
    _writes: queue.Queue[tuple[str, list[Any]] | None]
    throttle: LoginThrottle
    failed_audit: AuditBudget
    roles: dict[str, list[str]]
    users: dict[str, dict[str, Any]]
    keys: dict[str, KeyRecord]
    key_ids: dict[str, KeyRecord]
    sessions: dict[str, tuple[str, datetime]]
    hub_seen: dict[str, dict[str, Any]]

    if TYPE_CHECKING:  # what the parts call of one another (each is defined once, in its part)

        def audit(
            self, actor: str | None, action: str, target: str | None = None, ok: bool = True, **detail: Any
        ) -> None: ...
        def user(self, user_id: str) -> dict[str, Any]: ...
        def revoke_key(self, key_id: str, actor: str | None = None, by: Principal | None = None) -> dict[str, Any]: ...
        def live_key_scopes(self, key_id: str) -> frozenset[str] | None: ...
        def _rate(self, rec: KeyRecord) -> None: ...
        def _flush(self, rec: KeyRecord) -> None: ...
        def _end_sessions(self, user_id: str) -> None: ...

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
            and rec.maker_id is None
            and rec.expires_at is None
            and rec.rate_limit_per_min is None
        )

    def _bounded(self, by: Principal) -> bool:
        """Whether `by` is a key with an expiry or a rate limit (or one revoked since): what it hands to someone else
        (a password, a key following their role, a key with no end or limit) would outlive or outrun it. A login
        session, a Hub token and a key with neither are not: what they make stays their user's to make."""
        if by.key_id is None:
            return False
        rec = self.key_ids.get(by.key_id)
        return rec is None or rec.expires_at is not None or rec.rate_limit_per_min is not None

    def _no_lasting_gain(self, by: Principal | None, gained: set[str], what: str, field: str) -> None:
        """403 when a key that expires or is rate-limited would give `gained` scopes through a role (`what`): a role
        outlives every key, so its holders' logins and the keys that follow it would keep them for good, as a
        password set for someone would (refused the same way)."""
        if by is None or not gained or not self._bounded(by):
            return
        raise Forbidden(f"{what} gives {', '.join(sorted(gained))} for good, and the key asking expires or is "
                        "rate-limited: use a login session or a key with no expiry and no rate limit",
                        field=field)  # fmt: skip

    def _upstream(self, rec: KeyRecord, limited: bool = False) -> list[KeyRecord]:
        """The keys whose bounds hold key `rec`: itself, every key it derives from (`parent_id`) and every key that
        made one of them for its user (`maker_id`), however deep, each once, `rec` first. A key revoked (or
        forgotten) since is not among them: the keys it held went with it. `limited`: only those with a rate limit
        (a key without one is held by no key with one: a limit is copied down when a key is made)."""
        out: list[KeyRecord] = []
        seen: set[str] = set()
        todo = [rec]
        while todo:
            k = todo.pop()
            if k.id in seen or (limited and not k.rate_limit_per_min):
                continue
            seen.add(k.id)
            out.append(k)
            for up in (k.maker_id, k.parent_id):
                found = self.key_ids.get(up) if up is not None else None
                if found is not None:
                    todo.append(found)
        return out

    def _bound_by(self, rec: KeyRecord, key_id: str | None) -> bool:
        """Whether key `rec` is key `key_id` or is held within its bounds (derives from it, or was made by it or by
        a key within them), however deep: then it expires no later, shares its rate limit and is revoked with it."""
        return any(k.id == key_id for k in self._upstream(rec))

    def key_scopes(self, rec: KeyRecord) -> frozenset[str]:
        """The scopes a key holds now: its user's role's, narrowed to the key's own list unless it follows the role."""
        user = self.users.get(rec.user_id)
        role = frozenset(self.roles.get(user["role"], ())) if user else frozenset()
        return role if rec.follows_role else frozenset(rec.scopes) & role

    def acting_scopes(self, rec: KeyRecord) -> frozenset[str] | None:
        """The scopes key `rec` acts with now: `key_scopes`, within those of every key of another user whose bounds
        hold it (the bounded delegate that made it for its user, and that key's own chain), as they hold them now;
        None while such a key's user is disabled or deleted (the key made within its bounds waits with it, and works
        again if that user is enabled again; revoking the maker revokes it)."""
        scopes = self.key_scopes(rec)
        if rec.maker_id is None and rec.parent_id is None:  # most keys: nothing above them
            return scopes
        for k in self._upstream(rec)[1:]:
            if k.user_id == rec.user_id:
                continue  # its own user's keys: what it derives from holds no other user's rights
            maker = self.users.get(k.user_id)
            if maker is None or maker["disabled"]:
                return None
            scopes &= self.key_scopes(k)
        return scopes

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
                            try:
                                self.con.execute(sql, params)
                            except Exception:  # that row alone: the rest of the batch is still written
                                log.exception("auth writer: a row not written (%s)", sql.split("(")[0].strip())
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
