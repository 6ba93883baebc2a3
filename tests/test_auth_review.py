"""What a review of the auth core found, each pinned: a delegate (a key that expires or is rate-limited) hands out
nothing that outlives or outruns it; keys derived from a limited key share its rate limit; two JupyterHub users
never map to one bkg user; the workbench key never goes to a Hub admin; and a change checked against a user, a
role or a key that another change altered meanwhile is checked again as they are now (a 403 or a 404, never a
KeyError or a change nobody could have made)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.errors import Forbidden, NotFound, TooManyRequests, Unauthorized, Unavailable
from bkg_kernel.store import Store

ADMIN_KEY = "bkg_0123456789ab_" + "A" * 40
PW = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def auth(store: Store) -> Iterator[AuthService]:
    a = AuthService(store)
    yield a
    a.close()


def _soon(hours: float = 1) -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=hours)


def _key_of(auth: AuthService, user: dict[str, Any], name: str = "k") -> Principal:
    """A real key of `user` that follows their role and stands for all of them, authenticated."""
    _, token = auth.create_key(user["id"], name, actor="test")
    return auth.authenticate(token, metered=False)


# -- 1. a delegate hands out nothing that outlives it ----------------------------------------------------------------
def test_a_delegate_holding_every_scope_hands_out_no_login_and_no_key_that_outlives_it(
    auth: AuthService, tmp_path: Path
) -> None:
    auth.bootstrap(tmp_path, ADMIN_KEY)
    admin = auth.authenticate(ADMIN_KEY)
    dk, dtok = auth.create_key(admin.user_id, "an hour for a script", expires_at=_soon(), rate_limit_per_min=5,
                               by=admin)  # fmt: skip
    delegate = auth.authenticate(dtok)
    assert delegate.scopes == admin.scopes  # it holds every scope, yet is less than its user
    other = auth.create_user("root2", "admin", actor="test")

    for attempt in (
        lambda: auth.create_user("backdoor", "admin", password=PW, by=delegate),
        lambda: auth.update_user(other["id"], password=PW, by=delegate),
        lambda: auth.set_password(other["id"], PW, by=delegate),
    ):
        with pytest.raises(Forbidden) as err:
            attempt()
        assert err.value.field == "password"
    assert "backdoor" not in {u["username"] for u in auth.list_users()}
    assert auth.user(other["id"])["password_hash"] is None

    # a key for someone else: theirs, but fixed and held within the delegate's bounds (revoked with it too)
    theirs, ttok = auth.create_key(other["id"], "forever", expires_at=_soon(24 * 30), rate_limit_per_min=1000,
                                   by=delegate)  # fmt: skip
    assert theirs["follows_role"] is False and theirs["parent_id"] is None and theirs["maker_id"] == dk["id"]
    assert theirs["expires_at"] == dk["expires_at"] and theirs["rate_limit_per_min"] == 5
    following, _ = auth.create_key(other["id"], "theirs, following", by=admin)
    with pytest.raises(Forbidden) as err:  # a new secret of a key following their role: the same as making one
        auth.rotate_key(following["id"], by=delegate)
    assert err.value.field == "key_id"

    # a login session or a key with no expiry and no limit still may
    auth.update_user(other["id"], password=PW, by=admin)
    made = auth.create_user("made", "viewer", password=PW, by=admin)
    assert made["has_password"] and auth.create_key(other["id"], "by admin", by=admin)[0]["follows_role"]
    auth.revoke_key(dk["id"], by=admin)
    with pytest.raises(Unauthorized):  # within the delegate's bounds: it goes with it (tests/test_delegate_chain.py)
        auth.authenticate(ttok)


# -- 2. a limited key's children share its bucket -------------------------------------------------------------------
def test_keys_derived_from_a_rate_limited_key_draw_from_its_bucket(auth: AuthService) -> None:
    root = _key_of(auth, auth.create_user("root", "admin", actor="test"))
    ops = auth.create_user("ops", "admin", actor="test")
    k, tok = auth.create_key(ops["id"], "script", ["admin:keys", "plugins:read"], rate_limit_per_min=5, by=root)
    children = []
    for i in range(4):  # 4 of the key's 5 requests, each making a child (as the /admin/keys route would)
        rec, ctok = auth.create_key(ops["id"], f"child {i}", by=auth.authenticate(tok))
        assert rec["parent_id"] == k["id"] and rec["rate_limit_per_min"] == 5
        children.append(ctok)
    grandchild, gtok = auth.create_key(ops["id"], "grandchild", by=auth.authenticate(children[0]))  # the 5th
    with pytest.raises(TooManyRequests):  # the parent's bucket was empty: so was every descendant's
        auth.authenticate(gtok)
    for t in [tok, *children, gtok]:
        with pytest.raises(TooManyRequests, match=k["id"]):
            auth.authenticate(t)
    plain, ptok = auth.create_key(ops["id"], "unlimited", by=root)  # a key with no limit is never counted
    for _ in range(20):
        auth.authenticate(ptok)


# -- 3. two Hub users never share a bkg user --------------------------------------------------------------------------
class FakeHubOAuth:
    """A stand-in for the Hub's OAuth client, the one boundary that cannot run here: which Hub user a token is."""

    access_scopes = {"access:services!service=bkg"}

    def __init__(self, users: dict[str, dict[str, Any]]) -> None:
        self.users = users

    async def user_for_token(self, token: str, use_cache: bool = True, sync: bool = False) -> dict[str, Any] | None:
        return self.users.get(token)

    def check_scopes(self, need: set[str], model: dict[str, Any]) -> bool:
        return True


