"""The OpenAPI schema is valid, and a bounded schemathesis fuzz run finds no 5xx and no traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from gateway_harness import ADMIN_KEY
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz  # noqa: E402

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_openapi_schema_is_valid(gw: Any) -> None:
    spec = httpx.get(gw.url + "/openapi.json").json()
    schemathesis.openapi.from_dict(spec).validate()  # against the OpenAPI meta-schema schemathesis ships
    assert spec["info"]["title"] == "bkg gateway"
    assert "/api/collections/{name}/query" in spec["paths"] and "/admin/keys/{key_id}/rotate" in spec["paths"]
    # every plugin capability is an operation of its own, with its input and output schemas
    caps = [(p["id"], c) for p in httpx.get(gw.url + "/api/plugins", headers=AUTH).json()["plugins"]
            for c in httpx.get(gw.url + f"/api/plugins/{p['id']}", headers=AUTH).json()["capabilities"]]  # fmt: skip
    assert len(caps) > 20
    schemas = spec["components"]["schemas"]
    for pid, cap in caps:
        op = spec["paths"][f"/api/plugins/{pid}/invoke/{cap['id']}"]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        assert set(schemas[body].get("properties", {})) == set(cap["input_schema"].get("properties", {})), cap["id"]
        assert ("202" if cap["job"] else "200") in op["responses"] and "422" in op["responses"]
    query = schemas["brainml__brainml_query__input"]["properties"]
    assert query["top_k"]["maximum"] == 1000 and query["mode"]["enum"] == ["vector", "text", "hybrid"]
    # an empty prompt or text to embed is refused (OpenAI's 400): the schema says so
    for cap, field in (("llm.complete", "prompt"), ("llm.embed", "input")):
        variants = schemas[f"llmserver__{cap.replace('.', '_')}__input"]["properties"][field]["anyOf"]
        assert {v.get("minLength") or v["items"].get("minLength") for v in variants} == {1}, variants
    # a tool is OpenAI's {"type": "function", "function": {"name": ...}}: the schema states the shape it checks
    tool = schemas["llmserver__llm_chat__input"]["properties"]["tools"]["items"]
    assert tool["required"] == ["function"] and tool["properties"]["function"]["required"] == ["name"]
    r = httpx.post(
        gw.url + "/api/plugins/llmserver/invoke/llm.chat",
        json={"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": {"name": 5}}]},
        headers=AUTH,
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.tools", r.text


def test_fuzz_finds_no_server_errors(gw: Any) -> None:
    fuzz.warm_embedder(gw.url, AUTH)  # as bench/fuzz.py does: cases are bounded to 30 s, a cold model load is not
    schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
    failures: list[str] = []
    calls: list[int] = []
    # Lifecycle routes would stop the plugins the rest of the run relies on; LLM generation, model loading,
    # training and the sleep/survey probes run for seconds on each valid case (bench/fuzz.py's SLOW). All have
    # their own tests, bad input included; every other plugin capability is fuzzed through its own operation.
    for op in schema.get_all_operations():
        operation = op.ok()
        if any(s in operation.path for s in fuzz.SLOW):
            continue

        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            r = case.call(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
            calls.append(r.status_code)
            if r.status_code >= 500 or fuzz.leaks_traceback(r.text):
                failures.append(f"{case.method} {case.formatted_path} -> {r.status_code}: {r.text[:200]}")
            if r.status_code >= 400:
                assert set(r.json()) == {"error"}, r.text

        run()
    assert not failures, "\n".join(failures[:10])
    assert len(calls) >= 200 and any(c < 300 for c in calls) and any(c == 422 for c in calls)


def _resolve(expr: str, path: dict[str, str], body: Any) -> str:
    """An OpenAPI runtime expression ($request.path.x or $response.body#/json/pointer) against one exchange."""
    if expr.startswith("$request.path."):
        return path[expr.removeprefix("$request.path.")]
    assert expr.startswith("$response.body#/"), expr
    for part in expr.split("#/", 1)[1].split("/"):
        body = body[int(part)] if isinstance(body, list) else body[part]
    return str(body)


def test_links_lead_from_a_created_resource_to_it(gw: Any) -> None:
    """Every link the document declares for these producers, followed by hand: the ids it names exist."""
    spec = httpx.get(gw.url + "/openapi.json").json()
    by_id = {op["operationId"]: (m, p) for p, item in spec["paths"].items() for m, op in item.items()}
    c = gw.client()
    created = c.post("/api/collections", json={"name": "linked", "dim": 3})
    c.put("/api/collections/linked/points", json={"points": [{"id": "a", "vector": [1, 0, 0]}]}).raise_for_status()
    exchanges = [
        ("post", "/api/collections/{name}/snapshots", {"name": "linked"}, None),
        ("post", "/admin/roles", {}, {"name": "linkrole", "scopes": ["plugins:read"]}),
        ("post", "/admin/users", {}, {"username": "linkuser", "role": "viewer", "password": "a long password 1"}),
        ("post", "/admin/keys", {}, {"name": "linkkey", "scopes": ["plugins:read"]}),
        ("get", "/api/plugins", {}, None),
        ("post", "/api/collections", {}, created),  # last: its links end with the collection's DELETE
    ]
    followed = 0
    for method, template, params, body in exchanges:
        r = body if isinstance(body, httpx.Response) else c.request(method, template.format(**params), json=body)
        assert r.status_code < 300, r.text
        links = spec["paths"][template][method]["responses"][str(r.status_code)]["links"]
        # deletes last, so the other links still find the resource
        for link in sorted(links.values(), key=lambda link: by_id[link["operationId"]][0] == "delete"):
            m, target = by_id[link["operationId"]]
            values = {k: _resolve(v, params, r.json()) for k, v in link["parameters"].items()}
            answer = c.request(m, target.format(**values), json={} if m in ("post", "put", "patch") else None)
            assert answer.status_code != 404, (link["operationId"], answer.text)  # the id named a real resource
            followed += 1
    assert followed >= 25
    assert c.get("/api/collections/linked").status_code == 404  # the link to DELETE found it and deleted it


def test_stateful_fuzz_follows_links_without_server_errors(gw: Any) -> None:
    """Schemathesis' state machine: sequences of calls chained by the document's links (bounded here;
    `python bench/fuzz.py` runs more)."""
    seen, failures = fuzz.run_stateful(gw.url, AUTH, scenarios=40, linked_2xx=5, most=400)
    assert not failures, "\n".join(failures[:10])
    assert seen["scenarios"] >= 40 and seen["calls"] >= 200
    assert seen["linked 2xx"] >= 5, seen  # chains reached resources an earlier call created


def test_admin_scopes_in_the_schema_are_the_scopes() -> None:
    import typing

    from bkg_kernel.auth.principal import SCOPES
    from bkg_kernel.gateway.routes.admin import Scope

    assert set(typing.get_args(Scope)) == set(SCOPES)  # a new scope must be added to the schema too


def test_the_fuzzers_traceback_check_tells_a_leak_from_echoed_input() -> None:
    import json
    import traceback

    try:
        {}["missing"]
    except KeyError:
        leaked = traceback.format_exc()
    assert fuzz.leaks_traceback(leaked) and fuzz.leaks_traceback(json.dumps({"detail": leaked}))
    # a fuzzed path id that happens to be the word, echoed in a 404's message (seen in CI: /api/jobs/Traceback/retry)
    echoed = {"error": {"status": 404, "code": "not_found", "message": "no notebook run 'Traceback'"}}
    assert not fuzz.leaks_traceback(json.dumps(echoed))


def test_a_home_directory_that_does_not_exist_is_a_404_wherever_a_path_is_taken(gw: Any) -> None:
    # found by the stateful fuzzer: POST /api/models {"path": "~nobody.../x"} was a 500 (pathlib's RuntimeError)
    home = "~no-such-user-here/x"
    for path, body in (
        ("/api/models", {"path": home + ".gguf"}),
        ("/api/plugins/repoagent/invoke/repo.workspace", {"action": "add", "name": "nohome", "path": home}),
        ("/api/plugins/rustyface/invoke/faces.detect", {"image": "path:" + home + ".jpg"}),
    ):
        r = httpx.post(gw.url + path, json=body, headers=AUTH, timeout=120)
        assert r.status_code == 404 and "no home directory" in r.json()["error"]["message"], (path, r.text)
        assert r.json()["error"]["field"].split(".")[-1] in ("path", "image"), (path, r.text)
