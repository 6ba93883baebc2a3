"""Input checks for the store: every failure names the field and what was wrong."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store.filters import field_path
from bkg_kernel.store.index import KINDS, METRICS

COLLECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also stated in the API's schemas
EMBED_MODEL_PATTERN = r"^(candle|llmserver):.+$"
_NAME = re.compile(COLLECTION_NAME_PATTERN)
MAX_K = 1000
MAX_ID_CHARS = 512  # characters of a string point id
MAX_QUERY_CHARS = 10_000  # characters of a full-text query
_INT64 = 2**63
INT64_MIN, INT64_MAX = -_INT64, _INT64 - 1  # DuckDB's BIGINT: an offset or a seed past it cannot be bound


EMBEDDERS = ("candle", "llmserver")


def embed_model(spec: Any, field: str = "embed_model") -> str | None:
    """Return a valid `<plugin>:<model id>` embedding model (or None) or raise naming the rule it broke."""
    if spec is None:
        return None
    plugin, _, model = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if plugin not in EMBEDDERS or not model:
        raise InvalidInput(
            f"embed_model must be '<plugin>:<model id>' with plugin {' or '.join(EMBEDDERS)}, not {spec!r}", field=field
        )
    return str(spec)


def collection_name(name: Any, field: str = "name") -> str:
    """Return a valid collection name or raise naming the rule it broke."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("collection name must be a non-empty string", field=field)
    if "/" in name or "\\" in name:
        raise InvalidInput(f"collection name {name!r} must not contain '/' or '\\'", field=field)
    if not _NAME.fullmatch(name):  # not `match`: `$` would let a trailing newline in
        raise InvalidInput(
            f"collection name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit",
            field=field,
        )
    return name


def collection_config(dim: Any, metric: Any, index: Any) -> tuple[int, str, str]:
    """Check dim / metric / index kind of a new collection."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
        raise InvalidInput(f"dim must be an integer from 1 to 65536, got {dim!r}", field="dim")
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})", field="metric")
    if index not in KINDS:
        raise InvalidInput(f"unknown index {index!r} (expected one of {', '.join(KINDS)})", field="index")
    return dim, metric, index


def _json_encoder() -> Callable[[Any], str]:
    """Return a strict JSON encoder (no NaN) built once: json.dumps builds a new one per call, and payload
    encoding is the largest Python cost of a big upsert."""
    from json import encoder as je

    make = getattr(je, "c_make_encoder", None)
    if make is None:  # no C speedups on this interpreter
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode

    def default(o: Any) -> Any:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    enc = make(None, default, je.encode_basestring, None, ": ", ", ", False, False, False)
    return lambda obj: "".join(enc(obj, 0))


_ENCODE = _json_encoder()
encode: Callable[[Any], str] = _ENCODE  # a payload's stored JSON text, for one already checked


def point_key(pid: Any, field: str) -> str:
    """Return the stored key of a point id: its JSON text, so 7 and "7" stay different points."""
    if type(pid) is int and -_INT64 <= pid < _INT64:
        return str(pid)
    if isinstance(pid, bool) or not isinstance(pid, int | str | np.integer):
        raise InvalidInput(f"point id must be an integer or a string, got {type(pid).__name__}", field=field)
    if isinstance(pid, str):
        if not pid or len(pid) > MAX_ID_CHARS:
            raise InvalidInput(f"point id string must have 1 to {MAX_ID_CHARS} characters", field=field)
        return _ENCODE(pid)
    if not -_INT64 <= int(pid) < _INT64:
        raise InvalidInput(f"integer point id {pid} does not fit in 64 bits", field=field)
    return str(int(pid))


def k_value(k: Any) -> int:
    """Check a result count."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be an integer from 1 to {MAX_K}, got {k!r}", field="k")
    return k


