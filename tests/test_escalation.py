"""Nobody grants what they do not hold, against a real gateway: every /admin route that hands out scopes (keys,
rotations, roles, role changes, passwords) is tried by keys of every built-in role, of custom roles holding one
or two admin scopes, and of an admin user's key narrowed to admin scopes; afterwards no credential any of them
obtained holds a scope its holder did not start with, and no attempt was answered with a 5xx."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
from gateway_harness import Gateway, http_ok, start_gateway, wait_for

from bkg_kernel.auth.principal import SCOPES

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin

PASSWORD = "correct horse battery"
# name -> (role, scopes of the key; None: the role's); custom roles are created with the scopes listed
CUSTOM_ROLES = {
    "keys-only": ["admin:keys"],
    "keys-reader": ["admin:keys", "plugins:read"],
    "users-only": ["admin:users"],
    "users-keys": ["admin:users", "admin:keys"],
    "audit-only": ["admin:audit"],
}
ATTACKERS: dict[str, tuple[str, list[str] | None]] = {
    "admin": ("admin", None),
    "developer": ("developer", None),
    "viewer": ("viewer", None),
    **{name: (name, None) for name in CUSTOM_ROLES},
    "admin-key-narrowed": ("admin", ["admin:keys", "admin:users"]),
}
_n = itertools.count()


@pytest.fixture(scope="module")
def setup_key(gw: Gateway) -> str:
    """An admin key of its own for the test's set-up, left alone by the attacks (they may rotate the rest)."""
    admin = gw.client()
    for name, scopes in CUSTOM_ROLES.items():
        admin.post("/admin/roles", json={"name": name, "scopes": scopes}).raise_for_status()
    key: str = admin.post("/admin/keys", json={"name": "set-up"}).json()["key"]
    return key


def _me(gw: Gateway, token: str) -> set[str]:
    r = gw.client(token).get("/auth/me")
    return set(r.json()["scopes"]) if r.status_code == 200 else set()


def _login(gw: Gateway, username: str) -> str | None:
    r = httpx.post(gw.url + "/auth/login", json={"username": username, "password": PASSWORD})
    return r.json()["token"] if r.status_code == 200 else None


def _attack(
    gw: Gateway, a: httpx.Client, me: dict[str, Any], admin_id: str, spare: set[str]
) -> tuple[list[str], list[httpx.Response]]:
    """Every way the /admin routes hand out scopes, tried once each; the tokens it got, and every answer."""
    tag = f"{me['username']}-{next(_n)}"
    got: list[str] = []
    answers: list[httpx.Response] = []

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        r = a.request(method, path, json=body)
        answers.append(r)
        if r.status_code < 300 and isinstance(r.json(), dict) and "key" in r.json():
            got.append(r.json()["key"])
        return r

    for owner in (admin_id, me["user_id"]):
        call("POST", "/admin/keys", {"name": f"k-{tag}", "user_id": owner})
        call("POST", "/admin/keys", {"name": f"k-{tag}", "user_id": owner, "scopes": list(SCOPES)})
    listed = a.get("/admin/keys")
    for k in listed.json().get("keys", []) if listed.status_code == 200 else []:
        if k["state"] == "active" and k["id"] not in spare | {me["key_id"]}:
            call("POST", f"/admin/keys/{k['id']}/rotate")
    call("POST", "/admin/roles", {"name": f"esc-{tag}", "scopes": list(SCOPES)})
    call("PATCH", f"/admin/users/{me['user_id']}", {"role": f"esc-{tag}"})
    call("PATCH", f"/admin/users/{me['user_id']}", {"role": "admin"})
    if me["role"] not in ("admin", "developer", "viewer"):
        call("PATCH", f"/admin/roles/{me['role']}", {"scopes": list(SCOPES)})
    passwords = [  # each user whose password the attacker could set is logged in as
        (f"esc-{tag}", call("POST", "/admin/users", {"username": f"esc-{tag}", "role": "admin", "password": PASSWORD})),
        ("admin", call("PATCH", f"/admin/users/{admin_id}", {"password": PASSWORD})),
        (me["username"], call("PATCH", f"/admin/users/{me['user_id']}", {"password": PASSWORD})),
    ]
    for username, r in passwords:
        if r.status_code < 300:
            session = _login(gw, username)
            assert session, f"{username}: password set, yet no login"
            got.append(session)
    # its own key last: a new secret ends the one every attempt above is made with
    call("POST", f"/admin/keys/{me['key_id']}/rotate")
    errors = [(r.request.method, r.request.url.path, r.status_code) for r in answers if r.status_code >= 500]
    assert not errors, errors
    return got, answers


