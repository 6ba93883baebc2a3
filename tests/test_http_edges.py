"""The HTTP API at its edges, as a client author meets it: query parameters a route does not take, bodies that are
not JSON, wrong methods, trailing slashes, 401 and 429 headers, and times written in UTC whatever the machine's
zone. Found by a review; each of these answered in a way no client could act on, one of them by losing data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # a machine far from UTC: the store's own `now()` and column defaults must still write UTC
    g = start_gateway(tmp_path_factory.mktemp("edges") / "data", env={"TZ": "Asia/Tokyo"}, plugins=["apikeys"])
    yield g
    g.stop()


def test_a_query_parameter_a_route_does_not_take_is_refused_before_anything_happens(gw: Gateway) -> None:
    c = gw.client()
    assert c.post("/api/collections", json={"name": "docs", "dim": 2}).status_code == 201
    c.put("/api/collections/docs/points", json={"points": [{"id": 1, "vector": [1, 0]}]}).raise_for_status()
    snap = c.post("/api/collections/docs/snapshots").json()["id"]
    c.put("/api/collections/docs/points", json={"points": [{"id": i, "vector": [0, 1]} for i in range(2, 50)]})
    # `into` belongs in the body: as a query parameter it was dropped, and the snapshot restored over docs itself
    r = c.post(f"/api/collections/docs/snapshots/{snap}/restore", params={"into": "docs_copy"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.into", r.text
    assert "JSON body" in r.json()["error"]["message"]
    assert c.get("/api/collections/docs").json()["count"] == 49  # nothing restored over it
    assert c.get("/api/collections/docs_copy").status_code == 404
    r = c.post(f"/api/collections/docs/snapshots/{snap}/restore", json={"into": "docs_copy"})
    assert r.status_code == 200 and r.json()["count"] == 1
    r = c.get("/admin/audit", params={"limt": 5})  # a misspelt name is named, with what was meant
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.limt"
    assert "did you mean 'limit'" in r.json()["error"]["message"]
    assert c.get("/admin/audit", params={"limit": 5}).status_code == 200  # what a route takes still works
    assert c.get("/api/collections?1796521699736").status_code == 200  # JupyterLab's cache-buster
    assert c.get("/admin/audit", params={"_": "1796521699736"}).status_code == 200  # jQuery's


def test_bodies_that_are_not_json_objects_are_named_and_explained(gw: Gateway) -> None:
    c = gw.client()
    r = c.post("/auth/login", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    assert "not valid JSON at character 1" in r.json()["error"]["message"]
    r = c.post("/api/collections", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body" and "none was sent" in r.text
    r = c.post("/api/collections", content=b'{"name": "x", "dim": 2}')  # `requests.post(data=...)`: no type
    assert r.status_code == 415 and r.json()["error"]["field"] == "content-type"
    assert "application/json" in r.json()["error"]["message"]
    r = c.post("/api/collections", json=[1, 2])
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    assert c.get("/api/collections/x").status_code == 404  # none of them made anything
    # a misspelt field of a body is named with what was meant, as a query parameter's is (it said "Extra inputs
    # are not permitted"); a name like none of them lists what the body takes
    r = c.post("/admin/keys", json={"name": "k", "rate_limit": 5})
    err = r.json()["error"]
    assert (
        r.status_code == 422 and err["field"] == "rate_limit" and "did you mean 'rate_limit_per_min'" in err["message"]
    )
    r = c.post("/api/collections", json={"name": "y", "dim": 2, "zzz": 1})
    assert r.status_code == 422 and "it takes" in r.json()["error"]["message"] and "dim" in r.json()["error"]["message"]
    assert c.get("/api/collections/y").status_code == 404


def test_methods_slashes_and_authentication_answer_as_http_says(gw: Gateway) -> None:
    c = gw.client()
    r = c.delete("/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"  # RFC 9110: a 405 names what is allowed
    message = "this route does not take that method: DELETE /health (it takes GET, HEAD)"
    assert r.json()["error"]["message"] == message
    r = c.get("/health/")
    assert r.status_code == 404 and "no such route: GET /health/" in r.json()["error"]["message"]
    r = c.delete("/api/collections/docs/")  # not a bare 307 sent before any check
    assert r.status_code == 404 and c.get("/api/collections/docs").status_code == 200
    anonymous = httpx.get(f"{gw.url}/auth/me")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Bearer realm="bkg"'
    wrong = httpx.get(f"{gw.url}/auth/me", headers={"Authorization": "Bearer bkg_nope"})
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]


def test_a_rate_limited_key_is_told_how_long_to_wait_in_the_body_too(gw: Gateway) -> None:
    made = gw.client().post("/admin/keys", json={"name": "one a minute", "rate_limit_per_min": 1}).json()
    c = gw.client(made["key"])
    assert c.get("/auth/me").status_code == 200
    r = c.get("/auth/me")
    assert r.status_code == 429
    header, body = int(r.headers["retry-after"]), r.json()["error"]["retry_after"]
    assert header >= 1 and abs(header - body) <= 1, (header, body)  # over HTTP as over the call port

    import bkg_kernel
    from bkg_kernel.errors import TooManyRequests

    wb = bkg_kernel.connect(gw.url, api_key=made["key"])
    with pytest.raises(TooManyRequests) as err:
        wb.me()
    assert err.value.retry_after > 5  # the minute's wait, not the 1 s fallback


def test_times_are_written_in_utc_whatever_the_machine_s_zone(gw: Gateway, tmp_path: Path) -> None:
    c = gw.client()
    before = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=5)
    user = c.post("/admin/users", json={"username": "tz-check", "role": "viewer"}).json()
    made = datetime.fromisoformat(user["created_at"].rstrip("Z"))
    assert before <= made <= before + timedelta(minutes=15), user  # Tokyo's wall time would be 9 hours ahead
    assert c.post("/api/collections", json={"name": "tz", "dim": 2}).status_code == 201
    info = wait_for(lambda: c.get("/api/collections/tz").json())
    created = datetime.fromisoformat(str(info["created_at"]).rstrip("Z"))
    assert before <= created.replace(tzinfo=None) <= before + timedelta(minutes=15), info


def test_the_openapi_document_describes_the_errors_the_gateway_sends(gw: Gateway) -> None:
    doc = gw.client().get("/openapi.json").json()
    assert "HTTPValidationError" not in str(doc)  # FastAPI's {"detail": [...]}, which the gateway never sends
    usage = doc["paths"]["/admin/usage"]["get"]["responses"]
    assert usage["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "401" in usage and "404" in doc["paths"]["/api/collections/{name}"]["get"]["responses"]


def test_an_answer_of_vectors_is_held_to_a_size_and_the_client_asks_in_pages(gw: Gateway) -> None:
    """Found by a review: 100,000 ids with their vectors took ~4 GB in the gateway for anyone who may read."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "wide", "dim": 4096}).status_code == 201
    points = [{"id": i, "vector": [float(i + 1)] * 4096} for i in (7, 900, 1400)]
    assert c.put("/api/collections/wide/points", json={"points": points}).status_code == 200
    ids = list(range(1500))
    r = c.post("/api/collections/wide/points/get", json={"ids": ids})
    assert r.status_code == 422 and r.json()["error"]["field"] == "ids" and "488 points" in r.text, r.text
    r = c.post("/api/collections/wide/points/scroll", json={"limit": 1000, "with_vectors": True})
    assert r.status_code == 422 and r.json()["error"]["field"] == "limit"
    assert c.post("/api/collections/wide/points/get", json={"ids": ids, "with_vectors": False}).status_code == 200

    import bkg_kernel

    wide = bkg_kernel.connect(gw.url, api_key=c.headers["authorization"].split()[1]).collection("wide")
    got = wide.get(ids)
    assert [p.id for p in got] == [7, 900, 1400] and got[2].vector[0] == 1401.0
    assert [p.id for p in wide.get([900, 7, 900, *range(600)])] == [900, 7]  # 600 ids: in pages too; once each
    # the plugin calls served beside the router hold to the same rule
    r = c.post("/api/plugins/apikeys/invoke/keys.list?page=2", json={})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.page", r.text


