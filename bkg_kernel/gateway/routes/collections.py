"""The store over HTTP: collections, points, queries and snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from bkg_kernel.auth import Principal
from bkg_kernel.errors import BadRequest, InvalidInput, TooManyRequests
from bkg_kernel.gateway import storeops
from bkg_kernel.gateway.bodylimit import CheckedJSONRoute, takes_big_bodies
from bkg_kernel.gateway.embedcheck import check_embed_model
from bkg_kernel.gateway.jsonresp import FastJSONResponse, PagedJSONResponse
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.runtime import bodyjson
from bkg_kernel.store import projection
from bkg_kernel.store.index import DEFAULT_PARAMS, PARAM_RANGES
from bkg_kernel.store.validate import (
    COLLECTION_NAME_PATTERN,
    EMBED_MODEL_PATTERN,
    INT64_MAX,
    INT64_MIN,
    MAX_K,
    MAX_PAYLOAD_KEYS,
)
from bkg_kernel.strict import StrictBody

router = APIRouter(prefix="/api/collections", tags=["collections"], route_class=CheckedJSONRoute)
NAME_PATTERN, EMBED_PATTERN = COLLECTION_NAME_PATTERN, EMBED_MODEL_PATTERN  # the store's rules, in the schema
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="A collection name.")]
SnapshotId = Annotated[str, PathParam(pattern=r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$", description="A snapshot id.")]
READ_SCOPE, WRITE_SCOPE = "collections:read", "collections:write"
READ, WRITE = Depends(need(READ_SCOPE)), need(WRITE_SCOPE)


def _params_by_index() -> dict[str, Any]:
    """The store's rule, in JSON Schema: each index kind takes its own parameters, flat (the default) none."""

    def allowed(kind: str) -> dict[str, Any]:
        names = list(DEFAULT_PARAMS[kind])
        if not names:
            return {"properties": {"params": {"maxProperties": 0}}}
        ranges = {n: {"minimum": PARAM_RANGES[n][0], "maximum": PARAM_RANGES[n][1]} for n in names}
        return {"properties": {"params": {"propertyNames": {"enum": names}, "properties": ranges}}}

    rules = [{"if": {"not": {"required": ["index"]}}, "then": allowed("flat")}]
    for kind in DEFAULT_PARAMS:
        rules.append({"if": {"required": ["index"], "properties": {"index": {"const": kind}}}, "then": allowed(kind)})
    return {"allOf": rules}


class NewCollection(StrictBody):
    model_config = ConfigDict(json_schema_extra=_params_by_index())  # extra="forbid" comes from StrictBody

    name: str = Field(..., pattern=NAME_PATTERN)
    dim: int = Field(..., ge=1, le=65536)
    metric: Literal["cosine", "l2", "ip"] = "cosine"
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    params: dict[str, Annotated[int, Field(ge=0, le=max(hi for _, hi in PARAM_RANGES.values()))]] = Field(
        default_factory=dict, description="Index parameters (hnsw: m, ef_construction, ef_search; ivf: nlist...)."
    )
    embed_model: str | None = Field(
        None,
        pattern=EMBED_PATTERN,
        description='"candle:<model>" or "llmserver:<model>": computes vectors from text when none is given.',
    )


class CollectionPatch(StrictBody):
    embed_model: str | None = Field(None, pattern=EMBED_PATTERN)


class PointIn(StrictBody):
    id: int | str
    vector: list[float] | None = Field(None, description="Optional when the collection has an embed_model.")
    payload: dict[str, Any] | None = None
    text: str | None = None


MAX_POINTS = 100_000  # per upsert request
MAX_NUMBERS = 2_000_000  # vector numbers one answer holds: ~80 MB as Python floats while it is made, ~40 MB of JSON


class Upsert(StrictBody):
    points: list[PointIn] = Field(..., max_length=MAX_POINTS)
    embed_model: str | None = Field(
        None, pattern=EMBED_PATTERN, description="Embed texts of points without vectors with this model."
    )