@pytest.mark.parametrize("attacker", list(ATTACKERS))
def test_no_route_ends_with_more_scopes_than_its_caller_had(gw: Gateway, setup_key: str, attacker: str) -> None:
    admin = gw.client(setup_key)
    role, key_scopes = ATTACKERS[attacker]
    user = admin.post("/admin/users", json={"username": f"atk-{attacker}", "role": role}).json()
    body: dict[str, Any] = {"name": f"{attacker}'s", "user_id": user["id"]}
    if key_scopes is not None:
        body["scopes"] = key_scopes
    token = admin.post("/admin/keys", json=body).json()["key"]
    start = _me(gw, token)
    assert start, attacker
    admin_id = next(u["id"] for u in admin.get("/admin/users").json()["users"] if u["username"] == "admin")
    spare = {k["id"] for k in admin.get("/admin/keys").json()["keys"] if k["name"] == "set-up"}
    me = gw.client(token).get("/auth/me").json()

    obtained, answers = _attack(gw, gw.client(token), me, admin_id, spare)

    # the attempts were real ones, else "nothing obtained" proves nothing: made with a live credential (no 401),
    # and well-formed: the admin obtains credentials, and anyone else is refused for a scope they lack
    said = [(r.request.method, r.request.url.path, r.status_code, r.text[:200]) for r in answers]
    assert not [a for a in said if a[2] == 401], said
    if attacker == "admin":
        assert obtained
    else:  # or a 404 for the role it could not create
        odd = [a for a in said if a[2] >= 400 and not (a[2] == 403 and "scope" in a[3] or "no role 'esc-" in a[3])]
        assert not odd, odd

    held = {t: _me(gw, t) for t in [token, *obtained]}
    above = {t[:16]: sorted(s - start) for t, s in held.items() if s - start}
    assert not above, f"{attacker} started with {sorted(start)} and obtained {above}"


