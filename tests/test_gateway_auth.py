"""Auth against a real gateway: 401 everywhere without credentials, 403 without the scope, keys, sessions."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin

OPEN = {("GET", "/health"), ("GET", "/livez"), ("GET", "/readyz"), ("POST", "/auth/login")}  # probes: open


def _routes(gw: Any) -> list[tuple[str, str]]:
    spec = httpx.get(gw.url + "/openapi.json").json()
    out = []
    for path, ops in spec["paths"].items():
        for method in ops:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            out.append((method.upper(), concrete))
    return out


def test_every_route_needs_credentials(gw: Any) -> None:
    routes = _routes(gw)
    assert len(routes) > 30
    anon = gw.client(None)
    for method, path in routes:
        if (method, re.sub(r"/x", "/{}", path)) in OPEN or (method, path) in OPEN:
            continue
        r = anon.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
    bad = gw.client("bkg_0123456789ab_" + "B" * 40)
    assert bad.get("/api/plugins").status_code == 401
    assert gw.client("not-a-key").get("/api/plugins").status_code == 401
    assert anon.get("/health").status_code == 200


def test_viewer_key_cannot_write(gw: Any) -> None:
    admin = gw.client()
    user = admin.post("/admin/users", json={"username": "vera", "role": "viewer"}).json()
    key = admin.post("/admin/keys", json={"name": "vera's", "user_id": user["id"]}).json()
    assert key["scopes"] == ["plugins:read", "collections:read", "models:read"] and key["key"].startswith("bkg_")
    viewer = gw.client(key["key"])
    assert viewer.get("/api/plugins").status_code == 200
    for method, path, body in [
        ("POST", "/api/plugins/sysinfo/stop", None),
        ("PUT", "/api/plugins/sysinfo/config", {"config": {}}),
        ("POST", "/api/collections", {"name": "v", "dim": 2}),
        ("POST", "/api/plugins/sysinfo/invoke/sysinfo.sleep", {"seconds": 0}),
        ("GET", "/admin/users", None),
        ("GET", "/admin/audit", None),
    ]:
        r = viewer.request(method, path, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert "scope" in r.json()["error"]["message"]
    assert admin.get("/api/plugins/sysinfo/status").json()["state"] == "running"
    # a key can never hold more than its owner
    r = admin.post("/admin/keys", json={"name": "x", "user_id": user["id"], "scopes": ["collections:write"]})
    assert r.status_code == 403 and r.json()["error"]["field"] == "scopes[0]"
    r = admin.post("/admin/keys", json={"name": "x", "scopes": ["fly"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "scopes.0"  # the schema names it


def test_key_shown_once_hashed_and_rotated(gw: Any) -> None:
    admin = gw.client()
    created = admin.post("/admin/keys", json={"name": "rot", "scopes": ["plugins:read"]}).json()
    old = created["key"]
    assert gw.client(old).get("/auth/me").json()["key_id"] == created["id"]
    listed = {k["id"]: k for k in admin.get("/admin/keys").json()["keys"]}
    assert "key" not in listed[created["id"]] and old not in str(listed)
    assert listed[created["id"]]["last_used_at"] is not None
    rotated = admin.post(f"/admin/keys/{created['id']}/rotate").json()
    assert rotated["id"] == created["id"] and rotated["scopes"] == ["plugins:read"] and rotated["key"] != old
    assert gw.client(old).get("/auth/me").status_code == 401
    assert gw.client(rotated["key"]).get("/auth/me").status_code == 200
    assert admin.post(f"/admin/keys/{created['id']}/revoke").json()["state"] == "revoked"
    assert gw.client(rotated["key"]).get("/auth/me").status_code == 401


def test_expiry_honoured(gw: Any) -> None:
    admin = gw.client()
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    key = admin.post("/admin/keys", json={"name": "short", "expires_at": soon}).json()
    assert gw.client(key["key"]).get("/auth/me").status_code == 200
    time.sleep(2.5)
    r = gw.client(key["key"]).get("/auth/me")
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = admin.post("/admin/keys", json={"name": "past", "expires_at": past})
    assert r.status_code == 422 and r.json()["error"]["field"] == "expires_at"


def test_rate_limit_gives_429_with_retry_after(gw: Any) -> None:
    key = gw.client().post("/admin/keys", json={"name": "slow", "rate_limit_per_min": 5}).json()["key"]
    c = gw.client(key)
    codes = [c.get("/api/plugins").status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3
    r = c.get("/api/plugins")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "too_many_requests"


def test_login_session_logout(gw: Any) -> None:
    admin = gw.client()
    u = admin.post("/admin/users", json={"username": "dana", "role": "developer", "password": "correct horse"}).json()
    assert u["has_password"] and "password_hash" not in u
    r = httpx.post(gw.url + "/auth/login", json={"username": "dana", "password": "wrong pass"})
    assert r.status_code == 401
    r = httpx.post(gw.url + "/auth/login", json={"username": "dana", "password": "correct horse"})
    token = r.json()["token"]
    s = gw.client(token)
    me = s.get("/auth/me").json()
    assert me["username"] == "dana" and me["via"] == "session" and "collections:write" in me["scopes"]
    assert s.post("/auth/logout").json() == {"ok": True}
    assert s.get("/auth/me").status_code == 401
    assert admin.patch(f"/admin/users/{u['id']}", json={"disabled": True}).json()["disabled"] is True
    r = httpx.post(gw.url + "/auth/login", json={"username": "dana", "password": "correct horse"})
    assert r.status_code == 401


def test_audit_log_records_changes(gw: Any) -> None:
    admin = gw.client()
    admin.post("/admin/users", json={"username": "audited", "role": "viewer"})
    admin.post("/api/plugins/sysinfo/restart")
    admin.put("/api/plugins/sysinfo/config", json={"config": {"request_timeout": 20}})
    entries = admin.get("/admin/audit", params={"limit": 200}).json()["entries"]
    actions = {(e["action"], e["target"]) for e in entries}
    assert ("user.create", "audited") in actions
    assert ("plugin.restart", "sysinfo") in actions
    assert ("plugin.config", "sysinfo") in actions
    assert any(a == "key.create" for a, _ in actions)
    assert all(e["actor"] for e in entries if e["action"] != "auth.login")


def test_admin_key_is_the_env_key(gw: Any) -> None:
    assert gw.client(ADMIN_KEY).get("/auth/me").json()["role"] == "admin"
    assert not (gw.data_dir / "admin.key").exists()  # BKG_ADMIN_KEY was given: nothing written


@pytest.mark.parametrize("path", ["/nope", "/api/plugins/nope"])
def test_not_found_shape(gw: Any, path: str) -> None:
    r = gw.client().get(path)
    assert r.status_code == 404
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == 404 and body["error"]["message"]
