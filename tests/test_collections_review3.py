"""Found by a review against Qdrant / LanceDB: a query's `score_threshold`, `offset`, `with_payload` and
`with_vectors` were 422s ("not a field of this body"), and a payload could only change by upserting the point
again with its vector (set / overwrite / delete payload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway

import bkg_kernel
from bkg_kernel.errors import InvalidInput, NotFound
from bkg_kernel.store import Store, search
from bkg_kernel.store.filters import compile_filter

PLUGINS = ["sysinfo"]  # only the gateway's own routes are under test


def _points(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "vector": [float(i), 1.0],
            "payload": {"n": i, "meta": {"src": f"s{i % 2}", "page": i}, "tag": "t"},
            "text": f"apple number{i}" + " apple" * (i % 3),
        }
        for i in range(10)
    ]


def _refused(r: httpx.Response, field: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["field"] == field, err
    return err


def _key(gw: Gateway, username: str, role: str) -> httpx.Client:
    admin = gw.client()
    u = admin.post("/admin/users", json={"username": username, "role": role}).json()
    return gw.client(admin.post("/admin/keys", json={"name": username, "user_id": u["id"]}).json()["key"])


def test_a_query_takes_score_threshold_offset_with_payload_and_with_vectors(gw: Gateway) -> None:
    """Qdrant's query options, in every mode, through REST and `wb.collection(name).query`: the threshold by the
    score a hit carries (an L2 distance at most it, a similarity, BM25 or fused score at least it)."""
    c = gw.client()
    for name, metric in (("r3_l2", "l2"), ("r3_cos", "cosine")):
        assert c.post("/api/collections", json={"name": name, "dim": 2, "metric": metric}).status_code == 201
        assert c.put(f"/api/collections/{name}/points", json={"points": _points(10)}).status_code == 200

    def query(name: str, **body: Any) -> list[dict[str, Any]]:
        r = c.post(f"/api/collections/{name}/query", json=body)
        assert r.status_code == 200, r.text
        return list(r.json()["results"])

    # l2: distances, smaller is closer; the threshold keeps those <= it
    full = query("r3_l2", vector=[0.0, 1.0], k=10)
    assert [h["id"] for h in full] == list(range(10)) and [h["score"] for h in full[:3]] == [0.0, 1.0, 2.0]
    assert [h["id"] for h in query("r3_l2", vector=[0.0, 1.0], k=10, score_threshold=3.5)] == [0, 1, 2, 3]
    # cosine: similarities, larger is closer; the threshold keeps those >= it
    cos = query("r3_cos", vector=[0.0, 1.0], k=10)
    kept = query("r3_cos", vector=[0.0, 1.0], k=10, score_threshold=0.5)
    assert kept and len(kept) < 10 and all(h["score"] >= 0.5 for h in kept)
    assert [h["id"] for h in kept] == [h["id"] for h in cos if h["score"] >= 0.5]
    # offset: the next page of the same ranking, in every mode
    for name, body in (
        ("r3_l2", {"vector": [0.0, 1.0]}),
        ("r3_l2", {"text": "apple", "mode": "text"}),
        ("r3_l2", {"vector": [0.0, 1.0], "text": "apple"}),
        ("r3_cos", {"vector": [0.0, 1.0], "text": "apple", "fusion": "relative"}),
    ):
        ranked = [h["id"] for h in query(name, k=8, **body)]
        assert [h["id"] for h in query(name, k=3, offset=5, **body)] == ranked[5:8], (name, body)
    # text (BM25) and hybrid (the fused score): larger is better, kept >= the threshold
    bm25 = query("r3_l2", text="apple", mode="text", k=10)
    cut = bm25[3]["score"]
    assert [h["id"] for h in query("r3_l2", text="apple", mode="text", k=10, score_threshold=cut)] == [
        h["id"] for h in bm25 if h["score"] >= cut
    ]
    fused = query("r3_l2", vector=[0.0, 1.0], text="apple", k=10)
    cut = fused[2]["score"]
    assert all(h["score"] >= cut for h in query("r3_l2", vector=[0.0, 1.0], text="apple", k=10, score_threshold=cut))
    assert len(query("r3_l2", vector=[0.0, 1.0], text="apple", k=10, score_threshold=cut)) >= 3
    # with_payload false / a list of fields (nested as stored); with_vectors the stored vector
    assert [h["payload"] for h in query("r3_l2", vector=[0.0, 1.0], k=2, with_payload=False)] == [None, None]
    picked = query("r3_cos", vector=[0.0, 1.0], k=2, with_payload=["meta.page", "n", "absent"], with_vectors=True)
    assert picked[0]["payload"] == {"meta": {"page": 0}, "n": 0} and picked[0]["vector"] == [0.0, 1.0]
    assert picked[1]["vector"] == [1.0, 1.0]  # as upserted, not the normalised copy cosine searches
    assert "vector" not in query("r3_cos", vector=[0.0, 1.0], k=1)[0]

    # the notebook client
    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    hits = wb.collection("r3_l2").query(
        [0.0, 1.0], k=2, offset=1, score_threshold=1.5, with_payload=["tag"], with_vectors=True
    )
    assert [(h.id, h.payload, h.vector) for h in hits] == [(1, {"tag": "t"}, [1.0, 1.0])]
    assert wb.collection("r3_l2").query(text="apple", mode="text", k=1, with_payload=False)[0].payload is None

    # refusals name the field
    err = _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "k": 10, "offset": 995}), "offset")
    assert "1000" in err["message"]
    _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "offset": 1000}), "offset")
    _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "with_payload": []}), "with_payload")
    _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "with_payload": 1}), "with_payload")
    bad = {"vector": [0, 1], "with_payload": ["a..b"]}
    _refused(c.post("/api/collections/r3_l2/query", json=bad), "with_payload[0]")
    _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "score_threshold": "1"}), "score_threshold")
    _refused(c.post("/api/collections/r3_l2/query", json={"vector": [0, 1], "with_vectors": 1}), "with_vectors")
    assert c.post("/api/collections", json={"name": "r3_wide", "dim": 4096}).status_code == 201
    wide = {"vector": [1.0] * 4096, "k": 1000, "with_vectors": True}  # 4,096,000 numbers
    _refused(c.post("/api/collections/r3_wide/query", json=wide), "k")

    # the schema says what each does
    props = c.get("/openapi.json").json()["components"]["schemas"]["Query"]["properties"]
    for field in ("score_threshold", "offset", "with_payload", "with_vectors"):
        assert props[field].get("description"), field
    assert "<=" in props["score_threshold"]["description"] and "1000" in props["offset"]["description"]
    for name in ("r3_l2", "r3_cos", "r3_wide"):
        assert c.delete(f"/api/collections/{name}").status_code == 204


def test_a_payload_changes_without_its_vector_by_ids_or_filter(gw: Gateway) -> None:
    """set (merge), overwrite and delete payload keys by ids or filter: the vector, the text (and its full-text
    match) and the point's place in a scroll stay; an id not stored is a 404 and nothing changes; a filter that
    matches none is 0 updated; the write scope, as an upsert's."""
    c = gw.client()
    base = "/api/collections/r3_pay"
    assert c.post("/api/collections", json={"name": "r3_pay", "dim": 2}).status_code == 201
    assert c.put(f"{base}/points", json={"points": _points(10)}).status_code == 200
    order = [p["id"] for p in c.post(f"{base}/points/scroll", json={}).json()["points"]]

    r = c.post(f"{base}/points/payload", json={"points": [1, 2], "payload": {"seen": True, "n": -1}})
    assert r.status_code == 200 and r.json() == {"updated": 2}, r.text
    got = c.post(f"{base}/points/get", json={"ids": [1, 3]}).json()["points"]
    assert got[0]["payload"] == {"n": -1, "meta": {"src": "s1", "page": 1}, "tag": "t", "seen": True}
    assert got[0]["vector"] == [1.0, 1.0] and got[0]["text"] == "apple number1 apple"
    assert got[1]["payload"] == _points(10)[3]["payload"]
    assert c.post(f"{base}/points/count", json={"filter": {"seen": True}}).json() == {"count": 2}
    q = c.post(f"{base}/query", json={"vector": [1.0, 1.0], "k": 3, "filter": {"seen": True}}).json()["results"]
    assert sorted(h["id"] for h in q) == [1, 2] and q[0]["payload"]["seen"] is True
    # the full-text index reads only `text`: the point still matches its words, found once
    q = c.post(f"{base}/query", json={"text": "number1", "mode": "text"}).json()["results"]
    assert [h["id"] for h in q] == [1]

    r = c.put(f"{base}/points/payload", json={"filter": {"seen": True}, "payload": {"only": 1}})
    assert r.json() == {"updated": 2}, r.text
    assert c.post(f"{base}/points/get", json={"ids": [2], "with_vectors": False}).json()["points"][0]["payload"] == {
        "only": 1
    }
    r = c.post(f"{base}/points/payload/delete", json={"filter": {"n": {"$gte": 8}}, "keys": ["meta.src", "tag"]})
    assert r.json() == {"updated": 2}, r.text
    p8 = c.post(f"{base}/points/get", json={"ids": [8]}).json()["points"][0]
    assert p8["payload"] == {"n": 8, "meta": {"page": 8}} and p8["vector"] == [8.0, 1.0]
    assert c.post(f"{base}/points/payload", json={"filter": {"n": 99}, "payload": {"x": 1}}).json() == {"updated": 0}
    # every point keeps its place: a scroll meanwhile sees each once, in the same order
    assert [p["id"] for p in c.post(f"{base}/points/scroll", json={}).json()["points"]] == order
    assert c.get(f"{base}").json()["count"] == 10

    # an id not stored: 404 naming it, and nothing changed (as Qdrant)
    r = c.post(f"{base}/points/payload", json={"points": [3, 77], "payload": {"x": 1}})
    assert r.status_code == 404 and r.json()["error"]["field"] == "points[1]", r.text
    assert c.post(f"{base}/points/count", json={"filter": {"x": 1}}).json() == {"count": 0}
    # refusals name the field
    _refused(c.post(f"{base}/points/payload", json={"payload": {"x": 1}}), "points")
    _refused(c.post(f"{base}/points/payload", json={"points": [1], "filter": {"n": 1}, "payload": {}}), "points")
    _refused(c.post(f"{base}/points/payload", json={"filter": {}, "payload": {"x": 1}}), "filter")
    _refused(c.put(f"{base}/points/payload", json={"points": [1], "payload": [1]}), "payload")
    _refused(c.post(f"{base}/points/payload", json={"points": [1]}), "payload")
    _refused(c.post(f"{base}/points/payload/delete", json={"points": [1], "keys": []}), "keys")
    _refused(c.post(f"{base}/points/payload/delete", json={"points": [1], "keys": ["a..b"]}), "keys[0]")
    lone = b'{"points": [1], "payload": {"x": "\\ud800"}}'  # a lone surrogate: JSON carries it, UTF-8 cannot
    _refused(c.post(f"{base}/points/payload", content=lone, headers={"Content-Type": "application/json"}), "body")
    assert c.post("/api/collections/r3_none/points/payload", json={"points": [1], "payload": {}}).status_code == 404
    # the write scope, as an upsert's
    viewer = _key(gw, "r3viewer", "viewer")
    for method, path in (("POST", ""), ("PUT", ""), ("POST", "/delete")):
        body = {"points": [1], "payload": {"x": 1}} if path == "" else {"points": [1], "keys": ["n"]}
        r = viewer.request(method, f"{base}/points/payload{path}", json=body)
        assert r.status_code == 403, r.text

    # the notebook client
    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    coll = wb.collection("r3_pay")
    assert coll.set_payload({"k": "v"}, np.array([4, 5])) == 2
    assert coll.overwrite_payload({"k": "w"}, filter={"k": "v"}) == 2
    assert coll.delete_payload(["k"], [4]) == 1
    assert [p.payload for p in coll.get([4, 5], with_vectors=False)] == [{}, {"k": "w"}]
    with pytest.raises(NotFound) as missing:
        coll.set_payload({"k": 1}, [123])
    assert missing.value.field == "points[0]"
    with pytest.raises(InvalidInput):
        coll.delete_payload([], [4])
    assert c.delete(base).status_code == 204