def test_grants_are_narrowed_to_the_caller_and_named_when_refused(gw: Gateway, setup_key: str) -> None:
    """A key manager who holds admin:keys and plugins:read: a key acts as its owner, so a key for the admin user
    (or a new secret for the admin's key) is a 403 naming the scopes they lack; a key for a user whose role they
    hold holds that role's scopes, fixed; asking for more or giving a role above them is a 403 too."""
    admin = gw.client(setup_key)
    mgr = admin.post("/admin/users", json={"username": "key-manager", "role": "keys-reader"}).json()
    m = gw.client(admin.post("/admin/keys", json={"name": "km", "user_id": mgr["id"]}).json()["key"])
    admin_id = next(u["id"] for u in admin.get("/admin/users").json()["users"] if u["username"] == "admin")
    r = m.post("/admin/keys", json={"name": "for admin", "user_id": admin_id})
    err = r.json()["error"]
    assert r.status_code == 403 and err["field"] == "user_id" and "acts as 'admin'" in err["message"], r.text
    assert "admin:audit" in err["message"] and "llm:use" in err["message"]
    admin.post("/admin/roles", json={"name": "reader-only", "scopes": ["plugins:read"]}).raise_for_status()
    reader = admin.post("/admin/users", json={"username": "plain-reader", "role": "reader-only"}).json()
    k = m.post("/admin/keys", json={"name": "for reader", "user_id": reader["id"]}).json()
    assert k["scopes"] == ["plugins:read"] and k["follows_role"] is False and _me(gw, k["key"]) == {"plugins:read"}
    r = m.post("/admin/keys", json={"name": "x", "user_id": reader["id"], "scopes": ["admin:audit"]})
    assert r.status_code in (403, 422) and "admin:audit" in r.json()["error"]["message"]
    assert r.json()["error"]["field"].startswith("scopes")
    boot = next(x for x in admin.get("/admin/keys").json()["keys"] if x["name"] == "admin (bootstrap)")
    r = m.post(f"/admin/keys/{boot['id']}/rotate")
    assert r.status_code == 403 and "admin:users" in r.json()["error"]["message"]
    narrow = admin.post("/admin/keys", json={"name": "narrow", "scopes": ["plugins:read"]}).json()
    r = m.post(f"/admin/keys/{narrow['id']}/rotate")  # its scopes are theirs, but its new secret acts as admin
    assert r.status_code == 403 and "acts as 'admin'" in r.json()["error"]["message"], r.text
    assert _me(gw, narrow["key"]) == {"plugins:read"}  # not rotated
    assert m.post(f"/admin/keys/{k['id']}/revoke").status_code == 200  # within their scopes: theirs to revoke
    # a user manager may hand out only roles within their own scopes
    um = admin.post("/admin/users", json={"username": "user-manager", "role": "users-keys"}).json()
    u = gw.client(admin.post("/admin/keys", json={"name": "um", "user_id": um["id"]}).json()["key"])
    r = u.post("/admin/users", json={"username": "new-dev", "role": "developer"})
    assert r.status_code == 403 and r.json()["error"]["field"] == "role" and "llm:use" in r.json()["error"]["message"]
    assert u.post("/admin/users", json={"username": "new-km", "role": "keys-only"}).status_code == 201
    assert admin.get("/admin/users").status_code == 200  # the set-up key was never touched
    entries = admin.get("/admin/audit", params={"action": "key.create", "limit": 1000}).json()["entries"]
    by_manager = [e for e in entries if e["actor"] == "key-manager"]
    assert len(by_manager) == 1 and by_manager[0]["detail"]["scopes"] == ["plugins:read"]


def test_a_key_made_for_someone_else_never_gains_what_their_role_gains_later(gw: Gateway, setup_key: str) -> None:
    """A key manager (admin:keys, plugins:read) makes a key for a user whose role holds only plugins:read (all of
    which the manager holds); the admin later promotes that user to developer: the manager's key stays
    plugins:read (the manager never held llm:use). The admin's own key for that user follows the role (the admin
    could give them any role), and so does a key a user makes for themselves."""
    admin = gw.client(setup_key)
    mgr = admin.post("/admin/users", json={"username": "km-later", "role": "keys-reader"}).json()
    m = gw.client(admin.post("/admin/keys", json={"name": "km", "user_id": mgr["id"]}).json()["key"])
    assert admin.post("/admin/roles", json={"name": "plugins-only", "scopes": ["plugins:read"]}).is_success
    user = admin.post("/admin/users", json={"username": "promoted", "role": "plugins-only"}).json()
    by_mgr = m.post("/admin/keys", json={"name": "for them", "user_id": user["id"]}).json()
    assert by_mgr["follows_role"] is False and _me(gw, by_mgr["key"]) == {"plugins:read"}
    by_admin = admin.post("/admin/keys", json={"name": "by admin", "user_id": user["id"]}).json()
    assert by_admin["follows_role"] is True
    assert admin.patch(f"/admin/users/{user['id']}", json={"role": "developer"}).status_code == 200
    assert _me(gw, by_mgr["key"]) == {"plugins:read"}  # not llm:use, collections:write, ...
    assert "llm:use" in _me(gw, by_admin["key"])

    assert admin.post("/admin/roles", json={"name": "self-keys", "scopes": ["admin:keys", "plugins:read"]}).is_success
    me = admin.post("/admin/users", json={"username": "self-keyed", "role": "self-keys"}).json()
    first = gw.client(admin.post("/admin/keys", json={"name": "first", "user_id": me["id"]}).json()["key"])
    own = first.post("/admin/keys", json={"name": "own"}).json()
    assert own["follows_role"] is True
    scopes = ["admin:keys", "plugins:read", "models:read"]
    assert admin.patch("/admin/roles/self-keys", json={"scopes": scopes}).is_success
    assert _me(gw, own["key"]) == set(scopes)


