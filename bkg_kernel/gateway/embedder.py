"""Compute vectors from text with a plugin's model, for collections that name an `embed_model`.

`candle:<model>` runs a sentence model in the candle worker; `llmserver:<model>` a GGUF model in llmserver.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bkg_kernel.errors import BkgError, InvalidInput
from bkg_kernel.store import validate

BATCH = 256


async def embed(gw: Any, spec: str, texts: list[str], dim: int | None = None, field: str = "embed_model") -> np.ndarray:
    """Embed `texts` with `spec` ("plugin:model"); check the vectors have the collection's dimension."""
    validate.embed_model(spec, field)
    plugin, _, model = spec.partition(":")
    host = gw.supervisor.get(plugin)
    out: list[list[float]] = []
    for i in range(0, len(texts), BATCH):
        batch = texts[i : i + BATCH]
        if plugin == "candle":
            r = await host.invoke("candle.run", {"model_id": model, "inputs": batch})
            if r.get("task") != "embed":
                raise InvalidInput(f"{spec} is not an embedding model (it does {r.get('task')})", field=field)
            out.extend(r["embeddings"])
        else:
            r = await host.invoke("llm.embed", {"model": model, "input": batch})
            out.extend(d["embedding"] for d in sorted(r["data"], key=lambda d: d["index"]))
    vecs = np.asarray(out, dtype=np.float32).reshape(len(texts), -1)
    if dim is not None and vecs.shape[1] != dim:
        raise InvalidInput(f"{spec} gives {vecs.shape[1]}-d vectors; the collection holds {dim}-d vectors", field=field)
    return vecs


async def rerank(gw: Any, spec: str, query: str, documents: list[str], field: str = "model") -> list[float]:
    """Score (query, document) pairs with a candle cross-encoder (`candle:<model>`); higher is more relevant."""
    validate.embed_model(spec, field)
    plugin, _, model = spec.partition(":")
    if plugin != "candle":
        raise InvalidInput(f"rerank models run in candle (candle:<model>), not {plugin}", field=field)
    host = gw.supervisor.get(plugin)
    scores: list[float] = []
    for i in range(0, len(documents), BATCH):
        pairs = [[query, d] for d in documents[i : i + BATCH]]
        try:
            r = await host.invoke("candle.run", {"model_id": model, "inputs": pairs})
        except BkgError as exc:
            if exc.field != "inputs":
                raise
            raise InvalidInput(f"{spec} is not a reranker (a cross-encoder): {exc.message}", field=field) from None
        if r.get("task") != "score":
            raise InvalidInput(f"{spec} is not a reranker (a cross-encoder); it does {r.get('task')}", field=field)
        scores.extend(r["scores"])
    return scores