_UPSERT_HEAD = TypeAdapter(Upsert)
_POINTS = TypeAdapter(list[PointIn])


class Ids(StrictBody):
    # 100,000 ids are up to ~4 MB: parsed off the event loop, the list refused past its cap as it is read
    MAX_ITEMS: ClassVar[dict[str, int]] = {"ids": 100_000}
    MAX_BODY_BYTES: ClassVar[int] = 8 * 2**20

    ids: list[int | str] = Field(..., max_length=100_000)
    with_vectors: bool = True


_NONEMPTY: dict[str, Any] = {"type": "object", "minProperties": 1}  # an empty filter would match every point: refused


class Delete(StrictBody):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [  # exactly one of ids or filter
                {"required": ["ids"], "properties": {"ids": {"type": "array"}, "filter": {"type": "null"}}},
                {"required": ["filter"], "properties": {"filter": _NONEMPTY, "ids": {"type": "null"}}},
            ]
        },
    )
    MAX_ITEMS: ClassVar[dict[str, int]] = {"ids": 100_000}
    MAX_BODY_BYTES: ClassVar[int] = 8 * 2**20

    ids: list[int | str] | None = Field(None, max_length=100_000)
    filter: dict[str, Any] | None = None


class PayloadPoints(StrictBody):
    """The points a payload change goes to: by ids or by filter (Qdrant's points selector)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [  # exactly one of points or filter
                {"required": ["points"], "properties": {"points": {"type": "array"}, "filter": {"type": "null"}}},
                {"required": ["filter"], "properties": {"filter": _NONEMPTY, "points": {"type": "null"}}},
            ]
        },
    )
    MAX_ITEMS: ClassVar[dict[str, int]] = {"points": 100_000, "keys": MAX_PAYLOAD_KEYS}
    MAX_BODY_BYTES: ClassVar[int] = 8 * 2**20

    points: list[int | str] | None = Field(
        None, max_length=100_000, description="The points' ids; every one must be stored (a 404 names one that is "
        "not, and nothing is changed)."
    )  # fmt: skip
    filter: dict[str, Any] | None = Field(
        None, description="Or the points a filter matches (it must test a field; none matched: 0 updated)."
    )


class SetPayload(PayloadPoints):
    payload: dict[str, Any] = Field(..., description="Payload keys to set (POST: merged over the point's top-level "
                                    "keys; PUT: the whole new payload).")  # fmt: skip


class DeletePayload(PayloadPoints):
    keys: list[str] = Field(
        ..., min_length=1, max_length=MAX_PAYLOAD_KEYS, description='Payload fields to remove, dotted as a filter '
        'names them ("meta.source").'
    )  # fmt: skip


class Scroll(StrictBody):
    filter: dict[str, Any] | None = None
    limit: int = Field(100, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=INT64_MAX, description="Points to skip (shifts when others write: use after).")
    after: str | None = Field(
        None, max_length=2048, description="The last page's next_after: the page after it, right while others write."
    )
    with_vectors: bool = False


class Count(StrictBody):
    filter: dict[str, Any] | None = None


class CountDistinct(StrictBody):
    field: str = Field(..., description='A payload field, a dotted path as a filter names one ("meta.source").')
    filter: dict[str, Any] | None = None


_VECTOR: dict[str, Any] = {"required": ["vector"], "properties": {"vector": {"type": "array"}}}
_TEXT: dict[str, Any] = {"required": ["text"], "properties": {"text": {"type": "string"}}}


class Query(StrictBody):
    # the store's rules, stated: a text or a vector (a text alone is embedded with the collection's embed_model);
    # text and hybrid mode need the text
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {"if": {"required": ["mode"], "properties": {"mode": {"enum": ["text", "hybrid"]}}}, "then": _TEXT},
                {"anyOf": [_VECTOR, _TEXT]},
            ]
        },
    )

    MAX_ITEMS: ClassVar[dict[str, int]] = {"vector": 65536, "with_payload": MAX_PAYLOAD_KEYS}
    MAX_BODY_BYTES: ClassVar[int] = 4 * 2**20  # a 65,536-d vector is ~1.4 MB of JSON

    vector: list[float] | None = Field(None, min_length=1, max_length=65536)
    text: str | None = Field(None, min_length=1, max_length=10_000, pattern=r"\S", description="1 to 10000 characters.")
    k: int = Field(10, ge=1, le=1000)
    filter: dict[str, Any] | None = None
    mode: Literal["vector", "text", "hybrid"] | None = None
    rrf_k: float = Field(60.0, ge=0)
    vector_weight: float = Field(0.5, ge=0, le=1, description="Hybrid: the vector ranking's weight (text: the rest).")
    fusion: Literal["rrf", "relative"] = Field(
        "rrf", description="Hybrid: reciprocal rank fusion, or a weighted sum of min-max normalised scores."
    )
    ef_search: int | None = Field(None, ge=1, le=4096)
    with_text: bool = False
    explain: bool = Field(False, description="Add each hit's vector and BM25 rank and score, whatever the mode.")
    score_threshold: float | None = Field(
        None, description="Drop the hits worse than this by the score they carry (Qdrant's): an L2 vector query keeps "
        "distances <= it; cosine and ip similarity, BM25 (text mode) and the fused score (hybrid) keep scores >= it."
    )  # fmt: skip
    offset: int = Field(0, ge=0, le=MAX_K - 1, description=f"Skip the first hits; k + offset is at most {MAX_K}.")
    with_payload: bool | Annotated[list[str], Field(min_length=1, max_length=MAX_PAYLOAD_KEYS)] = Field(
        True, description="true: each hit's payload; false: none (null); a list of payload fields (dotted as a "
        'filter names them, "meta.source") to return, nested as stored, those a point lacks left out.'
    )  # fmt: skip
    with_vectors: bool = Field(
        False, description=f"Add each hit's vector as stored (k x dim at most {MAX_NUMBERS:,} numbers)."
    )


class Map(StrictBody):
    sample: int = Field(5000, ge=1, le=50_000, description="At most this many points, the same ones for a seed.")
    filter: dict[str, Any] | None = None
    components: int = Field(2, ge=2, le=64, description="PCA components; over 2, sent as `reduced` (for UMAP).")
    seed: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    text_chars: int = Field(200, ge=0, le=5000, description="How much of each point's text to send.")


class Restore(StrictBody):
    into: str | None = Field(None, pattern=NAME_PATTERN, description="The new collection's name (default: the same).")


def _audit(request: Request, p: Principal, action: str, target: str, **detail: Any) -> None:
    gateway(request).auth.audit(p.username, action, target, **detail)


@router.get("", dependencies=[READ])
def list_collections(request: Request) -> dict[str, Any]:
    """Every collection, described."""
    return {"collections": [c.to_dict() for c in gateway(request).store.list_collections()]}


@router.post("", status_code=201)
def create_collection(body: NewCollection, request: Request, p: Annotated[Principal, Depends(WRITE)]) -> dict[str, Any]:
    """Create a collection (an embed_model that is not registered, does not embed, or gives vectors of another
    size is a 422)."""
    gw = gateway(request)
    check_embed_model(gw, body.embed_model, body.dim)
    s = gw.store
    s.create_collection(body.name, body.dim, body.metric, body.index, embed_model=body.embed_model, **body.params)
    _audit(request, p, "collection.create", body.name, dim=body.dim, metric=body.metric, index=body.index)
    return s.describe(body.name).to_dict()


@router.patch("/{name}")
def patch_collection(
    name: Name, body: CollectionPatch, request: Request, p: Annotated[Principal, Depends(WRITE)]
) -> dict[str, Any]:
    """Change a collection's embed_model (checked as at create)."""
    gw = gateway(request)
    s = gw.store
    check_embed_model(gw, body.embed_model, s.collection(name).dim)
    s.set_embed_model(name, body.embed_model)
    _audit(request, p, "collection.update", name, embed_model=body.embed_model)
    return s.describe(name).to_dict()


