"""The OpenAPI document tells the truth about plugin capabilities: each capability is its own operation
(`POST /api/plugins/{plugin}/invoke/{capability}`) with its input model as the request body and its output model
(or, for a job, the 202 job record) as the response, so generated clients and fuzzers see what the code checks.

The requests themselves go through the one invoke route, and the worker validates them with the same models.

The document also declares its OpenAPI links: which response gives the id that later operations take (a created
collection's name for its points, queries and snapshots; a snapshot's id for its restore; a started job's id for
its record, output and cancel...), so clients and schemathesis' stateful runs can follow them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bkg_kernel.gateway.routes.collections import Upsert
from bkg_kernel.runtime.discovery import Discovered

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "code", "message"],
            "properties": {
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
                "retry_after": {"type": "number", "description": "Seconds to wait (a 429; also its Retry-After)."},
                "type": {"type": "string", "description": "On /v1: OpenAI's error type."},
                "param": {"type": ["string", "null"], "description": "On /v1: OpenAI's name for `field`."},
            },
        }
    },
}


JOB_STARTED = {
    "type": "object",
    "required": ["job"],
    "properties": {
        "job": {
            "type": "object",
            "required": ["id", "state"],
            "properties": {"id": {"type": "string"}, "state": {"type": "string"}},
        }
    },
}


def _schema(model: Any, name: str, components: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON Schema with its nested models moved into the components under `name`-prefixed keys."""
    schema: dict[str, Any] = model.model_json_schema(ref_template=f"#/components/schemas/{name}__{{model}}")
    for key, sub in schema.pop("$defs", {}).items():
        components[f"{name}__{key}"] = sub
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


_COLLECTION = "/api/collections/{name}"
_JOB = "/api/jobs/{job_id}"
_PLUGIN = "/api/plugins/{plugin_id}"
_ID = "$response.body#/id"
# (producer method, path, status) -> [(consumer method, path, {parameter: runtime expression})]
LINKS: dict[tuple[str, str, str], list[tuple[str, str, dict[str, str]]]] = {
    ("post", "/api/collections", "201"): [
        (m, _COLLECTION + tail, {"name": "$response.body#/name"})
        for m, tail in [
            ("get", ""),
            ("patch", ""),
            ("delete", ""),
            ("put", "/points"),
            ("post", "/points/get"),
            ("post", "/points/scroll"),
            ("post", "/points/delete"),
            ("post", "/points/count"),
            ("post", "/query"),
            ("post", "/map"),
            ("post", "/snapshots"),
            ("get", "/snapshots"),
        ]
    ],  # fmt: skip
    ("post", _COLLECTION + "/snapshots", "201"): [
        (m, _COLLECTION + "/snapshots/{snapshot_id}" + tail, {"name": "$request.path.name", "snapshot_id": _ID})
        for m, tail in [("post", "/restore"), ("delete", "")]
    ],
    ("post", "/admin/users", "201"): [
        (m, "/admin/users/{user_id}", {"user_id": _ID}) for m in ("get", "patch", "delete")
    ],
    ("post", "/admin/roles", "201"): [
        (m, "/admin/roles/{name}", {"name": "$response.body#/name"}) for m in ("patch", "delete")
    ],
    ("post", "/admin/keys", "201"): [
        ("post", "/admin/keys/{key_id}/" + a, {"key_id": _ID}) for a in ("rotate", "revoke")
    ],
    ("post", "/api/jobs", "202"): [
        (m, _JOB + tail, {"job_id": _ID})
        for m, tail in [("get", ""), ("get", "/output"), ("post", "/cancel"), ("post", "/retry")]
    ],
    ("post", "/api/jobs/schedules", "201"): [
        (m, "/api/jobs/schedules/{schedule_id}", {"schedule_id": _ID}) for m in ("patch", "delete")
    ],
    ("post", "/api/models", "201"): [
        (m, "/api/models/{model_id}" + tail, {"model_id": _ID})
        for m, tail in [("get", ""), ("post", "/verify"), ("delete", "")]
    ],
    ("get", "/api/plugins", "200"): [
        (m, _PLUGIN + tail, {"plugin_id": "$response.body#/plugins/0/id"})
        for m, tail in [
            ("get", ""),
            ("get", "/status"),
            ("get", "/health"),
            ("get", "/logs"),
            ("get", "/telemetry"),
            ("get", "/config"),
        ]
    ],  # fmt: skip
}
# A capability that runs as a job answers 202 with {"job": {...}}: the job's id is one level down.
_JOB_LINKS = [(m, _JOB + tail, {"job_id": "$response.body#/job/id"}) for m, tail in [("get", ""), ("post", "/cancel")]]


