"""A collection's embed_model, checked when it is set (REST create and PATCH, and a plugin's store handle):
registered, one its plugin embeds with, and giving vectors as wide as the collection's."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bkg_kernel.errors import BkgError, InvalidInput, NotFound

if TYPE_CHECKING:
    from bkg_kernel.gateway.state import Gateway
    from bkg_kernel.models.registry import ModelEntry, ModelRegistry

EMBEDS_WITH = {"candle": ("hf-transformers",), "llmserver": ("gguf-llm", "gguf-embedding")}  # the kinds each embeds
_POOLED = {"Transformer", "Pooling", "Normalize"}  # sentence-transformers modules that keep the encoder's width


def check_embed_model(gw: Gateway, spec: str | None, dim: int) -> None:
    """Refuse (422 naming `embed_model`) a model no text of a `dim`-d collection could be embedded with.

    That is one the model registry (where candle and llmserver find their models) does not hold, one its plugin does
    not embed with, or one whose vectors are not `dim` wide. What it does and how wide its vectors are is read from
    its registry entry (and a sentence model's module list), never by loading it: a width those do not tell for
    certain (a sentence model with a Dense layer, say) is checked by the first embedding, as before. Whether the
    plugin runs now is not asked (a stopped one starts when it is used). An llmserver that forwards to an upstream
    server runs that server's models, which no registry here lists: its models are checked by the first embedding.
    """
    if spec is None:
        return
    plugin, _, model_id = spec.partition(":")
    host = gw.supervisor.hosts.get(plugin)
    if plugin == "llmserver" and host is not None and getattr(host.settings, "upstream_url", None):
        return
    kinds = EMBEDS_WITH.get(plugin, ())
    gw.models_ready.wait(120)  # the packaged default models are registered just after the gateway starts
    try:
        entry = gw.models.get(model_id)
    except NotFound:
        known = ", ".join(sorted(m.id for m in gw.models.list() if m.kind in kinds)) or "none"
        raise InvalidInput(f"embed_model {spec!r}: no model {model_id!r} is registered ({plugin} embeds with: "
                           f"{known})", field="embed_model") from None  # fmt: skip
    if entry.kind not in kinds:
        raise InvalidInput(f"embed_model {spec!r}: {model_id!r} is a {entry.kind} model; {plugin} embeds with "
                           f"{' or '.join(kinds)} models", field="embed_model")  # fmt: skip
    does = _task(entry.meta)
    if does != "embed":
        raise InvalidInput(f"embed_model {spec!r}: {model_id!r} does {does}, not embed (it is not an embedding model)",
                           field="embed_model")  # fmt: skip
    width = _width(gw.models, entry)
    if width is not None and width != dim:
        raise InvalidInput(f"{spec} gives {width}-d vectors; the collection holds {dim}-d vectors", field="embed_model")


def _task(meta: dict[str, Any]) -> str:
    """Tell what a model does (embed, score, generate) from its registry entry, as candle tells it from its files."""
    archs = meta.get("architectures") if isinstance(meta.get("architectures"), list) else []
    if meta.get("sentence_transformers") or not archs:
        return "embed"
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        return "score"
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "generate"
    return "embed"


def _width(models: ModelRegistry, entry: ModelEntry) -> int | None:
    """Tell how wide a model's vectors are when its entry says for certain (else None): a GGUF's embedding_length;
    a transformers encoder's hidden_size, mean-pooled, or a sentence model's when its modules pool one way and
    project nothing (a quantized model's modules are its base's)."""
    meta = entry.meta
    width = meta.get("embedding_length") if entry.kind.startswith("gguf") else meta.get("hidden_size")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    if entry.kind.startswith("gguf") or not meta.get("sentence_transformers"):
        return width
    try:
        folder = models.resolve(str(meta["base"]) if meta.get("base") else entry)
        modules = json.loads((folder / "modules.json").read_text())
        pools = 0
        for m in modules:
            kind = str(m["type"]).rpartition(".")[2]
            if kind not in _POOLED:
                return None
            if kind == "Pooling":
                cfg = json.loads((folder / m["path"] / "config.json").read_text())
                modes = sum(v is True for k, v in cfg.items() if k.startswith("pooling_mode_"))
                if modes != 1 or cfg.get("word_embedding_dimension", width) != width:
                    return None
                pools += 1
    except (BkgError, OSError, ValueError, TypeError, KeyError):
        return None
    return width if pools == 1 else None
