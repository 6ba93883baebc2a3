"""Query parameters a route does not take are refused, 422 naming them, as unknown body fields are.

FastAPI drops a query parameter its route does not declare without a word, and the route runs as if it had not
been given: `POST /api/collections/docs/snapshots/<id>/restore?into=copy` restored the snapshot over `docs` itself
(`into` belongs in the JSON body), and `DELETE /api/models/x?delete_files=true` kept the files. bkg's own routes
(`/api`, `/admin`, `/auth`) take only what they declare; the OpenAI-compatible `/v1` routes, static assets, the Hub's
OAuth callback (an identity provider may add parameters) and WebSockets (`?token=`) are left as they are, and so are
the cache-busters browsers' libraries add (JupyterLab's `?<timestamp>`, jQuery's `_=`).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from bkg_kernel.errors import InvalidInput, closest
from bkg_kernel.gateway.jupyterhub import route_path

STRICT_PREFIXES = ("/api/", "/admin/", "/auth/")


async def known_query_only(conn: HTTPConnection) -> None:
    """App-wide dependency: 422 for a query parameter the matched route does not declare."""
    if not conn.query_params:
        return
    route = conn.scope.get("route")
    if not isinstance(route, APIRoute) or not route_path(conn.scope).startswith(STRICT_PREFIXES):
        return
    names, body = takes(route)
    for given in conn.query_params:
        if given in names or given.isdigit() or given == "_":  # a browser's cache-buster (`?1796521699736`, `_=`)
            continue
        if given in body:
            raise InvalidInput(f"{given} is a field of the JSON body, not a query parameter", field=f"query.{given}")
        near = closest(given, names)
        hint = f" (did you mean {near!r}?)" if near else ""
        said = f"it takes {', '.join(sorted(names))}" if names else "it takes none"
        raise InvalidInput(f"unknown query parameter {given!r}{hint}: {said}", field=f"query.{given}")


def takes(route: APIRoute) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameter names a route declares, and its JSON body's top-level field names (by alias)."""
    taken: tuple[frozenset[str], frozenset[str]] | None = getattr(route, "_bkg_takes", None)
    if taken is None:  # kept on the route itself (an id could be a later route's, once this one is gone)
        taken = (frozenset(_query_names(route.dependant)), frozenset(_body_names(route)))
        route._bkg_takes = taken  # type: ignore[attr-defined]
    return taken


def _query_names(dependant: Dependant) -> set[str]:
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _body_names(route: APIRoute) -> set[str]:
    field = route.body_field
    if field is None:
        return set()
    names: set[str] = set()
    for kind in _kinds(field.field_info.annotation):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= {f.alias or name for name, f in kind.model_fields.items()}
    return names


def _kinds(annotation: Any) -> list[Any]:
    """The types an annotation names (`X | None` -> X, None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]
