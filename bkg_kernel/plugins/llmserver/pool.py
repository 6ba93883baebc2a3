"""Loaded models: several at once within a memory budget, parallel slots per model, idle unload (keep-alive).

Each slot is its own llama.cpp model and context over the mmap'd GGUF, so a second slot costs its KV cache and
buffers, not another copy of the weights in memory. A model idle longer than its keep-alive is unloaded, like
Ollama's. Loading a model or adding a slot (seconds) happens outside the pool's lock, with its memory reserved
first: requests to models already loaded keep flowing meanwhile. A loaded model is the registry entry's file (its
sha256): an id removed and registered again with another file loads the new one, and the old one is unloaded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bkg_kernel.errors import InvalidInput, ModelLoadFailed, NotFound, Unavailable
from bkg_kernel.models.registry import ModelEntry, ModelRegistry

GGUF_KINDS = ("gguf-llm", "gguf-embedding")


@dataclass
class Loaded:
    """One model in memory with its slots (contexts)."""

    model_id: str
    kind: str
    sha256: str  # the registry entry's: an id registered again with another file is another model
    path: Path
    embedding: bool
    n_ctx: int
    keep_alive: float
    weights_bytes: int
    slot_bytes: int
    slots: list[Any] = field(default_factory=list)
    free: list[Any] = field(default_factory=list)
    busy: int = 0
    adding: int = 0  # slots being made (outside the pool's lock)
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)
    template: str | None = None
    bos: str = ""
    eos: str = ""

    @property
    def bytes(self) -> int:
        return self.weights_bytes + self.slot_bytes * len(self.slots)

    def describe(self) -> dict[str, Any]:
        """Return the loaded state as JSON data."""
        idle = time.monotonic() - self.last_used
        return {
            "model": self.model_id,
            "sha256": self.sha256,
            "embedding": self.embedding,
            "slots": len(self.slots),
            "busy": self.busy,
            "n_ctx": self.n_ctx,
            "memory_mb": round(self.bytes / 2**20, 1),
            "keep_alive": self.keep_alive,
            "idle_s": round(idle, 1),
            "expires_in_s": None if self.keep_alive < 0 else round(max(0.0, self.keep_alive - idle), 1),
        }


class ModelPool:
    """Hand out llama.cpp contexts; load on first use, evict idle models to stay in the budget."""

    def __init__(self, registry: ModelRegistry, settings: Any) -> None:
        self.registry = registry
        self.settings = settings
        self.models: dict[tuple[str, bool], Loaded] = {}
        self.loading: set[tuple[str, bool]] = set()  # being loaded (outside the lock) right now
        self.reserved = 0  # bytes set aside for loads and new slots in progress
        self.cond = threading.Condition()
        self._stop = threading.Event()
        threading.Thread(target=self._reaper, name="llm-keepalive", daemon=True).start()

    @property
    def slots(self) -> int:
        return int(self.settings.max_concurrent)

    def used_bytes(self) -> int:
        """Return the estimated memory of every loaded model (under the lock)."""
        return sum(m.bytes for m in self.models.values()) + self.reserved

    def snapshot(self) -> tuple[dict[tuple[str, bool], dict[str, Any]], int]:
        """Describe the loaded models and the memory in use, read under the lock: loads and unloads on other
        threads change `models`, and iterating it meanwhile fails ("dictionary changed size during iteration")."""
        with self.cond:
            return {k: m.describe() for k, m in self.models.items()}, self.used_bytes()

    # -- loading ----------------------------------------------------------------------------------
    def _new_context(self, m: Loaded) -> Any:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_UNSPECIFIED, Llama

        s = self.settings
        threads = s.n_threads or default_threads()
        pooling = LLAMA_POOLING_TYPE_UNSPECIFIED
        if m.embedding and m.kind == "gguf-llm":
            pooling = LLAMA_POOLING_TYPE_MEAN  # a decoder used for embeddings: mean of its token states
        # an input to embed goes in one batch, whole (llama-cpp-python's embed() cut it at n_batch, 512, unsaid)
        batch = m.n_ctx if m.embedding else min(s.n_batch, m.n_ctx)
        try:
            return Llama(
                model_path=str(m.path),
                n_ctx=m.n_ctx,
                n_batch=batch,
                n_ubatch=batch,
                n_threads=threads,
                n_threads_batch=threads,
                embedding=m.embedding,
                pooling_type=pooling,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadFailed(
                f"llama.cpp cannot load model {m.model_id!r} ({m.path.name}): {exc}", field="model"
            ) from None

    def _make_room(self, need: int, keep: tuple[str, bool] | None = None) -> None:
        budget = int(self.settings.memory_budget_mb) * 2**20
        while self.used_bytes() + need > budget:
            idle = [(m.last_used, k) for k, m in self.models.items() if m.busy == 0 and k != keep]
            if not idle:
                used = self.used_bytes() / 2**20
                raise Unavailable(
                    f"memory budget of {self.settings.memory_budget_mb} MB is full ({used:,.0f} MB in use by busy "
                    f"models; this needs {need / 2**20:,.0f} MB more): raise memory_budget_mb or unload a model"
                )
            self._unload_locked(min(idle)[1])

    def _load_locked(self, entry: ModelEntry, embedding: bool, keep_alive: float | None) -> Loaded:
        from bkg_kernel.models.gguf import read_gguf

        model_id = entry.id
        if entry.kind not in GGUF_KINDS:
            raise InvalidInput(f"model {model_id!r} is a {entry.kind} model; llmserver runs GGUF models", field="model")
        if entry.kind == "gguf-embedding" and not embedding:
            raise InvalidInput(f"model {model_id!r} is an embedding model: use it for embeddings", field="model")
        path = self.registry.resolve(entry)
        info = read_gguf(path)  # refuses a file that was damaged after it was registered
        train_ctx = int(info.arch_value("context_length") or self.settings.n_ctx)
        n_ctx = min(int(self.settings.n_ctx), train_ctx)
        layers = int(info.arch_value("block_count") or 0)
        n_embd = int(info.arch_value("embedding_length") or 0)
        heads = int(info.arch_value("attention.head_count") or 1)
        kv_heads = int(info.arch_value("attention.head_count_kv") or heads)
        slot_bytes = n_ctx * layers * (n_embd * kv_heads // max(heads, 1)) * 2 * 2 + 16 * 2**20  # f16 K+V, buffers
        if embedding and entry.kind == "gguf-llm":  # a whole input in one batch, each token's logits made (twice)
            slot_bytes += n_ctx * int(info.arch_value("vocab_size") or 0) * 4 * 2
        m = Loaded(
            model_id=model_id,
            kind=entry.kind,
            sha256=entry.sha256,
            path=path,
            embedding=embedding,
            n_ctx=n_ctx,
            keep_alive=self.settings.keep_alive if keep_alive is None else keep_alive,
            weights_bytes=path.stat().st_size,
            slot_bytes=slot_bytes,
            template=info.metadata.get("tokenizer.chat_template"),
        )
        need = m.weights_bytes + m.slot_bytes
        self._make_room(need)
        llm = self._outside_lock(self._new_context, m, need, key=(model_id, embedding))
        m.bos, m.eos = _token_text(llm, llm.token_bos()), _token_text(llm, llm.token_eos())
        m.slots.append(llm)
        m.free.append(llm)
        self.models[(model_id, embedding)] = m
        return m

    def _outside_lock(self, fn: Any, m: Loaded, need: int, key: tuple[str, bool] | None = None) -> Any:
        """Run `fn(m)` (a slow llama.cpp load) with the lock released and `need` bytes reserved (called with the
        lock held; holds it again on return)."""
        self.reserved += need
        if key is not None:
            self.loading.add(key)
        self.cond.release()
        try:
            return fn(m)
        finally:
            self.cond.acquire()
            self.reserved -= need
            if key is not None:
                self.loading.discard(key)
            self.cond.notify_all()

    def _entry(self, model_id: str) -> ModelEntry:
        """The registry's entry of a GGUF model llmserver can run; a 404 naming only those (not every model the
        registry holds: candle's, brainml's classifiers), and for a model spec of another runner, where it runs."""
        runner, _, bare = model_id.partition(":")
        if bare and runner == "candle":
            raise InvalidInput(f"model {model_id!r} runs in candle, not llmserver: embed with it through /api/embed "
                               f"(the model {bare!r} there), or name a GGUF model", field="model")  # fmt: skip
        try:
            return self.registry.get(model_id)
        except NotFound:
            known = ", ".join(sorted(m.id for m in self.registry.list() if m.kind in GGUF_KINDS)) or "none"
            raise NotFound(f"model {model_id!r} is not a registered GGUF model (llmserver runs: {known})",
                           field="model") from None  # fmt: skip

    def _wait_loading(self, key: tuple[str, bool]) -> None:
        while key in self.loading:  # another request is loading it: wait for that load, do not start a second
            self.cond.wait(1.0)

    def _current_locked(self, model_id: str, embedding: bool, keep_alive: float | None) -> Loaded:
        """The instance of the file `model_id` names now, loaded if it is not (under the lock); one loaded from the
        file it named before it was removed and registered again is unloaded first."""
        key = (model_id, embedding)
        self._wait_loading(key)
        entry = self._entry(model_id)  # after the wait: a stale read never unloads what a later one loaded
        m = self.models.get(key)
        if m is not None and m.sha256 != entry.sha256:
            self._unload_locked(key)  # its busy slots close when their requests end
            m = None
        return self._load_locked(entry, embedding, keep_alive) if m is None else m

    def load(self, model_id: str, *, embedding: bool = False, keep_alive: float | None = None) -> Loaded:
        """Load a model now (or refresh its keep-alive)."""
        with self.cond:
            m = self._current_locked(model_id, embedding, keep_alive)
            if keep_alive is not None:
                m.keep_alive = keep_alive
            m.last_used = time.monotonic()
            return m

    @contextlib.contextmanager
    def acquire(self, model_id: str, *, embedding: bool = False) -> Iterator[tuple[Loaded, Any]]:
        """Hold one slot of a model (loading it, or adding a slot, as needed) for one request."""
        key = (model_id, embedding)
        with self.cond:
            while True:
                m = self._current_locked(model_id, embedding, None)
                if m.free:
                    llm = m.free.pop()
                    break
                if len(m.slots) + m.adding < self.slots:
                    self._make_room(m.slot_bytes, keep=key)
                    m.adding += 1
                    try:
                        llm = self._outside_lock(self._new_context, m, m.slot_bytes)
                    finally:
                        m.adding -= 1
                    if self.models.get(key) is not m:  # unloaded while its new slot was made
                        llm.close()
                        continue
                    m.slots.append(llm)
                    break
                self.cond.wait(1.0)
            m.busy += 1
        try:
            yield m, llm
        finally:
            with self.cond:
                m.busy -= 1
                m.last_used = time.monotonic()
                if self.models.get(key) is m:
                    m.free.append(llm)
                else:  # unloaded while busy: this was its last user
                    llm.close()
                self.cond.notify_all()

    # -- unloading --------------------------------------------------------------------------------
    def _unload_locked(self, key: tuple[str, bool]) -> None:
        m = self.models.pop(key)
        for llm in m.free:
            llm.close()
        m.free.clear()

    def unload(self, model_id: str) -> list[str]:
        """Unload a model (chat and embedding instances); busy slots close when their request ends."""
        with self.cond:
            keys = [k for k in self.models if k[0] == model_id]
            for k in keys:
                self._unload_locked(k)
            return [f"{k[0]}{' (embedding)' if k[1] else ''}" for k in keys]

    def _reaper(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self.cond:
                for k, m in list(self.models.items()):
                    if m.busy == 0 and m.keep_alive >= 0 and now - m.last_used >= m.keep_alive:
                        self._unload_locked(k)

    def close(self) -> None:
        """Unload everything."""
        self._stop.set()
        with self.cond:
            for k in list(self.models):
                self._unload_locked(k)


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return str(llm._model.token_get_text(token))  # noqa: SLF001 - llama-cpp-python exposes no public getter


def default_threads() -> int:
    """llama.cpp's threads when `n_threads` is unset: OMP_NUM_THREADS when set (the variable torch, numpy, faiss and
    scikit-learn already honour, so one setting bounds every model runtime on a shared machine), else every core."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1
