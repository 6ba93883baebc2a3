"""Load and run registered models with torch: sentence embedders, causal LMs, encoders, TorchScript and
torch.export programs. Quantized models are their base model, transformed, with the saved weights loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bkg_kernel.errors import BkgError, Cancelled, InvalidFile, InvalidInput
from bkg_kernel.runtime import calls

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "state_dict.pt"
METHODS = ("dynamic-int8", "fp16", "bf16")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


def pick_device(setting: str) -> str:
    """Resolve `cpu|cuda|auto` (auto: the GPU when torch sees one)."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device is 'cuda' but torch sees no CUDA GPU here", field="device")
    return setting


class Runner:
    """A loaded model: `task` is embed, score, generate or tensors."""

    task = ""

    def __init__(self, model_id: str, module: Any, device: str, tokenizer: Any = None) -> None:
        self.model_id, self.module, self.device = model_id, module, device
        self.tokenizer = tokenizer  # transformers models: the tokenizer loaded with them

    def parameters_bytes(self) -> int:
        """Return the bytes held by the model's parameters and buffers (packed int8 weights included)."""
        import torch

        seen = 0
        for t in self.module.state_dict().values():
            if isinstance(t, torch.Tensor):
                seen += t.numel() * t.element_size()
            elif isinstance(t, tuple):  # packed quantized linear params: (weight, bias)
                seen += sum(x.numel() * x.element_size() for x in t if isinstance(x, torch.Tensor))
        return seen

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class SentenceRunner(Runner):
    """sentence-transformers: texts -> normalized embeddings."""

    task = "embed"

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        texts = _texts(inputs)
        normalize = bool(options.get("normalize", True))
        if "batch_size" in options or self.device != "cpu":
            groups = [list(range(len(texts)))]
            size = int(options.get("batch_size", 64))
        else:  # on a CPU a forward pass costs by the token: batches of about equal work, not of equal count
            groups, size = cpu_batches(texts), 0
        parts, order = [], []
        for group in groups:
            parts.append(
                self.module.encode(
                    [texts[i] for i in group], batch_size=size or len(group), normalize_embeddings=normalize,
                    convert_to_numpy=True, show_progress_bar=False,
                )
            )  # fmt: skip
            order.extend(group)
        vecs = np.concatenate(parts)
        if order != sorted(order):  # back to the caller's order
            out = np.empty_like(vecs)
            out[np.asarray(order)] = vecs
            vecs = out
        return {"embeddings": vecs.tolist(), "dim": int(vecs.shape[1])}


CPU_BATCH_CHARS = 3200  # about 800 tokens of text per forward pass
CPU_BATCH_MAX = 64