def offset_value(offset: Any, k: int) -> int:
    """Check a query's offset: the hits skipped before the k returned (k + offset at most `MAX_K`)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_K - k:
        raise InvalidInput(f"offset must be an integer from 0 to {MAX_K - k} (k + offset is at most {MAX_K}), got "
                           f"{offset!r}", field="offset")  # fmt: skip
    return offset


def score_threshold(threshold: Any) -> float | None:
    """Check a query's score threshold (None: none)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise InvalidInput(f"score_threshold must be a finite number, got {threshold!r}", field="score_threshold")
    return float(threshold)


MAX_PAYLOAD_KEYS = 1000  # payload fields one query returns or one call removes


def payload_keys(keys: Any, field: str) -> list[list[str]]:
    """Return payload fields, named as a filter names them (`"meta.source"`, `"a\\.b"`), as their keys from the
    top; a list of none, or a name that addresses no key, is a 422 naming `field` (or its element)."""
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_PAYLOAD_KEYS:
        raise InvalidInput(f"{field} must be a list of 1 to {MAX_PAYLOAD_KEYS} payload field names", field=field)
    out = []
    for i, name in enumerate(keys):
        pointer = field_path(name, f"{field}[{i}]")  # RFC 6901: "/meta/source", "~1" a slash, "~0" a tilde
        out.append([k.replace("~1", "/").replace("~0", "~") for k in pointer[1:].split("/")])
    return out


def with_payload(selector: Any) -> bool | list[list[str]]:
    """Check a query's `with_payload`: true (the whole payload), false (none) or a list of the fields to return."""
    if isinstance(selector, bool):
        return selector
    if not isinstance(selector, list):
        raise InvalidInput(f"with_payload must be true, false or a list of payload field names, got {selector!r}",
                           field="with_payload")  # fmt: skip
    return payload_keys(selector, "with_payload")


def payload(p: Any, field: str = "payload") -> str:
    """Return a payload object as the JSON text it is stored as, or raise naming `field` (a payload that is not an
    object, nests over `MAX_PAYLOAD_DEPTH` levels, or holds a lone surrogate)."""
    if not isinstance(p, dict):
        raise InvalidInput(f"payload must be a JSON object, got {type(p).__name__}", field=field)
    text = _payloads([p], lambda i: field)[0]
    assert text is not None
    _utf8([text], lambda i: field)
    return text


def query_vector(vector: Any, dim: int, collection: str) -> np.ndarray:
    """Return a query vector as float32 or raise naming the problem."""
    numpy_ok = isinstance(vector, np.ndarray) and vector.shape == (dim,) and vector.dtype == np.float32
    # The common case from numpy callers, checked without copies: a float64 sum of float32 values cannot
    # overflow, so it is finite exactly when every value is.
    if numpy_ok and math.isfinite(vector.sum(dtype=np.float64)):
        return vector
    return vectors_matrix([vector], dim, collection, lambda i: "vector")[0]


ROWS_PER_CALL = 500
ROWS_PER_STEP = 8192  # rows per C-level pass over a column of Python objects (~2 ms holding the GIL)


def vectors_matrix(vectors: Any, dim: int, collection: str, where: Any) -> np.ndarray:
    """Return an (n, dim) float32 matrix; `where(i)` names the field of row i in errors."""
    try:
        if isinstance(vectors, list) and len(vectors) > ROWS_PER_CALL:
            # in slices: one numpy call over 5,000 Python lists holds the GIL for tens of milliseconds, and the
            # gateway's event loop would wait that long (this runs on a store thread)
            parts = [
                np.asarray(vectors[a : a + ROWS_PER_CALL], dtype=np.float32)
                for a in range(0, len(vectors), ROWS_PER_CALL)
            ]
            arr = np.concatenate(parts) if all(p.ndim == 2 for p in parts) else None
        else:
            arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 2:
        for i, v in enumerate(vectors):
            try:
                row = np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                raise InvalidInput("vector must be a list of numbers", field=where(i)) from None
            if row.ndim != 1 or len(row) != dim:
                n = len(row) if row.ndim == 1 else f"shape {row.shape}"
                raise InvalidInput(f"vector has {n} values, collection {collection!r} has dim {dim}", field=where(i))
        raise InvalidInput("vectors must be a list of number lists", field=where(0))
    if arr.shape[1] != dim:
        raise InvalidInput(f"vector has {arr.shape[1]} values, collection {collection!r} has dim {dim}", field=where(0))
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InvalidInput(
            f"vector contains {arr[i, j]} at position {j}: only finite numbers are allowed", field=where(i)
        )
    with np.errstate(over="ignore"):  # a norm past float32's range: cosine scores it 0, L2 loses it from results
        norms = np.einsum("ij,ij->i", arr, arr)
    if not np.isfinite(norms).all():
        i = int(np.argwhere(~np.isfinite(norms))[0][0])
        raise InvalidInput("vector is too long: its squared length passes float32's range (about 3.4e38); scale "
                           "it down", field=where(i))  # fmt: skip
    return arr


