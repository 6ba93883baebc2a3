"""Big answers are encoded off the gateway's event loop. The real app (FastAPI, the routes and middlewares, a real
store, the apikeys and sysinfo plugins) runs in this process behind Starlette's TestClient, and every JSON answer's
encoding notes whether it ran on the event loop's thread. Found by a review: `GET /admin/audit?limit=10000` (17 MB)
and `apikeys.audit` were encoded on the loop, holding it up to 80 ms; a polled job's answer too."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, wait_for
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from bkg_kernel.gateway.app import create_app
from bkg_kernel.gateway.jsonresp import FastJSONResponse, PagedJSONResponse
from bkg_kernel.settings import Settings


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each JSON answer was encoded on the event loop's thread, in order."""
    seen: list[bool] = []
    for cls in (JSONResponse, FastJSONResponse, PagedJSONResponse):
        real = cls.__dict__["render"]
        monkeypatch.setattr(
            cls, "render", lambda self, content, _real=real: seen.append(_on_loop()) or _real(self, content)
        )
    return seen


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY), plugins=["apikeys", "sysinfo"])
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


def _answered(c: TestClient, encodings: list[bool], method: str, url: str, **kw: Any) -> Any:
    encodings.clear()
    r = c.request(method, url, **kw)
    assert r.status_code in (200, 202), r.text
    assert encodings, f"{method} {url}: no JSON answer was encoded"
    return r.json(), list(encodings)


def test_listings_jobs_and_long_plugin_answers_are_encoded_off_the_loop(
    client: TestClient, encodings: list[bool]
) -> None:
    auth = client.app.state.gateway.auth  # type: ignore[attr-defined]
    for i in range(1100):  # an audit longer than any page of hits
        auth.audit("probe", "probe.entry", f"t{i}", detail={"n": i})
    for url in ("/admin/audit?limit=10000", "/admin/users", "/admin/keys", "/admin/keys?user_id=admin",
                "/admin/usage?group_by=day"):  # fmt: skip
        body, on_loop = _answered(client, encodings, "GET", url)
        assert not any(on_loop), url
    assert len(body["usage"]) == 0 and body["group_by"] == "day"
    entries, on_loop = _answered(client, encodings, "GET", "/admin/audit?limit=10000")
    assert len(entries["entries"]) > 1100 and entries["entries"][0]["action"] == "probe.entry"
    # an inline plugin's answer with a long list: on a thread too (a page of hits stays on the loop: its hop
    # would double a text query's time)
    rows, on_loop = _answered(client, encodings, "POST", "/api/plugins/apikeys/invoke/apikeys.audit",
                              json={"limit": 5000})  # fmt: skip
    assert len(rows["items"]) > 1100 and not any(on_loop)
    # a background job, polled: encoded off the loop
    job, _ = _answered(client, encodings, "POST", "/api/plugins/sysinfo/invoke/sysinfo.survey",
                       json={"samples": 1, "every_s": 0.01})  # fmt: skip
    job_id = job["job"]["id"] if "job" in job else job["id"]
    wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["finished"], 30)
    polled, on_loop = _answered(client, encodings, "GET", f"/api/jobs/{job_id}")
    assert polled["state"] == "done" and not any(on_loop)


def test_keys_by_username_and_an_unknown_user(client: TestClient) -> None:
    """Found by a review: `?user_id=<username>` listed no keys (every other admin route takes a username), and an
    unknown user was a 200 with none."""
    by_name = client.get("/admin/keys", params={"user_id": "admin"}).json()["keys"]
    admin_id = client.get("/admin/users/admin").json()["id"]
    by_id = client.get("/admin/keys", params={"user_id": admin_id}).json()["keys"]
    assert by_name and [k["id"] for k in by_name] == [k["id"] for k in by_id]
    r = client.get("/admin/keys", params={"user_id": "nobody"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "user_id"
    made = client.post("/admin/users", json={"username": "gone", "role": "viewer"}).json()
    client.post("/admin/keys", json={"user_id": "gone", "name": "k"}).raise_for_status()
    client.delete(f"/admin/users/{made['id']}").raise_for_status()
    kept = client.get("/admin/keys", params={"user_id": made["id"]}).json()["keys"]  # a deleted user's, by id
    assert [k["name"] for k in kept] == ["k"] and all(k["state"] == "revoked" for k in kept)