@router.get("/{name}", dependencies=[READ])
def describe(name: Name, request: Request) -> dict[str, Any]:
    """Count, dim, metric, index, bytes on disk, last snapshot."""
    return gateway(request).store.describe(name).to_dict()


@router.delete("/{name}", status_code=204)
def drop(name: Name, request: Request, p: Annotated[Principal, Depends(WRITE)]) -> Response:
    """Drop a collection (its snapshots stay)."""
    gateway(request).store.drop_collection(name)
    _audit(request, p, "collection.drop", name)
    return Response(status_code=204)


UPSERT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Upsert"}}},
    }
}
PARSE_SLICE = 500  # points validated per pydantic call: each call holds the GIL, so the event loop waits at most one


def parse_upsert(raw: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """Parse and validate an upsert body (`Upsert`): its points as dicts and the embed model.

    Run it on a thread, not the event loop: a 5,000-point body is tens of milliseconds of JSON and validation,
    which on the loop would stall every other client (/health included) that long. What the parse made is freed a
    slice at a time once validated (or refused). The caller keeps the garbage collector paused (`gc_paused`) until
    the points are released: a collection while they live walks every one of them holding the GIL (~40 ms for
    100,000 small points), and JSON makes no reference cycles for it to find (only while texts are embedded, which
    can take minutes, does it run).
    """
    try:
        text = raw.decode("utf-8")  # a lone surrogate is the store's 422, naming the point's field (validate._utf8)
        data = bodyjson.loads_in_pieces(text, max_items={"points": MAX_POINTS}, objects=frozenset({"points"}))
    except RecursionError:
        raise BadRequest("the request body nests too deeply to parse", field="body") from None
    except ValueError as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})", field="body") from None
    points: list[dict[str, Any]] = []
    try:
        try:
            head = _UPSERT_HEAD.validate_python(
                {**data, "points": []} if isinstance(data, dict) and isinstance(data.get("points"), list) else data
            )
        except ValidationError as exc:
            raise _invalid(exc, 0) from None
        items = data["points"]
        for a in range(0, len(items), PARSE_SLICE):
            try:
                points += [pt.model_dump() for pt in _POINTS.validate_python(items[a : a + PARSE_SLICE])]
            except ValidationError as exc:
                raise _invalid(exc, a) from None
    except BaseException:
        bodyjson.release(points)
        raise
    finally:
        bodyjson.release(data)
    return points, head.embed_model


