"""JSON request bodies parsed without holding up the gateway's event loop.

On a thread, a top-level object's arrays are decoded one element at a time (the interpreter can switch to the loop
between elements), the cyclic garbage collector paused meanwhile: the points upsert and big calls of inline
plugins. What a parse made is freed the same way, a slice at a time (`release`): dropping a list of 100,000 small
objects at once is one C-level cascade of deallocations that holds the interpreter ~70 ms, wherever it happens. A
big call of a worker plugin is not parsed in the gateway at all: it travels as `RawJSON` (its bytes) and the worker
parses it, so neither the parse nor pickling what it made holds the gateway's interpreter.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import pickle
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from bkg_kernel.errors import InvalidInput, json_kind

BIG_BODY = 64 * 1024  # a plugin call's input bigger than this goes to a worker as its bytes (parsed there)


class RawJSON:
    """A request body still in JSON: parsed where the call runs (`Plugin.invoke`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def object(self) -> dict[str, Any]:
        """The body as a JSON object (422 naming `body` when it is not JSON or not an object)."""
        return loads(self.raw)

    def __reduce_ex__(self, protocol: Any) -> Any:
        if isinstance(protocol, int) and protocol >= 5:  # out of band: the pipe writes the bytes as they are (pipe.py)
            return RawJSON, (pickle.PickleBuffer(self.raw),)
        return RawJSON, (self.raw,)


def json_object(data: Any) -> dict[str, Any]:
    """A call's parsed input, which must be a JSON object (422 naming `body`)."""
    if not isinstance(data, dict):
        raise InvalidInput(f"the input must be a JSON object, not {json_kind(data)}", field="body")
    return data


TOO_DEEP = "the request nests too deeply (JSON objects or filters)"
# A JSON text may spell a lone UTF-16 surrogate ("\ud800"), which `json.loads` turns into a str no UTF-8 sink takes
# (DuckDB's binding, the error renderer): refused where a body is read, with where it is. Only a text that has a
# surrogate at all (an escape in D800-DFFF, or one raw) is looked at closely.
_SURROGATE_HINT = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")
_RAW_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")  # an even run of \ before


def check_text(text: str, field: str = "body") -> None:
    """422 naming `field` when the JSON `text` holds a lone surrogate (escaped, or raw as `surrogatepass` decodes
    one): strings must be Unicode text. A pair (an astral character escaped as two, as `json.dumps` writes emoji)
    is fine."""
    if _SURROGATE_HINT.search(text) is None:
        return
    raw = _RAW_SURROGATE.search(text)
    if raw is not None:
        raise _lone(raw.start(), field)
    high_end = -1  # where the escape after a high surrogate must begin
    for m in _SURROGATE_ESCAPE.finditer(text):
        start = m.end() - 6
        if int(m.group(1), 16) < 0xDC00:  # high: a low must follow at once
            if high_end != -1:
                raise _lone(high_end - 6, field)
            high_end = m.end()
        elif start != high_end:  # low, after no high
            raise _lone(start, field)
        else:
            high_end = -1
    if high_end != -1:
        raise _lone(high_end - 6, field)


def check_raw(raw: bytes, field: str = "body") -> None:
    """`check_text` for a body's bytes as `json.loads` reads them (UTF-8, -16 or -32); bytes that do not decode are
    left to the parser."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        return
    check_text(text, field)


def _lone(at: int, field: str) -> InvalidInput:
    return InvalidInput(f"the request holds a lone UTF-16 surrogate (character {at:,}): strings must be Unicode "
                        "text (an astral character is escaped as a high and a low surrogate together)",
                        field=field)  # fmt: skip


WHOLE_BYTES = 64 * 1024  # a body up to this size is parsed in one `json.loads` (~0.1 ms), its caps checked after


def loads(raw: bytes, max_items: Mapping[str, int] | None = None, root: str = "body") -> dict[str, Any]:
    """Parse a request body that must be a JSON object as `json.loads` would (UTF-8, -16 or -32, a BOM allowed):
    errors are 422s naming `body`; `max_items` as for `loads_in_pieces`. Up to `WHOLE_BYTES` in one `json.loads`,
    the caps checked after; over it (run it on a thread then) in pieces, anything but an object refused before it
    is parsed. `NaN` and `Infinity`, which `json.loads` takes but JSON has not, are a 422 naming the field under
    `root` (`input.temperature`; "": the field's own name): let through, they became null (a default taken
    silently) or a stored Infinity."""
    caps = max_items or {}
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        check_text(text)
        if len(raw) <= WHOLE_BYTES:
            data = json_object(json.loads(text))
            for key, value in data.items():
                if isinstance(value, list) and (limit := _cap(caps, key)) is not None and len(value) > limit:
                    raise _too_many(key, limit)
            if "NaN" in text or "Infinity" in text:  # (mostly words in a text: then the walk finds nothing)
                _finite_only(data, root)
            return data
        start = _LEADING_WS.match(text)
        first = text[start.end() : start.end() + 1] if start else ""
        if not first:
            raise InvalidInput("the request body is empty: send a JSON object", field="body")
        if first != "{":
            if first not in _KINDS and first not in "-0123456789":
                raise ValueError(f"not JSON: {first!r}")
            kind = _KINDS.get(first, "a number")
            raise InvalidInput(f"the input must be a JSON object: this body starts with {first!r}, as {kind} would",
                               field="body")  # fmt: skip
        with gc_paused():
            data = json_object(loads_in_pieces(text, caps))
        if "NaN" in text or "Infinity" in text:
            try:
                _finite_only(data, root)
            except InvalidInput:
                release(data)
                raise
        return data
    except RecursionError:
        raise InvalidInput(TOO_DEEP, field="body") from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidInput("request body is not valid JSON", field="body") from None


def _finite_only(data: Any, path: str) -> None:
    """422 naming the first NaN or infinity in `data` (what `json.loads` makes of `NaN`, `Infinity`)."""
    if isinstance(data, float):
        if not math.isfinite(data):
            raise InvalidInput(f"{path}: {data!r} is not a JSON number: send a finite number (or null)", field=path)
    elif isinstance(data, dict):
        for k, v in data.items():
            _finite_only(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for n, v in enumerate(data):
            _finite_only(v, f"{path}.{n}" if path else str(n))


def _cap(max_items: Mapping[str, int], key: str) -> int | None:
    """The most elements the top-level array `key` may hold (the "*" entry for one not named), None: no cap."""
    return max_items.get(key, max_items.get("*"))


def _too_many(key: str, limit: int) -> InvalidInput:
    return InvalidInput(f"{key}: List should have at most {limit} items", field=key)


_LEADING_WS = re.compile(r"[ \t\n\r]*")
_KINDS = {"[": "an array", '"': "a string", "t": "true", "f": "false", "n": "null"}  # by a big body's first character


_gc_lock = threading.Lock()
_gc_pausers = [0, False]  # parses running, whether the collector was on before the first


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off while a body is parsed.

    Parsing makes tens of thousands of dicts and lists; they trigger collections, and a full one walks the whole
    heap holding the GIL (~70 ms measured: the event loop waits that long). JSON makes no reference cycles, so
    nothing is lost by collecting after the parse instead.
    """
    with _gc_lock:
        if _gc_pausers[0] == 0:
            _gc_pausers[1] = gc.isenabled()
            gc.disable()
        _gc_pausers[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers[0] -= 1
            if _gc_pausers[0] == 0 and _gc_pausers[1]:
                gc.enable()


RELEASE_SLICE = 2048  # objects freed per step: ~1 ms at most, then the interpreter may switch threads


def release(data: Any) -> None:
    """Free a parsed body's big arrays (the top-level ones, or `data` itself when it is a list) a slice at a time;
    `data` must be the caller's own: what it held is gone afterwards."""
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, list):
                release(value)
    elif isinstance(data, list):
        while data:
            del data[-RELEASE_SLICE:]


_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def loads_in_pieces(
    text: str, max_items: Mapping[str, int] | None = None, objects: frozenset[str] = frozenset()
) -> Any:
    """`json.loads`, but a top-level object's arrays are decoded one element at a time.

    One `json.loads` of a 5,000-point body holds the GIL for ~150 ms (the event loop waits that long even though
    this runs on a thread); element by element, the interpreter can switch threads between elements. An array named
    in `max_items` (any other top-level array: the limit under "*", if given) that grows past its limit is refused
    (422 naming it) without decoding the rest, and whatever a failed parse had made is released (`release`) before
    the error goes up. The arrays named in `objects` hold objects: an element that is not one is refused (422
    naming it) before it is decoded, as is a body that is not an object when any are named.
    """
    out: dict[str, Any] = {}
    try:
        return _pieces(text, max_items or {}, out, objects)
    except BaseException:
        release(out)
        raise


def _pieces(text: str, max_items: Mapping[str, int], out: dict[str, Any], objects: frozenset[str]) -> Any:
    def ws(i: int) -> int:
        while i < len(text) and text[i] in _WS:
            i += 1
        return i

    i = ws(0)
    if not text.startswith("{", i):
        if objects and text[i : i + 1] in _KINDS:  # a list, string, ...: not parsed to be refused
            raise InvalidInput(
                f"the body must be a JSON object: this one starts with {text[i]!r}, as {_KINDS[text[i]]} would",
                field="body",
            )
        return json.loads(text)
    i = ws(i + 1)
    if text.startswith("}", i):
        i = ws(i + 1)
    else:
        while True:
            key, i = _DECODER.raw_decode(text, i)
            if not isinstance(key, str):
                raise ValueError("an object key must be a string")
            i = ws(i)
            if not text.startswith(":", i):
                raise ValueError(f"expected ':' at character {i}")
            i = ws(i + 1)
            release(out.get(key))  # a repeated key: the last one wins, as in json.loads
            if text.startswith("[", i):
                limit = _cap(max_items, key)
                items: list[Any] = []
                out[key] = items  # in `out` from the start: a failed parse releases it too
                i = ws(i + 1)
                if text.startswith("]", i):
                    i += 1
                else:
                    while True:
                        if key in objects and not text.startswith("{", i):
                            raise InvalidInput(
                                f"{key}.{len(items)}: must be a JSON object", field=f"{key}.{len(items)}"
                            )
                        item, i = _DECODER.raw_decode(text, i)
                        items.append(item)
                        if limit is not None and len(items) > limit:
                            raise _too_many(key, limit)
                        i = ws(i)
                        if text.startswith(",", i):
                            i = ws(i + 1)
                        elif text.startswith("]", i):
                            i += 1
                            break
                        else:
                            raise ValueError(f"expected ',' or ']' at character {i}")
            else:
                out[key], i = _DECODER.raw_decode(text, i)
            i = ws(i)
            if text.startswith(",", i):
                i = ws(i + 1)
            elif text.startswith("}", i):
                i = ws(i + 1)
                break
            else:
                raise ValueError(f"expected ',' or '}}' at character {i}")
    if i != len(text):
        raise ValueError(f"extra data at character {i}")
    return out