def _old_hashed(hub_name: str, clean: str) -> str:
    return f"{clean}-{hashlib.sha256(hub_name.encode()).hexdigest()[:8]}@hub"


def test_a_hub_name_that_looks_hashed_never_lands_on_another_hub_users_bkg_user(auth: AuthService) -> None:
    from bkg_kernel.gateway.jupyterhub import HubTrust, bkg_name
    from bkg_kernel.settings import Settings

    victim = "ana+lab@example.com"
    lookalike = bkg_name(victim).removesuffix("@hub")  # a Hub name anyone who picks their Hub name can pick
    # names that needed no change, and those that did, keep the bkg names they had
    assert bkg_name("ana") == "ana@hub" and bkg_name("ana-b") == "ana-b@hub" and bkg_name("ci-2024") == "ci-2024@hub"
    assert bkg_name(victim) == _old_hashed(victim, "ana-lab@example.com")
    assert bkg_name("ana b") == _old_hashed("ana b", "ana-b")
    assert bkg_name(lookalike) != bkg_name(victim) and bkg_name(lookalike).startswith(lookalike + "-")

    settings = Settings(JUPYTERHUB_SERVICE_NAME="bkg", JUPYTERHUB_API_TOKEN="t" * 32,
                        JUPYTERHUB_API_URL="http://127.0.0.1:9/hub/api")  # fmt: skip # nothing answers there
    trust = HubTrust(settings, auth)
    trust.oauth = FakeHubOAuth({  # type: ignore[assignment]
        "v" * 32: {"kind": "user", "name": victim, "scopes": ["custom:bkg:developer"]},
        "a" * 32: {"kind": "user", "name": lookalike, "scopes": []},
    })  # fmt: skip

    async def both() -> tuple[Principal, Principal]:
        return await trust.principal("v" * 32), await trust.principal("a" * 32)

    v, a = asyncio.run(both())
    assert v.user_id != a.user_id and (v.role, a.role) == ("developer", "viewer")
    assert auth.user(v.user_id)["role"] == "developer"  # the look-alike's request did not lower the victim


# -- 4. the workbench key never goes to a Hub admin -------------------------------------------------------------------
def test_the_workbench_key_goes_to_a_local_admin_never_a_hub_one(auth: AuthService, tmp_path: Path) -> None:
    auth.bootstrap(tmp_path, ADMIN_KEY)
    first = auth.authenticate(ADMIN_KEY)
    ana = auth.create_user("ana@hub", "admin", actor="jupyterhub")  # a Hub admin, as HubTrust makes them
    local = auth.create_user("ops", "admin", actor="test")
    hub_admin = Principal(ana["id"], "ana@hub", "admin", frozenset(auth.roles["admin"]), None, "hub")
    auth.update_user(first.user_id, disabled=True, by=hub_admin)
    path = auth.workbench_key(tmp_path)  # workbench.key missing: made for the first local admin left
    token = path.read_text().strip()
    assert auth.authenticate(token).user_id == local["id"]

    auth.update_user(local["id"], disabled=True, by=hub_admin)
    path.unlink()
    with pytest.raises(Unavailable, match="other than JupyterHub's"):
        auth.workbench_key(tmp_path)


