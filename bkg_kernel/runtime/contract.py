"""The plugin contract: what every plugin declares, and how its capabilities are invoked.

A plugin is plain Python. The gateway hosts it inline or in a worker process; tests and `bkg.local()` can
run the same object in-process. Capabilities are methods marked with `@capability`, taking one pydantic
model and returning one, so their JSON Schemas come for free.

A capability marked `job=True` is long work (training): its method also takes a `progress(fraction, message)`
callable. Through the gateway it runs in the background as a job (202 + job id; progress on the WebSocket
topic `jobs`); called directly it simply runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import queue
import threading
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if typing.TYPE_CHECKING:
    from fastapi import APIRouter

    from bkg_kernel.auth import Principal

from bkg_kernel.errors import InvalidInput, NotFound, Unavailable, invalid_from_pydantic, name_hint
from bkg_kernel.runtime import calls
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.strict import whole_floats_only

F = TypeVar("F", bound=Callable[..., Any])
MASK = "********"
# Set on a streamed generation's chunks (and on chunks of nothing else): the usage so far, which the gateway books
# when the stream ends before its last chunk (a client that left); never sent to the client.
RUNNING_USAGE = "bkg_usage_so_far"
# The route a call that spends LLM tokens is booked under when its caller stopped waiting before the answer (the
# host books that answer then; an answered call is booked by whoever called). Set by `booked_under`.
USAGE_ROUTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bkg_usage_route", default=None)
# Calls of one plugin marked `quick` that run at once: they take none of its `max_concurrent` request slots and run
# on threads of their own (in a worker too), so a model list answers while every slot generates.
QUICK_CONCURRENT = 4
# The most request slots a plugin may have; a worker's request threads are made as calls come, up to this many, and
# the gateway's slots (`max_concurrent`, applied without a restart) decide how many calls run at once.
MAX_CONCURRENT = 256
Progress = Callable[..., None]  # progress(fraction 0..1, message="")


def validate_input(model: type[BaseModel], data: Any) -> BaseModel:
    """A capability's input, validated the way JSON Schema reads it: pydantic's strict JSON mode, so a JSON
    `true` is not the number 1 and `"5"` is not an integer (its lax mode takes both), while `4.0` is the integer 4
    (`bkg_kernel.strict`); 422 naming the field. Data that is not JSON (a Python caller's bytes, say) is
    validated in the lax Python mode instead."""
    data = data if data is not None else {}
    if isinstance(data, dict):
        _known_only(model, data)
    try:
        try:
            raw = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:
            return model.model_validate(data)
        try:
            return model.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            if not whole_floats_only(exc):
                raise
            return model.model_validate_json(raw, strict=False)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc, "input") from None


_NAMES: dict[type[BaseModel], frozenset[str]] = {}


def _known_only(model: type[BaseModel], data: dict[str, Any]) -> None:
    """422 for a top-level name the input model does not take (`filter` for `filters`, `k` for `top_k`): it was
    dropped without a word, and the call ran as if it had not been given. A model that allows extra names keeps
    them."""
    if model.model_config.get("extra") == "allow":
        return
    names = _NAMES.get(model)
    if names is None:
        found = set(model.model_fields)
        found |= {a for f in model.model_fields.values() for a in (f.alias, f.validation_alias) if isinstance(a, str)}
        names = _NAMES[model] = frozenset(found)
    for key in data:
        if key not in names:
            hint = name_hint(str(key), names)
            raise InvalidInput(f"input.{key}: not an input of this capability ({hint})", field=f"input.{key}")


class Cancelled(Exception):
    """Raised by `progress()` inside a job whose client cancelled it."""


class PluginSettings(BaseModel):
    """Settings every plugin has; a plugin subclasses this to add its own (the JSON Schema is its config form).
    A number must be finite: an Infinity was stored, shown back as null, and every later save of the form failed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_timeout: float = Field(30.0, gt=0, le=3600, description="Seconds before a request gets a 504.")
    max_concurrent: int = Field(4, ge=1, le=MAX_CONCURRENT, description="Requests run at once; more wait in the queue.")
    max_queue: int = Field(64, ge=0, le=10_000, description="Requests that may wait; beyond it a 429.")
    memory_limit_mb: int | None = Field(
        None, ge=16, description="Restart the worker when its resident memory passes this many MB."
    )

    secret_fields: ClassVar[tuple[str, ...]] = ()  # shown as MASK over the API and in the audit log
    # what anyone who may operate the plugin (plugins:write) may change; every other setting decides what the
    # plugin reaches for all its callers (folders, URLs, commands, models, secrets) and needs every scope to change
    tunable_fields: ClassVar[tuple[str, ...]] = ("request_timeout", "max_concurrent", "max_queue", "memory_limit_mb")
    # what the gateway itself applies from the next call on (its request slots and queue, each call's deadline, the
    # supervisor's memory check): a change of these alone restarts nothing, and the models a worker holds stay loaded
    live_fields: ClassVar[tuple[str, ...]] = ("request_timeout", "max_concurrent", "max_queue", "memory_limit_mb")
    # what the running plugin applies itself (`Plugin.retune`), in its worker too: a change of these and of the live
    # fields alone restarts nothing (candle's max_loaded and keep_alive_s: its models stay loaded, as Ollama's do)
    retunable_fields: ClassVar[tuple[str, ...]] = ()

    def public(self) -> dict[str, Any]:
        """Return the settings with secret values masked (what the API and the audit log show)."""
        data = self.model_dump()
        for name in self.secret_fields:
            if data.get(name):
                data[name] = MASK
        return data

    def changed(self, other: PluginSettings) -> list[str]:
        """The settings whose values differ in `other`, by name."""
        return sorted(k for k in type(self).model_fields if getattr(self, k) != getattr(other, k))

    def keep_secrets(self, new: dict[str, Any]) -> dict[str, Any]:
        """Return `new` with masked secret values replaced by the current ones (a form sends the mask back)."""
        return {k: (getattr(self, k) if k in self.secret_fields and v == MASK else v) for k, v in new.items()}


class JSONResult(BaseModel):
    """A free-form output (any fields, none declared) that the plugin builds from plain JSON values only (dict,
    list, str, int, float, bool, None): a call's answer is its fields as they are, not walked again by pydantic
    (~50 µs for a page of 30 hits, on every query). A value of any other type fails where the answer is encoded."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class Capability:
    """One thing a plugin can do: id (`llm.chat`), the scope it needs, and its input / output models."""

    id: str
    summary: str
    scope: str
    input: type[BaseModel]
    output: type[BaseModel]
    method: str
    job: bool = False
    books_usage: bool = False  # its answer's `usage` (LLM tokens) is booked to the caller by whoever calls it
    quick: bool = False  # a short read-only call: no request slot, its own few threads (`QUICK_CONCURRENT`)
    big_input: bool = False  # takes inputs up to the gateway's max_body_mb (documents, images, batches); else 1 MiB
    check: str | None = None  # a job's: the capability the gateway asks first, so a refused input queues no job

    def describe(self) -> dict[str, Any]:
        """Return the capability with its JSON Schemas."""
        return {
            "id": self.id,
            "summary": self.summary,
            "scope": self.scope,
            "job": self.job,
            **({"check": self.check} if self.check else {}),
            "input_schema": self.input.model_json_schema(),
            "output_schema": self.output.model_json_schema(),
        }


def capability(
    id: str,
    *,
    scope: str,
    job: bool = False,
    books_usage: bool = False,
    big_input: bool = False,
    check: str | None = None,
    quick: bool = False,
) -> Callable[[F], F]:
    """Mark a plugin method `def m(self, inp: InModel) -> OutModel` as the capability `id`.

    With `job=True` the method is `def m(self, inp, progress)` and the gateway runs it as a background job. With
    `books_usage=True` its answer is an LLM's (OpenAI `usage` with token counts), and the gateway books those
    tokens to the caller's key and user when a caller invokes it. An input over 1 MiB is refused (413) unless
    `big_input=True` (documents to index, images, batches): checking a big input holds the interpreter, and only
    the capabilities made for such inputs take them. A job's `check` names a capability (same input, called, not
    queued) that refuses what the job would refuse at its start (no such collection, a field no row has): the
    gateway calls it before it queues the job, so the caller gets that 4xx at once, not a failed job later.
    `quick=True` marks a short read-only call (a model list, a status): it waits for none of the plugin's
    `max_concurrent` request slots, which bound the heavy work, but runs on a few threads of its own
    (`QUICK_CONCURRENT`), so it answers while long calls hold every slot (as Ollama's `/api/tags` does).
    """

    def mark(fn: F) -> F:
        # Capability's own fields, read back by Plugin.capabilities()
        fn.__dict__["__bkg_capability__"] = {
            "id": id, "scope": scope, "job": job, "books_usage": books_usage, "big_input": big_input, "check": check,
            "quick": quick,
        }  # fmt: skip
        return fn

    return mark


class GatewayAPI(typing.Protocol):
    """What the gateway hands a plugin's `routes()` hook: the auth dependency and calls into plugins, as a caller."""

    def need(self, scope: str | None) -> Any:
        """Return a FastAPI dependency that authenticates the request, checks `scope` and yields the Principal."""

    @property
    def route_class(self) -> type[Any]:
        """The `APIRoute` class for routes whose JSON bodies may be big: the body (a JSON object, one pydantic
        model) is parsed before FastAPI sees it, off the event loop when big; a top-level array past its cap in the
        model's `MAX_ITEMS` class attribute (field -> most elements; every list field should be named there, any
        other array gets 1,000) is refused as it is read; the route takes bodies up to the model's `MAX_BODY_BYTES`
        (default 1 MiB, never over the gateway's `max_body_mb`)."""

    def big_bodies(self, endpoint: Any) -> Any:
        """Mark an endpoint that reads its body itself without holding the event loop (a streamed form upload): it
        takes bodies up to the gateway's `max_body_mb`; any other route's body is at most 1 MiB."""

    async def invoke(self, plugin_id: str, capability_id: str, data: Any, caller: Principal) -> Any:
        """Run a capability of a plugin as `caller`."""

    def stream(
        self, plugin_id: str, capability_id: str, data: Any, caller: Principal
    ) -> typing.AsyncGenerator[Any, None]:
        """Run a streaming capability of a plugin as `caller`; closing the iterator cancels it."""

    def record_usage(self, caller: Principal, route: str, result: dict[str, Any]) -> None:
        """Book an LLM result's token usage to the caller's key and user."""


@contextlib.contextmanager
def booked_under(route: str) -> Iterator[None]:
    """Have the calls made in this block (and the tasks they start) book the tokens of an answer their caller no
    longer waited for under `route` (`/v1/chat/completions`) rather than the plugin's invoke route."""
    token = USAGE_ROUTE.set(route)
    try:
        yield
    finally:
        USAGE_ROUTE.reset(token)


class StreamUsage:
    """What a streamed generation used, booked once however the stream ends: each chunk of a local generation
    carries the count so far (`RUNNING_USAGE`, taken off here: the client never sees it), its last chunk the exact
    usage; a stream that ends before that chunk (its client left, it failed) books the count so far. `book(result)`
    books an answer's `usage` (`{"model", "usage"}`)."""

    __slots__ = ("_book", "booked", "last", "model", "so_far")

    def __init__(self, book: Callable[[dict[str, Any]], None], model: str | None = None) -> None:
        self._book, self.model = book, model
        self.so_far: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None  # the last `usage` a chunk with choices carried (an upstream's)
        self.booked = False

    def read(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as its reader gets it (the count so far taken off it; None when it held nothing else). The
        chunk of the exact usage (usage, no choices) is booked as it passes."""
        self.model = chunk.get("model", self.model)
        if RUNNING_USAGE in chunk:
            self.so_far = chunk.pop(RUNNING_USAGE)
            if not chunk:
                return None
        if chunk.get("usage") and not self.booked:
            if chunk.get("choices"):  # an upstream server may send it with the last choice: booked at the end
                self.last = chunk["usage"]
            else:
                self.booked = True
                self._book(chunk)
        return chunk

    def close(self) -> None:
        """The stream has ended: book the last usage a chunk carried, else the count so far, unless its exact usage
        was booked."""
        usage = self.last or self.so_far
        if not self.booked and usage:
            self.booked = True
            self._book({"model": self.model, "usage": usage})


def _no_store(op: str, args: dict[str, Any]) -> Any:
    raise Unavailable("this plugin runs without a gateway: it cannot reach the store")


@dataclass
class PluginContext:
    """What the host gives a plugin: the data dir, a folder of its own, the store handle and (inline only)
    gateway services. `store` acts as the caller of the running call; `caller` says who that is."""

    data_dir: Path
    work_dir: Path
    services: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    store: StoreHandle = field(default_factory=lambda: StoreHandle(_no_store))

    @property
    def caller(self) -> Principal | None:
        """Return who the running call acts for (None outside a call, e.g. in `start()`)."""
        call = calls.current()
        return call.caller if call is not None else None


class Plugin:
    """Base class of every plugin."""

    id: ClassVar[str]
    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    mode: ClassVar[Literal["inline", "worker"]] = "worker"
    Settings: ClassVar[type[PluginSettings]] = PluginSettings

    def __init__(self, settings: PluginSettings | None = None, context: PluginContext | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.context = context
        self.log = logging.getLogger(f"bkg.plugin.{self.id}")

    @classmethod
    def create(
        cls,
        settings: PluginSettings,
        data_dir: Path,
        services: dict[str, Any] | None = None,
        model_dir: Path | None = None,
        store: StoreHandle | None = None,
    ) -> Plugin:
        """Build the plugin with its context: `<data_dir>/plugins/<id>` as its own folder (created here)."""
        work = data_dir / "plugins" / cls.id
        work.mkdir(parents=True, exist_ok=True)
        if model_dir is None:
            from bkg_kernel.settings import get_settings

            model_dir = get_settings().model_dir
        context = PluginContext(data_dir, work, services or {}, Path(model_dir))
        if store is not None:
            context.store = store
        return cls(settings, context)

    @classmethod
    def routes(cls, api: GatewayAPI) -> APIRouter | None:
        """Return extra HTTP routes for the gateway to mount (llmserver's `/v1`), built on what `api` offers."""
        return None

    def start(self) -> None:
        """Acquire resources (load models, open files); raise to fail the start."""

    def stop(self) -> None:
        """Release resources."""

    def health(self) -> dict[str, Any]:
        """Return `{"ok": bool, ...}`; not ok marks the plugin degraded."""
        return {"ok": True}

    def retune(self, settings: PluginSettings) -> None:
        """Take new settings while running, where they differ from the old in `retunable_fields` (and the gateway's
        `live_fields`) alone; raise to have the plugin restarted with them instead."""
        self.settings = settings

    @classmethod
    def capabilities(cls) -> dict[str, Capability]:
        """Return the plugin's capabilities by id, read from its `@capability` methods (once per class: reading
        type hints costs ~0.6 ms, and every request asks)."""
        found: dict[str, Capability] = cls._per_class("_capabilities_cache", cls._read_capabilities)
        return found

    @classmethod
    def _per_class(cls, attr: str, build: Callable[[], Any]) -> Any:
        """`build()`'s result kept on this class itself (a subclass builds its own)."""
        if attr not in cls.__dict__:
            setattr(cls, attr, build())
        return cls.__dict__[attr]

    @classmethod
    def _read_capabilities(cls) -> dict[str, Capability]:
        found: dict[str, Capability] = {}
        for attr, fn in inspect.getmembers(cls, inspect.isfunction):
            mark = getattr(fn, "__bkg_capability__", None)
            if mark is None:
                continue
            hints = typing.get_type_hints(fn)
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            if len(params) != (2 if mark["job"] else 1) or "return" not in hints:
                extra = " and a progress callable" if mark["job"] else ""
                raise TypeError(f"capability {mark['id']} must take one pydantic model{extra} and return one")
            doc = (inspect.getdoc(fn) or "").splitlines()
            found[mark["id"]] = Capability(summary=doc[0] if doc else "", input=hints[params[0]],
                                           output=hints["return"], method=attr, **mark)  # fmt: skip
        return found

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Return the declaration the gateway, the lab panel and the dashboards build themselves from (built once
        per class: its JSON Schemas take milliseconds to make, and panels poll it; callers do not change it)."""
        described: dict[str, Any] = cls._per_class("_described_cache", cls._describe)
        return described

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        return {
            "id": cls.id,
            "name": cls.name,
            "version": cls.version,
            "description": cls.description,
            "mode": cls.mode,
            "capabilities": [c.describe() for c in cls.capabilities().values()],
            "settings_schema": cls.Settings.model_json_schema(),
        }

    def stream(self, capability_id: str, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """Run a streaming capability: yield chunks until done or `cancelled` is set (plugins that stream override).

        A job capability streams `{"progress": f, "message": m}` chunks, then `{"result": output}`.
        """
        cap = self.capabilities().get(capability_id)
        if cap is None or not cap.job:
            raise NotFound(f"plugin {self.id!r} cannot stream {capability_id!r}", field="capability")
        yield from self._run_job(cap, data, cancelled)

    def _run_job(self, cap: Capability, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        inp = self._validate(cap, data)
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def progress(fraction: float, message: str = "") -> None:
            if cancelled.is_set():
                raise Cancelled(f"{cap.id} was cancelled")
            events.put(("progress", {"progress": float(fraction), "message": message}))

        def run() -> None:
            try:
                out = getattr(self, cap.method)(inp, progress)
                events.put(("result", {"result": cap.output.model_validate(out).model_dump(mode="json")}))
            except BaseException as exc:  # handed to the caller's thread
                events.put(("error", exc))

        ctx = contextvars.copy_context()  # the job's thread acts for the same caller
        threading.Thread(target=ctx.run, args=(run,), name=f"job-{cap.id}", daemon=True).start()
        while True:
            kind, item = events.get()
            if kind == "error":
                raise item
            yield item
            if kind == "result":
                return

    def _validate(self, cap: Capability, data: Any) -> BaseModel:
        return validate_input(cap.input, data)

    def invoke(self, capability_id: str, data: Any) -> dict[str, Any]:
        """Validate `data` against the capability's input model, run it, return its output as JSON data."""
        cap = self.capabilities().get(capability_id)
        if cap is None:
            raise NotFound(f"plugin {self.id!r} has no capability {capability_id!r}", field="capability")
        inp = self._validate(cap, data)
        method = getattr(self, cap.method)
        out = method(inp, lambda fraction, message="": None) if cap.job else method(inp)
        if type(out) is cap.output and issubclass(cap.output, JSONResult) and not cap.output.model_fields:
            return dict(out.__pydantic_extra__ or {})  # plain JSON data already: not walked again
        return cap.output.model_validate(out).model_dump(mode="json")