@dataclass
class Batch:
    """Validated columns of an upsert, deduplicated (the last occurrence of an id wins)."""

    ids: list[int | str]
    keys: list[str]
    vectors: np.ndarray
    payloads: list[str | None]
    texts: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, a: int, b: int) -> Batch:
        """Return rows a..b."""
        return Batch(self.ids[a:b], self.keys[a:b], self.vectors[a:b], self.payloads[a:b], self.texts[a:b])


def upsert_batch(
    points: Iterable[Any] | None,
    ids: Sequence[Any] | None,
    vectors: Any,
    payloads: Sequence[Any] | None,
    texts: Sequence[Any] | None,
    dim: int,
    collection: str,
) -> Batch:
    """Validate an upsert given as point dicts or as columns."""
    if points is not None:
        if ids is not None or vectors is not None:
            raise InvalidInput("pass either points or ids + vectors, not both", field="points")
        pts = [p if isinstance(p, dict) else getattr(p, "__dict__", p) for p in points]
        for i, p in enumerate(pts):
            if not isinstance(p, dict):
                raise InvalidInput("each point must be an object with id and vector", field=f"points[{i}]")
            for req in ("id", "vector"):
                if req not in p:
                    raise InvalidInput(f"point has no {req}", field=f"points[{i}].{req}")
            unknown = set(p) - {"id", "vector", "payload", "text"}
            if unknown:
                raise InvalidInput(f"unknown point field {sorted(unknown)[0]!r}", field=f"points[{i}]")
        ids = [p["id"] for p in pts]
        vectors = [p["vector"] for p in pts]
        payloads = [p.get("payload") for p in pts]
        texts = [p.get("text") for p in pts]
    else:
        if ids is None or vectors is None:
            raise InvalidInput("upsert needs points, or ids and vectors", field="points")
    n = len(ids)
    name = (lambda f: lambda i: f"points[{i}].{f}") if points is not None else (lambda f: lambda i: f"{f}[{i}]")
    for col, label in ((payloads, "payloads"), (texts, "texts")):
        if col is not None and len(col) != n:
            raise InvalidInput(f"{label} has {len(col)} entries for {n} ids", field=label)
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
        ids = ids.tolist()  # plain Python ints, 64-bit by construction
    keys = _keys(ids, name("id"))
    plain_ids: list[int | str] = [
        pid if type(pid) is int or type(pid) is str else json.loads(k) for pid, k in zip(ids, keys, strict=True)
    ]
    mat = vectors_matrix(vectors, dim, collection, name("vector")) if n else np.zeros((0, dim), np.float32)
    if len(mat) != n:
        raise InvalidInput(f"got {len(mat)} vectors for {n} ids", field="vectors")
    nothing: list[str | None] = [None] * n
    pl = _payloads(payloads, name("payload")) if payloads is not None else nothing
    tx = _texts(texts, name("text")) if texts is not None else list(nothing)
    for col, where in ((keys, name("id")), (pl, name("payload")), (tx, name("text"))):
        _utf8(col, where)
    last = {k: i for i, k in enumerate(keys)}
    if len(last) != n:
        keep = sorted(last.values())
        return Batch(
            [plain_ids[i] for i in keep],
            [keys[i] for i in keep],
            mat[keep],
            [pl[i] for i in keep],
            [tx[i] for i in keep],
        )
    return Batch(plain_ids, keys, mat, pl, tx)