def test_a_payload_changed_in_place_is_seen_by_a_filter_scanned_before_it_and_survives_a_reopen(
    store: Store, data_dir: Path
) -> None:
    """The store keeps the point's position (no new FAISS or full-text entry); a filter's scan begun before the
    change (outside the store's lock) is done again, so a query or delete that ranks after it sees the new
    payload; the change is in DuckDB, read again on open."""
    c = store.create_collection("pay", dim=2, index="hnsw")
    c.upsert(_points(10))
    c.query(text="apple", mode="text")  # the full-text index loaded
    assert c._index is not None and c._text is not None
    ntotal, text_total = c._index.ntotal, c._text.ntotal
    flt = {"meta.src": "s1"}
    before = search.Matching(c, flt, *compile_filter(flt))  # scanned now, ranked later
    assert c.set_payload({"meta": {"src": "s9"}}, filter={"n": {"$lt": 4}}) == 4
    assert sorted(c._ids[f] for f in before.now().tolist()) == [5, 7, 9]  # 1 and 3 moved to s9
    assert sorted(c.query([1.0, 1.0], k=10, filter=flt).ids) == [5, 7, 9]
    assert c._index.ntotal == ntotal and c._text.ntotal == text_total  # nothing appended
    assert [p.id for p in c.scroll()] == list(range(10))
    assert c.delete_payload(["tag"], [0, 0]) == 1
    with pytest.raises(NotFound):
        c.overwrite_payload({}, [0, "0"])
    store.close()
    with Store(data_dir) as again:
        c2 = again.collection("pay")
        assert c2.get([0, 1], with_vectors=False).points[0].payload == {"n": 0, "meta": {"src": "s9"}}
        assert sorted(c2.query([1.0, 1.0], k=10, filter={"meta.src": "s9"}).ids) == [0, 1, 2, 3]
        hits = c2.query([1.0, 1.0], k=2, with_payload=["n"], with_vectors=True)
        assert [(h.id, h.payload, h.vector) for h in hits] == [(1, {"n": 1}, [1.0, 1.0]), (2, {"n": 2}, [2.0, 1.0])]
