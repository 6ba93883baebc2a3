"""Logins that hold up against guessing: throttled per user name and per address, the same work for unknown
names, bounded failure rows, sessions that end when the password changes or the user is disabled, and password
hashes at today's scrypt cost (older ones upgraded at the next login). A real DuckDB file; the gateway part on
a real gateway."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import Gateway

from bkg_kernel.auth import AuthService
from bkg_kernel.auth import keys as ks
from bkg_kernel.auth.throttle import AuditBudget, LoginThrottle
from bkg_kernel.errors import TooManyRequests, Unauthorized
from bkg_kernel.store import Store

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin

PW = "correct horse battery"


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[AuthService]:
    s = Store(tmp_path / "data")
    a = AuthService(s)
    yield a
    a.close()
    s.close()


def test_unknown_names_cost_the_same_scrypt_work(auth: AuthService, monkeypatch: pytest.MonkeyPatch) -> None:
    auth.create_user("known", "viewer", PW)
    auth.create_user("nopass", "viewer")
    real, calls = hashlib.scrypt, []

    def counting(*a: Any, **kw: Any) -> bytes:
        calls.append(kw["n"])
        return real(*a, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    for name in ("known", "nobody-by-this-name", "nopass"):
        calls.clear()
        with pytest.raises(Unauthorized, match="wrong username or password"):
            auth.login(name, "wrong password", "10.0.0.1")
        assert calls == [ks.SCRYPT_N], (name, calls)  # one full-cost scrypt each, whoever it was


def test_throttled_per_name_and_per_address(auth: AuthService) -> None:
    auth.throttle = LoginThrottle(per_name=3, per_address=6)  # the defaults (10, 30) cost a scrypt each to reach
    auth.create_user("ann", "viewer", PW)
    auth.create_user("bob", "viewer", PW)
    for _ in range(auth.throttle.limits["name"]):
        with pytest.raises(Unauthorized):
            auth.login("ann", "guess", "10.0.0.1")
    with pytest.raises(TooManyRequests) as err:  # even the right password, until the window moves on
        auth.login("ann", PW, "10.0.0.2")
    assert err.value.retry_after > 0 and "user name" in err.value.message
    assert auth.login("bob", PW, "10.0.0.1")[1].username == "bob"  # another name from that address still works
    for i in range(auth.throttle.limits["address"]):
        with pytest.raises((Unauthorized, TooManyRequests)):
            auth.login(f"spray-{i}", "guess", "10.0.0.9")
    with pytest.raises(TooManyRequests, match="address"):
        auth.login("bob", PW, "10.0.0.9")


def test_failed_login_rows_are_bounded(auth: AuthService, monkeypatch: pytest.MonkeyPatch) -> None:
    from bkg_kernel.auth import throttle

    clock = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])  # a minute that does not pass by itself
    auth.failed_audit = AuditBudget(per_min=5)
    for i in range(20):
        with pytest.raises(Unauthorized):
            auth.login(f"guess-{i}", "x", f"10.1.0.{i}")
    rows = [e for e in auth.list_audit(1000, "auth.login") if not e["ok"]]
    assert len(rows) == 5
    clock[0] += 60  # a minute later: the next row says how many were held back
    with pytest.raises(Unauthorized):
        auth.login("later", "x", "10.2.0.1")
    newest = auth.list_audit(1, "auth.login")[0]
    assert newest["detail"]["held_back"] == 15 and newest["detail"]["address"] == "10.2.0.1"


def test_new_password_or_disabling_ends_sessions(auth: AuthService) -> None:
    u = auth.create_user("cat", "developer", PW)
    token, _ = auth.login("cat", PW, "10.0.0.1")
    assert auth.authenticate(token).username == "cat"
    auth.set_password(u["id"], "another long password")
    with pytest.raises(Unauthorized):
        auth.authenticate(token)
    token, _ = auth.login("cat", "another long password", "10.0.0.1")
    auth.update_user(u["id"], disabled=True)
    auth.update_user(u["id"], disabled=False)
    with pytest.raises(Unauthorized):
        auth.authenticate(token)


def test_what_a_session_started_stops_acting_for_the_user_once_it_ends(auth: AuthService) -> None:
    """A long call or a queued job started from a login acts for the user only while that login lasts: logging
    out, or a new password, ends it; another login of the same user is not touched."""
    u = auth.create_user("dot", "developer", PW)
    token, _ = auth.login("dot", PW, "10.0.0.2")
    other_token, _ = auth.login("dot", PW, "10.0.0.2")
    p = auth.authenticate(token)
    assert auth.as_now(p) == p and "session" not in p.to_dict()
    auth.logout(token)
    with pytest.raises(Unauthorized, match="session"):
        auth.as_now(p)
    q = auth.authenticate(other_token)
    assert auth.as_now(q) == q
    auth.set_password(u["id"], "another long password")
    with pytest.raises(Unauthorized, match="session"):
        auth.as_now(q)


def test_weaker_hashes_are_upgraded_at_login(auth: AuthService) -> None:
    u = auth.create_user("old", "viewer", PW)
    assert auth.users[u["id"]]["password_hash"].startswith(f"scrypt${2**17}$8$1$")
    salt = b"0123456789abcdef"
    weak = hashlib.scrypt(PW.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    stored = f"scrypt${2**14}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(weak).decode()}"
    with auth.mutex:  # the connection is shared with the audit writer thread
        auth.con.execute("UPDATE users SET password_hash = ? WHERE id = ?", [stored, u["id"]])
        auth.users[u["id"]]["password_hash"] = stored
    auth.login("old", PW, "10.0.0.1")
    with auth.mutex:
        now = auth.con.execute("SELECT password_hash FROM users WHERE id = ?", [u["id"]]).fetchone()[0]
    assert now.startswith(f"scrypt${2**17}$") and ks.check_password(PW, now)


def test_gateway_answers_429_with_retry_after(gw: Gateway) -> None:
    gw.client().post("/admin/users", json={"username": "dee", "role": "viewer", "password": PW}).raise_for_status()
    codes = [
        httpx.post(gw.url + "/auth/login", json={"username": "dee", "password": "nope nope"}).status_code
        for _ in range(11)
    ]
    assert codes == [401] * 10 + [429]
    r = httpx.post(gw.url + "/auth/login", json={"username": "dee", "password": PW})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


def test_a_burst_of_logins_waits_on_threads_of_its_own(tmp_path: Path) -> None:
    """Found by a review: logins hashed their passwords on the pool every route's store work and every worker's
    answer use (six threads here), and the throttle counts only finished failures, so a burst of logins by anyone
    took every thread for seconds. Now they wait on two threads of their own, and past 16 at once are a 429."""
    import threading

    from gateway_harness import start_gateway

    g = start_gateway(tmp_path / "data", plugins=["apikeys"])
    try:
        codes: list[int] = []
        said: list[str] = []

        def attempt(i: int) -> None:
            r = httpx.post(g.url + "/auth/login", json={"username": f"nobody{i}", "password": "nope nope"}, timeout=60)
            codes.append(r.status_code)
            said.append(r.json()["error"]["message"])

        burst = [threading.Thread(target=attempt, args=(i,)) for i in range(28)]
        for t in burst:
            t.start()
        answered = g.client().get("/api/collections")  # store work, on the pool the logins no longer take
        for t in burst:
            t.join()
        assert answered.status_code == 200
        assert set(codes) <= {401, 429} and codes.count(401) >= 16, codes
        assert any("logins are running or waiting (at most 16)" in s for s in said), said
    finally:
        g.stop()
