"""Roles and users: created, changed and deleted by whoever holds their scopes, never leaving no admin behind;
passwords set; what JupyterHub said of its users recorded."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.base import AuthBase
from bkg_kernel.auth.principal import BUILTIN_ROLES, SCOPES, Principal
from bkg_kernel.auth.records import (
    HUB_ACTOR,
    HUB_SUFFIX,
    _check_name,
    _check_password,
    _now,
    _password_for_another,
    _public_user,
)
from bkg_kernel.errors import AlreadyExists, Conflict, Forbidden, InvalidInput, NotFound


class Users(AuthBase):
    """Roles, users, their passwords and their Hub records."""

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
        with self.mutex:  # checked and changed at once: a role edited or deleted meanwhile is seen as it is now
            if name not in self.roles:
                raise NotFound(f"no role {name!r}", field="name")
            if name in BUILTIN_ROLES:
                raise InvalidInput(f"role {name!r} is built in", field="name")
            self._grantable(by, self.roles[name], f"editing role {name!r}", "name")
            if scopes is not None:
                self._check_scopes(scopes, SCOPES, "scopes")
                self._grantable(by, scopes, f"giving role {name!r} these scopes", "scopes")
                self._no_lasting_gain(by, set(scopes) - set(self.roles[name]), f"editing role {name!r}", "scopes")
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
        self._givable(by, role)
        if password is not None:
            _check_password(password)
            self._may_set_password(by, None, username)
        pw = ks.hash_password(password) if password else None  # scrypt: before the lock, which nobody waits on
        with self.mutex:
            self._givable(by, role)  # again, under the lock: the role may have gone (or changed) meanwhile
            if any(u["username"] == username for u in self.users.values()):
                raise AlreadyExists(f"user {username!r} already exists", field="username")
            uid = "u_" + uuid.uuid4().hex[:12]
            self.con.execute(
                "INSERT INTO users (id, username, role, password_hash) VALUES (?, ?, ?, ?)", [uid, username, role, pw]
            )
            self.users[uid] = self._rows("SELECT * FROM users WHERE id = ?", [uid])[0]
        self.audit(actor, "user.create", username, role=role)
        return _public_user(self.users[uid])

    def _givable(self, by: Principal | None, role: str) -> None:
        """404 for a role that does not exist; 403 unless `by` holds its scopes."""
        if role not in self.roles:
            raise NotFound(f"no role {role!r} (have {', '.join(sorted(self.roles))})", field="role")
        self._grantable(by, self.roles[role], f"giving role {role!r}", "role")

    def _current(self, u: dict[str, Any]) -> dict[str, Any]:
        """User `u` as held now (under `self.mutex`): 404 if they were deleted since they were looked up."""
        now = self.users.get(u["id"])
        if now is None:
            raise NotFound(f"no user {u['username']!r}", field="user_id")
        return now

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
        self._may_update(by, u, role, disabled, password)  # first without the lock: a refusal costs no scrypt
        pw = ks.hash_password(password) if password is not None else None
        with self.mutex:  # checked again and changed at once: the user as they are now (promoted, deleted, their
            # role or the role given deleted meanwhile); two admins disabling each other, one wins
            u = self._current(u)
            self._may_update(by, u, role, disabled, password)
            if by is not None:
                self._keeps_an_admin(u, role, disabled)
            if pw is not None:
                self._store_password(u, pw)
            if role is not None:
                self.con.execute("UPDATE users SET role = ? WHERE id = ?", [role, u["id"]])
                u["role"] = role
            if disabled is not None:
                self.con.execute("UPDATE users SET disabled = ? WHERE id = ?", [disabled, u["id"]])
                if disabled:
                    self._end_sessions(u["id"])
                u["disabled"] = disabled
        if pw is not None:
            self.audit(actor, "user.password", u["username"])
        self.audit(actor, "user.update", u["username"], role=role, disabled=disabled)
        return _public_user(u)

    def _may_update(
        self, by: Principal | None, u: dict[str, Any], role: str | None, disabled: bool | None, password: str | None
    ) -> None:
        """The checks of `update_user`, in the order its refusals are answered."""
        if role is not None and role not in self.roles:
            raise NotFound(f"no role {role!r} (have {', '.join(sorted(self.roles))})", field="role")
        if password is not None:
            _check_password(password)
        self._manageable(by, u, "user_id")
        if password is not None:
            self._may_set_password(by, u["id"], u["username"])
        if role is not None:
            self._givable(by, role)
            gained = set(self.roles[role]) - set(self.roles.get(u["role"], ()))
            self._no_lasting_gain(by, gained, f"giving {u['username']!r} role {role!r}", "role")
        if disabled is False and u["disabled"]:  # their login (a password) and keys work again, for good
            after = u["role"] if role is None else role
            self._no_lasting_gain(by, set(self.roles.get(after, ())), f"enabling {u['username']!r} (role {after})",
                                  "disabled")  # fmt: skip
        if by is not None and by.user_id == u["id"] and (disabled or (role is not None and role != u["role"])):
            raise InvalidInput("you cannot disable yourself or change your own role: another admin can",
                               field="disabled" if disabled else "role")  # fmt: skip

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
        self._may_set_password(by, u["id"], u["username"])
        pw = ks.hash_password(password)
        with self.mutex:  # checked again as the user is now (promoted or deleted meanwhile)
            u = self._current(u)
            self._manageable(by, u, "user_id")
            self._may_set_password(by, u["id"], u["username"])
            self._store_password(u, pw)
        self.audit(actor, "user.password", u["username"])

    def _store_password(self, u: dict[str, Any], pw: str) -> None:
        """Store a password hash for user `u` (under `self.mutex`)."""
        self.con.execute("UPDATE users SET password_hash = ? WHERE id = ?", [pw, u["id"]])
        self._end_sessions(u["id"])  # a new password ends old logins
        u["password_hash"] = pw

    def delete_user(self, user_id: str, actor: str | None = None, by: Principal | None = None) -> None:
        """Delete a user (one whose scopes `by` holds); their keys are revoked and their sessions end."""
        actor = by.username if by else actor
        u = self.user(user_id)
        with self.mutex:  # checked and deleted at once: the user as they are now (promoted, or deleted already)
            u = self._current(u)
            self._manageable(by, u, "user_id")
            if by is not None:
                self._keeps_an_admin(u, deleted=True)
            for k in [k for k in self.keys.values() if k.user_id == u["id"]]:
                with contextlib.suppress(NotFound):  # gone already with a key whose bounds held it
                    self.revoke_key(k.id, actor=actor)  # managing u covers their keys: all within u's role
            self._end_sessions(u["id"])
            self.con.execute("DELETE FROM users WHERE id = ?", [u["id"]])
            self.con.execute("DELETE FROM hub_users WHERE user_id = ?", [u["id"]])
            del self.users[u["id"]]
            self.hub_seen.pop(u["id"], None)
        self.audit(actor, "user.delete", u["username"])

    def _may_set_password(self, by: Principal | None, user_id: str | None, username: str) -> None:
        """403 when `by` may not set the password of user `username` (`user_id`; None: one being created): a
        JupyterHub user logs in through the Hub; a login follows the role, never expires with a key and outlives
        every key's revocation, so someone else's password takes every scope held through a credential with no
        expiry and no rate limit, and one's own a credential that stands for all of oneself."""
        if username.endswith(HUB_SUFFIX):
            raise Forbidden(f"{username!r} is a JupyterHub user: they log in through the Hub", field="password")
        if by is None:
            return
        if by.user_id != user_id and (not set(SCOPES) <= by.scopes or self._bounded(by)):
            raise _password_for_another(username)
        if by.user_id == user_id and not self._whole(by):
            raise Forbidden(f"a password for {username!r} gives a login that follows their role and outlives "
                            "every key: set it with a login session or a key that stands for all of them (follows "
                            "the role, no expiry, rate limit or parent), not with this key",
                            field="password")  # fmt: skip
