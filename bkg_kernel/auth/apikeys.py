"""API keys: created, listed, rotated and revoked (with every key derived from them or made by them under their
bounds), looked up while they work, rate-limited, and their last use written now and then."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.base import AuthBase
from bkg_kernel.auth.principal import SCOPES, Principal
from bkg_kernel.auth.records import HUB_SUFFIX, RUN_KEY, RUN_KEY_PREFIX, KeyRecord, _now
from bkg_kernel.errors import AlreadyExists, Forbidden, InvalidInput, NotFound, TooManyRequests


class ApiKeys(AuthBase):
    """API keys and their rate limits and last-used times."""

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
        started the run) derives from it: it expires no later, its requests count against that key's rate limit
        too, and it is revoked with it. A key made for someone else is theirs, but one made with a key that
        expires or is rate-limited (a bounded delegate) stays within that key's bounds as a derived key does: it
        records its maker (`maker_id`), expires no later, draws on the maker's rate limit (and on every limit the
        maker draws on), and is revoked with it; so the keys a delegate limited to 5 requests a minute makes for
        others, and all they make, make 5 in all. Its expiry and limit are clamped rather than refused: the caller
        gets a key that works as long as its own does, and the record it gets back shows the expiry and the
        limit. A key made for someone else with a key with neither stands alone (as with JupyterHub's tokens: its
        maker's revocation leaves it).

        Without `scopes` the key follows its owner's role when its maker could give that user any role: the owner
        themselves through a credential that follows it too (a login, a key following the role: a fixed key makes
        fixed keys), a maker holding every scope through a credential with no expiry and no rate limit (a key made
        for someone else would otherwise gain what their role gains after its maker expired), or the gateway. A key
        for someone else acts as them, so its maker must hold every scope of their role (as for managing them); it
        holds the role's scopes of today, fixed: it would otherwise gain whatever the owner's role gains later,
        which its maker may not hold. Explicit scopes must be the owner's and `by`'s.

        Names starting with `RUN_KEY` are refused to every caller (`by`): a key the gateway itself makes under a
        run's name (`RUN_KEY` and the run's id: JobService's, as the run starts) is that run's key, marked
        `run_id`; only the mark makes a key a run's (what its kernel makes lives by the key that started the run)."""
        actor = by.username if by else actor
        u = self.user(user_id)
        # a notebook run's key: made by the gateway itself (JobService, as the run starts) under the run's name, and
        # marked with the run's id; what a key is, is read from the mark, never from the name
        run_id = name.removeprefix(RUN_KEY) if by is None and str(name).startswith(RUN_KEY_PREFIX) else None
        if u["username"].endswith(HUB_SUFFIX) and run_id is None:
            # their rights follow the Hub on every request; a bkg key would keep today's role after the Hub changes it
            raise Forbidden(f"{u['username']!r} is a JupyterHub user: they use their Hub token, not bkg keys",
                            field="user_id")  # fmt: skip
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise InvalidInput("key name must be 1 to 100 characters", field="name")
        if by is not None and name.lstrip().lower().startswith(RUN_KEY):
            raise InvalidInput(f"key names starting with {RUN_KEY!r} are the gateway's, for notebook runs' keys",
                               field="name")  # fmt: skip
        self._may_act_as(by, u, "a key for another user", "user_id")
        allowed = self.roles[u["role"]]
        follows = scopes is None and (
            by is None
            or (set(SCOPES) <= by.scopes and not self._bounded(by))
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
        # a key for someone else made with a key that expires or is limited: held within that key's bounds, as a key
        # derived from it is (without the link, each such key had a bucket of its own: N keys, N times the limit)
        maker = by.key_id if by is not None and by.user_id != u["id"] and self._bounded(by) else None
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
            if self.users.get(u["id"]) is not u:  # deleted since it was looked up
                raise NotFound(f"no user {u['username']!r}", field="user_id")
            for bound, what in ((parent, "it would derive from"), (maker, "asking for it")):
                if bound is None:
                    continue
                try:
                    up = self._key(bound)
                except NotFound:
                    raise Forbidden(f"key {bound} {what} is revoked", field="key_id") from None
                if up.expires_at is not None:
                    expires_at = min(expires_at or up.expires_at, up.expires_at)
                if up.rate_limit_per_min is not None:
                    rate_limit_per_min = min(rate_limit_per_min or up.rate_limit_per_min, up.rate_limit_per_min)
            rec = KeyRecord(
                "k_" + uuid.uuid4().hex[:12], prefix, ks.hash_secret(secret), name, u["id"], scopes,
                rate_limit_per_min, _now(), expires_at, None, None, None, follows, parent, maker, run_id,
            )  # fmt: skip
            self.con.execute(
                "INSERT INTO api_keys (id, prefix, secret_hash, name, user_id, scopes, rate_limit_per_min, created_at, "
                "expires_at, follows_role, parent_id, maker_id, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    maker,
                    run_id,
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
        limited or derived) may only renew itself or a key derived from it, and a key that expires or is limited
        may only renew someone else's key that it made (or one made within its bounds)."""
        actor = by.username if by else actor
        rec = self._key(key_id)
        self._may_rotate(rec, by)
        token, prefix, secret = ks.new_key()
        with self.mutex:  # checked again and changed at once: a key revoked (or its owner changed) meanwhile
            if self.key_ids.get(rec.id) is not rec or self.keys.get(rec.prefix) is not rec:
                raise NotFound(f"no active key {key_id!r}", field="key_id")
            self._may_rotate(rec, by)
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

    def _may_rotate(self, rec: KeyRecord, by: Principal | None) -> None:
        """The checks of `rotate_key` (403 when `by` may not take a new secret of key `rec`)."""
        if rec.run_id is not None:  # a running notebook holds it: a new secret would be someone else's
            raise Forbidden(f"key {rec.id} belongs to a notebook run; cancel the run or revoke the key", field="key_id")
        self._grantable(by, self.key_scopes(rec), f"rotating key {rec.id}", "key_id")
        if (
            rec.follows_role
            and by is not None
            and by.user_id != rec.user_id
            and (not set(SCOPES) <= by.scopes or self._bounded(by))
        ):  # its new secret would hold whatever the owner's role gains later (as create_key refuses to make)
            raise Forbidden(f"key {rec.id} follows its owner's role: only its owner, or someone holding every scope "
                            "with no expiry or rate limit, may take a new secret of it", field="key_id")  # fmt: skip
        if by is not None and by.user_id == rec.user_id and not self._whole(by):
            # the new secret must be no more than the credential asking for it: no longer-lived, no less limited,
            # not outliving its revocation, and following the role only if it does
            if not self._bound_by(rec, by.key_id):
                raise Forbidden(f"key {rec.id} does not derive from the key asking for its new secret, which is "
                                f"less than {by.username} (fixed scopes, an expiry, a rate limit or a parent): use "
                                "a login session or a key that stands for all of them", field="key_id")  # fmt: skip
            if rec.follows_role and not self._follows(by):
                raise Forbidden(f"key {rec.id} follows its owner's role and the key asking for its new secret does "
                                "not: it would gain what that key never held", field="key_id")  # fmt: skip
        if by is not None and by.user_id != rec.user_id and self._bounded(by) and not self._bound_by(rec, by.key_id):
            # a new secret of a key beyond its bounds (one with no expiry or limit, say) would outlive or outrun it
            raise Forbidden(f"key {rec.id} was not made within the bounds of the key asking for its new secret, "
                            "which expires or is rate-limited: the new secret would outlive or outrun it; use a "
                            "login session or a key with no expiry and no rate limit", field="key_id")  # fmt: skip
        owner = self.users.get(rec.user_id)
        if owner is not None:
            if owner["username"].endswith(HUB_SUFFIX):
                raise Forbidden(
                    f"{owner['username']!r} is a JupyterHub user: their keys are not handed out", field="key_id"
                )
            self._may_act_as(by, owner, f"rotating key {rec.id}", "key_id")

    def revoke_key(self, key_id: str, actor: str | None = None, by: Principal | None = None) -> dict[str, Any]:
        """Revoke a key for good: one's own, or one whose scopes `by` holds; with it go the keys held within its
        bounds (derived from it, or made by it for others while it expired or was limited), however deep."""
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
                for up in {d.parent_id, d.maker_id} - {None}:
                    children.setdefault(str(up), []).append(d)
            # and what is held within its bounds (a run's key, a key it made for its own user, a key it made for
            # someone else while it expired or was limited: its bucket goes, theirs must not become their own)
            todo = [rec]
            now = _now()
            while todo:
                k = todo.pop()
                if k.id not in self.key_ids:  # reached twice (made by one key and derived from another, both going)
                    continue
                k.revoked_at = now
                del self.key_ids[k.id]  # first: a store call that looks it up by id from now on finds it revoked
                del self.keys[k.prefix]
                gone.append(k)
                todo += children.get(k.id, [])
            # one statement: a crash leaves all of them revoked or none (a key outliving its maker would be unbounded)
            ids = [k.id for k in gone]
            self.con.execute("UPDATE api_keys SET revoked_at = ? WHERE id IN (SELECT unnest(?::VARCHAR[]))", [now, ids])
        for k in gone:
            if k is rec:
                self.audit(actor, "key.revoke", k.id, name=k.name)
            else:  # `derived_from`: the key revoked whose bounds held it (it derives from it, or was made within them)
                self.audit(actor, "key.revoke", k.id, name=k.name, derived_from=rec.id)
        return rec.public()

    def live_key(self, key_id: str) -> KeyRecord | None:
        """Key `key_id` while it works; None once it is revoked (or gone) or has expired."""
        try:
            rec = self._key(key_id)
        except NotFound:  # revoked keys leave `keys`
            return None
        return None if rec.expires_at is not None and rec.expires_at <= _now() else rec

    def live_key_scopes(self, key_id: str) -> frozenset[str] | None:
        """The scopes key `key_id` acts with now (`acting_scopes`); None once it is revoked (or gone) or has expired,
        or while the user of a bounded delegate that made it is disabled."""
        rec = self.live_key(key_id)
        return None if rec is None else self.acting_scopes(rec)

    def _rate(self, rec: KeyRecord) -> None:
        """Count a request against key `rec`'s rate limit and those of every key whose bounds hold it (`_upstream`:
        the keys it derives from and the bounded keys that made them for their users): a derived key draws from its
        ancestors' buckets too, and so does a key a limited delegate made for someone else, so a key limited to 5
        requests a minute and all it made, for its user or for others, make 5 in all, as its user would expect
        (each copying the limit had a bucket of its own: 5 keys, 25). A request refused by one bucket takes from
        none."""
        chain = self._upstream(rec, limited=True)
        if not chain:
            return
        with self._lock:
            now = time.monotonic()
            for k in chain:
                limit = float(k.rate_limit_per_min or 0)
                if k.refilled == 0.0:
                    k.tokens, k.refilled = limit, now
                k.tokens = min(limit, k.tokens + (now - k.refilled) * limit / 60.0)
                k.refilled = now
            for k in chain:
                if k.tokens < 1.0:
                    limit = float(k.rate_limit_per_min or 0)
                    whose = f"key {k.id}" if k is rec else f"key {k.id}, whose limit key {rec.id} shares"
                    raise TooManyRequests(
                        f"rate limit of {k.rate_limit_per_min} requests per minute reached for {whose}",
                        retry_after=(1.0 - k.tokens) * 60.0 / limit,
                    )
            for k in chain:
                k.tokens -= 1.0

    def _flush(self, rec: KeyRecord) -> None:
        rec.flushed = time.monotonic()
        self._write_later("UPDATE api_keys SET last_used_at = ? WHERE id = ?", [rec.last_used_at, rec.id])

    def flush_last_used(self) -> None:
        """Write the in-memory last-used times to DuckDB."""
        for rec in list(self.keys.values()):
            if rec.last_used_at is not None:
                self._flush(rec)
