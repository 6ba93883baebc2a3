"""Hostile input against a real gateway: ids that become paths are refused before anything is written, and
malformed requests that used to reach an assertion or a KeyError get a 4xx naming the field."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import cv2
import httpx
import nbformat
import numpy as np
import pytest
from gateway_harness import Gateway

from bkg_kernel.errors import InvalidInput
from bkg_kernel.models.registry import check_id

JSON = {"Content-Type": "application/json"}
BAD_IDS = ["../evil", "/tmp/bkg-evil", "a\x00b", "x" * 200, "ok\n", ".hidden", "a/b", "..", ""]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_check_id_refuses_path_like_ids(bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_id(bad, "model_id")
    assert err.value.field == "model_id"


def _files(*roots: Path) -> set[Path]:
    return {p for r in roots if r.exists() for p in r.rglob("*")}


@pytest.mark.parametrize(
    ("capability", "field", "body"),
    [
        ("brainml/invoke/brainml.train", "model_id", {"collection": "kb", "label_field": "topic"}),
        ("candle/invoke/candle.quantize", "new_id", {}),
    ],
)
def test_ids_that_become_paths_are_refused_before_anything_is_written(
    gw: Gateway, capability: str, field: str, body: dict[str, Any]
) -> None:
    models = gw.data_dir.parent / "models"
    before = _files(gw.data_dir, models)
    c = gw.client()
    for bad in BAD_IDS:
        r = c.post(f"/api/plugins/{capability}", json={**body, field: bad})
        assert r.status_code == 422, (bad, r.status_code, r.text)
        assert r.json()["error"]["field"].endswith(field), r.json()
    written = {p for p in _files(gw.data_dir, models) - before if "evil" in p.name or p.name == "b"}
    assert not written and not Path("/tmp/bkg-evil").exists()


def test_registering_a_model_under_a_path_like_id_is_refused(gw: Gateway, tmp_path: Path) -> None:
    from helpers import write_gguf

    src = write_gguf(tmp_path / "m.gguf")
    c = gw.client()
    for bad in ["../evil", "x" * 200, "a\x00b"]:
        r = c.post("/api/models", json={"path": str(src), "import_mode": "copy", "id": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "id", r.text
    assert not (gw.data_dir.parent / "evil").exists()
    (tmp_path / "notes.gguf").write_text("not a model")
    r = c.post("/api/models", json={"path": str(tmp_path / "notes.gguf"), "import_mode": "copy", "id": "not-a-model"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_file"  # the caller's file, the caller's 4xx


def test_logout_with_the_session_in_x_api_key(gw: Gateway) -> None:
    admin = gw.client()
    admin.post("/admin/users", json={"username": "xkey", "role": "viewer", "password": "long enough pw"})
    token = httpx.post(gw.url + "/auth/login", json={"username": "xkey", "password": "long enough pw"}).json()["token"]
    r = httpx.post(gw.url + "/auth/logout", headers={"X-API-Key": token})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert httpx.get(gw.url + "/auth/me", headers={"X-API-Key": token}).status_code == 401
    # every way a request may carry the session ends it: the one the check accepted is the one that ends
    token = httpx.post(gw.url + "/auth/login", json={"username": "xkey", "password": "long enough pw"}).json()["token"]
    r = httpx.post(gw.url + "/auth/logout", headers={"Authorization": f"token {token}"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert httpx.get(gw.url + "/auth/me", headers={"Authorization": f"token {token}"}).status_code == 401


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from gateway_harness import start_gateway

    g = start_gateway(tmp_path / "data", env={"BKG_MAX_BODY_MB": "1"}, plugins=["sysinfo"])
    try:
        c = g.client()
        c.post("/api/collections", json={"name": "big", "dim": 4}).raise_for_status()
        points = [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"pad": "x" * 200}} for i in range(6000)]
        r = c.put("/api/collections/big/points", json={"points": points})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "body_too_large" and "1,048,576" in err["message"] and "max_body_mb" in err["message"]

        def chunked() -> Any:  # no Content-Length: counted as it arrives
            yield b'{"points": ['
            for i in range(6000):
                yield json.dumps({"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"pad": "x" * 200}}).encode()
                yield b","
            yield b'{"id": -1, "vector": [0, 0, 0, 1]}]}'

        r = c.put("/api/collections/big/points", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert c.get("/api/collections/big").json()["count"] == 0  # nothing of either body was stored
        small = {"points": points[:100]}
        assert c.put("/api/collections/big/points", json=small).status_code == 200
    finally:
        g.stop()


def test_a_big_body_without_credentials_is_refused_before_it_is_read(gw: Gateway) -> None:
    """FastAPI parses a route's JSON body on the event loop before the route authenticates: an anonymous 25 MB
    body held /health for 270 ms. A body over 64 KiB (or of unknown length) needs valid credentials first."""
    big = json.dumps({"username": "x", "password": "y" * 100, "pad": "z" * 200_000}).encode()
    anon = gw.client(None)
    for path in ("/auth/login", "/admin/users", "/api/collections"):
        r = anon.post(path, content=big, headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 401 and "checked before it is read" in err["message"], (path, r.text)
    r = gw.client("bkg_0123456789ab_" + "x" * 40).post("/admin/users", content=big)
    assert r.status_code == 401  # a key that does not exist is no credential

    def chunks() -> Any:
        yield b'{"username": "x", '
        yield b'"password": "y"}'

    r = anon.post("/auth/login", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 401 and "unknown length" in r.json()["error"]["message"]
    small = anon.post("/auth/login", json={"username": "nobody", "password": "not the password"})
    assert small.status_code == 401 and "wrong username" in small.json()["error"]["message"]  # read as before
    c = gw.client()
    c.post("/api/collections", json={"name": "bodies", "dim": 4}).raise_for_status()
    points = [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"pad": "x" * 200}} for i in range(500)]
    assert len(json.dumps({"points": points})) > 64 * 1024
    assert c.put("/api/collections/bodies/points", json={"points": points}).status_code == 200


def test_a_body_parsed_whole_is_bounded_and_capped_arrays_are_refused_as_read(gw: Gateway) -> None:
    """A route whose body FastAPI parses and validates on the event loop takes at most 1 MiB; the routes made for
    big bodies (embeddings, chat, rerank) parse off the loop and refuse an array over its cap as it is read
    (pydantic walks 2,000,000 numbers, 2.8 s holding the interpreter, before it says the list is too long)."""
    c = gw.client()
    pad = "z" * (2**20 + 10)
    r = c.post("/admin/users", json={"username": "padded", "role": "viewer", "password": "long enough pw", "pad": pad})
    assert r.status_code == 413 and "this route takes at most 1,048,576 bytes" in r.json()["error"]["message"]
    assert all(u["username"] != "padded" for u in c.get("/admin/users").json()["users"])
    c.post("/api/collections", json={"name": "capped", "dim": 2}).raise_for_status()
    assert c.post("/api/collections/capped/points/count", json={"pad": pad}).status_code == 413
    big_pad = "z" * (4 * 2**20 + 10)  # a query takes up to 4 MiB (a 65,536-d vector is ~1.4 MB)
    assert c.post("/api/collections/capped/query", json={"vector": [1, 0], "pad": pad}).status_code == 422
    assert c.post("/api/collections/capped/query", json={"vector": [1, 0], "pad": big_pad}).status_code == 413
    for path, body, field, cap in [
        ("/v1/embeddings", {"input": [1] * 1_000_000}, "input", 2048),
        ("/v1/chat/completions", {"messages": [{}] * 1_000_000}, "messages", 10_000),
        ("/api/embed", {"model": "candle:x", "input": ["a"] * 10_001}, "input", 10_000),
        ("/api/rerank", {"model": "candle:x", "query": "q", "documents": ["d"] * 1001}, "documents", 1000),
        ("/v1/embeddings", {"input": [1] * 3000}, "input", 2048),  # a small body: the same check
    ]:
        r = c.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        err = r.json()["error"]  # refused as read: pydantic's own words would end "after validation, not ..."
        assert err["field"] == field and err["message"].endswith(f"at most {cap} items"), (path, err)
    r = c.post("/v1/embeddings", content=b'{"input": [1, 2', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    r = c.post("/v1/embeddings", json=[1] * 100_000)  # not an object: refused before it is parsed
    assert r.status_code == 422 and "must be a JSON object, not list" in r.json()["error"]["message"]
    r = c.post("/v1/embeddings", json={"input": "hi", "extra": [1] * 5000})  # an array its model does not name
    assert r.status_code == 422 and r.json()["error"]["field"] == "extra"

    def chunked() -> Any:  # no Content-Length: counted as it arrives, refused past this route's 1 MiB
        yield b'{"username": "chunky", "role": "viewer", "password": "long enough pw", "pad": "'
        for _ in range(20):
            yield b"z" * 65536
        yield b'"}'

    r = c.post("/admin/users", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 1,048,576 bytes" in r.json()["error"]["message"]
    # what the API allows in one request still fits: 100,000 ids (~4 MB as UUIDs) to fetch or delete
    ids = [str(uuid.UUID(int=i)) for i in range(100_000)]
    c.put("/api/collections/capped/points", json={"points": [{"id": ids[7], "vector": [1, 0]}]}).raise_for_status()
    r = c.post("/api/collections/capped/points/get", json={"ids": ids})
    assert r.status_code == 200 and [p["id"] for p in r.json()["points"]] == [ids[7]]
    r = c.post("/api/collections/capped/points/delete", json={"ids": ids})
    assert r.status_code == 200 and c.get("/api/collections/capped").json()["count"] == 0


def test_who_may_not_call_a_big_body_route_gets_401_or_403_before_the_body_is_parsed(gw: Gateway) -> None:
    """The routes that parse their JSON body themselves (embeddings, chat, rerank, collections) check the caller
    first: one without the route's scope learns nothing of what the body should be (403 naming the scope, not the
    body's 422), and a malformed body from someone without credentials is their 401."""
    c = gw.client()
    user = c.post("/admin/users", json={"username": "peeker", "role": "viewer"}).json()
    key = c.post("/admin/keys", json={"name": "peeker's", "user_id": user["id"]}).json()["key"]
    viewer = gw.client(key)
    c.post("/api/collections", json={"name": "peeked", "dim": 2})
    for path, body, scope in [
        ("/v1/embeddings", {"input": [1] * 3000}, "llm:use"),
        ("/api/embed", {"model": "candle:x", "input": ["a"] * 10_001}, "llm:use"),
        ("/api/rerank", {"model": "candle:x", "query": "q", "documents": ["d"] * 1001}, "llm:use"),
        ("/api/collections/peeked/points/delete", {"ids": [1] * 200_000}, "collections:write"),
    ]:
        r = viewer.post(path, json=body)
        assert r.status_code == 403 and scope in r.json()["error"]["message"], (path, r.text)
        assert c.post(path, json=body).status_code == 422, path  # the same body from one who may: its 422
    bad = {"content": b'{"input": [1, 2', "headers": {"content-type": "application/json"}}
    assert viewer.post("/v1/embeddings", **bad).status_code == 403
    assert gw.client(None).post("/v1/embeddings", **bad).status_code == 401