# The per-row checks below run a million times in a big upsert: the common case is one cheap test per row,
# and the field name of an error is only formatted for the row that fails.
def _keys(ids: Sequence[Any], where: Callable[[int], str]) -> list[str]:
    lo, hi = -_INT64, _INT64
    if all(type(pid) is int and lo <= pid < hi for pid in ids):
        keys: list[str] = []
        for a in range(0, len(ids), ROWS_PER_STEP):  # one C call per step: other threads get the GIL in between
            keys += map(str, ids[a : a + ROWS_PER_STEP])
        return keys
    return [point_key(pid, where(i)) for i, pid in enumerate(ids)]


MAX_PAYLOAD_DEPTH = 100  # levels of objects and arrays in one payload, as MongoDB allows in a document


def _payloads(payloads: Sequence[Any], where: Callable[[int], str]) -> list[str | None]:
    enc = _ENCODE
    try:
        out = [enc(p) if type(p) is dict else _payload(p, "") for p in payloads]
    except (InvalidInput, TypeError, ValueError, RecursionError):
        return [_payload(p, where(i)) for i, p in enumerate(payloads)]  # raises, naming the row
    for i, text in enumerate(out):  # only a payload with that many brackets at all can nest that deep
        if text is not None and text.count("{") + text.count("[") > MAX_PAYLOAD_DEPTH:
            _shallow(payloads[i], where(i))
    return out


def _shallow(payload: Any, field: str) -> None:
    """422 naming `field` when `payload` nests objects and arrays over `MAX_PAYLOAD_DEPTH` levels: every read that
    returns it writes it in JSON again (orjson, which stops at 255 levels)."""
    todo: list[tuple[Any, int]] = [(payload, 1)]
    while todo:
        value, depth = todo.pop()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if items is None:
            continue
        if depth > MAX_PAYLOAD_DEPTH:
            raise InvalidInput(f"payload nests objects and arrays more than {MAX_PAYLOAD_DEPTH} levels deep",
                               field=field)  # fmt: skip
        todo.extend((v, depth + 1) for v in items)


def _texts(texts: Sequence[Any], where: Callable[[int], str]) -> list[str | None]:
    if all(t is None or type(t) is str for t in texts):
        return list(texts)
    return [_text(t, where(i)) for i, t in enumerate(texts)]


def _payload(p: Any, field: str) -> str | None:
    if p is None:
        return None
    if not isinstance(p, dict):
        raise InvalidInput(f"payload must be a JSON object, got {type(p).__name__}", field=field)
    try:
        return _ENCODE(p)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"payload is not valid JSON: {exc}", field=field) from None


def _utf8(col: Sequence[str | None], where: Callable[[int], str]) -> None:
    """Refuse a lone surrogate ("\\ud800", which JSON can carry and UTF-8 cannot store), naming the row: one C-level
    encode of the whole column, then row by row only when it fails."""
    try:
        for a in range(0, len(col), ROWS_PER_STEP):
            "".join(v for v in col[a : a + ROWS_PER_STEP] if v is not None).encode("utf-8")
    except UnicodeEncodeError:
        for i, v in enumerate(col):
            if v is not None:
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = v[exc.start : exc.end].encode("unicode_escape").decode()
                    raise InvalidInput(f"{bad} is not valid Unicode (a lone surrogate)", field=where(i)) from None


def _text(t: Any, field: str) -> str | None:
    if t is None or isinstance(t, str):
        return t
    raise InvalidInput(f"text must be a string, got {type(t).__name__}", field=field)