def test_one_user_holds_a_bounded_number_of_live_sockets(gw: Gateway) -> None:
    """Found by a review: nothing bounded the live sockets, and each event is encoded once per socket on the loop."""
    from contextlib import ExitStack

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    c = gw.client()
    watcher = c.post("/admin/users", json={"username": "watcher", "role": "viewer"}).json()
    made = c.post("/admin/keys", json={"name": "sockets", "user_id": watcher["id"]}).json()["key"]
    url = gw.url.replace("http", "ws") + f"/ws?token={made}"
    with ExitStack() as open_:
        for _ in range(32):
            ws = open_.enter_context(ws_connect(url))
            assert '"bootstrap"' in str(ws.recv(timeout=10))
        with ws_connect(url) as one_more, pytest.raises(ConnectionClosed) as closed:
            one_more.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
        assert "at most 32" in closed.value.rcvd.reason
        with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={ADMIN_KEY}") as other:  # another user's: fine
            assert '"bootstrap"' in str(other.recv(timeout=10))
    with ws_connect(url) as again:  # closed ones no longer count
        assert '"bootstrap"' in str(again.recv(timeout=10))


def test_nan_and_infinity_are_refused_naming_the_field(gw: Gateway) -> None:
    """Found by a review: `json.loads` takes `NaN` and `Infinity`, which JSON has not. In a plugin's input they
    became null on the way to validation (an optional field then took its default without a word); in a query's
    `rrf_k` every hybrid score was 0 (a ranking in no order); in a plugin setting with no upper bound the value was
    stored, shown back as null, and every later save of the config form failed."""
    c = gw.client()
    json_type = {"content-type": "application/json"}
    r = c.post("/api/plugins/apikeys/invoke/apikeys.audit", content=b'{"limit": 5, "action": NaN}', headers=json_type)
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.action", r.text
    assert "not a JSON number" in r.json()["error"]["message"]
    r = c.post(
        "/api/plugins/apikeys/invoke/apikeys.audit",
        content=b'{"limit": 5, "action": "NaN and Infinity"}',
        headers=json_type,
    )  # fmt: skip  (the words themselves are fine)
    assert r.status_code == 200, r.text
    assert c.post("/api/collections", json={"name": "finite", "dim": 2}).status_code == 201
    c.put("/api/collections/finite/points", json={"points": [{"id": 1, "vector": [1, 0], "text": "x y"}]})
    body = b'{"vector": [1, 0], "text": "x", "mode": "hybrid", "rrf_k": Infinity}'
    r = c.post("/api/collections/finite/query", content=body, headers=json_type)
    assert r.status_code == 422 and r.json()["error"]["field"] == "rrf_k", r.text


