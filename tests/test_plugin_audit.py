"""A plugin records what its caller did in the audit log through its store handle (`context.store.audit`): as the
caller (their user and key), under the plugin's own name, checked (a plugin cannot write another action's entry,
nor pass off its entry as another plugin's). Real store, real auth service, the gateway's real handler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import auth_on

from bkg_kernel.auth import AuthService
from bkg_kernel.errors import InvalidInput
from bkg_kernel.gateway.plugin_store import PluginStore


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[AuthService]:
    with auth_on(tmp_path / "data") as a:
        yield a


def test_a_plugin_records_its_callers_act_under_its_own_name(auth: AuthService) -> None:
    auth.create_role("nothing-much", ["plugins:read"], actor="test")  # recording one's own act takes no scope
    user = auth.create_user("dora", "nothing-much", actor="test")
    _, token = auth.create_key(user["id"], "k", actor="test")
    dora = auth.authenticate(token, metered=False)
    serve = PluginStore(None, auth, None)  # type: ignore[arg-type]  # the audit op reads neither store nor hub

    serve("repoagent", dora, "audit", {"action": "command", "target": "demo", "detail": {"name": "test"}})
    (entry,) = auth.list_audit(10, "repoagent.command")
    assert entry["actor"] == "dora" and entry["target"] == "demo" and entry["ok"] is True
    assert entry["detail"] == {"name": "test", "key": dora.key_id, "plugin": "repoagent"}
    # what the gateway records, or the row's own columns, the detail cannot set (a claim, or a row never written)
    for own in ("plugin", "key", "ok", "actor", "action", "target"):
        with pytest.raises(InvalidInput) as claimed:
            serve("repoagent", dora, "audit", {"action": "command", "target": None, "detail": {own: "x"}})
        assert claimed.value.field == f"detail.{own}"

    for action in ("Command", "../x", "", "a" * 65, "a..b", 3):
        with pytest.raises(InvalidInput) as bad:
            serve("repoagent", dora, "audit", {"action": action, "target": None, "detail": {}})
        assert bad.value.field == "action"
    with pytest.raises(InvalidInput) as big:
        serve("repoagent", dora, "audit", {"action": "command", "target": None, "detail": {"x": "y" * 5000}})
    assert big.value.field == "detail"
    with pytest.raises(InvalidInput) as target:
        serve("repoagent", dora, "audit", {"action": "command", "target": ["demo"], "detail": {}})
    assert target.value.field == "target"
    serve("repoagent", dora, "audit", {"action": "user.delete", "target": "ana", "detail": {}})  # its own, by name
    recorded = [e["action"] for e in auth.list_audit(100) if e["actor"] == "dora"]
    assert recorded == ["repoagent.user.delete", "repoagent.command"]

    # what a caller did is recorded though their key was revoked meanwhile (the command ran: its row is written)
    auth.revoke_key(dora.key_id, actor="test")
    serve("repoagent", dora, "audit", {"action": "command", "target": "demo", "detail": {"name": "late"}})
    assert auth.list_audit(1, "repoagent.command")[0]["detail"]["name"] == "late"
