"""The store over HTTP, the error shape, one owner per data dir, clean shutdown and `bkg.connect()`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, start_gateway, wait_for
from helpers import clustered

import bkg_kernel
from bkg_kernel.runtime.discovery import discover

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin


def test_collections_over_http(gw: Any) -> None:
    c = gw.client()
    assert c.post("/api/collections", json={"name": "docs", "dim": 4, "index": "hnsw"}).status_code == 201
    x = clustered(200, 4)
    pts = [{"id": i, "vector": x[i].tolist(), "payload": {"even": i % 2 == 0}, "text": f"doc {i}"} for i in range(200)]
    assert c.put("/api/collections/docs/points", json={"points": pts}).json()["upserted"] == 200
    q = c.post("/api/collections/docs/query", json={"vector": x[3].tolist(), "k": 5, "filter": {"even": False}}).json()
    assert q["results"][0]["id"] == 3 and len(q["results"]) == 5 and q["took_ms"] > 0
    assert all(not r["payload"]["even"] for r in q["results"])
    t = c.post("/api/collections/docs/query", json={"text": "doc", "k": 3, "mode": "text"}).json()
    assert len(t["results"]) == 3
    got = c.post("/api/collections/docs/points/get", json={"ids": [5, 999]}).json()["points"]
    assert [p["id"] for p in got] == [5] and len(got[0]["vector"]) == 4
    assert c.post("/api/collections/docs/points/delete", json={"filter": {"even": True}}).json()["deleted"] == 100
    assert c.post("/api/collections/docs/points/count", json={}).json()["count"] == 100
    snap = c.post("/api/collections/docs/snapshots").json()
    assert c.get("/api/collections/docs/snapshots").json()["snapshots"][0]["id"] == snap["id"]
    restored = c.post(f"/api/collections/docs/snapshots/{snap['id']}/restore", json={"into": "docs2"}).json()
    assert restored["count"] == 100
    assert c.delete("/api/collections/docs2").status_code == 204
    assert {x["name"] for x in c.get("/api/collections").json()["collections"]} == {"docs"}


def test_a_remote_collection_answers_as_a_local_one_does(gw: Any) -> None:
    """Found by a review: over the gateway, `get`, `snapshot` and `snapshots` gave plain dicts and lists where a local
    `Collection` gives its result types (`snap.id` was an AttributeError where README's example uses it), and
    `wb.collections()` a bare list without `.names` or a table."""
    from bkg_kernel.store.results import PointList, SnapshotInfo, SnapshotList

    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    coll = wb.create_collection("remote_like_local", dim=2)
    coll.upsert(ids=np.arange(3), vectors=np.eye(3, 2, dtype=np.float32), payloads=[{"n": i} for i in range(3)])
    got = coll.get([2, 99, 0])
    assert isinstance(got, PointList) and [p.id for p in got] == [2, 0] and got[0].payload == {"n": 2}
    assert "<table" in got._repr_html_()
    snap = coll.snapshot()
    assert isinstance(snap, SnapshotInfo) and snap.points == 3 and snap.ok
    listed = coll.snapshots()
    assert isinstance(listed, SnapshotList) and listed[0].id == snap.id and "<table" in listed._repr_html_()
    assert coll.restore(snap.id, into="remote_like_local2").count == 3
    names = wb.collections().names
    assert {"remote_like_local", "remote_like_local2"} <= set(names)
    wb.drop_collection("remote_like_local2")
    wb.drop_collection("remote_like_local")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "/api/collections", {"name": "a/b", "dim": 4}, 422, "name"),
        ("POST", "/api/collections", {"name": "ok", "dim": 4, "metric": "hamming"}, 422, "metric"),
        ("POST", "/api/collections", {"name": "ok"}, 422, "dim"),
        ("PUT", "/api/collections/docs/points", {"points": [{"id": 1, "vector": [1, 2]}]}, 422, "points[0].vector"),
        ("PUT", "/api/collections/docs/points", {"points": [{"id": 1, "vector": [1, 2, 3, "x"]}]}, 422, None),
        (
            "POST",
            "/api/collections/docs/query",
            {"vector": [1, 0, 0, 0], "filter": {"a": {"$bad": 1}}},
            422,
            "filter.a.$bad",
        ),
        ("POST", "/api/collections/docs/query", {"vector": [1, 0, 0, 0], "k": 5000}, 422, "k"),
        ("GET", "/api/collections/missing", None, 404, "name"),
        ("POST", "/api/collections/docs/snapshots/zzz/restore", None, 404, "snapshot_id"),
    ],
)
def test_bad_input_is_a_clear_4xx(gw: Any, method: str, path: str, body: Any, status: int, field: str | None) -> None:
    c = gw.client()
    if c.get("/api/collections/docs").status_code == 404:
        c.post("/api/collections", json={"name": "docs", "dim": 4})
    before = c.post("/api/collections/docs/points/count", json={}).json()["count"]
    r = c.request(method, path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) <= {"status", "code", "message", "field"} and err["status"] == status and err["message"]
    if field is not None:
        assert err["field"] == field
    assert "Traceback" not in r.text
    assert c.post("/api/collections/docs/points/count", json={}).json()["count"] == before


def test_malformed_json_body(gw: Any) -> None:
    r = gw.client().post("/api/collections", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


def test_second_gateway_on_same_dir_refused(gw: Any) -> None:
    second = start_gateway(gw.data_dir, wait=False)
    assert second.proc.wait(60) == 2
    out = second.log.read_text()
    assert "already owned by pid" in out and str(gw.proc.pid) in out and "Traceback" not in out


def test_sigterm_stops_cleanly_and_connect_starts_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    g = start_gateway(data, plugins=PLUGINS)
    state = json.loads((data / "gateway.json").read_text())
    assert state["pid"] == g.proc.pid
    worker = g.client().get("/api/plugins/sysinfo/status").json()["pid"]
    assert g.stop() == 0
    assert not (data / "gateway.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    # connect() with no gateway running starts one in the background and authenticates with BKG_API_KEY
    os.environ["BKG_API_KEY"] = ADMIN_KEY
    try:
        wb = bkg_kernel.connect(data_dir=data, timeout=90)
        assert wb.me()["role"] == "admin"
        assert {p["id"] for p in wb.plugins} == set(discover())  # every built-in plugin
        docs = wb.create_collection("nb", dim=3)
        docs.upsert(ids=np.arange(50), vectors=clustered(50, 3), payloads=[{"i": i} for i in range(50)])
        assert docs.count() == 50 and docs.query(clustered(50, 3)[7], k=1).ids == [7]
        assert "<table" in docs.query(clustered(50, 3)[7], k=3)._repr_html_()
        assert "<table" in wb.plugins._repr_html_()
        again = bkg_kernel.connect(data_dir=data)
        assert again.url == wb.url
        pid = json.loads((data / "gateway.json").read_text())["pid"]
    finally:
        os.environ.pop("BKG_API_KEY", None)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not (data / "gateway.json").exists(), timeout=30)