def test_settings_and_sampling_take_finite_numbers_only_and_old_infinities_fall_back() -> None:
    from pydantic import ValidationError

    from bkg_kernel.plugins.candle.plugin import CandleSettings
    from bkg_kernel.plugins.llmserver.plugin import LLMSettings
    from bkg_kernel.plugins.llmserver.schemas import ChatRequest
    from bkg_kernel.runtime.host import _finite_config

    for model, data in [
        (CandleSettings, {"keep_alive_s": float("inf")}),
        (LLMSettings, {"keep_alive": float("inf")}),
        (ChatRequest, {"messages": [{"role": "user", "content": "hi"}], "repeat_penalty": float("inf")}),
    ]:
        with pytest.raises(ValidationError, match="finite"):
            model.model_validate(data)
    # a plugins.json written before: the infinite setting takes its default, the rest stays, the plugin starts
    stored = {"keep_alive_s": float("inf"), "max_queue": 7}
    assert CandleSettings.model_validate(_finite_config(CandleSettings, stored)).max_queue == 7
    assert _finite_config(CandleSettings, stored) == {"max_queue": 7}


def test_head_is_answered_as_get_without_a_body(gw: Gateway) -> None:
    """Found by a review: HEAD was a 405 on every route (FastAPI's routes, unlike Starlette's, do not add it), so
    `curl -I` and uptime monitors that probe with HEAD saw the gateway as down (RFC 9110: GET implies HEAD)."""
    c = gw.client()
    got = c.get("/health")
    r = c.head("/health")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == got.headers["content-length"]
    r = c.head("/api/plugins")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"
    assert httpx.head(f"{gw.url}/api/plugins").status_code == 401  # the route's checks still apply
    assert c.head("/api/collections/nothing-here").status_code == 404
    r = c.head("/auth/login")  # a route that takes POST only
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_scroll_pages_by_cursor_over_rest(gw: Gateway) -> None:
    """`points/scroll` answers `next_after`, the cursor of the next page: a point re-upserted between pages keeps
    its place and moves no other past the reader (with `offset` the point after the page was skipped)."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "paged", "dim": 2}).status_code == 201
    c.put("/api/collections/paged/points", json={"points": [{"id": i, "vector": [1, i]} for i in range(10)]})
    first = c.post("/api/collections/paged/points/scroll", json={"limit": 5}).json()
    assert [p["id"] for p in first["points"]] == [0, 1, 2, 3, 4] and first["next_offset"] == 5
    c.put("/api/collections/paged/points", json={"points": [{"id": 2, "vector": [2, 2]}]})
    second = c.post("/api/collections/paged/points/scroll", json={"limit": 5, "after": first["next_after"]}).json()
    assert [p["id"] for p in second["points"]] == [5, 6, 7, 8, 9] and second["next_offset"] is None
    last = c.post("/api/collections/paged/points/scroll", json={"limit": 5, "after": second["next_after"]}).json()
    assert last["points"] == [] and last["next_after"] is None  # 2 was read on the first page, in its place
    # found by a review: digits Python's isdigit() takes but int() or DuckDB do not were a 500
    for bad in ("made up", "1:\u00b2:x", "\u00b2:0:x", "0:\u0663:x", "0:" + "9" * 40 + ":x", "0:9223372036854775808:x"):
        r = c.post("/api/collections/paged/points/scroll", json={"after": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "after", (bad, r.text)


def test_a_slash_inside_a_name_in_the_path_is_a_404_naming_the_parameter(gw: Gateway, tmp_path: Path) -> None:
    """Found by a review: the server decodes %2F before it routes, so a name holding a '/' made a path with a
    segment too many: `bkg keys revoke ../../admin` answered "no such route" naming no field, and
    `GET /api/collections/slashy%2Fsnapshots` listed collection slashy's snapshots (another route, another
    answer). Such a request is answered before routing: 404, the parameter named, nothing else run."""
    from helpers import bkg, one_line_error

    c = gw.client()
    assert c.post("/api/collections", json={"name": "slashy", "dim": 2}).status_code in (200, 201)
    assert c.post("/api/collections/slashy/snapshots").status_code in (200, 201)
    for method, path, field, value in (
        ("GET", "/api/collections/slashy%2Fsnapshots", "name", "slashy/snapshots"),
        ("DELETE", "/api/collections/slashy%2fsnapshots", "name", "slashy/snapshots"),
        ("POST", "/admin/keys/..%2F..%2Fadmin/revoke", "key_id", "../../admin"),
        ("GET", "/api/jobs/..%2Fx?x=1", "job_id", "../x"),
    ):
        r = c.request(method, path)
        error = r.json()["error"]
        assert r.status_code == 404 and error["field"] == field, (path, r.text)
        assert error["message"].startswith(f"{value!r} holds a '/'"), error
    assert c.get("/api/collections/slashy").status_code == 200  # the DELETE above dropped nothing
    r = c.get("/nothing%2Fhere")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no such route"), r.text
    r = bkg("keys", "revoke", "../../admin", "--url", gw.url, cwd=tmp_path, BKG_API_KEY=ADMIN_KEY)
    one_line_error(r, "key_id: '../../admin' holds a '/'")


def test_a_slash_inside_a_name_is_named_under_the_hub_prefix_too(tmp_path: Path) -> None:
    """Found by a review: under the Hub's service prefix the %2F answer named no field (the routes were matched
    before the prefix was taken off), and on /v1 it lost OpenAI's error shape."""
    hub_env = {"JUPYTERHUB_SERVICE_NAME": "bkg", "JUPYTERHUB_SERVICE_PREFIX": "/services/bkg/",
               "JUPYTERHUB_API_TOKEN": "t" * 32, "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api"}  # fmt: skip
    g = start_gateway(tmp_path / "data", env=hub_env, plugins=["apikeys", "llmserver"])  # its /v1 routes
    try:
        c = g.client()
        for path in ("/api/collections/a%2Fsnapshots", "/services/bkg/api/collections/a%2Fsnapshots"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["field"] == "name", (path, r.text)
        r = c.get("/services/bkg/v1/models/a%2Fb")
        error = r.json()["error"]
        assert r.status_code == 404 and "type" in error and error["param"] == "model", r.text  # OpenAI's shape
        assert c.get("/services/bkg/api/collections?x=a%2Fb").status_code != 404  # a query's %2F is no matter
    finally:
        g.stop()