def test_a_key_that_is_less_than_its_user_hands_out_nothing_more(gw: Gateway, setup_key: str) -> None:
    """A key someone else made for a user (fixed scopes), a delegate of a key (an expiry, a rate limit, a parent):
    each is less than its user, so it may not make a key that follows their role, take a new secret of one that
    does or of the key it derives from, or set their password (a login follows the role and outlives every key).
    Their login session and a key that stands for all of them may; a key may always renew itself."""
    admin = gw.client(setup_key)
    mgr = admin.post("/admin/users", json={"username": "mallory-less", "role": "users-keys"}).json()
    m = gw.client(admin.post("/admin/keys", json={"name": "m", "user_id": mgr["id"]}).json()["key"])
    x = m.post("/admin/users", json={"username": "xavier-less", "role": "users-keys"}).json()
    fixed = m.post("/admin/keys", json={"name": "by mallory", "user_id": x["id"]}).json()
    assert fixed["follows_role"] is False
    k = gw.client(fixed["key"])
    child = k.post("/admin/keys", json={"name": "child"}).json()
    assert child["follows_role"] is False and child["parent_id"] == fixed["id"]
    following = admin.post("/admin/keys", json={"name": "by admin", "user_id": x["id"]}).json()
    assert following["follows_role"] is True
    r = k.post(f"/admin/keys/{following['id']}/rotate")
    assert r.status_code == 403 and r.json()["error"]["field"] == "key_id", r.text
    r = k.patch(f"/admin/users/{x['id']}", json={"password": PASSWORD})
    assert r.status_code == 403 and r.json()["error"]["field"] == "password", r.text
    renewed = k.post(f"/admin/keys/{child['id']}/rotate")  # derived from it: nothing more than itself
    assert renewed.status_code == 200 and renewed.json()["parent_id"] == fixed["id"], renewed.text
    assert admin.patch(f"/admin/users/{x['id']}", json={"role": "admin"}).status_code == 200
    held = {"admin:users", "admin:keys"}
    assert _me(gw, child["key"]) == set() and _me(gw, renewed.json()["key"]) == held
    assert _me(gw, fixed["key"]) == held  # promoted: what mallory made stays as it was

    main = admin.post("/admin/users", json={"username": "carol-less", "role": "users-keys"}).json()
    whole = admin.post("/admin/keys", json={"name": "carol", "user_id": main["id"]}).json()
    c1 = gw.client(whole["key"])
    delegate = c1.post("/admin/keys", json={"name": "an hour", "expires_in_days": 0.04, "rate_limit_per_min": 5})
    assert delegate.json()["parent_id"] == whole["id"], delegate.text
    c2 = gw.client(delegate.json()["key"])
    r = c2.post(f"/admin/keys/{whole['id']}/rotate")
    assert r.status_code == 403 and "derive" in r.json()["error"]["message"], r.text
    r = c2.patch(f"/admin/users/{main['id']}", json={"password": PASSWORD})
    assert r.status_code == 403 and r.json()["error"]["field"] == "password", r.text
    assert _me(gw, whole["key"]) and _login(gw, "carol-less") is None  # the refusals changed nothing
    assert c1.patch(f"/admin/users/{main['id']}", json={"password": PASSWORD}).status_code == 200
    session = _login(gw, "carol-less")
    assert session is not None
    r = gw.client(session).post(f"/admin/keys/{whole['id']}/rotate")
    assert r.status_code == 200 and _me(gw, r.json()["key"]) == {"admin:users", "admin:keys"}, r.text


