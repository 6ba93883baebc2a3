"""candle: a real torch / transformers model runner (worker process).

Loads registered models (sentence-transformers and other transformers folders, TorchScript and torch.export
programs), runs them, and quantizes them into new registered models with a measured quality report.

Any caller who may embed (llm:use) makes candle load the embedding model it names (a model that does another job
is refused from its files, before it is loaded), so what stays loaded is bounded like Ollama's
OLLAMA_MAX_LOADED_MODELS and keep_alive: at most `max_loaded` models (the least recently used one is unloaded to
make room) and none idle longer than `keep_alive_s`. A loaded model is the registry entry's weights (its sha256):
an id removed and registered again with another file loads the new file, and the old one is dropped.
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from bkg_kernel.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER
from bkg_kernel.models.registry import ID_PATTERN, ModelEntry, ModelRegistry, check_id, sha256_of, slug
from bkg_kernel.plugins.candle import runners
from bkg_kernel.runtime.contract import Plugin, PluginSettings, capability

# A fixed probe set: the quality report compares the original and the quantized model on these.
PROBE = [
    "The cat sat on the mat.",
    "A dog is running in the park.",
    "Quantum field theory describes elementary particles.",
    "Stock markets fell sharply after the announcement.",
    "How do I bake sourdough bread at home?",
    "The committee approved the new budget on Tuesday.",
    "Neural networks learn representations from data.",
    "She played the violin at the concert last night.",
    "Rain is expected across the north this weekend.",
    "Python is a popular programming language.",
    "The museum opens a new exhibition of modern art.",
    "Vitamin C is found in oranges and lemons.",
    "The train to Berlin leaves at seven in the morning.",
    "He fixed the leaking pipe under the kitchen sink.",
    "Solar panels convert sunlight into electricity.",
    "The novel tells the story of two sisters in Paris.",
]
BOUNDS = {"dynamic-int8": 0.95, "fp16": 0.999, "bf16": 0.99}  # minimum mean cosine (embeddings) / agreement


class CandleSettings(PluginSettings):
    """candle settings."""

    max_concurrent: int = Field(1, ge=1, le=16, description="Requests run at once (torch uses every core).")
    request_timeout: float = Field(600.0, gt=0, le=3600, description="Seconds a request may take.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: the GPU when torch sees one.")
    threads: int | None = Field(None, ge=1, le=256, description="torch threads (default OMP_NUM_THREADS or all cores).")
    preload: list[str] = Field(default_factory=list, description="Models to load when the plugin starts.")
    max_loaded: int = Field(
        3, ge=1, le=64, description="Models kept loaded at once; loading one more unloads the least recently used."
    )
    keep_alive_s: float | None = Field(
        1800.0, ge=1, description="Seconds an idle model stays loaded; None: until max_loaded or an unload drops it."
    )

    # they only bound the memory the plugin holds, as max_concurrent does: an operator (plugins:write) may change them,
    # and the running worker takes them (`Candle.retune`) with its models still loaded
    tunable_fields: ClassVar[tuple[str, ...]] = (*PluginSettings.tunable_fields, "max_loaded", "keep_alive_s")
    retunable_fields: ClassVar[tuple[str, ...]] = ("max_loaded", "keep_alive_s")


class Empty(BaseModel):
    """No input."""


class LoadRequest(BaseModel):
    """Which model."""

    model_id: str = DEFAULT_EMBEDDER


class RunOptions(BaseModel):
    """What a run may be told, each checked before the model sees it (a string where a number goes was a 500)."""

    model_config = ConfigDict(extra="allow")  # a torch program's own options pass through
    batch_size: int | None = Field(None, ge=1, le=4096, description="Texts per forward pass (embed, score).")
    normalize: bool = Field(True, description="Unit-length embeddings (embed).")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens to generate (generate).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (generate).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling when temperature > 0 (generate).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed (generate).")
    token_ids: bool = Field(False, description="Also return the generated token ids (generate).")


class RunRequest(BaseModel):
    """Run a model: texts for language models, tensors for programs."""

    model_id: str = DEFAULT_EMBEDDER
    inputs: Any = Field(..., description='Text(s), or [{"data": [...], "dtype": "float32"}] for a torch program.')
    options: RunOptions = Field(default_factory=RunOptions, description="What the run may be told, by task.")
    task: Literal["embed", "score", "generate", "tensors"] | None = Field(
        None, description="What the caller needs the model to do: a model that does something else is refused "
        "(422) before it is loaded.",
    )  # fmt: skip


class RunResult(BaseModel):
    """What a model produced, with how long it took."""

    model_config = {"extra": "allow"}
    model_id: str
    task: str
    took_ms: float


class QuantizeRequest(BaseModel):
    """Quantize a model into a new registered model."""

    model_id: str = DEFAULT_EMBEDDER
    method: Literal["dynamic-int8", "fp16", "bf16"] = "dynamic-int8"
    new_id: str | None = Field(None, pattern=ID_PATTERN, description="Default: <model_id>-<method>.")
    min_quality: float | None = Field(
        None, gt=0, le=1, description="A stricter bound than the method's own (mean cosine or token agreement)."
    )
    allow_out_of_bound: bool = Field(
        False, description="Register the model even when its quality falls below the method's bound (flagged)."
    )


class QuantizeResult(BaseModel):
    """The new model and how it compares with the original."""

    model: dict[str, Any]
    original_bytes: int
    quantized_bytes: int
    ratio: float
    quality: dict[str, Any]


class Stats(BaseModel):
    """Loaded models, memory and device."""

    device: str
    cuda: bool
    torch: str
    threads: int
    rss_bytes: int
    loaded: list[dict[str, Any]]
    max_loaded: int
    keep_alive_s: float | None


class Loaded(BaseModel):
    """The models loaded after a load or unload."""

    loaded: list[dict[str, Any]]


class Candle(Plugin):
    """Run and quantize torch / transformers models from the registry."""

    id = "candle"
    name = "candle"
    version = "0.1.0"
    description = "torch + transformers model runner: embeddings, generation, TorchScript programs, quantization."
    mode = "worker"
    Settings = CandleSettings
    settings: CandleSettings

    def start(self) -> None:
        assert self.context is not None and self.context.model_dir is not None
        import torch

        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.registry = ModelRegistry(self.context.model_dir)
        self.device = runners.pick_device(self.settings.device)
        self.runners: dict[str, runners.Runner] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.used: dict[str, float] = {}  # model id -> time.monotonic() of its last use: least recently used first out
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.looked = threading.Event()  # set: the keep-alive thread looks at the idle models again (new settings)
        self.log.info("torch %s on %s, %d threads", torch.__version__, self.device, torch.get_num_threads())
        if len(self.settings.preload) > self.settings.max_loaded:
            n, most = len(self.settings.preload), self.settings.max_loaded
            self.log.warning("preload names %d models, max_loaded is %d: only the last %d stay loaded", n, most, most)
        for model_id in self.settings.preload:
            self._runner(model_id)
        threading.Thread(target=self._unload_idle_until_stopped, name="candle-keep-alive", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        self.looked.set()
        with self.lock:
            self.runners.clear()
            self.info.clear()
            self.used.clear()

    def health(self) -> dict[str, Any]:
        return {"ok": True, "device": self.device, "loaded": sorted(self.runners)}

    def retune(self, settings: PluginSettings) -> None:
        """A new max_loaded or keep_alive_s, the models loaded kept: the keep-alive thread unloads the least recently
        used beyond a lower cap, and measures the idle ones against a new time, at once. Takes no lock: a model
        loading holds it (the next load reads the new cap)."""
        assert isinstance(settings, CandleSettings)
        self.settings = settings
        self.looked.set()
        self.log.info("max_loaded %d, keep_alive_s %s: taken while running", settings.max_loaded, settings.keep_alive_s)

    def _resolve(self, model_id: str) -> tuple[str, Any]:
        e = self.registry.get(model_id)
        return e.kind, self.registry.resolve(e)

    def _check_base(self, model_id: str, path: Any) -> None:
        """A quantized model loads onto its base's weights: refuse it when the base is no longer the one it was
        made from (the sha256 stored at quantization)."""
        qfile = Path(path) / runners.QUANT_FILE
        if not qfile.is_file():
            return
        q = runners.quantization(qfile)
        now = self.registry.get(q["base"]).sha256
        if q.get("base_sha256") and q["base_sha256"] != now:
            raise Conflict(
                f"{model_id!r} was quantized from {q['base']!r} with sha256 {q['base_sha256'][:12]}…; that model now "
                f"has sha256 {now[:12]}…: quantize it again",
                field="model_id",
            )

    def _current(self, entry: ModelEntry) -> runners.Runner | None:
        """The runner loaded from `entry`'s weights (under `self.lock`); not one loaded for its id before the id was
        removed and registered again with another file."""
        r = self.runners.get(entry.id)
        return r if r is not None and self.info[entry.id]["sha256"] == entry.sha256 else None

    def _runner(self, model_id: str) -> runners.Runner:
        with self.lock:
            entry = self.registry.get(model_id)  # under the lock: a stale read never unloads what a later one loaded
            r = self._current(entry)
            if r is not None:
                self.info[model_id]["last_used"] = time.time()
                self.used[model_id] = time.monotonic()
                return r
            if model_id in self.runners:  # dropped before the new weights load: never two copies of one id
                self._unload_locked(model_id, f"registered again with sha256 {entry.sha256[:12]}…")
                gc.collect()
            kind, path = entry.kind, self.registry.resolve(entry)
            self._check_base(model_id, path)  # at every load: a re-registered quantized model is checked again
            # room first: the load gets the memory freed
            if self._unload_lru_locked(
                self.settings.max_loaded - 1, f"max_loaded {self.settings.max_loaded}, to load {model_id}"
            ):
                gc.collect()
            t0 = time.perf_counter()
            r = runners.load(model_id, kind, path, self.device, self._resolve)
            self.runners[model_id] = r
            self.info[model_id] = {
                "model_id": model_id,
                "kind": kind,
                "sha256": entry.sha256,
                "task": r.task,
                "device": r.device,
                "bytes": r.parameters_bytes(),
                "load_s": round(time.perf_counter() - t0, 3),
                "loaded_at": time.time(),
                "last_used": time.time(),
            }
            self.used[model_id] = time.monotonic()
            self.log.info("loaded %s (%s) in %.2fs", model_id, r.task, time.perf_counter() - t0)
            return r

    def _unload_locked(self, model_id: str, why: str) -> None:
        """Drop a loaded model (under `self.lock`); a call running on it keeps its runner until it returns."""
        del self.runners[model_id], self.info[model_id], self.used[model_id]
        self.log.info("unloaded %s: %s", model_id, why)

    def _unload_lru_locked(self, most: int, why: str) -> bool:
        """Unload the least recently used models (under `self.lock`) until at most `most` stay; whether any went."""
        dropped = False
        while len(self.runners) > most:
            lru = min(self.used, key=self.used.__getitem__)
            self._unload_locked(lru, f"least recently used of {len(self.runners)} ({why})")
            dropped = True
        return dropped

    def _unload_idle(self) -> float | None:
        """Unload the models idle for `keep_alive_s`; return the seconds until the next one would be (at most 60, and
        at most `keep_alive_s` when none is loaded: a model loaded meanwhile is not left loaded past its time), None
        without a keep_alive_s (until new settings come)."""
        settings = self.settings
        keep = settings.keep_alive_s
        wait: float | None = None
        with self.lock:
            # a lower cap, taken while running (`retune`)
            dropped = self._unload_lru_locked(settings.max_loaded, f"max_loaded now {settings.max_loaded}")
            if keep is not None:
                now = time.monotonic()
                idle = [m for m, t in self.used.items() if now - t >= keep]
                for m in idle:
                    self._unload_locked(m, f"idle for {now - self.used[m]:.0f}s (keep_alive_s {keep:g})")
                dropped = dropped or bool(idle)
                wait = min(min((t + keep - now for t in self.used.values()), default=keep), 60.0)
        if dropped:
            gc.collect()
        return wait

    def _unload_idle_until_stopped(self) -> None:
        while not self.stopped.is_set():
            self.looked.wait(self._unload_idle())
            self.looked.clear()

    def _check_task(self, model_id: str, task: str, r: runners.Runner | None = None) -> None:
        """422 unless `model_id` does `task`: as loaded (`r`, or already), else found out from its files without
        loading it (an embedding asked of a causal LM must not load the LM, pushing out the models in use)."""
        does = r.task if r is not None else self._task_now(model_id)
        if does != task:
            raise InvalidInput(f"model {model_id!r} does {does or 'nothing candle runs'}, not {task}", field="model_id")

    def _task_now(self, model_id: str) -> str:
        """What the weights `model_id` names now do: as loaded, else from their files (a runner loaded for the id
        before it was registered again with another file may do something else)."""
        entry = self.registry.get(model_id)
        with self.lock:
            r = self._current(entry)
        return r.task if r is not None else runners.task_of(entry.kind, self.registry.resolve(entry), self._resolve)

    def _loaded(self) -> list[dict[str, Any]]:
        info = dict(self.info)  # a snapshot: the keep-alive thread may unload a model meanwhile
        return [info[m] for m in sorted(info)]

    # -- capabilities -----------------------------------------------------------------------------
    @capability("candle.model.load", scope="plugins:write")
    def load_model(self, inp: LoadRequest) -> Loaded:
        """Load a registered model (no-op if loaded)."""
        self._runner(inp.model_id)
        return Loaded(loaded=self._loaded())

    @capability("candle.model.unload", scope="plugins:write")
    def unload_model(self, inp: LoadRequest) -> Loaded:
        """Unload a model and free its memory."""
        with self.lock:
            if inp.model_id not in self.runners:
                raise NotFound(f"model {inp.model_id!r} is not loaded", field="model_id")
            self._unload_locked(inp.model_id, "candle.model.unload")
        gc.collect()
        return Loaded(loaded=self._loaded())

    # running a model is llm:use whichever route asks (/api/embed, a collection's embed_model, this capability)
    @capability("candle.run", scope="llm:use", big_input=True)
    def run(self, inp: RunRequest) -> RunResult:
        """Run a model: text -> embeddings or generated text; tensors -> tensors for a program."""
        if inp.task is not None:
            self._check_task(inp.model_id, inp.task)  # from its files, before it is loaded
        r = self._runner(inp.model_id)
        if inp.task is not None:
            self._check_task(inp.model_id, inp.task, r)  # and as loaded: what its files said, checked
        t0 = time.perf_counter()
        out = r.run(inp.inputs, inp.options.model_dump(exclude_unset=True))  # what was not said: the runner's default
        took = (time.perf_counter() - t0) * 1000
        return RunResult(model_id=inp.model_id, task=r.task, took_ms=round(took, 3), **out)

    @capability("candle.stats", scope="plugins:read", quick=True)  # answers while a run holds the one slot
    def stats(self, inp: Empty) -> Stats:
        """Loaded models, memory and device."""
        import psutil
        import torch

        return Stats(
            device=self.device,
            cuda=torch.cuda.is_available(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            rss_bytes=psutil.Process().memory_info().rss,
            loaded=self._loaded(),
            max_loaded=self.settings.max_loaded,
            keep_alive_s=self.settings.keep_alive_s,
        )

    @capability("candle.quantize", scope="models:write")  # it adds a model to the registry, as POST /api/models does
    def quantize(self, inp: QuantizeRequest) -> QuantizeResult:
        """Quantize a model into a new registered model, with its size and a quality report on a probe set."""
        import torch

        base_entry = self.registry.get(inp.model_id)
        if base_entry.kind != "hf-transformers":
            raise InvalidInput(
                f"candle quantizes hf-transformers models; {inp.model_id!r} is {base_entry.kind}", field="model_id"
            )
        if (self.registry.resolve(base_entry) / runners.QUANT_FILE).exists():
            raise InvalidInput(f"{inp.model_id!r} is already quantized: quantize its base model", field="model_id")
        new_id = inp.new_id or slug(f"{inp.model_id}-{inp.method}")
        check_id(new_id, "new_id")  # it names a folder: checked before anything is written
        if new_id in {m.id for m in self.registry.list()}:
            raise AlreadyExists(f"model {new_id!r} is already registered", field="new_id")
        base = self._runner(inp.model_id)
        if inp.method == "dynamic-int8" and base.device != "cpu":
            raise InvalidInput("dynamic-int8 runs on CPU kernels: use fp16 or bf16 on a GPU", field="method")
        module = runners.quantized_module(base.module, inp.method)
        quant = type(base).__new__(type(base))
        quant.__dict__.update({**base.__dict__, "module": module, "model_id": new_id})
        quality = _compare(base, quant, max(BOUNDS[inp.method], inp.min_quality or 0.0))
        if not quality["within_bound"] and not inp.allow_out_of_bound:
            raise InvalidInput(
                f"the {inp.method} model scores {quality['mean']} ({quality['metric']} over {quality['probe']} "
                f"probes), below its bound {quality['bound']}: not registered (allow_out_of_bound keeps it, flagged)",
                field="method",
            )
        folder = self.registry.dir / new_id
        if folder.exists():
            raise AlreadyExists(f"{folder} already exists in the model dir", field="new_id")
        src = self.registry.resolve(base_entry)
        with self.registry.staged(new_id) as partial:  # its own: two quantizations to one id never share it
            ignore = shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt", "*.pth", ".*")
            shutil.copytree(src, partial, ignore=ignore)
            torch.save(module.state_dict(), partial / runners.WEIGHTS_FILE)
            meta = {"method": inp.method, "base": inp.model_id, "base_sha256": base_entry.sha256, "quality": quality}
            (partial / runners.QUANT_FILE).write_text(json.dumps(meta, indent=2))
            self.registry.place(partial, folder, field="new_id")
        digest, size = sha256_of(folder)
        entry = ModelEntry(
            id=new_id,
            kind="hf-transformers",
            path=new_id,
            sha256=digest,
            size=size,
            license=base_entry.license,
            source=f"quantized:{inp.model_id}:{inp.method}",
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            meta={**base_entry.meta, "quantization": inp.method, "base": inp.model_id, "quality": quality},
        )
        try:
            self.registry.register_entry(entry)
        except BaseException:  # placed by this call: not left in the model dir unregistered
            shutil.rmtree(folder, ignore_errors=True)
            raise
        original = base_entry.size
        quantized = (folder / runners.WEIGHTS_FILE).stat().st_size
        return QuantizeResult(
            model=entry.model_dump(),
            original_bytes=original,
            quantized_bytes=quantized,
            ratio=round(quantized / original, 4),
            quality=quality,
        )


def _compare(base: runners.Runner, quant: runners.Runner, bound: float) -> dict[str, Any]:
    """Cosine of embeddings (embedders) or greedy token agreement (causal LMs) over the probe set, against `bound`."""
    import numpy as np

    if base.task == "embed":
        a = np.asarray(base.run(PROBE, {"normalize": True})["embeddings"])
        b = np.asarray(quant.run(PROBE, {"normalize": True})["embeddings"])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        mean = float(cos.mean())
        return {
            "metric": "cosine", "probe": len(PROBE), "mean": round(mean, 5), "min": round(float(cos.min()), 5),
            "bound": bound, "within_bound": mean >= bound,
        }  # fmt: skip
    if base.task == "generate":  # greedy continuations of every probe, compared token id by token id
        opts = {"max_new_tokens": 8, "temperature": 0, "token_ids": True}
        ta = [g["token_ids"] for g in base.run(PROBE, opts)["generations"]]
        tb = [g["token_ids"] for g in quant.run(PROBE, opts)["generations"]]
        same = sum(sum(1 for x, y in zip(p, q, strict=False) if x == y) for p, q in zip(ta, tb, strict=True))
        total = max(1, sum(max(len(p), len(q)) for p, q in zip(ta, tb, strict=True)))
        agree = same / total
        return {
            "metric": "token agreement", "probe": len(PROBE), "mean": round(agree, 5), "bound": bound,
            "within_bound": agree >= bound,
        }  # fmt: skip
    raise InvalidInput("only embedding and causal language models can be quantized here", field="model_id")
