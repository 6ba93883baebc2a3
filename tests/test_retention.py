"""What is over is not kept for good: keys revoked or expired long ago (every notebook run makes one and revokes it
as the run ends), old audit entries and old usage rows are deleted after their `*_keep_days`, by the gateway at
start and every six hours. Found by a review: all three grew for as long as the gateway ran."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway_harness import ADMIN_KEY, start_gateway, wait_for

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.auth.principal import SCOPES
from bkg_kernel.store import Store

ADMIN = Principal("u-root", "root", "admin", frozenset(SCOPES))


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def seed(auth: AuthService) -> dict[str, Any]:
    """Keys in every state, and audit and usage rows of two ages; returns the ids."""
    dev = auth.create_user("dev", "developer", actor="test")
    ids = {}
    for name in ("live", "revoked long ago", "revoked lately", "expired long ago"):
        ids[name] = auth.create_key(dev["id"], name, by=ADMIN)[0]["id"]
    auth.revoke_key(ids["revoked long ago"], by=ADMIN)
    auth.revoke_key(ids["revoked lately"], by=ADMIN)
    old = _now() - timedelta(days=400)
    auth.sync()
    with auth.mutex:
        auth.con.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", [old, ids["revoked long ago"]])
        auth.con.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", [old, ids["expired long ago"]])
        auth.key_ids[ids["expired long ago"]].expires_at = old
        for when, what in ((old, "old"), (_now(), "new")):
            auth.con.execute("INSERT INTO audit (created_at, action) VALUES (?, ?)", [when, f"{what}.thing"])
            auth.con.execute(
                "INSERT INTO usage (created_at, route, prompt_tokens, completion_tokens) VALUES (?, ?, 1, 1)",
                [when, f"/{what}"],
            )
    return ids


def counts(auth: AuthService) -> dict[str, int]:
    with auth.mutex:
        return {t: auth.con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("api_keys", "audit", "usage")}


def test_old_keys_audit_and_usage_go_and_the_rest_stays(tmp_path: Path) -> None:
    with Store(tmp_path / "data") as store:
        auth = AuthService(store)
        ids = seed(auth)
        before = counts(auth)
        gone = auth.forget_old(90, 365, 365)
        assert gone == {"keys": 2, "audit": 1, "usage": 1}, gone
        after = counts(auth)
        assert after["usage"] == before["usage"] - 1 and after["audit"] == before["audit"] - 1
        left = {k["id"] for k in auth.list_keys()}
        assert ids["live"] in left and ids["revoked lately"] in left
        assert ids["revoked long ago"] not in left and ids["expired long ago"] not in left
        assert ids["expired long ago"] not in auth.key_ids and ids["live"] in auth.key_ids
        assert auth.forget_old(0, 0, 0) == {"keys": 0, "audit": 0, "usage": 0}  # 0: kept for good
        assert counts(auth) == after
        auth.close()


def test_the_gateway_forgets_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Store(data) as store:
        auth = AuthService(store)
        auth.bootstrap(data, ADMIN_KEY)  # the admin user and key a gateway's first start makes
        ids = seed(auth)
        auth.close()
    g = start_gateway(data, plugins=["sysinfo"])
    try:
        c = g.client()

        def forgotten() -> bool:
            keys = {k["id"] for k in c.get("/admin/keys").json()["keys"]}
            return ids["revoked long ago"] not in keys and ids["expired long ago"] not in keys

        wait_for(forgotten, timeout=30, every=0.2)
        keys = {k["id"] for k in c.get("/admin/keys").json()["keys"]}
        assert ids["live"] in keys and ids["revoked lately"] in keys
        assert c.get("/admin/audit", params={"action": "old.thing"}).json()["entries"] == []
        assert len(c.get("/admin/audit", params={"action": "new.thing"}).json()["entries"]) == 1
    finally:
        g.stop()


def test_a_log_handed_to_a_child_is_rotated_past_its_size(tmp_path: Path) -> None:
    from bkg_kernel.logfiles import open_log

    log = tmp_path / "logs" / "gateway.log"
    for n in range(5):
        with open_log(log, max_bytes=100, keep=3) as f:
            f.write(bytes([65 + n]) * 150)  # each start finds the last one's 150 bytes: over 100, rotated
    assert sorted(p.name for p in log.parent.iterdir()) == ["gateway.log", "gateway.log.1", "gateway.log.2",
                                                             "gateway.log.3"]  # fmt: skip
    assert log.read_bytes() == b"E" * 150 and (log.parent / "gateway.log.1").read_bytes() == b"D" * 150
    assert (log.parent / "gateway.log.3").read_bytes() == b"B" * 150  # the oldest kept; "A" went
    with open_log(log, max_bytes=1000) as f:  # under the size: appended to
        f.write(b"F")
    assert log.read_bytes() == b"E" * 150 + b"F"


def test_what_a_dead_download_left_is_swept_and_a_live_one_is_not(tmp_path: Path) -> None:
    import os
    import time

    from bkg_kernel.models.download import sweep_partial

    partial = tmp_path / ".partial"
    partial.mkdir()
    (partial / "dead-model.gguf").write_bytes(b"x")
    (partial / "live-model.gguf").write_bytes(b"y")
    day_ago = time.time() - 2 * 86_400
    os.utime(partial / "dead-model.gguf", (day_ago, day_ago))
    (partial / "link").symlink_to(tmp_path / "elsewhere")
    assert sweep_partial(tmp_path) == ["dead-model.gguf"]
    assert sorted(p.name for p in partial.iterdir()) == ["link", "live-model.gguf"]
    assert sweep_partial(tmp_path / "no-such-dir") == []


def test_a_row_the_database_refuses_loses_no_other_row_of_its_batch(tmp_path: Path) -> None:
    """Found by a review: the auth writer wrote its queued rows (audit, usage, last use) in batches, and one row
    the database refused (a token count past BIGINT from an upstream) dropped every row queued after it."""
    import time

    store = Store(tmp_path / "data")
    auth = AuthService(store)
    u = auth.create_user("ann", "developer", actor="test")
    p = Principal(u["id"], "ann", "developer", frozenset(SCOPES))
    with auth.mutex:  # the writer takes the first row and waits here with it: the next rows queue behind it
        auth.audit("test", "first")
        wait_for(lambda: auth._writes.qsize() == 0, 10)  # noqa: SLF001
        time.sleep(0.2)  # (its batch closed: it holds one row)
        auth.record_usage(p, "/v1/chat/completions", "m", 2**70, 1)  # refused by DuckDB: out of range
        auth.audit("test", "after the refused row")
        auth.record_usage(p, "/v1/chat/completions", "m", 3, 4)
    auth.sync()
    actions = [e["action"] for e in auth.list_audit(10)]
    assert "after the refused row" in actions and "first" in actions
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in auth.usage_report("key")] == [(3, 4)]
    store.close()