def test_a_refused_part_of_a_user_change_changes_nothing(gw: Gateway, setup_key: str) -> None:
    """A user manager may disable a keys-only user but not give them the developer role: asked for both at once,
    they get the 403 and the user stays as they were (sessions included). Nor may they set the password (a login
    as them would follow their role wherever it goes later): that takes every scope, as the admin holds."""
    admin = gw.client(setup_key)
    um = admin.post("/admin/users", json={"username": "um-atomic", "role": "users-keys"}).json()
    u = gw.client(admin.post("/admin/keys", json={"name": "um", "user_id": um["id"]}).json()["key"])
    target = admin.post("/admin/users", json={"username": "km-atomic", "role": "keys-only", "password": PASSWORD})
    session = _login(gw, "km-atomic")
    assert session is not None
    r = u.patch(f"/admin/users/{target.json()['id']}", json={"disabled": True, "role": "developer"})
    assert r.status_code == 403 and r.json()["error"]["field"] == "role", r.text
    assert _login(gw, "km-atomic") is not None and _me(gw, session)  # still enabled, sessions still good
    r = u.patch(f"/admin/users/{target.json()['id']}", json={"password": "a new password"})
    assert r.status_code == 403 and r.json()["error"]["field"] == "password", r.text
    r = u.post("/admin/users", json={"username": "um-made", "role": "keys-only", "password": PASSWORD})
    assert r.status_code == 403 and r.json()["error"]["field"] == "password", r.text
    assert _login(gw, "km-atomic") is not None and _me(gw, session)
    r = admin.patch(f"/admin/users/{target.json()['id']}", json={"password": "a new password"})
    assert r.status_code == 200 and _login(gw, "km-atomic") is None and not _me(gw, session)