def test_limits_name_what_was_too_much(gw: Gateway) -> None:
    c = gw.client()
    c.post("/api/collections", json={"name": "lim", "dim": 2}).raise_for_status()
    deep: dict[str, Any] = {"a": 1}
    for _ in range(40):
        deep = {"$and": [deep]}
    r = c.post("/api/collections/lim/query", json={"vector": [1, 0], "filter": deep})
    assert r.status_code == 422 and "16 deep" in r.json()["error"]["message"]
    r = c.post("/api/collections/lim/query", json={"vector": [1, 0], "filter": {"a": {"$in": list(range(10_001))}}})
    assert r.status_code == 422 and "10,000" in r.json()["error"]["message"]
    nested = '{"x": ' * 5000 + "1" + "}" * 5000  # deeper than Python's json can even write
    body = '{"points": [{"id": 1, "vector": [1, 0], "payload": ' + nested + "}]}"
    r = c.put("/api/collections/lim/points", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"]
    r = c.post("/api/collections", json={"name": "huge", "dim": 70_000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "dim"
    before = c.post("/api/collections/lim/points/count", json={}).json()["count"]
    r = c.put("/api/collections/lim/points", json={"points": [{"id": i, "vector": [1, 0]} for i in range(100_001)]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "points"
    assert "at most 100000 items" in r.json()["error"]["message"]
    assert c.post("/api/collections/lim/points/count", json={}).json()["count"] == before


QUERY = "/api/plugins/brainml/invoke/brainml.query"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("post", QUERY, {"collection": "x", "query": "q", "top_k": True}, "top_k"),
        ("post", QUERY, {"collection": "x", "query": "q", "top_k": "5"}, "top_k"),
        ("post", QUERY, {"collection": "x", "query": "q", "rerank": "yes"}, "rerank"),
        ("post", "/admin/keys", {"name": "k", "expires_in_days": True}, "expires_in_days"),
        ("post", "/admin/keys", {"name": "k", "rate_limit_per_min": "60"}, "rate_limit_per_min"),
        ("post", "/api/collections", {"name": "strict", "dim": True}, "dim"),
        ("post", "/api/collections/lim/query", {"vector": [1, 0], "k": True}, "k"),
        ("post", "/api/collections/lim/query", {"vector": [1, 0], "with_text": "true"}, "with_text"),
        ("post", "/api/jobs", {"notebook": "jobs/x.ipynb", "retries": 1.5}, "retries"),
        ("post", "/api/collections", {"name": "strict", "dim": 4.5}, "dim"),
    ],
)  # fmt: skip
def test_json_types_are_not_coerced(gw: Gateway, method: str, path: str, body: dict[str, Any], field: str) -> None:
    """JSON Schema's types, as the OpenAPI document states them: `true` is not the number 1 and `"5"` is not 5
    (pydantic's lax mode reads both), for the gateway's own routes and every capability's input alike."""
    r = getattr(gw.client(), method)(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].split(".")[-1] == field, r.json()
    assert gw.client().get("/api/collections/strict").status_code == 404  # nothing was created on the way


def test_whole_numbers_written_with_a_fraction_are_integers(gw: Gateway) -> None:
    """JSON Schema's `integer` (the dialect of the OpenAPI 3.1 document) is any number without a fraction: 4.0 is
    the integer 4, on the gateway's own routes and in a capability's input alike, while 4.5 stays a 422."""
    c = gw.client()
    r = c.post("/api/collections", json={"name": "whole", "dim": 4.0})
    assert r.status_code == 201, r.text
    assert c.get("/api/collections/whole").json()["dim"] == 4
    r = c.post("/api/plugins/apikeys/invoke/apikeys.audit", json={"limit": 2.0})
    assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text
    r = c.post("/api/plugins/apikeys/invoke/apikeys.audit", json={"limit": 2.5})
    assert r.status_code == 422 and r.json()["error"]["field"].endswith("limit")


def test_numbers_past_a_bigint_are_refused_not_a_500(gw: Gateway) -> None:
    """Found by the stateful fuzz: a scroll offset (or a map seed) past DuckDB's BIGINT was bound as is and the
    cast failed inside DuckDB (a 500). The schema states the range, and the route refuses it naming the field."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "big", "dim": 2}).status_code == 201
    for path, body, field in (
        ("/api/collections/big/points/scroll", {"offset": 2**70}, "offset"),
        ("/api/collections/big/points/scroll", {"offset": 2.5e20}, "offset"),
        ("/api/collections/big/map", {"seed": -(2**64)}, "seed"),
    ):
        r = c.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"]["field"].split(".")[-1] == field, r.text
    r = c.post("/api/collections/big/points/scroll", json={"offset": 2**63 - 1})
    assert r.status_code == 200 and r.json()["points"] == []


def test_the_store_refuses_an_offset_or_seed_it_cannot_bind(store: Any) -> None:
    from bkg_kernel.store import projection

    coll = store.create_collection("big", dim=2)
    with pytest.raises(InvalidInput) as exc:
        coll.scroll(offset=2**63)
    assert exc.value.field == "offset"
    with pytest.raises(InvalidInput) as exc:
        projection.sample(coll, 10, seed=2**63)
    assert exc.value.field == "seed"


def test_index_parameters_out_of_range_are_refused_when_the_collection_is_made(gw: Gateway) -> None:
    """Found by the stateful fuzz: an hnsw collection made with `ef_search` past a C int was accepted, and every
    later use of it (a snapshot, a query) was a 500 from FAISS. Each parameter's range is in the schema and
    checked when the collection is created."""
    c = gw.client()
    for params, field in (({"ef_search": 2**40}, "ef_search"), ({"ef_search": 5000}, "ef_search"), ({"m": 1}, "m")):
        r = c.post("/api/collections", json={"name": "hnswbad", "dim": 2, "index": "hnsw", "params": params})
        assert r.status_code == 422 and r.json()["error"]["field"] == f"params.{field}", r.text
    assert c.get("/api/collections/hnswbad").status_code == 404
    doc = c.get("/openapi.json").json()["components"]["schemas"]["NewCollection"]
    assert {"minimum": 1, "maximum": 4096} in [
        rule["then"]["properties"]["params"].get("properties", {}).get("ef_search") for rule in doc["allOf"]
    ]
    r = c.post("/api/collections", json={"name": "hnswok", "dim": 2, "index": "hnsw", "params": {"ef_search": 4096}})
    assert r.status_code == 201 and c.post("/api/collections/hnswok/snapshots").status_code in (200, 201)


def test_a_lone_surrogate_is_refused_naming_its_field(gw: Gateway) -> None:
    """JSON can carry "\\ud800"; UTF-8 cannot store it: an upsert holding one is a 422 naming the point's field (it
    was a 500 from the column writer), and the points already stored stay."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "surrogates", "dim": 2}).status_code == 201
    assert c.put("/api/collections/surrogates/points", json={"points": [{"id": 1, "vector": [1, 0]}]}).is_success
    for point, field in (
        ({"id": 2, "vector": [0, 1], "payload": {"a": "\udc00"}}, "points[1].payload"),
        ({"id": 2, "vector": [0, 1], "text": "x \ud800 y"}, "points[1].text"),
        ({"id": "\ud800", "vector": [0, 1]}, "points[1].id"),
    ):
        body = json.dumps({"points": [{"id": 3, "vector": [1, 1]}, point]})  # ASCII: the surrogate as \\ud800
        r = c.put("/api/collections/surrogates/points", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert "surrogate" in r.json()["error"]["message"]
    assert c.post("/api/collections/surrogates/points/count", json={}).json()["count"] == 1


def test_a_filter_number_past_a_double_is_the_callers_422(gw: Gateway) -> None:
    """Filters compare numbers as doubles: a 401-digit integer could not become one (OverflowError, a 500)."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "huge_filter", "dim": 2}).status_code == 201
    huge = 10**400
    for flt in ({"a": {"$gt": huge}}, {"a": huge}, {"a": {"$in": [1, huge]}}):
        body = json.dumps({"filter": flt})  # the standard encoder writes the integer out in full
        r = c.post(
            "/api/collections/huge_filter/points/count", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"]["field"].startswith("filter.a"), r.text
        assert "too large" in r.json()["error"]["message"]


def test_a_payload_integer_past_64_bits_is_kept_and_found(gw: Gateway) -> None:
    """The store keeps a payload integer of any size as it came; search answers encoded by orjson (64 bits at most)
    had turned every search that found such a point into a 500."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "bigint_payload", "dim": 2}).status_code == 201
    body = json.dumps({"points": [{"id": 1, "vector": [1, 0], "text": "beta", "payload": {"n": 2**64}}]})
    assert c.put(
        "/api/collections/bigint_payload/points", content=body, headers={"Content-Type": "application/json"}
    ).is_success
    for q in ({"vector": [1, 0]}, {"text": "beta", "mode": "text", "with_text": True}):
        r = c.post("/api/collections/bigint_payload/query", json=q)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["results"][0]["payload"]["n"] == 2**64


def test_odd_inputs_of_less_travelled_routes_are_4xx(gw: Gateway) -> None:
    """Each was a 500 (found by a review that sent them to a real gateway)."""
    c = gw.client()
    checks: list[tuple[httpx.Response, int, str]] = []
    (gw.data_dir / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(), gw.data_dir / "notebooks" / "plain.ipynb")
    for host in ("a..b", "a" * 64 + ".example.com"):  # names IDNA cannot encode (UnicodeError)
        r = c.post("/api/jobs/schedules", json={"notebook": "plain.ipynb", "cron": "0 3 * * *",
                                                "webhook_url": f"http://{host}/hook"})  # fmt: skip
        checks.append((r, 422, "webhook_url"))
    for when in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):  # no UTC time (OverflowError)
        checks.append((c.post("/admin/keys", json={"name": "k", "expires_at": when}), 422, "expires_at"))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = c.post(
        "/v1/chat/completions", json={**chat, "tools": tools, "tool_choice": {"type": "function", "function": "f"}}
    )
    checks.append((r, 422, "tool_choice"))
    checks.append((c.post("/v1/chat/completions", json={**chat, "tool_choice": "sometimes"}), 422, "tool_choice"))
    r = c.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_schema", "json_schema": "x"}})
    checks.append((r, 422, "response_format"))
    checks.append((c.post("/api/plugins/rustyface/invoke/faces.detect", json={"image": "data:"}), 400, "image"))
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    r = c.post("/api/faces/detect", files={"image": ("a.png", png, "image/png")}, data={"min_score": "1" * 5000})
    checks.append((r, 422, "min_score"))
    big = "[" + ",".join(["1"] * 40_000) + "]"  # an option past 64 KiB: refused before it is parsed on the loop
    r = c.post("/api/faces/detect", files={"image": ("a.png", png, "image/png")}, data={"min_score": big})
    checks.append((r, 422, "min_score"))
    for r, status, field in checks:
        assert r.status_code == status and field in (r.json()["error"].get("field") or ""), (r.request.url, r.text)


def test_sysinfo_takes_only_a_folder_for_its_disk(gw: Gateway) -> None:
    c = gw.client()
    for path in ("/no/such/dir", "a\x00b"):
        r = c.put("/api/plugins/sysinfo/config", json={"config": {"disk_path": path}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "config.disk_path", r.text
    assert c.post("/api/plugins/sysinfo/invoke/sysinfo.facts", json={}).status_code == 200


def test_repoagent_writes_refuse_impossible_paths_and_leave_others_collections_alone(gw: Gateway) -> None:
    c = gw.client()

    def invoke(cap: str, body: dict[str, Any]) -> httpx.Response:
        return c.post(f"/api/plugins/repoagent/invoke/{cap}", json=body)

    (gw.data_dir / "repos" / "odd").mkdir(parents=True)
    (gw.data_dir / "repos" / "odd" / "README.md").write_text("hello\n")
    assert invoke("repo.workspace", {"action": "add", "name": "odd", "path": "odd"}).status_code == 200
    for path in ("README.md/notes.txt", "/".join(["d"] * 1500) + "/f.txt"):  # FileExistsError, RecursionError
        r = invoke("repo.file.write", {"workspace": "odd", "path": path, "content": "hi"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "path", r.text
        assert str(gw.data_dir) not in r.text
    assert (gw.data_dir / "repos" / "odd" / "README.md").read_text() == "hello\n"
    # a collection named like a workspace's index is someone's own: never taken over, never dropped
    assert c.post("/api/collections", json={"name": "repo-mine", "dim": 2}).status_code == 201
    assert c.put("/api/collections/repo-mine/points", json={"points": [{"id": 1, "vector": [1, 0]}]}).is_success
    (gw.data_dir / "repos" / "mine").mkdir()
    r = invoke("repo.workspace", {"action": "add", "name": "mine", "path": "mine"})
    assert r.status_code == 409 and "repo-mine" in r.json()["error"]["message"], r.text
    assert c.post("/api/collections/repo-mine/points/count", json={}).json()["count"] == 1


def test_a_capability_not_made_for_big_inputs_refuses_one_before_checking_it(gw: Gateway) -> None:
    """Checking a plugin call's input holds the interpreter as long as it takes (a viewer's 25 MB brainml.query
    held the gateway a second): past 1 MiB only the capabilities made for big inputs (documents to index,
    images, batches) take one; the others answer 413 from the header, before the body is read."""
    c = gw.client()
    body = json.dumps({"collection": "x", "query": "q", "junk": "x" * (2 * 2**20)})
    r = c.post("/api/plugins/brainml/invoke/brainml.query", content=body, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text
    assert "brainml.query" in r.json()["error"]["message"] and "big_input" in r.json()["error"]["message"]
    caps = {c["id"]: c for c in gw.client().get("/api/plugins/brainml").json()["capabilities"]}
    assert "brainml.index" in caps and "brainml.query" in caps
    body = json.dumps({"collection": "big_input_ok", "documents": "x" * (2 * 2**20)})  # read, checked: not a list
    r = c.post("/api/plugins/brainml/invoke/brainml.index", content=body, headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("input.documents"), r.text