def cpu_batches(texts: list[str]) -> list[list[int]]:
    """Indices of `texts`, shortest first, in groups of at most CPU_BATCH_CHARS characters (at least one text,
    at most CPU_BATCH_MAX). On a CPU, MiniLM embeds 800-character chunks 1.45x faster 4-8 at a time than 64 at a
    time (attention over long padded batches leaves the cache); short texts gain nothing from smaller batches."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    groups: list[list[int]] = []
    group: list[int] = []
    chars = 0
    for i in order:
        n = len(texts[i])
        if group and (chars + n > CPU_BATCH_CHARS or len(group) == CPU_BATCH_MAX):
            groups.append(group)
            group, chars = [], 0
        group.append(i)
        chars += n
    if group:
        groups.append(group)
    return groups


class EncoderRunner(Runner):
    """A transformers encoder without a sentence-transformers config: mean-pooled, normalized embeddings."""

    task = "embed"

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        import torch

        texts = _texts(inputs)
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.module(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vecs = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if options.get("normalize", True):
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
        return {"embeddings": vecs.float().cpu().tolist(), "dim": int(vecs.shape[1])}


class CrossEncoderRunner(Runner):
    """A sequence-classification model over (query, passage) pairs: one relevance score per pair (a reranker)."""

    task = "score"

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        import torch

        ok = (
            isinstance(inputs, list)
            and inputs
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in inputs)
        )
        if not ok:
            raise InvalidInput(
                "inputs must be a non-empty list of [query, passage] pairs for a reranker", field="inputs"
            )
        scores: list[float] = []
        size = int(options.get("batch_size", 32))
        for a in range(0, len(inputs), size):
            pairs = inputs[a : a + size]
            batch = self.tokenizer(
                [p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                logits = self.module(**batch).logits.float()
            # one label: its logit is the relevance; several: the last label's log-odds ("relevant")
            col = logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=1)
            scores.extend(col.cpu().tolist())
        return {"scores": scores}


class CausalRunner(Runner):
    """A causal LM: prompts -> generated continuations (greedy unless `temperature` > 0)."""

    task = "generate"

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        import torch

        texts = _texts(inputs)
        max_new = int(options.get("max_new_tokens", 32))
        if not 1 <= max_new <= 4096:
            raise InvalidInput("options.max_new_tokens must be from 1 to 4096", field="options.max_new_tokens")
        temperature = float(options.get("temperature", 0.0))
        if options.get("seed") is not None:
            torch.manual_seed(int(options["seed"]))
        # once the caller stops waiting (a timeout, a client gone), generation stops at the next token and no
        # further prompt starts: a thousand prompts of 4,096 tokens held candle (one slot) for hours
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = calls.stop_event()

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stop.is_set()

        stopped = StoppingCriteriaList([Stopped()])
        out: list[dict[str, Any]] = []
        for text in texts:
            if stop.is_set():
                raise Cancelled(f"the caller stopped waiting: {len(texts) - len(out)} of {len(texts)} prompts not run")
            ids = self.tokenizer(text, return_tensors="pt")
            ids.pop("token_type_ids", None)  # segment ids are an encoder's; a causal LM refuses or misreads them
            ids = ids.to(self.device)
            with torch.inference_mode():
                gen = self.module.generate(
                    **ids,
                    max_new_tokens=max_new,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None if temperature == 0 else float(options.get("top_p", 0.95)),
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0,
                    stopping_criteria=stopped,
                )
            new = gen[0, ids["input_ids"].shape[1] :]
            one = {"text": self.tokenizer.decode(new, skip_special_tokens=True), "tokens": int(new.shape[0])}
            if options.get("token_ids"):
                one["token_ids"] = new.tolist()
            out.append(one)
        return {"generations": out}


class ProgramRunner(Runner):
    """A TorchScript (`.pt`) or torch.export (`.pt2`) program: tensors -> tensors."""

    task = "tensors"

    def run(self, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
        import torch

        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
            raise InvalidInput(
                'inputs must be a list of tensors: [{"data": [...], "dtype": "float32"}]', field="inputs"
            )
        args = []
        for i, t in enumerate(inputs):
            dtype = t.get("dtype", "float32")
            if dtype not in DTYPES:
                raise InvalidInput(f"inputs[{i}].dtype must be one of {', '.join(DTYPES)}", field=f"inputs[{i}].dtype")
            try:
                args.append(torch.tensor(t.get("data"), dtype=getattr(torch, dtype), device=self.device))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidInput(f"inputs[{i}].data is not a tensor: {exc}", field=f"inputs[{i}].data") from None
        try:
            with torch.inference_mode():
                result = self.module(*args)
        except RuntimeError as exc:
            raise InvalidInput(f"the program rejected these inputs: {str(exc)[:300]}", field="inputs") from None
        outs = result if isinstance(result, (tuple, list)) else [result]
        return {
            "outputs": [
                {
                    "shape": list(o.shape),
                    "dtype": str(o.dtype).removeprefix("torch."),
                    "data": o.detach().cpu().tolist(),
                }
                for o in outs
            ]
        }


def _texts(inputs: Any) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidInput("inputs must be a text or a non-empty list of texts for this model", field="inputs")
    return texts


def task_of(kind: str, path: Path, resolve: Any) -> str:
    """What a registered model does once loaded (embed, score, generate or tensors; "" when candle cannot run it),
    read from its files the way `load` decides, without loading it."""
    if kind == "torch-program":
        return "tensors"
    if kind != "hf-transformers":
        return ""
    qfile = path / QUANT_FILE
    if qfile.exists():  # a quantized model does what its base does
        base_kind, base_path = resolve(quantization(qfile)["base"])
        return task_of(base_kind, base_path, resolve)
    if (path / "modules.json").exists():
        return "embed"
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "score"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "generate"
    return "embed"


def quantization(qfile: Path) -> dict[str, Any]:
    """A quantized model's `quantization.json` (method, base, base_sha256); one that cannot be read is a 422 naming
    the model, not a 500."""
    try:
        q = json.loads(qfile.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidFile(f"{qfile.parent.name}/{QUANT_FILE} cannot be read: {exc}", field="model_id") from None
    shaped = isinstance(q, dict) and isinstance(q.get("base"), str) and q.get("method") in METHODS
    if not shaped or not isinstance(q.get("base_sha256") or "", str):
        raise InvalidFile(f"{qfile.parent.name}/{QUANT_FILE} names no base model and method", field="model_id")
    return q


def load(model_id: str, kind: str, path: Path, device: str, resolve: Any) -> Runner:
    """Load a registered model onto `device`; `resolve(id)` returns (kind, path) of another model (a base). Files
    that torch or transformers cannot load (damaged since they were registered, or a header that passed the check
    at registration but not the load) are a 422 naming `model_id`, not a 500."""
    try:
        return _load(model_id, kind, path, device, resolve)
    except (BkgError, ImportError, MemoryError):
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda's: the device's, not the files'
            raise
        raise InvalidFile(
            f"model {model_id!r} cannot be loaded from {path.name}: {type(exc).__name__}: {str(exc)[:300]} "
            f"(`bkg models verify {model_id}` says whether its files changed since they were registered)",
            field="model_id",
        ) from None


def _load(model_id: str, kind: str, path: Path, device: str, resolve: Any) -> Runner:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: models are local files
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if kind == "torch-program":
        import torch

        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location=device)
            module.eval()
        return ProgramRunner(model_id, module, device)
    if kind != "hf-transformers":
        raise InvalidInput(
            f"model {model_id!r} is a {kind} model; candle runs hf-transformers folders and torch programs",
            field="model_id",
        )
    qfile = path / QUANT_FILE
    if qfile.exists():
        return _load_quantized(model_id, path, quantization(qfile), device, resolve)
    return _load_hf(model_id, path, device)


def _load_hf(model_id: str, path: Path, device: str) -> Runner:
    cfg = json.loads((path / "config.json").read_text())
    if not isinstance(cfg, dict):
        raise InvalidFile(f"{path.name}/config.json holds no object of settings", field="model_id")
    if (path / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device=device, local_files_only=True)
        st.eval()
        return SentenceRunner(model_id, st, device)
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        ce = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        return CrossEncoderRunner(model_id, ce.to(device).eval(), device, tok)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()  # type: ignore[arg-type]
        return CausalRunner(model_id, lm, device, tok)
    enc = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    return EncoderRunner(model_id, enc, device, tok)


def quantized_module(module: Any, method: str) -> Any:
    """Return a quantized copy of a torch module (the module itself is left as it is)."""
    import copy

    import torch

    if method == "dynamic-int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig

        # per-channel scales: per-tensor int8 costs MiniLM ~0.07 cosine, per-channel ~0.02
        return torch.ao.quantization.quantize_dynamic(
            module, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    if method in ("fp16", "bf16"):
        return copy.deepcopy(module).to(torch.float16 if method == "fp16" else torch.bfloat16)
    raise InvalidInput(f"method must be dynamic-int8, fp16 or bf16, not {method!r}", field="method")


def _load_quantized(model_id: str, path: Path, q: dict[str, Any], device: str, resolve: Any) -> Runner:
    import torch

    base_kind, base_path = resolve(q["base"])
    if q["method"] == "dynamic-int8":
        device = "cpu"  # dynamic int8 kernels are CPU kernels
    base = load(q["base"], base_kind, base_path, device, resolve)
    module = quantized_module(base.module, q["method"])
    state = torch.load(path / WEIGHTS_FILE, map_location=device, weights_only=True)
    module.load_state_dict(state)
    base.module = module
    base.model_id = model_id
    return base
