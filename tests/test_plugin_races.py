"""Races between plugin calls on the same data, made to happen: one call held on a threading.Event at the point
where another used to slip in. A real gateway in this process (store, auth, plugin store, brainml inline, candle in
its worker), so the hold can sit inside the call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, wait_for
from helpers import on_thread

from bkg_kernel.auth import Principal
from bkg_kernel.errors import NotFound
from bkg_kernel.gateway.plugin_store import PluginStore
from bkg_kernel.gateway.state import Gateway
from bkg_kernel.plugins.brainml.plugin import chunk
from bkg_kernel.plugins.rustyface.galleries import Galleries
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.settings import Settings

# How long a call that the held one blocks is given before the held one goes on: fixed, the second call waits
# for the lock all that time; unfixed, it finishes well within it and the damage is done.
BLOCKED_S = 1.5


@dataclass
class InProcess:
    gw: Gateway
    admin: Principal
    loop: asyncio.AbstractEventLoop

    def invoke(self, plugin: str, cap: str, body: dict[str, Any]) -> Any:
        host = self.gw.supervisor.get(plugin)
        return asyncio.run_coroutine_threadsafe(host.invoke(cap, body, self.admin), self.loop).result(120)

    def store_handle(self, plugin: str) -> StoreHandle:
        """The store as `plugin` sees it, acting for the admin (the gateway's own plugin store)."""
        serve = PluginStore(self.gw.store, self.gw.auth, self.gw.hub)
        serve.supervisor = self.gw.supervisor
        return StoreHandle(lambda op, args: serve(plugin, self.admin, op, args))


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    data = tmp_path_factory.mktemp("races") / "data"
    gw = Gateway.open(Settings(data_dir=data, admin_key=ADMIN_KEY, call_port=-1), plugins=["brainml", "candle"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="races-loop", daemon=True)
    thread.start()
    gw.hub.bind(loop)  # embeddings go to candle from the gateway's loop
    try:
        wait_for(lambda: all(gw.supervisor.get(p).state == "running" for p in ("brainml", "candle")), timeout=120)
        yield InProcess(gw, gw.auth.authenticate(ADMIN_KEY), loop)
    finally:
        gw.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def hold_first(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    *,
    after: bool = False,
    when: Callable[..., bool] | None = None,
) -> tuple[threading.Event, threading.Event]:
    """Make the first call of `owner.name` that `when` picks wait for `release`, before it runs or `after`
    (`held` says it is waiting)."""
    held, release = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hold = not held.is_set() and (when is None or when(*args, **kwargs))
        out = real(*args, **kwargs) if after else None
        if hold:
            held.set()
            assert release.wait(60), "never released"
        return out if after else real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return held, release


def words(version: str, n: int) -> str:
    return " ".join(f"{version}w{i:02d}" for i in range(n))


def test_two_index_calls_on_one_document_leave_one_version_whole(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review found it: V2 upserts, V1 upserts and deletes its surplus (none), V2 deletes the chunks past its own
    last: V1's first five chunks were left, V1 had answered ten (a cell re-run after a 504, its first run going on)."""
    size = {"size": 60, "overlap": 0}
    texts = {"v0": words("v0", 80), "v1": words("v1", 100), "v2": words("v2", 50)}
    chunks = {v: [t[a:b] for a, b in chunk(t, 60, 0)] for v, t in texts.items()}
    assert len(chunks["v1"]) > len(chunks["v0"]) > len(chunks["v2"]) > 1

    def index(version: str) -> Any:
        doc = {"id": "doc", "text": texts[version]}
        return inproc.invoke("brainml", "brainml.index", {"collection": "race", "documents": [doc], "chunking": size})

    index("v0")
    held, release = hold_first(monkeypatch, StoreHandle, "delete")
    v2, v2_out = on_thread(lambda: index("v2"))
    assert held.wait(60), v2_out  # V2 has written its chunks; its delete waits
    v1, v1_out = on_thread(lambda: index("v1"))
    v1.join(BLOCKED_S)
    release.set()
    v2.join(60)
    v1.join(60)
    assert not [x for x in v1_out + v2_out if isinstance(x, Exception)], (v1_out, v2_out)

    stored = inproc.gw.store.collection("race").scroll({"doc_id": "doc"}, limit=100)
    left = [p.text for p in sorted(stored, key=lambda p: (p.payload or {})["chunk"])]
    assert left in (chunks["v1"], chunks["v2"]), [t[:6] for t in left]


def test_a_subject_deleted_during_a_rename_stays_deleted(inproc: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review found it: rename read ann's faces, delete_subject removed them, rename wrote them back as anna:
    deleted faces (biometric data) were back, and the delete had said it removed them."""
    g = Galleries(inproc.store_handle("rustyface"), dim=8, model="test")
    g.create("race")
    rng = np.random.default_rng(0)

    def faces(subject: str, n: int) -> list[dict[str, Any]]:
        return [{"embedding": rng.normal(size=8).tolist(), "payload": {"subject": subject}} for _ in range(n)]

    ann = g.add_faces("race", faces("ann", 3))
    g.add_faces("race", faces("bob", 2))
    held, release = hold_first(
        monkeypatch, Galleries, "_points", after=True, when=lambda self, gallery, filter, *a: bool(filter)
    )
    rename, rename_out = on_thread(lambda: g.rename("race", "ann", "anna"))
    assert held.wait(60), rename_out  # rename has read ann's faces; it writes them back once released
    delete, delete_out = on_thread(lambda: g.delete_subject("race", "ann"))
    delete.join(BLOCKED_S)
    release.set()
    rename.join(60)
    delete.join(60)

    left = {p["id"]: p["payload"]["subject"] for p in inproc.store_handle("rustyface").scroll("faces-race")[0]}
    if isinstance(delete_out[0], Exception):  # the rename went first: nothing of ann's was left to delete
        assert isinstance(delete_out[0], NotFound) and rename_out[0]["faces"] == 3, delete_out
        assert [left[i] for i in ann] == ["anna"] * 3
    else:
        assert delete_out[0]["deleted_faces"] == 3
        assert not set(ann) & set(left), f"deleted faces are back: {left}"
    assert {s["subject"]: s["faces"] for s in g.subjects("race")}["bob"] == 2
