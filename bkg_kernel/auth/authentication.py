"""Who a request is: an API key or a login session checked, a call's caller checked again as they are now, and
sessions opened (by a password, throttled) and ended."""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.base import AuthBase
from bkg_kernel.auth.principal import Principal
from bkg_kernel.auth.records import HUB_SUFFIX, SESSION_TTL, _now
from bkg_kernel.errors import Unauthorized


class Authentication(AuthBase):
    """Credentials checked; login sessions opened and ended."""

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
        scopes = self.acting_scopes(rec)
        if scopes is None:
            raise Unauthorized(f"API key {rec.id} was made by a bounded key whose user is disabled or deleted")
        if metered:
            self._rate(rec)
            rec.last_used_at = now
            if time.monotonic() - rec.flushed > 60:
                self._flush(rec)
        return Principal(user["id"], user["username"], user["role"], scopes, rec.id, "key")

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

    def _end_sessions(self, user_id: str) -> None:
        """End every session of a user (under `self.mutex`)."""
        self.con.execute("DELETE FROM sessions WHERE user_id = ?", [user_id])
        for h in [h for h, (uid, _) in self.sessions.items() if uid == user_id]:
            self.sessions.pop(h, None)
