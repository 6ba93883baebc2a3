"""A '/' inside a name in the path (sent as %2F) is a 404 naming the path parameter (`gateway/slashes.py`): it
names the field the route's own errors name that parameter. `GET /v1/models/a%2Fb` named `model_id` while the
route's 404 for an unknown model names `model`; `/api/models/{model_id}` (`model`) and `/api/plugins/{plugin_id}`
(`plugin`), `.../invoke/{capability_id}` (`capability`) did the same: two names for one thing."""

from __future__ import annotations

from gateway_harness import Gateway

PLUGINS = ["apikeys", "llmserver"]  # llmserver: its OpenAI-compatible /v1 routes


def test_a_slash_in_a_path_parameter_is_named_as_the_routes_own_errors_name_it(gw: Gateway) -> None:
    c = gw.client()
    assert c.post("/api/collections", json={"name": "named", "dim": 2}).status_code == 201
    # (method, path with {} for the value): the 404 for a value holding '/' and for an unknown one name one field
    cases = [
        ("GET", "/v1/models/{}", "model"),
        ("GET", "/api/models/{}", "model"),
        ("POST", "/api/models/{}/verify", "model"),
        ("DELETE", "/api/models/{}", "model"),
        ("GET", "/api/plugins/{}", "plugin"),
        ("GET", "/api/plugins/{}/logs", "plugin"),
        ("GET", "/api/plugins/{}/config", "plugin"),
        ("POST", "/api/plugins/{}/restart", "plugin"),
        ("POST", "/api/plugins/apikeys/invoke/{}", "capability"),
        ("GET", "/api/collections/{}", "name"),
        ("DELETE", "/api/collections/named/snapshots/{}", "snapshot_id"),
        ("GET", "/api/jobs/{}", "job_id"),
        ("GET", "/api/jobs/schedules/{}", "schedule_id"),
        ("GET", "/admin/users/{}", "user_id"),
        ("POST", "/admin/keys/{}/revoke", "key_id"),
    ]
    for method, template, field in cases:
        unknown = c.request(method, template.format("no-such-thing"))
        slashed = c.request(method, template.format("a%2Fb"))
        assert unknown.status_code == 404 and slashed.status_code == 404, (template, unknown.text, slashed.text)
        said = slashed.json()["error"]
        assert unknown.json()["error"]["field"] == field, (template, unknown.text)
        assert said["field"] == field and said["message"].startswith("'a/b' holds a '/'"), (template, slashed.text)
        if template.startswith("/v1/"):  # OpenAI's shape: its `param` is the field
            assert said["param"] == "model" and unknown.json()["error"]["param"] == "model", slashed.text