def test_a_key_following_someone_elses_role_is_rotated_only_by_them_or_a_full_admin(tmp_path: Any) -> None:
    """A new secret of a key that follows its owner's role would hold whatever that role gains later: a key
    manager who holds today's scopes may not take one (as they may not make such a key); its owner and a holder of
    every scope may."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.errors import Forbidden
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    try:
        auth = AuthService(store)
        admin = Principal("u-root", "root", "admin", frozenset(SCOPES))
        bob = auth.create_user("bob", "viewer", actor="test")
        mgr = Principal("u-mgr", "mgr", "keys-mgr", frozenset({"admin:keys", *auth.roles["viewer"]}))
        following, _ = auth.create_key(bob["id"], "bob's", by=admin)
        fixed, _ = auth.create_key(bob["id"], "bob's fixed", scopes=list(auth.roles["viewer"]), by=admin)
        assert following["follows_role"] and not fixed["follows_role"]
        with pytest.raises(Forbidden, match="follows its owner's role"):
            auth.rotate_key(following["id"], by=mgr)
        assert auth.rotate_key(fixed["id"], by=mgr)[1]  # fixed scopes, all held: a new secret grants nothing new
        bob_p = Principal(bob["id"], "bob", "viewer", frozenset(auth.roles["viewer"]), following["id"])
        assert auth.rotate_key(following["id"], by=bob_p)[1] and auth.rotate_key(following["id"], by=admin)[1]
    finally:
        store.close()


def test_a_call_finds_its_key_by_id_through_rotation_restart_and_revocation(tmp_path: Any) -> None:
    """A plugin call's store operations look their caller's key up by id (`as_now`): a new secret keeps the key
    (and the calls it started) alive, a gateway started again finds it, and once it is revoked nothing acts for it."""
    from helpers import auth_on

    from bkg_kernel.auth import Principal
    from bkg_kernel.errors import Unauthorized

    admin = Principal("u-root", "root", "admin", frozenset(SCOPES))
    with auth_on(tmp_path / "data") as auth:
        dev = auth.create_user("dev", "developer", actor="test")
        k, token = auth.create_key(dev["id"], "k", by=admin)
        p = auth.authenticate(token)
        _, new_token = auth.rotate_key(k["id"], by=admin)
        with pytest.raises(Unauthorized):
            auth.authenticate(token)
        assert auth.as_now(p) == p and auth.authenticate(new_token).key_id == k["id"]
        rec = auth.live_key(k["id"])
        assert rec is not None and new_token.startswith(f"bkg_{rec.prefix}_")
    with auth_on(tmp_path / "data") as auth:
        assert auth.as_now(p) == p and auth.authenticate(new_token).key_id == k["id"]
        auth.revoke_key(k["id"], by=admin)
        with pytest.raises(Unauthorized, match="revoked"):
            auth.as_now(p)
        assert auth.live_key(k["id"]) is None and k["id"] not in auth.key_ids


def test_a_key_made_with_a_key_expires_no_later_and_goes_with_it(tmp_path: Any) -> None:
    """A key a key makes for its own user (or a notebook run's key, made from the key that started the run)
    derives from it: it expires no later, is rate-limited no more loosely and is revoked with it, whoever its own
    holder is. A key it made for someone else is theirs, but held within its bounds: it goes with it too."""
    from datetime import UTC, datetime, timedelta

    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.auth.service import RUN_KEY_PREFIX
    from bkg_kernel.errors import NotFound, Unauthorized
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    try:
        auth = AuthService(store)
        admin = Principal("u-root", "root", "admin", frozenset(SCOPES))
        auth.create_user("root", "admin", actor="test")  # another admin: deleting dev leaves one
        dev = auth.create_user("dev", "developer", actor="test")
        viewer = auth.create_user("vee", "viewer", actor="test")
        soon = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
        k, k_token = auth.create_key(dev["id"], "temp", expires_at=soon, rate_limit_per_min=10, by=admin)
        pk = auth.authenticate(k_token)
        later = soon + timedelta(days=2)
        derived, d_token = auth.create_key(dev["id"], "derived", expires_at=later, rate_limit_per_min=1000, by=pk)
        assert derived["parent_id"] == k["id"] and derived["expires_at"] == k["expires_at"]
        assert derived["rate_limit_per_min"] == 10
        theirs, t_token = auth.create_key(viewer["id"], "for vee", by=pk)
        run, r_token = auth.create_key(dev["id"], RUN_KEY_PREFIX + "x", actor="jobs", parent=derived["id"])
        assert theirs["parent_id"] is None and theirs["maker_id"] == k["id"] and run["parent_id"] == derived["id"]
        auth.revoke_key(k["id"], by=admin)
        for token in (d_token, r_token, t_token):  # the derived key, the run key made from it, and vee's key
            with pytest.raises(Unauthorized):
                auth.authenticate(token)
        revoked = {x["id"]: x["state"] for x in auth.list_keys()}
        assert revoked[derived["id"]] == revoked[run["id"]] == "revoked"
        with pytest.raises(NotFound):  # revoked twice: the second is a 404, whoever asks
            auth.revoke_key(derived["id"], by=admin)

        # a chain however long goes whole (each key made with the one before), and a user whose keys derive from
        # one another is deleted in one go
        root, token = auth.create_key(dev["id"], "root", by=admin)
        chain = [root["id"]]
        for i in range(1100):
            made, token = auth.create_key(dev["id"], f"link {i}", by=auth.authenticate(token))
            chain.append(made["id"])
        auth.revoke_key(root["id"], by=admin)
        assert not {k.id for k in auth.keys.values()} & set(chain)
        assert set(auth.key_ids) == {k.id for k in auth.keys.values()}  # the index by id keeps up
        stored = {x["id"]: x["state"] for x in auth.list_keys(dev["id"])}  # and the database, for the next start
        assert {stored[c] for c in chain} == {"revoked"}
        first, token = auth.create_key(dev["id"], "first", by=admin)
        auth.create_key(dev["id"], "second", by=auth.authenticate(token))
        auth.delete_user(dev["id"], by=admin)
        assert dev["id"] not in auth.users
    finally:
        store.close()


def test_a_hub_user_never_gets_a_password_and_their_names_are_the_hubs(tmp_path: Any) -> None:
    """A Hub user's role follows the Hub on every request; a bkg password would let someone log in as them with
    whatever role the Hub later gives them. Only the gateway, on the Hub's word, makes `@hub` users (without a
    password), and nobody may take the name its changes are made under."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.errors import Forbidden, InvalidInput, Unauthorized
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    try:
        auth = AuthService(store)
        admin = Principal("u-root", "root", "admin", frozenset(SCOPES))
        for name, kw in [
            ("boss@hub", {"by": admin}),
            ("boss@hub", {"actor": "jupyterhub", "password": PASSWORD}),
            ("jupyterhub", {"by": admin}),
            ("jupyterhub", {"actor": "jupyterhub"}),
        ]:
            with pytest.raises(InvalidInput):
                auth.create_user(name, "viewer", **kw)
        boss = auth.create_user("boss@hub", "viewer", actor="jupyterhub")
        with pytest.raises(Forbidden, match="JupyterHub user"):
            auth.set_password(boss["id"], PASSWORD, by=admin)
        with pytest.raises(Forbidden, match="JupyterHub user"):
            auth.update_user(boss["id"], password=PASSWORD, by=admin)
        with pytest.raises(Unauthorized):
            auth.login("boss@hub", PASSWORD, "10.0.0.9")
    finally:
        store.close()