def _parsed(raw: bytes) -> tuple[list[dict[str, Any]], str | None, bool]:
    """`parse_upsert`, and whether any point needs its text embedded."""
    points, embed_model = parse_upsert(raw)
    return points, embed_model, any(pt.get("vector") is None for pt in points)


def _invalid(exc: ValidationError, offset: int) -> InvalidInput:
    """The first error, named as FastAPI names a body field (`points.3.vector`), indices counted from 0."""
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    if offset or (loc and isinstance(loc[0], int)):
        loc = ["points", loc[0] + offset if isinstance(loc[0], int) else loc[0], *loc[1:]]
    field = ".".join(str(x) for x in loc) or "body"
    return InvalidInput(f"{field}: {err.get('msg', 'invalid value')}", field=field)


@router.put("/{name}/points", openapi_extra=UPSERT_BODY)
@takes_big_bodies
async def upsert(name: Name, request: Request, p: Annotated[Principal, Depends(WRITE)]) -> dict[str, Any]:
    """Insert or replace points (body: `Upsert`); points without a vector are embedded from their text."""
    gw = gateway(request)
    raw = await request.body()
    with contextlib.ExitStack() as paused:
        paused.enter_context(bodyjson.gc_paused())
        points, embed_model, unembedded = await asyncio.to_thread(_parsed, raw)
        handed = False
        try:
            coll = await asyncio.to_thread(gw.store.collection, name)  # the store's lock is never waited on the loop
            if unembedded:
                paused.close()  # texts to embed (minutes, maybe): the collector runs meanwhile
            handed = True  # from here the store's thread frees the points, once it is done with them
            return await storeops.upsert_points(gw.supervisor, p, coll, points, embed_model, release=True)
        finally:
            if not handed and len(points) > bodyjson.RELEASE_SLICE:  # refused before the store had them
                await asyncio.to_thread(bodyjson.release, points)


