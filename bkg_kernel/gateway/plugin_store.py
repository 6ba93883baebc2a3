"""The gateway's side of the plugins' store handle (`context.store`): each operation runs as the caller of the
plugin call that asked, checked against that caller's scopes and booked to them (audit, LLM usage).

A plugin keeps its own domain (rustyface's galleries are collections it names) but gains no scope its caller
lacks. Worker requests arrive over the worker's pipe and run on a thread of the plugin host's pool; inline
plugins call in directly from their request thread. The async parts (embedding in candle or llmserver, chat)
run on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from bkg_kernel.errors import InvalidInput, Unavailable
from bkg_kernel.gateway import storeops
from bkg_kernel.runtime.contract import StreamUsage

if TYPE_CHECKING:
    from bkg_kernel.auth import AuthService, Principal
    from bkg_kernel.gateway.hub import Hub
    from bkg_kernel.runtime.supervisor import Supervisor
    from bkg_kernel.store import Store

READ, WRITE, LLM = "collections:read", "collections:write", "llm:use"
ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")  # a plugin's own audit action, after `<plugin id>.`
MAX_AUDIT_DETAIL = 4096  # bytes of JSON a plugin records with one audit entry
AUDIT_OWN = frozenset({"actor", "action", "target", "ok", "key", "plugin"})  # what a plugin's detail cannot name


class PluginStore:
    """Serves `StoreHandle` operations: `store(plugin_id, caller, op, arguments)`."""

    def __init__(self, store: Store, auth: AuthService, hub: Hub) -> None:
        self.store, self.auth, self.hub = store, auth, hub
        self.supervisor: Supervisor | None = None  # set by Gateway.open once the supervisor exists
        # `embedcheck.check_embed_model` bound to the gateway (set by Gateway.open): a collection's embed_model
        # is checked as the REST route checks it
        self.check_embed: Callable[[str | None, int], None] = _unchecked
        self.ops: dict[str, tuple[str | None, Callable[..., Any]]] = {
            "list_collections": (READ, self.list_collections),
            "describe": (READ, self.describe),
            "create_collection": (WRITE, self.create_collection),
            "drop_collection": (WRITE, self.drop_collection),
            "upsert": (WRITE, self.upsert),
            "get": (READ, self.get),
            "scroll": (READ, self.scroll),
            "delete": (WRITE, self.delete),
            "count": (READ, self.count),
            "count_distinct": (READ, self.count_distinct),
            "query": (READ, self.query),
            "embed": (LLM, self.embed),
            "rerank": (LLM, self.rerank),
            "chat": (LLM, self.chat),
            "chat_stream": (LLM, self.chat_stream),  # a generator: a worker's pipe carries its chunks one by one
            "audit": (None, self.record),  # the caller's own act, recorded: no scope
        }

    def __call__(self, plugin_id: str, caller: Principal, op: str, args: dict[str, Any]) -> Any:
        """Run one operation for `plugin_id` as `caller` (403 naming the scope the caller lacks)."""
        found = self.ops.get(op)
        if found is None:
            raise InvalidInput(f"the store has no operation {op!r}", field="op")
        scope, fn = found
        if scope is None:  # recording what the caller did: as they were when they did it (a key revoked since too)
            return fn(plugin_id, caller, **args)
        caller = self.auth.as_now(caller)  # a job queued or running since: its caller as they are now
        caller.require(scope, f"{plugin_id} ({op}, on behalf of {caller.username})")
        return fn(plugin_id, caller, **args)

    def _sup(self) -> Supervisor:
        if self.supervisor is None:
            raise Unavailable("the gateway is still starting")
        return self.supervisor

    def _await(self, coro: Coroutine[Any, Any, Any]) -> Any:
        loop = self.hub.loop
        if loop is None or loop.is_closed():
            coro.close()
            raise Unavailable("the gateway's event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def _audit(self, caller: Principal, plugin_id: str, action: str, target: str | None, **detail: Any) -> None:
        self.auth.audit(caller.username, action, target, **{**detail, "key": caller.key_id, "plugin": plugin_id})

    def record(
        self, plugin_id: str, caller: Principal, action: str, target: str | None, detail: dict[str, Any]
    ) -> None:
        """A plugin's audit entry for what its caller did (`StoreHandle.audit`), under the plugin's own name: a
        plugin records `repoagent.command`, never `user.delete`."""
        if not isinstance(action, str) or len(action) > 64 or not ACTION.fullmatch(action):
            raise InvalidInput("action must be lowercase letters, digits, '_' and '.', 64 at most", field="action")
        if target is not None and (not isinstance(target, str) or len(target) > 256):
            raise InvalidInput("target must be a string of 256 characters at most", field="target")
        if not isinstance(detail, dict) or len(json.dumps(detail, default=str)) > MAX_AUDIT_DETAIL:
            raise InvalidInput(f"detail must be an object of {MAX_AUDIT_DETAIL} bytes of JSON at most", field="detail")
        if taken := sorted(set(detail) & AUDIT_OWN):  # the row's own columns, and who and what the gateway records
            raise InvalidInput(
                f"detail cannot set {', '.join(taken)}: the gateway records it", field=f"detail.{taken[0]}"
            )
        self._audit(caller, plugin_id, f"{plugin_id}.{action}", target, **detail)

    # -- collections ----------------------------------------------------------------------------------
    def list_collections(self, plugin_id: str, caller: Principal) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.store.list_collections()]

    def describe(self, plugin_id: str, caller: Principal, name: str) -> dict[str, Any]:
        return self.store.describe(name).to_dict()

    def create_collection(
        self,
        plugin_id: str,
        caller: Principal,
        name: str,
        dim: int,
        metric: str,
        index: str,
        embed_model: str | None,
        params: dict[str, int],
    ) -> dict[str, Any]:
        self.check_embed(embed_model, dim)
        self.store.create_collection(name, dim, metric, index, embed_model=embed_model, **params)
        self._audit(caller, plugin_id, "collection.create", name, dim=dim, metric=metric, index=index)
        return self.store.describe(name).to_dict()

    def drop_collection(self, plugin_id: str, caller: Principal, name: str) -> None:
        self.store.drop_collection(name)
        self._audit(caller, plugin_id, "collection.drop", name)

    # -- points ---------------------------------------------------------------------------------------
    def upsert(
        self, plugin_id: str, caller: Principal, name: str, points: list[dict[str, Any]], embed_model: str | None
    ) -> dict[str, Any]:
        coll = self.store.collection(name)  # this runs on a store thread: only the embedding goes to the loop
        embedded = self._await(storeops.embed_missing(self._sup(), caller, coll, points, embed_model))
        r = coll.upsert(points)
        return {"upserted": r.upserted, "embedded": embedded, "took_ms": r.took_ms}

    def get(
        self, plugin_id: str, caller: Principal, name: str, ids: list[int | str], with_vectors: bool
    ) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.store.collection(name).get(ids, with_vectors=with_vectors)]

    def scroll(
        self,
        plugin_id: str,
        caller: Principal,
        name: str,
        filter: dict[str, Any] | None,
        limit: int,
        after: str | None,
        with_vectors: bool,
    ) -> tuple[list[dict[str, Any]], str | None]:
        pts = self.store.collection(name).scroll(filter, limit=limit, after=after, with_vectors=with_vectors)
        return [p.to_dict() for p in pts], pts.next_after

    def delete(
        self, plugin_id: str, caller: Principal, name: str, ids: list[int | str] | None, filter: dict[str, Any] | None
    ) -> int:
        return self.store.collection(name).delete(ids, filter=filter)

    def count(self, plugin_id: str, caller: Principal, name: str, filter: dict[str, Any] | None) -> int:
        return self.store.collection(name).count(filter)

    def count_distinct(
        self, plugin_id: str, caller: Principal, name: str, field: str, filter: dict[str, Any] | None
    ) -> int:
        return self.store.collection(name).count_distinct(field, filter)

    def query(self, plugin_id: str, caller: Principal, name: str, **q: Any) -> list[dict[str, Any]]:
        coll = self.store.collection(name)
        vector, text, mode = q.pop("vector"), q.pop("text"), q.pop("mode")
        if vector is None and text and mode != "text":  # only an embedding goes to the event loop (text mode has
            # none to compute); the search runs on this thread
            vector, mode = self._await(storeops.query_vector(self._sup(), caller, coll, vector, text, mode))
        results: list[dict[str, Any]] = coll.query(vector, text, mode=mode, **q).to_dict()["results"]
        return results

    # -- models ---------------------------------------------------------------------------------------
    def embed(self, plugin_id: str, caller: Principal, model: str, texts: list[str], dim: int | None = None) -> Any:
        return self._await(storeops.embed(self._sup(), caller, model, texts, dim, field="model"))

    def rerank(self, plugin_id: str, caller: Principal, model: str, query: str, documents: list[str]) -> list[float]:
        out: list[float] = self._await(storeops.rerank(self._sup(), caller, model, query, documents))
        return out

    def chat(self, plugin_id: str, caller: Principal, body: dict[str, Any], route: str) -> dict[str, Any]:
        host = self._sup().get("llmserver")  # an answer that comes after its call timed out is booked there
        result: dict[str, Any] = self._await(host.invoke("llm.chat", body, caller, route=route))
        self.auth.book_usage(caller, route, result)
        return result

    def chat_stream(
        self, plugin_id: str, caller: Principal, body: dict[str, Any], route: str
    ) -> Iterator[dict[str, Any]]:
        """`chat`'s chunks, pulled one at a time from llmserver's stream on the event loop into the plugin's thread;
        what it used is booked to the caller under `route` (its last chunk's usage, or the count so far when it ends
        before that chunk: a plugin that stopped reading, its own client gone). Closing it stops the generation."""
        stream = self._sup().get("llmserver").stream("llm.chat", {**body, "stream": True}, caller)

        async def pull() -> dict[str, Any] | None:
            try:
                chunk: dict[str, Any] = await stream.__anext__()
            except StopAsyncIteration:
                return None
            return chunk

        def chunks() -> Iterator[dict[str, Any]]:
            usage = StreamUsage(lambda result: self.auth.book_usage(caller, route, result), body.get("model"))
            try:
                while (chunk := self._await(pull())) is not None:
                    if (shown := usage.read(chunk)) is not None:
                        yield shown
            finally:
                with contextlib.suppress(Unavailable):  # the loop has gone: so has the stream
                    self._await(stream.aclose())
                usage.close()  # a plugin that stopped reading (its client left) pays what it used

        return chunks()


def _unchecked(spec: str | None, dim: int) -> None:
    """No registry to check an embed_model against (a PluginStore outside a gateway)."""