def test_a_run_key_is_never_rotated(tmp_path: Any) -> None:
    """A new secret acts as the key's user, and a notebook run's key is held by the running notebook: a rotation
    is refused (cancel the run or revoke the key), whoever asks."""
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.auth.service import RUN_KEY_PREFIX
    from bkg_kernel.errors import Forbidden
    from bkg_kernel.store import Store

    store = Store(tmp_path / "data")
    try:
        auth = AuthService(store)
        admin = Principal("u-root", "root", "admin", frozenset(SCOPES))
        dev = auth.create_user("dev", "developer", actor="test")
        run_key, token = auth.create_key(dev["id"], RUN_KEY_PREFIX + "1", actor="jobs")
        with pytest.raises(Forbidden, match="notebook run"):
            auth.rotate_key(run_key["id"], by=admin)
        assert auth.authenticate(token).username == "dev"  # the run's key still works
        own, _ = auth.create_key(dev["id"], "dev's own", by=admin)
        assert auth.rotate_key(own["id"], by=admin)[1]  # an ordinary key still rotates
    finally:
        store.close()


def test_nobody_locks_every_admin_out(tmp_path: Any) -> None:
    """Disabling yourself, taking your own role away, or editing the last admins' role below the admin role's
    scopes would leave nobody able to manage users or keys (the admin key's user disabled stays disabled, across
    restarts): each is refused, and the changes that leave an admin are made. Its own gateway: the only admins
    there are the admin key's user and the one this test makes."""
    g = start_gateway(tmp_path / "data", plugins=PLUGINS)
    try:
        admin = g.client()
        me = admin.get("/auth/me").json()
        for body, field in (({"disabled": True}, "disabled"), ({"role": "viewer"}, "role")):
            r = admin.patch(f"/admin/users/{me['user_id']}", json=body)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert admin.get("/auth/me").status_code == 200
        assert admin.post("/admin/roles", json={"name": "all-of-it", "scopes": list(SCOPES)}).status_code == 201
        body = {"username": "solo", "role": "all-of-it", "password": PASSWORD}
        solo = admin.post("/admin/users", json=body).json()
        token = _login(g, "solo")
        assert token is not None
        as_solo = g.client(token)
        assert as_solo.patch(f"/admin/users/{me['user_id']}", json={"disabled": True}).status_code == 200
        assert admin.get("/auth/me").status_code == 401
        # solo is the last enabled admin: their role keeps the admin scopes, and they do not disable themselves
        r = as_solo.patch("/admin/roles/all-of-it", json={"scopes": [s for s in SCOPES if s != "admin:keys"]})
        assert r.status_code == 409 and "admin role's scopes" in r.json()["error"]["message"], r.text
        assert as_solo.get("/auth/me").json()["scopes"] == sorted(SCOPES)
        assert as_solo.patch(f"/admin/users/{solo['id']}", json={"disabled": True}).status_code == 422
        assert as_solo.patch(f"/admin/users/{me['user_id']}", json={"disabled": False}).status_code == 200
        assert admin.get("/auth/me").status_code == 200
        r = as_solo.patch("/admin/roles/all-of-it", json={"scopes": [s for s in SCOPES if s != "admin:keys"]})
        assert r.status_code == 200, r.text  # the admin key's user is an admin again
    finally:
        g.stop()