def _within_numbers(points: int, dim: int, field: str) -> None:
    """422 naming `field` for an answer of more vector numbers than `MAX_NUMBERS` (100,000 points of 384 floats:
    ~4 GB in the gateway while it was built, for anyone who may read)."""
    if points * dim > MAX_NUMBERS:
        most = max(1, MAX_NUMBERS // dim)
        raise InvalidInput(f"{points:,} points with their {dim}-number vectors is {points * dim:,} numbers; one answer "
                           f"holds at most {MAX_NUMBERS:,} ({most:,} points of this collection): ask in pages, or "
                           "without vectors", field=field)  # fmt: skip


# The routes that answer pages of points encode them where they run (on FastAPI's threads, by orjson): a dict they
# returned would be encoded by FastAPI on the event loop (100,000 points with their vectors: seconds).
@router.post("/{name}/points/get", dependencies=[READ], response_model=None)
def get_points(name: Name, body: Ids, request: Request) -> PagedJSONResponse:
    """Points by id, in the order asked (missing ids left out)."""
    coll = gateway(request).store.collection(name)
    if body.with_vectors:
        _within_numbers(len(body.ids), coll.dim, "ids")
    pts = coll.get(body.ids, with_vectors=body.with_vectors)
    return PagedJSONResponse({"points": [p.to_dict() for p in pts]}, "points")


@router.post("/{name}/points/scroll", dependencies=[READ], response_model=None)
def scroll_points(name: Name, body: Scroll, request: Request) -> PagedJSONResponse:
    """Page through points (optionally matching a filter) in the order first inserted, as Qdrant's scroll: send the
    page's `next_after` as `after` for the next (null at the end). A point upserted again keeps its place, so a
    scroll returns each point there all along once, whatever is written between pages. `next_offset` (offset +
    points) is for offset paging, which skips a point for each one deleted before it meanwhile."""
    coll = gateway(request).store.collection(name)
    if body.with_vectors:
        _within_numbers(body.limit, coll.dim, "limit")
    pts = coll.scroll(
        body.filter, limit=body.limit, offset=body.offset, after=body.after, with_vectors=body.with_vectors
    )
    more = pts.next_after is not None
    return PagedJSONResponse(
        {
            "points": [p.to_dict() for p in pts],
            "next_after": pts.next_after,
            "next_offset": body.offset + len(pts) if more and body.after is None else None,
        },
        "points",
    )


@router.post("/{name}/points/delete", dependencies=[Depends(WRITE)])
def delete_points(name: Name, body: Delete, request: Request) -> dict[str, Any]:
    """Delete points by ids or by filter."""
    return {"deleted": gateway(request).store.collection(name).delete(body.ids, filter=body.filter)}


# Qdrant's set / overwrite / delete payload: in place, so the vectors, texts and scroll order stay as they are
@router.post("/{name}/points/payload", dependencies=[Depends(WRITE)])
def set_payload(name: Name, body: SetPayload, request: Request) -> dict[str, Any]:
    """Set payload keys on points by ids or filter, keeping their other keys (their vectors and texts stay)."""
    coll = gateway(request).store.collection(name)
    return {"updated": coll.set_payload(body.payload, body.points, filter=body.filter)}


@router.put("/{name}/points/payload", dependencies=[Depends(WRITE)])
def overwrite_payload(name: Name, body: SetPayload, request: Request) -> dict[str, Any]:
    """Replace the whole payload of points by ids or filter (their vectors and texts stay)."""
    coll = gateway(request).store.collection(name)
    return {"updated": coll.overwrite_payload(body.payload, body.points, filter=body.filter)}


@router.post("/{name}/points/payload/delete", dependencies=[Depends(WRITE)])
def delete_payload(name: Name, body: DeletePayload, request: Request) -> dict[str, Any]:
    """Remove payload fields from points by ids or filter."""
    coll = gateway(request).store.collection(name)
    return {"updated": coll.delete_payload(body.keys, body.points, filter=body.filter)}


@router.post("/{name}/points/count", dependencies=[READ])
def count_points(name: Name, request: Request, body: Count | None = None) -> dict[str, Any]:
    """Count points, optionally matching a filter."""
    return {"count": gateway(request).store.collection(name).count(body.filter if body else None)}


@router.post("/{name}/points/count_distinct", dependencies=[READ])
def count_distinct(name: Name, body: CountDistinct, request: Request) -> dict[str, Any]:
    """Count the distinct values of a payload field among the points (matching a filter) that have it: 1 and 1.0
    are one value, 1 and "1" two; a missing or null field is not counted, a list or object is one value."""
    return {"count": gateway(request).store.collection(name).count_distinct(body.field, body.filter)}


@router.post("/{name}/query")
async def query(name: Name, body: Query, request: Request, p: Annotated[Principal, Depends(need(READ_SCOPE))]) -> Any:
    """Vector, full-text (BM25) or hybrid (fused) search, filtered before ranking.

    With text and no vector on a collection with an embed_model, the text is embedded too: mode defaults to
    hybrid, and `vector` mode searches by the text's embedding.
    """
    gw = gateway(request)
    q = body.model_dump(exclude={"vector", "text", "mode"})
    coll = await asyncio.to_thread(gw.store.collection, name)  # the store's lock is never waited for on the loop
    if body.with_vectors:
        _within_numbers(body.k, coll.dim, "k")
    vector, mode = await storeops.query_vector(gw.supervisor, p, coll, body.vector, body.text, body.mode)
    # the search, the payloads' decoding and the answer's encoding (up to 1,000 hits) in one hop to a thread
    return await asyncio.to_thread(
        lambda: PagedJSONResponse(coll.query(vector, body.text, mode=mode, **q).to_dict(), "results")
    )


@router.post("/{name}/map", dependencies=[READ], response_model=None)
def map_points(name: Name, body: Map, request: Request) -> FastJSONResponse:
    """A sample of the points (matching a filter) as 2-D PCA coordinates with their ids, payloads and texts."""
    coll = gateway(request).store.collection(name)
    return FastJSONResponse(
        projection.project(coll, body.sample, body.filter, body.components, body.seed, body.text_chars)
    )


Background = Annotated[
    bool,
    QueryParam(description="Answer 202 with a background job at once (its progress: each step, and what it is doing) "
          "instead of 201 when done; the job's result is what the 201 holds. For a large collection (seconds)."),
]  # fmt: skip


@router.post("/{name}/snapshots", status_code=201)
def snapshot(
    name: Name, request: Request, response: Response, p: Annotated[Principal, Depends(WRITE)],
    background: Background = False,
) -> dict[str, Any]:  # fmt: skip
    """Write a snapshot archive (`background`: as a job that reports its steps)."""
    gw = gateway(request)
    if not background:
        with _slot():
            info = gw.store.snapshot(name, progress=False)  # no bar in the gateway's log
        _audit(request, p, "snapshot.create", name, snapshot=info.id)
        return info.to_dict()
    gw.store.collection(name)  # a missing one is a 404 now, not a failed job
    gw.store.require_space(f"a snapshot of {name!r}")

    def run(progress: Any) -> dict[str, Any]:
        info = gw.store.snapshot(name, progress=progress)
        _audit(request, p, "snapshot.create", name, snapshot=info.id)
        return info.to_dict()

    response.status_code = 202
    return {"job": _in_background(gw, "snapshot.create", run, p)}


# Snapshots and restores running at once, as jobs or not, all callers together: each exports or loads a whole
# collection (disk and CPU); past it, a 429 at once rather than a thread more
MAX_SNAPSHOTS = 4
_running = threading.BoundedSemaphore(MAX_SNAPSHOTS)


def _take_slot() -> None:
    if not _running.acquire(blocking=False):
        raise TooManyRequests(f"{MAX_SNAPSHOTS} snapshots or restores are running: try again when one ends")


@contextlib.contextmanager
def _slot() -> Iterator[None]:
    """A place among the `MAX_SNAPSHOTS` for a snapshot or a restore that runs in the call (a 429 when none is
    free), held until it ends."""
    _take_slot()
    try:
        yield
    finally:
        _running.release()


def _in_background(gw: Any, kind: str, fn: Any, p: Principal) -> dict[str, Any]:
    """Start `fn(progress)` as a job of `kind` for `p`, if fewer than `MAX_SNAPSHOTS` snapshots or restores run
    (else a 429); the job's dict."""
    _take_slot()

    def run(progress: Any) -> dict[str, Any]:
        try:
            return dict(fn(progress))
        finally:
            _running.release()

    try:
        return dict(gw.jobs.start(kind, run, owner=p, scope=WRITE_SCOPE).to_dict())
    except BaseException:
        _running.release()
        raise


# every collection's snapshots in one listing, the dropped ones' included (a dropped collection is no longer listed
# under /api/collections, and its snapshots are how it comes back)
snapshots_router = APIRouter(prefix="/api/snapshots", tags=["collections"], route_class=CheckedJSONRoute)


@snapshots_router.get("", dependencies=[READ])
def list_every_snapshot(request: Request) -> dict[str, Any]:
    """Every snapshot of every collection, dropped collections' included, newest first."""
    return {"snapshots": [s.to_dict() for s in gateway(request).store.list_snapshots()]}


@router.get("/{name}/snapshots", dependencies=[READ])
def list_snapshots(name: Name, request: Request) -> dict[str, Any]:
    """Snapshots of a collection (also of a dropped one), newest first."""
    return {"snapshots": [s.to_dict() for s in gateway(request).store.list_snapshots(name)]}


@router.post("/{name}/snapshots/{snapshot_id}/restore")
def restore(
    name: Name,
    snapshot_id: SnapshotId,
    request: Request,
    p: Annotated[Principal, Depends(WRITE)],
    response: Response,
    body: Restore | None = None,
    background: Background = False,
) -> dict[str, Any]:
    """Restore a snapshot into the same collection or a new name; a damaged archive is refused (corrupt_data),
    nothing live touched.
    `background`: as a job that reports its steps (a damaged archive then fails the job, saying why)."""
    gw = gateway(request)
    s, into = gw.store, body.into if body else None

    def run(progress: Any = False) -> dict[str, Any]:  # called here: no bar in the gateway's log
        coll = s.restore_snapshot(name, snapshot_id, into, progress=progress)
        _audit(request, p, "snapshot.restore", name, snapshot=snapshot_id, into=coll.name)
        return s.describe(coll.name).to_dict()

    if not background:
        with _slot():
            return run()
    s.check_restore(name, snapshot_id, into)  # what it would refuse at once: now, not a failed job
    response.status_code = 202
    return {"job": _in_background(gw, "snapshot.restore", run, p)}


@router.delete("/{name}/snapshots/{snapshot_id}", status_code=204)
def delete_snapshot(
    name: Name, snapshot_id: SnapshotId, request: Request, p: Annotated[Principal, Depends(WRITE)]
) -> Response:
    """Delete one snapshot archive."""
    gateway(request).store.delete_snapshot(name, snapshot_id)
    _audit(request, p, "snapshot.delete", name, snapshot=snapshot_id)
    return Response(status_code=204)