def _links(doc: dict[str, Any], targets: list[tuple[str, str, dict[str, str]]]) -> dict[str, Any]:
    """OpenAPI link objects to the `targets` operations, by their operationId."""
    out: dict[str, Any] = {}
    for method, path, params in targets:
        op_id = doc["paths"][path][method]["operationId"]
        out[op_id] = {"operationId": op_id, "parameters": params}
    return out


def _errors_as_sent(doc: dict[str, Any]) -> None:
    """Every route's 422 in the shape the gateway sends (`Error`; on `/v1`, OpenAI's, which `Error` describes too),
    not FastAPI's `HTTPValidationError` (`{"detail": [...]}`) that it never sends; a route that needs credentials
    says 401, one with a path parameter 404."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in doc["paths"].items():
        for op in item.values():
            responses = op.get("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "The request does not match its schema (the field is named).",
                                    "content": error}  # fmt: skip
            if op.get("security") or "/admin/" in path or path.startswith(("/api/", "/v1/")):
                responses.setdefault("401", {"description": "No valid credentials.", "content": error})
            if "{" in path:
                responses.setdefault("404", {"description": "Not found (the field is named).", "content": error})
    for name in ("HTTPValidationError", "ValidationError"):
        doc.get("components", {}).get("schemas", {}).pop(name, None)


def install(app: FastAPI, discovered: dict[str, Discovered]) -> None:
    """Give `app` an OpenAPI document with one operation per plugin capability."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR
        _schema(Upsert, "Upsert", components)  # the upsert route parses its body on a thread, so FastAPI cannot see it
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for pid, found in sorted(discovered.items()):
            if found.cls is None:
                continue
            for cap in found.cls.capabilities().values():
                base = f"{pid}__{cap.id.replace('.', '_')}"
                body = _schema(cap.input, f"{base}__input", components)
                out = _schema(cap.output, f"{base}__output", components)
                ok = (
                    {"202": {"description": "Started as a background job (follow it under /api/jobs).",
                             "content": {"application/json": {"schema": JOB_STARTED}}}}
                    if cap.job
                    else {"200": {"description": cap.summary or "The result.",
                                  "content": {"application/json": {"schema": out}}}}
                )  # fmt: skip
                doc["paths"][f"/api/plugins/{pid}/invoke/{cap.id}"] = {
                    "post": {
                        "tags": [f"plugin: {pid}"],
                        "summary": cap.summary,
                        "description": f"Needs scope `{cap.scope}`."
                        + (" Runs as a background job." if cap.job else ""),
                        "operationId": base,
                        # a capability whose input has no required field takes a missing body as {}
                        "requestBody": {
                            "required": bool(components[f"{base}__input"].get("required")),
                            "content": {"application/json": {"schema": body}},
                        },
                        "responses": {
                            **ok,
                            **{
                                code: {"description": text, "content": error}
                                for code, text in (
                                    ("401", "No valid credentials."),
                                    ("403", f"The caller lacks {cap.scope}."),
                                    ("422", "The input does not match its schema (the field is named)."),
                                    ("429", "The plugin's queue is full."),
                                    ("503", "The plugin is not running."),
                                )
                            },
                        },  # fmt: skip
                    }
                }
        _errors_as_sent(doc)
        for (method, path, status), targets in LINKS.items():
            doc["paths"][path][method]["responses"][status]["links"] = _links(doc, targets)
        for path, item in doc["paths"].items():
            started = item.get("post", {}).get("responses", {}).get("202", {})
            if path.startswith("/api/plugins/") and "/invoke/" in path and "{" not in path and started:
                started["links"] = _links(doc, _JOB_LINKS)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