# -- 5. checked and changed at once ------------------------------------------------------------------------------------
class _Gate:
    """The store's lock as `AuthService` holds it, telling when one thread (`thread`) asks for it."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.thread, self.asking = lock, None, threading.Event()

    def __enter__(self) -> Any:
        if threading.current_thread() is self.thread:
            self.asking.set()
        return self.lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.lock.__exit__(*exc)


def _race(auth: AuthService, store: Store, call: Callable[[], Any], competing: Callable[[], Any]) -> dict[str, Any]:
    """Run `call` on a thread until it asks for the store's lock (which this thread holds), make the `competing`
    change meanwhile, then let `call` go on: the interleaving is forced, not hoped for."""
    lock = store._mutex  # noqa: SLF001 - the lock the auth service shares with the store
    gate = _Gate(lock)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["ok"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["err"] = exc

    t = threading.Thread(target=run)
    gate.thread = t  # type: ignore[assignment]
    auth.mutex = gate
    try:
        with lock:
            t.start()
            assert gate.asking.wait(10), "the call never asked for the store's lock"
            competing()
        t.join(10)
    finally:
        auth.mutex = lock
    assert not t.is_alive()
    return out


@pytest.fixture
def people(auth: AuthService) -> dict[str, Any]:
    root = auth.create_user("root", "admin", actor="test")
    auth.create_user("spare", "admin", actor="test")  # deleting or disabling someone still leaves an admin
    mgr_scopes = ["admin:users", "plugins:read", "collections:read", "models:read"]
    auth.create_role("usermgr", mgr_scopes, actor="test")
    mgr = auth.create_user("mgr", "usermgr", actor="test")
    return {"root": _key_of(auth, root), "mgr": _key_of(auth, mgr)}


def test_a_rotation_racing_a_revocation_is_a_404_and_leaves_no_live_secret(
    auth: AuthService, store: Store, people: dict[str, Any]
) -> None:
    root = people["root"]
    dev = auth.create_user("dev", "developer", actor="test")
    k, _ = auth.create_key(dev["id"], "k", by=root)
    r = _race(auth, store, lambda: auth.rotate_key(k["id"], by=root), lambda: auth.revoke_key(k["id"], by=root))
    assert isinstance(r.get("err"), NotFound), r
    assert k["id"] not in auth.key_ids and all(x.id != k["id"] for x in auth.keys.values())
    auth.sync()
    stored = auth.con.execute("SELECT prefix, revoked_at IS NOT NULL FROM api_keys WHERE id = ?", [k["id"]]).fetchall()
    assert stored == [(k["prefix"].removeprefix("bkg_"), True)]


def test_two_deletes_of_one_user_are_one_delete_and_a_404(
    auth: AuthService, store: Store, people: dict[str, Any]
) -> None:
    root = people["root"]
    v = auth.create_user("victim", "viewer", actor="test")
    r = _race(auth, store, lambda: auth.delete_user(v["id"], by=root), lambda: auth.delete_user(v["id"], by=root))
    assert isinstance(r.get("err"), NotFound), r
    assert v["id"] not in auth.users


def test_a_manager_never_disables_or_deletes_a_user_promoted_meanwhile(
    auth: AuthService, store: Store, people: dict[str, Any]
) -> None:
    root, mgr = people["root"], people["mgr"]
    x = auth.create_user("xavier", "viewer", actor="test")
    r = _race(auth, store, lambda: auth.update_user(x["id"], disabled=True, by=mgr),
              lambda: auth.update_user(x["id"], role="admin", by=root))  # fmt: skip
    assert isinstance(r.get("err"), Forbidden), r
    assert (auth.users[x["id"]]["role"], auth.users[x["id"]]["disabled"]) == ("admin", False)
    y = auth.create_user("yvonne", "viewer", actor="test")
    r = _race(auth, store, lambda: auth.delete_user(y["id"], by=mgr),
              lambda: auth.update_user(y["id"], role="admin", by=root))  # fmt: skip
    assert isinstance(r.get("err"), Forbidden), r
    assert y["id"] in auth.users


def test_a_role_deleted_while_it_is_given_is_a_404_and_nobody_holds_a_missing_role(
    auth: AuthService, store: Store, people: dict[str, Any]
) -> None:
    root = people["root"]
    z = auth.create_user("zed", "viewer", actor="test")
    auth.create_role("temp", ["plugins:read"], by=root)
    r = _race(auth, store, lambda: auth.update_user(z["id"], role="temp", by=root),
              lambda: auth.delete_role("temp", by=root))  # fmt: skip
    assert isinstance(r.get("err"), NotFound) and r["err"].field == "role", r
    assert auth.users[z["id"]]["role"] == "viewer" and "temp" not in auth.roles
    auth.create_key(z["id"], "k", by=root)  # no KeyError later

    auth.create_role("temp", ["plugins:read"], by=root)
    r = _race(auth, store, lambda: auth.create_user("newbie", "temp", by=root),
              lambda: auth.delete_role("temp", by=root))  # fmt: skip
    assert isinstance(r.get("err"), NotFound), r
    assert "newbie" not in {u["username"] for u in auth.list_users()}

    auth.create_role("temp", ["plugins:read"], by=root)
    r = _race(auth, store, lambda: auth.update_role("temp", description="edited", by=root),
              lambda: auth.delete_role("temp", by=root))  # fmt: skip
    assert isinstance(r.get("err"), NotFound), r
