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


def refused(path: str) -> int:
    """The status of an input refused: 422, or OpenAI's 400 on the OpenAI-compatible `/v1` routes."""
    return 400 if path.startswith("/v1/") else 422


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
        assert r.status_code == refused(path), (path, r.text)
        err = r.json()["error"]  # refused as read: pydantic's own words would end "after validation, not ..."
        assert err["field"] == field and err["message"].endswith(f"at most {cap} items"), (path, err)
    r = c.post("/v1/embeddings", content=b'{"input": [1, 2', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"  # /v1: OpenAI's 400 for a refused input
    r = c.post("/v1/embeddings", json=[1] * 100_000)  # not an object: refused before it is parsed
    said = r.json()["error"]["message"]
    assert r.status_code == 400 and "must be a JSON object: this body starts with '[', as an array would" in said
    r = c.post("/v1/embeddings", json={"input": "hi", "extra": [1] * 5000})  # an array its model does not name
    assert r.status_code == 400 and r.json()["error"]["field"] == "extra"

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
        assert c.post(path, json=body).status_code == refused(path), path  # the same body from one who may: refused
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
    checks.append((r, 400, "tool_choice"))  # /v1: OpenAI's 400 for a refused input
    checks.append((c.post("/v1/chat/completions", json={**chat, "tool_choice": "sometimes"}), 400, "tool_choice"))
    r = c.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_schema", "json_schema": "x"}})
    checks.append((r, 400, "response_format"))
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


def _raw(c: httpx.Client, method: str, path: str, body: str) -> httpx.Response:
    """`body` sent as written: `json.dumps` keeps a lone surrogate as the escape `\\ud800`, as a hostile client
    would send it."""
    return c.request(method, path, content=body.encode(), headers=JSON)


def test_a_lone_surrogate_anywhere_in_a_body_is_a_422_never_a_500(gw: Gateway) -> None:
    """Found by a review: outside the upsert, a "\\ud800" reached DuckDB's binding or the error renderer (a 500)
    from filters, ids, a plugin's input, a schedule's parameters, a key's name. Every body is now checked where it
    is read (FastAPI's routes as the body arrives, the big-body routes and the call port as they parse); a pair (an
    emoji as `json.dumps` escapes it) is text like any other."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "lone", "dim": 2}).status_code == 201
    assert c.put("/api/collections/lone/points", json={"points": [{"id": 1, "vector": [1, 0]}]}).is_success
    lone = "\ud800"
    for method, path, body in (
        ("POST", "/api/collections/lone/points/count", {"filter": {"a": lone}}),
        ("POST", "/api/collections/lone/points/count", {"filter": {lone: 1}}),
        ("POST", "/api/collections/lone/points/get", {"ids": [lone]}),
        ("POST", "/api/collections/lone/points/delete", {"ids": [lone]}),
        ("POST", "/api/collections/lone/query", {"vector": [1, 0], "filter": {"a": {"$in": [lone]}}}),
        ("POST", "/api/plugins/sysinfo/invoke/sysinfo.facts", {"x": "\udc00"}),
        ("POST", "/admin/keys", {"name": "k" + lone}),
        ("POST", "/api/jobs/schedules", {"notebook": "n.ipynb", "cron": "0 3 * * *", "parameters": {"folder": lone}}),
    ):
        r = _raw(c, method, path, json.dumps(body))
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["field"] == "body" and "surrogate" in r.json()["error"]["message"], r.text
    r = _raw(c, "POST", "/api/collections/lone/points/count", json.dumps({"filter": {"a": "\U0001f600"}}))
    assert r.status_code == 200 and r.json()["count"] == 0, r.text
    assert c.post("/api/collections/lone/points/count", json={}).json()["count"] == 1


def test_a_filter_stays_small_enough_to_prepare_and_never_deletes_everything_by_accident(gw: Gateway) -> None:
    """Found by a review: the value cap was checked only between filter objects (20 fields of 10,000-value $in
    lists made 24 MB of SQL that DuckDB prepared holding the GIL for seconds), and `{"$and": [{}]}` slipped past
    the empty-filter guard of a delete (every point gone). An $in list is one bound list now, however long."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "bigfilter", "dim": 2}).status_code == 201
    points = [{"id": i, "vector": [1, i], "payload": {"k": i, "s": f"v{i}", "b": i % 2 == 0}} for i in range(50)]
    assert c.put("/api/collections/bigfilter/points", json={"points": points}).is_success

    def count(flt: dict[str, Any]) -> httpx.Response:
        return c.post("/api/collections/bigfilter/points/count", json={"filter": flt})

    assert count({"k": {"$in": list(range(0, 10_000, 2))}}).json()["count"] == 25
    assert count({"k": {"$in": [1, "v2", True, None, 3.0]}}).json()["count"] == 2  # the JSON types stay apart
    assert count({"s": {"$nin": ["v1", "v2"]}, "b": {"$in": [True]}}).json()["count"] == 24
    many = {f"k{i}": {"$in": [None] * 1000} for i in range(20)}
    r = count(many)
    assert r.status_code == 422 and "10,000 values" in r.json()["error"]["message"], r.text
    r = count({"$or": [{"k": i} for i in range(1001)]})
    assert r.status_code == 422 and "1,000 conditions" in r.json()["error"]["message"], r.text
    for flt in ({"$and": [{}]}, {"$or": [{"k": 1}, {}]}):
        r = c.post("/api/collections/bigfilter/points/delete", json={"filter": flt})
        assert r.status_code == 422 and "empty filter" in r.json()["error"]["message"], r.text
    r = c.post("/api/collections/bigfilter/points/delete", json={"filter": {"k": {"$nin": []}}})
    assert r.status_code == 422 and "tests no field" in r.json()["error"]["message"], r.text
    assert count({}).json()["count"] == 50
    assert c.post("/api/collections/bigfilter/points/delete", json={"filter": {"k": {"$in": [1, 2]}}}).is_success
    assert count({}).json()["count"] == 48


def test_what_the_store_could_not_use_later_is_refused_when_it_comes(gw: Gateway) -> None:
    """Found by a review, each once accepted and then failing every later use: an IVF collection with more lists
    than the vectors it trains on (every upsert from then on a 500), a payload nested past what a read can write
    back (the collection could no longer be scrolled), a vector whose length passes float32's range (cosine scored
    it 0, L2 lost it), a name with a trailing newline (no REST path could reach or drop it)."""
    c = gw.client()
    r = c.post("/api/collections", json={"name": "ivfbad", "dim": 3, "index": "ivf",
                                        "params": {"nlist": 50, "ivf_train_min": 5}})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["field"] == "params.nlist", r.text
    body = {"name": "ivfok", "dim": 3, "index": "ivf", "params": {"nlist": 4, "ivf_train_min": 8}}
    assert c.post("/api/collections", json=body).status_code == 201
    pts = [{"id": i, "vector": [1, i, 2], "text": f"fruit number {i}"} for i in range(12)]
    assert c.put("/api/collections/ivfok/points", json={"points": pts}).is_success
    r = c.post("/api/collections/ivfok/query", json={"text": "fruit", "mode": "text", "k": 20})
    assert r.status_code == 200 and len(r.json()["results"]) == 12, r.text

    assert c.post("/api/collections", json={"name": "deep", "dim": 2}).status_code == 201
    nested: dict[str, Any] = {"x": 1}
    for _ in range(99):
        nested = {"x": nested}
    r = c.put("/api/collections/deep/points", json={"points": [{"id": 1, "vector": [1, 0], "payload": nested}]})
    assert r.status_code == 200, r.text  # 100 levels deep is still taken
    r = c.put("/api/collections/deep/points", json={"points": [{"id": 2, "vector": [1, 0], "payload": {"x": nested}}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "points[0].payload", r.text
    r = c.post("/api/collections/deep/points/scroll", json={"limit": 10})
    assert r.status_code == 200 and [p["id"] for p in r.json()["points"]] == [1], r.text

    r = c.put("/api/collections/deep/points", json={"points": [{"id": 3, "vector": [3e38, 3e38]}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "points[0].vector", r.text
    assert c.post("/api/collections/deep/points/count", json={}).json()["count"] == 1

    snap = c.post("/api/collections/deep/snapshots").json()["id"]
    r = c.post(f"/api/collections/deep/snapshots/{snap}/restore", json={"into": "evil\n"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "into", r.text
    assert c.post("/api/collections", json={"name": "evil\n", "dim": 2}).status_code == 422
    assert not [x for x in c.get("/api/collections").json()["collections"] if x["name"].startswith("evil")]


def test_a_body_that_cannot_be_used_is_refused_before_it_is_parsed(gw: Gateway) -> None:
    """Found by a review: a 30 MB body for a capability that does not exist was parsed (651 ms holding the GIL, every
    other request waiting) before its 404; an upsert of anything but an object of point objects too. Each body here
    is cut short: an answer about its JSON would mean it was parsed."""
    c = gw.client()
    junk = "[" + ",".join(["0"] * 200_000) + "]"
    r = _raw(c, "POST", "/api/plugins/sysinfo/invoke/no.such.capability", '{"x": [' + junk + ", ")
    assert r.status_code == 404 and r.json()["error"]["field"] == "capability", r.text
    assert c.post("/api/collections", json={"name": "shape", "dim": 2}).status_code == 201
    r = _raw(c, "PUT", "/api/collections/shape/points", junk[:-1])
    assert r.status_code == 422 and "must be a JSON object" in r.json()["error"]["message"], r.text
    r = _raw(c, "PUT", "/api/collections/shape/points", '{"points": [' + junk[:-1])
    assert r.status_code == 422 and r.json()["error"]["field"] == "points.0", r.text
    assert c.post("/api/collections/shape/points/count", json={}).json()["count"] == 0


def test_one_request_cannot_ask_for_unbounded_work(gw: Gateway) -> None:
    """Found by a review, each one request's worth of gigabytes or hours: a chunking that steps a character at a
    time (a point per character, all held before the first is stored), a rerank of 1,000 hits (every sentence of
    each embedded), a rerank query copied into each of 1,000 pairs, stop strings checked prefix by prefix at every
    token, and a model URL whose file name no file system takes (a 500)."""
    c = gw.client()

    def call(cap: str, body: dict[str, Any]) -> httpx.Response:
        return c.post(f"/api/plugins/brainml/invoke/{cap}", json=body)

    docs = [{"id": "long", "text": "word " * 250_000}]  # a chunk every ~5 characters: ~250,000
    r = call("brainml.index", {"collection": "stepwise", "documents": docs, "chunking": {"size": 50, "overlap": 49}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "chunking", r.text
    assert c.get("/api/collections/stepwise").status_code == 404  # refused before anything was made
    r = call("brainml.query", {"collection": "stepwise", "query": "word", "top_k": 1000, "rerank": True})
    assert r.status_code == 422 and r.json()["error"]["field"] == "top_k", r.text
    r = c.post("/api/rerank", json={"model": "candle:x", "query": "q" * 20_000, "documents": ["d"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query", r.text
    ask = [{"role": "user", "content": "hi"}]
    for stop in (["s"] * 17, "x" * 600):
        r = c.post("/v1/chat/completions", json={"messages": ask, "stop": stop, "max_tokens": 1})
        assert r.status_code == 400 and "stop" in r.json()["error"]["message"], r.text
    r = c.post("/api/models", json={"url": "https://models.example/" + "a" * 300 + ".gguf"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "url", r.text
