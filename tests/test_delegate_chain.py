"""A bounded delegate (a key that expires or is rate-limited, and may make keys for other users) and what it makes
for others: each key it made had a budget of its own clamped to the delegate's, so N keys spent N times its limit,
and a key it made for someone who may make keys made more of them. A key made for someone else now records its
maker (`maker_id`, kept in DuckDB by migration 0010): it draws on the maker's rate limit and on every limit the
maker draws on, expires no later, and is revoked with it, as a key derived from it is; through a restart too.
Keys made by a key with no expiry and no limit (an admin's), and rows from before the link, are as they were."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from gateway_harness import ADMIN_KEY, start_gateway
from helpers import auth_on

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.errors import Forbidden, TooManyRequests, Unauthorized
from bkg_kernel.store.store import DB_NAME

LIMIT = 3  # per minute: one token back every 20 s, never within one of these tests' few seconds


def _soon(hours: float = 1) -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=hours)


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[AuthService]:
    with auth_on(tmp_path / "data", ADMIN_KEY) as a:
        yield a


def _delegate(auth: AuthService, **bounds: Any) -> tuple[dict[str, Any], Principal]:
    """A key of the admin user holding every scope, with `bounds` (an expiry, a rate limit), as a principal (not
    metered: the requests counted below are only those of the keys it makes)."""
    admin = auth.authenticate(ADMIN_KEY, metered=False)
    rec, token = auth.create_key(admin.user_id, "delegate", by=admin, **bounds)
    return rec, auth.authenticate(token, metered=False)


def _served(auth: AuthService, tokens: list[str], tries: int = 10) -> int:
    """How many requests the keys `tokens` get through together, each trying until it gets a 429."""
    n = 0
    for t in tokens:
        for _ in range(tries):
            try:
                auth.authenticate(t)
            except TooManyRequests:
                break
            n += 1
    return n


def test_keys_a_limited_delegate_makes_for_others_share_its_budget(auth: AuthService) -> None:
    dk, delegate = _delegate(auth, rate_limit_per_min=LIMIT)
    users = [auth.create_user(f"user{i}", "developer", actor="test") for i in range(5)]
    made = [auth.create_key(u["id"], "by the delegate", rate_limit_per_min=1000, by=delegate) for u in users]
    assert _served(auth, [token for _, token in made]) == LIMIT  # five keys, one budget: it was 5 x 3
    assert {(rec["maker_id"], rec["parent_id"], rec["rate_limit_per_min"]) for rec, _ in made} == {(dk["id"], None, 3)}
    with pytest.raises(TooManyRequests, match=dk["id"]) as err:  # a key not used yet: the 429 names the delegate's
        auth.authenticate(made[4][1])
    assert err.value.retry_after is not None and err.value.retry_after > 0
    with pytest.raises(TooManyRequests):  # and the delegate spent it too: it is its own budget
        auth.authenticate(auth.rotate_key(dk["id"], by=auth.authenticate(ADMIN_KEY))[1])


def test_a_chain_of_keys_made_for_others_stays_within_the_first_delegates_bounds(auth: AuthService) -> None:
    dk, delegate = _delegate(auth, rate_limit_per_min=LIMIT, expires_at=_soon())
    b = auth.create_user("bee", "admin", actor="test")  # may make keys, for others too
    c1, c2 = (auth.create_user(n, "developer", actor="test") for n in ("cee", "see"))
    kb, b_token = auth.create_key(b["id"], "for bee", expires_at=_soon(24 * 30), rate_limit_per_min=1000,
                                  by=delegate)  # fmt: skip
    assert kb["expires_at"] == dk["expires_at"] and kb["rate_limit_per_min"] == 3
    bee = auth.authenticate(b_token, metered=False)
    kc1, c1_token = auth.create_key(c1["id"], "for cee", expires_at=_soon(24 * 30), rate_limit_per_min=1000, by=bee)
    kc2, c2_token = auth.create_key(c2["id"], "for see", by=bee)
    own, own_token = auth.create_key(b["id"], "bee's own, derived", by=bee)
    assert {k["expires_at"] for k in (kc1, kc2, own)} == {dk["expires_at"]}  # bound by the first delegate's expiry
    # the delegate's key for bee, what bee's key made for two others and for bee: one budget, the delegate's
    assert _served(auth, [c1_token, c2_token, own_token, b_token]) == LIMIT
    assert (
        kb["maker_id"] == dk["id"] and kc1["maker_id"] == kc2["maker_id"] == kb["id"] and own["parent_id"] == kb["id"]
    )

    # a key within the delegate's bounds takes no new secret of a key beyond them (one an admin made, unbounded)
    unbounded, _ = auth.create_key(c1["id"], "by admin", ["plugins:read"], by=auth.authenticate(ADMIN_KEY))
    with pytest.raises(Forbidden, match="bounds") as err:
        auth.rotate_key(unbounded["id"], by=bee)
    assert err.value.field == "key_id"
    renewed, c1_token = auth.rotate_key(kc1["id"], by=bee)  # one made within them: nothing more than bee's key
    assert renewed["expires_at"] == dk["expires_at"]

    # the delegate revoked: the whole chain goes with it (its bucket would otherwise be theirs alone, at once)
    auth.revoke_key(dk["id"], by=auth.authenticate(ADMIN_KEY))
    for token in (b_token, c1_token, c2_token, own_token):
        with pytest.raises(Unauthorized):
            auth.authenticate(token)
    states = {k["id"]: k["state"] for k in auth.list_keys()}
    assert {states[k["id"]] for k in (kb, kc1, kc2, own)} == {"revoked"} and states[unbounded["id"]] == "active"
    revoked = {r["target"]: r["detail"] for r in auth.list_audit(action="key.revoke")}
    assert {revoked[k["id"]]["derived_from"] for k in (kb, kc1, kc2, own)} == {dk["id"]}


def test_a_key_made_by_a_bounded_delegate_waits_while_the_delegate_s_user_is_disabled_and_narrows_with_it(
    auth: AuthService,
) -> None:
    """Found by the review of the link: disabling the delegate's user (the usual answer to a leaked key) stopped
    the delegate's own key but not what it had made for others, and a delegate's user who lost rights left the keys
    it had made holding them. A key made within a delegate's bounds now acts within what that delegate's key holds
    now: none of it while its user is disabled (back once enabled), its scopes narrowed with it."""
    admin = auth.authenticate(ADMIN_KEY, metered=False)
    ops = auth.create_user("ops", "admin", by=admin)
    dev = auth.create_user("dev", "developer", by=admin)
    dk, dtoken = auth.create_key(ops["id"], "ops, for an hour", expires_at=_soon(), by=admin)
    delegate = auth.authenticate(dtoken, metered=False)
    made, token = auth.create_key(dev["id"], "for dev", scopes=["jobs:run", "collections:write"], by=delegate)
    assert made["maker_id"] == dk["id"]
    assert {"jobs:run", "collections:write"} <= auth.authenticate(token).scopes
    derived, dtok2 = auth.create_key(dev["id"], "dev's own, from it", by=auth.authenticate(token, metered=False))
    assert derived["parent_id"] == made["id"]

    auth.update_user(ops["id"], disabled=True, by=admin)
    for t in (token, dtok2):  # the key made for dev, and what dev derived from it
        with pytest.raises(Unauthorized, match="disabled"):
            auth.authenticate(t)
    assert auth.live_key_scopes(made["id"]) is None  # a call under way stops acting for dev too (`as_now`)
    auth.update_user(ops["id"], disabled=False, by=admin)
    assert "jobs:run" in auth.authenticate(token).scopes

    auth.update_user(ops["id"], role="viewer", by=admin)  # the delegate's user loses jobs:run and writes
    assert auth.authenticate(token).scopes == frozenset() and auth.authenticate(dtok2).scopes == frozenset()
    unbounded, utoken = auth.create_key(dev["id"], "by the admin", scopes=["jobs:run"], by=admin)
    assert unbounded["maker_id"] is None and auth.authenticate(utoken).scopes == {"jobs:run"}  # stands alone


def test_a_bounded_delegate_gives_no_role_and_no_role_scopes_that_outlive_it(auth: AuthService) -> None:
    """Found by the review of the link: a 1-hour key holding every scope could not set a password for someone (a
    login outlives it) but could make their role admin, or add scopes to their role, for good: the same lasting
    grant through the role. Now refused (403) to a key that expires or is rate-limited; taking rights away, and
    the same changes through an unbounded credential, are as before."""
    admin = auth.authenticate(ADMIN_KEY, metered=False)
    bob = auth.create_user("bob", "developer", by=admin)
    auth.create_role("helpers", ["plugins:read"], by=admin)
    _, delegate = _delegate(auth, expires_at=_soon())
    with pytest.raises(Forbidden, match="for good") as err:
        auth.update_user(bob["id"], role="admin", by=delegate)
    assert err.value.field == "role" and auth.user(bob["id"])["role"] == "developer"
    with pytest.raises(Forbidden, match="for good") as err:
        auth.update_role("helpers", scopes=["plugins:read", "admin:users"], by=delegate)
    assert err.value.field == "scopes" and auth.roles["helpers"] == ["plugins:read"]
    assert auth.update_user(bob["id"], role="viewer", by=delegate)["role"] == "viewer"  # fewer rights: fine
    assert auth.update_role("helpers", scopes=[], by=delegate)["scopes"] == []
    _, limited = _delegate(auth, rate_limit_per_min=1000)
    with pytest.raises(Forbidden):
        auth.update_user(bob["id"], role="developer", by=limited)
    assert auth.update_user(bob["id"], role="admin", by=admin)["role"] == "admin"  # the admin key: as before


def test_the_link_survives_a_restart(tmp_path: Path) -> None:
    with auth_on(tmp_path / "data", ADMIN_KEY) as auth:
        dk, delegate = _delegate(auth, rate_limit_per_min=LIMIT)
        made = [
            auth.create_key(auth.create_user(f"u{i}", "viewer", actor="t")["id"], "k", by=delegate) for i in range(3)
        ]
    with auth_on(tmp_path / "data") as auth:  # the gateway started again: keys come back from DuckDB
        assert _served(auth, [token for _, token in made]) == LIMIT  # still one budget
        assert {auth.key_ids[rec["id"]].maker_id for rec, _ in made} == {dk["id"]}
        assert {k["maker_id"] for k in auth.list_keys() if k["name"] == "k"} == {dk["id"]}
        auth.revoke_key(dk["id"], by=auth.authenticate(ADMIN_KEY))
    with auth_on(tmp_path / "data") as auth:
        for _, token in made:  # revoked with it, for good
            with pytest.raises(Unauthorized):
                auth.authenticate(token)


def test_keys_an_unbounded_admin_makes_for_others_are_as_they_were(auth: AuthService) -> None:
    admin = auth.authenticate(ADMIN_KEY, metered=False)
    other, other_token = auth.create_key(admin.user_id, "another admin key, no expiry, no limit", by=admin)
    maker = auth.authenticate(other_token, metered=False)
    users = [auth.create_user(f"v{i}", "developer", actor="test") for i in range(2)]
    made = [auth.create_key(u["id"], "own budget", rate_limit_per_min=LIMIT, by=maker) for u in users]
    assert {(rec["rate_limit_per_min"], rec["expires_at"]) for rec, _ in made} == {(3, None)}
    assert _served(auth, [made[0][1]]) == LIMIT and _served(auth, [made[1][1]]) == LIMIT  # each its own, as set
    following, f_token = auth.create_key(users[0]["id"], "follows the role", by=maker)
    assert following["follows_role"]
    auth.revoke_key(other["id"], by=admin)  # as JupyterHub's tokens: theirs, and the maker's revocation leaves them
    assert auth.authenticate(f_token).username == "v0"
    assert {rec["maker_id"] for rec, _ in [*made, (following, "")]} == {None}  # no link: nothing binds them


def test_rows_from_before_the_link_keep_working(tmp_path: Path) -> None:
    """A database from before migration 0010: keys a bounded delegate made for others have no link. They work and
    are clamped as they were (a budget of their own, not revoked with the delegate); what it makes now is linked."""
    with auth_on(tmp_path / "data", ADMIN_KEY) as auth:
        dk, delegate = _delegate(auth, rate_limit_per_min=LIMIT, expires_at=_soon())
        u = auth.create_user("old", "developer", actor="test")
        old, old_token = auth.create_key(u["id"], "made before the link", by=delegate)
    con = duckdb.connect(str(tmp_path / "data" / DB_NAME))  # back to schema 9: the column, and its migration, gone
    con.execute("ALTER TABLE api_keys DROP COLUMN IF EXISTS maker_id")
    con.execute("ALTER TABLE job_schedules DROP COLUMN IF EXISTS path")  # and what came after it (0011-0013)
    con.execute("ALTER TABLE api_keys DROP COLUMN IF EXISTS run_id")
    con.execute("ALTER TABLE job_runs DROP COLUMN IF EXISTS path")
    con.execute("DELETE FROM schema_migrations WHERE version >= 10")
    con.execute("CHECKPOINT")
    con.close()

    with auth_on(tmp_path / "data") as auth:  # migrated again: the column comes back empty
        assert auth.key_ids[old["id"]].maker_id is None
        assert auth.key_ids[old["id"]].rate_limit_per_min == LIMIT  # clamped when it was made, as it was
        delegate = auth.authenticate(auth.rotate_key(dk["id"], by=auth.authenticate(ADMIN_KEY))[1], metered=False)
        new, new_token = auth.create_key(u["id"], "made after", by=delegate)
        assert new["maker_id"] == dk["id"]
        assert _served(auth, [old_token]) == LIMIT  # its own bucket, as before
        assert _served(auth, [new_token]) == LIMIT  # the delegate's, untouched by the old key
        auth.revoke_key(dk["id"], by=auth.authenticate(ADMIN_KEY))
        with pytest.raises(Unauthorized):
            auth.authenticate(new_token)
        with pytest.raises(TooManyRequests):  # not revoked with it (nothing says it was its maker): as it was
            auth.authenticate(old_token)


def test_a_delegate_over_http_and_through_a_gateway_restart(tmp_path: Path) -> None:
    """The same through a real gateway: the delegate's own requests and those of the keys it made for others
    draw on one bucket of 4 a minute; the link is listed, and holds after the gateway starts again."""
    data = tmp_path / "data"
    gw = start_gateway(data, plugins=["apikeys"])
    try:
        admin = gw.client()
        dk = admin.post("/admin/keys", json={"name": "delegate", "rate_limit_per_min": 4}).json()
        d = gw.client(dk["key"])
        made = []
        for name in ("http-b", "http-c"):  # two of the delegate's four requests
            uid = admin.post("/admin/users", json={"username": name, "role": "developer"}).json()["id"]
            r = d.post("/admin/keys", json={"name": f"for {name}", "user_id": uid, "rate_limit_per_min": 1000})
            assert r.status_code == 201, r.text
            made.append(r.json())
        codes = [gw.client(k["key"]).get("/auth/me").status_code for k in made for _ in range(3)]
        assert sorted(codes) == [200] * 2 + [429] * 4, codes  # the two left, not 2 x 4
        assert d.get("/auth/me").status_code == 429
        assert {k["maker_id"] for k in made} == {dk["id"]}
    finally:
        gw.stop()

    gw = start_gateway(data, plugins=["apikeys"])
    try:
        admin = gw.client()
        listed = {k["id"]: k for k in admin.get("/admin/keys").json()["keys"]}
        assert {listed[k["id"]]["maker_id"] for k in made} == {dk["id"]}
        codes = [gw.client(k["key"]).get("/auth/me").status_code for k in made for _ in range(4)]
        assert sorted(codes) == [200] * 4 + [429] * 4, codes  # a fresh bucket after the start: still one
        assert admin.post(f"/admin/keys/{dk['id']}/revoke").status_code == 200
        assert {gw.client(k["key"]).get("/auth/me").status_code for k in made} == {401}
    finally:
        gw.stop()
