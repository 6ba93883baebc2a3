"""The OpenAPI document tells the truth about plugin capabilities: each capability is its own operation
(`POST /api/plugins/{plugin}/invoke/{capability}`) with its input model as the request body and its output model
(or, for a job, the 202 job record) as the response, so generated clients and fuzzers see what the code checks.

The requests themselves go through the one invoke route, and the worker validates them with the same models.
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
            },
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
                             "content": {"application/json": {"schema": {"type": "object"}}}}}
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
                        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
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
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