def test_settings_that_decide_what_a_plugin_reaches_need_every_scope(gw: Gateway, setup_key: str) -> None:
    """A plugin's settings decide what it reaches for every caller (repoagent's roots and commands, llmserver's
    upstream URL and key, sysinfo's disk): a developer (plugins:write) widening them would gain what they do not
    hold (repo_roots at the data dir read the admin key). They may still tune the limits every plugin has."""
    admin = gw.client(setup_key)
    dev = admin.post("/admin/users", json={"username": "tuner", "role": "developer"}).json()
    as_dev = gw.client(admin.post("/admin/keys", json={"name": "tuner", "user_id": dev["id"]}).json()["key"])
    config = admin.get("/api/plugins/sysinfo/config").json()["config"]
    r = as_dev.put("/api/plugins/sysinfo/config", json={"config": {**config, "disk_path": "/"}})
    assert r.status_code == 403 and r.json()["error"]["field"] == "config.disk_path", r.text
    assert "admin:keys" in r.json()["error"]["message"] and "max_concurrent" in r.json()["error"]["message"]
    assert admin.get("/api/plugins/sysinfo/config").json()["config"]["disk_path"] == config["disk_path"]
    r = as_dev.put("/api/plugins/sysinfo/config", json={"config": {**config, "max_concurrent": 3}})
    assert r.status_code == 200 and r.json()["config"]["max_concurrent"] == 3, r.text
    r = admin.put("/api/plugins/sysinfo/config", json={"config": {**config, "disk_path": "/"}})
    assert r.status_code == 200 and r.json()["config"]["disk_path"] == "/", r.text
    assert admin.put("/api/plugins/sysinfo/config", json={"config": config}).status_code == 200


def test_a_plugin_whose_stored_config_no_longer_validates_is_still_guarded(tmp_path: Any) -> None:
    """A stored config that fails validation leaves the plugin in error with the base settings: every setting of
    a new config then counts as changed, so a developer still cannot set the guarded ones."""
    data = tmp_path / "data"
    data.mkdir()
    entry = {"enabled": True, "autostart": True, "config": {"disk_path": 7}}  # not a string: invalid
    (data / "plugins.json").write_text(json.dumps({"sysinfo": entry}))
    g = start_gateway(data, plugins=PLUGINS, wait=False)  # /health says "degraded": sysinfo is in error
    try:
        admin = g.client()
        wait_for(lambda: http_ok(g.url + "/health"), 60)
        wait_for(lambda: admin.get("/api/plugins/sysinfo/status").json()["state"] == "error", 60)
        dev = admin.post("/admin/users", json={"username": "dev", "role": "developer"}).json()
        as_dev = g.client(admin.post("/admin/keys", json={"name": "dev", "user_id": dev["id"]}).json()["key"])
        r = as_dev.put("/api/plugins/sysinfo/config", json={"config": {"disk_path": "/"}})
        assert r.status_code == 403 and "disk_path" in r.json()["error"]["message"], r.text
        assert admin.put("/api/plugins/sysinfo/config", json={"config": {"disk_path": "/"}}).status_code == 200
    finally:
        g.stop()
