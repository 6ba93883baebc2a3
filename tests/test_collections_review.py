"""Found by a review of the store over the gateway: what `wb.collection(name)` lacked, a refused upsert batch
naming the wrong point, an embed_model no text could ever be embedded with, and count's body of `null`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gateway_harness import ADMIN_KEY

import bkg_kernel
from bkg_kernel.errors import BkgError, InvalidInput, NotFound
from bkg_kernel.store.results import PointList

# the gateway's own routes are under test; llmserver is there (stopped) for its upstream setting, not to run a model
PLUGINS = ["sysinfo", "llmserver"]
JSON = {"Content-Type": "application/json"}


def test_a_remote_collection_scrolls_counts_distinct_values_and_deletes_snapshots(gw: Any) -> None:
    """`wb.collection(name)` had no `scroll`, `count_distinct` or `delete_snapshot` (AttributeError), though it makes
    the same calls as a local `Collection` and the gateway serves them."""
    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    coll = wb.create_collection("review_scroll", dim=2)
    payloads: list[dict[str, Any]] = [{"g": i % 3, "n": i} for i in range(10)]
    payloads[9] = {"n": 9}  # no g: not counted
    payloads[8]["g"] = 1.0  # 1 and 1.0 are one value
    coll.upsert(ids=list(range(10)), vectors=np.ones((10, 2), dtype=np.float32), payloads=payloads)
    assert coll.count_distinct("g") == 3 and coll.count_distinct("g", {"n": {"$lt": 2}}) == 2
    with pytest.raises(InvalidInput) as bad:
        coll.count_distinct("a..b")
    assert bad.value.field == "field"

    first = coll.scroll(limit=4)
    assert isinstance(first, PointList) and [p.id for p in first] == [0, 1, 2, 3] and first[0].vector is None
    assert first.next_after is not None and first[1].payload == {"g": 1, "n": 1}
    rest = coll.scroll(limit=4, after=first.next_after, with_vectors=True)
    assert [p.id for p in rest] == [4, 5, 6, 7] and rest[0].vector == [1.0, 1.0]
    last = coll.scroll({"n": {"$gte": 5}}, limit=4, after=rest.next_after)
    assert [p.id for p in last] == [8, 9] and last.next_after is None
    assert [p.id for p in coll.scroll(limit=3, offset=8)] == [8, 9]

    snap = coll.snapshot()
    assert coll.delete_snapshot(snap.id) is None
    assert snap.id not in [s.id for s in coll.snapshots()]
    with pytest.raises(NotFound):
        coll.delete_snapshot(snap.id)
    wb.drop_collection("review_scroll")


def test_a_scroll_page_past_one_answer_of_vectors_is_asked_for_in_parts(gw: Any) -> None:
    """One answer holds at most 2,000,000 vector numbers (a 422 past them): a page of more, which a local
    `Collection` gives, comes in parts, the cursor at its end as the local one's."""
    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    coll = wb.create_collection("review_wide", dim=2048)
    coll.upsert(ids=list(range(1001)), vectors=np.ones((1001, 2048), dtype=np.float32), progress=False)
    page = coll.scroll(limit=1000, with_vectors=True)  # 2,048,000 numbers
    assert [p.id for p in page] == list(range(1000)) and len(page[999].vector) == 2048
    tail = coll.scroll(limit=1000, after=page.next_after, with_vectors=True)
    assert [p.id for p in tail] == [1000] and tail.next_after is None
    wb.drop_collection("review_wide")


def test_a_refused_upsert_batch_names_the_point_by_its_place_in_the_whole_list(gw: Any) -> None:
    """2,500 points with points[2100] 3-d in a 4-d collection: the error said `points[100].vector` (its place in
    the third batch of 1,000)."""
    wb = bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)
    coll = wb.create_collection("review_renumber", dim=4)
    points: list[dict[str, Any]] = [{"id": i, "vector": [1.0, 0.0, 0.0, 0.0]} for i in range(2500)]
    points[2100]["vector"] = [1.0, 0.0, 0.0]
    with pytest.raises(BkgError) as refused:
        coll.upsert(points)
    assert refused.value.field == "points[2100].vector", refused.value.to_dict()
    assert "(2,000 of 2,500 points were stored before)" in refused.value.message
    assert coll.count() == 2000
    points[2100]["vector"] = [1.0, 0.0, 0.0, 0.0]
    points[1234]["id"] = 1.5  # refused by the gateway's parse: `points.234.id` in its batch
    with pytest.raises(BkgError) as parsed:
        coll.upsert(points)
    assert parsed.value.field.startswith("points.1234.id") and parsed.value.message.startswith("points.1234.id")
    assert "(1,000 of 2,500 points were stored before)" in parsed.value.message
    wb.drop_collection("review_renumber")


def _model_folder(root: Path, name: str, hidden: int, *, modules: list[str] | None, arch: str = "BertModel") -> Path:
    """A transformers folder as the registry reads it (config, weights; with `modules`, a sentence model's)."""
    from safetensors.numpy import save_file

    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": [arch], "hidden_size": hidden})
    )
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / "model.safetensors"))
    if modules is not None:
        listed = [{"idx": i, "name": str(i), "path": "" if m == "Transformer" else f"{i}_{m}",
                   "type": f"sentence_transformers.models.{m}"} for i, m in enumerate(modules)]  # fmt: skip
        (folder / "modules.json").write_text(json.dumps(listed))
        pooling = {
            "word_embedding_dimension": hidden,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_cls_token": False,
        }
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def test_an_embed_model_is_checked_when_a_collection_is_created_or_changed(gw: Any, tmp_path: Path) -> None:
    """A collection took any `candle:`/`llmserver:` name (201, PATCH 200), a 384-d model for 4-d vectors too, and
    every text upsert failed after. Now: registered, of a kind its plugin embeds with, and of the collection's
    width when its registry entry says so for certain (else the first embedding checks it, as before)."""
    c = gw.client()

    def create(name: str, dim: int, model: str) -> Any:
        return c.post("/api/collections", json={"name": name, "dim": dim, "embed_model": model})

    def refused(r: Any, says: str) -> None:
        assert r.status_code == 422 and r.json()["error"]["field"] == "embed_model", r.text
        assert says in r.json()["error"]["message"], r.text

    refused(create("review_c4", 4, "candle:all-minilm-l6-v2"), "gives 384-d vectors; the collection holds 4-d")
    refused(create("review_c5", 384, "candle:nonexistent"), "no model 'nonexistent' is registered")
    refused(create("review_c6", 576, "candle:smollm2-135m-instruct"), "is a gguf-llm model")
    refused(create("review_c7", 384, "llmserver:all-minilm-l6-v2"), "is a hf-transformers model")
    assert c.get("/api/collections/review_c4").status_code == 404
    assert create("review_ok", 384, "candle:all-minilm-l6-v2").status_code == 201
    width = c.get("/api/models/smollm2-135m-instruct").json()["meta"]["embedding_length"]
    refused(create("review_gguf", width + 1, "llmserver:smollm2-135m-instruct"), f"gives {width}-d vectors")
    assert create("review_gguf", width, "llmserver:smollm2-135m-instruct").status_code == 201

    c.post("/api/collections", json={"name": "review_small", "dim": 4}).raise_for_status()
    refused(c.patch("/api/collections/review_small", json={"embed_model": "candle:doesnotexist"}), "doesnotexist")
    refused(c.patch("/api/collections/review_small", json={"embed_model": "candle:all-minilm-l6-v2"}), "384-d")
    assert c.get("/api/collections/review_small").json()["embed_model"] is None
    r = c.patch("/api/collections/review_ok", json={"embed_model": None})
    assert r.status_code == 200 and r.json()["embed_model"] is None
    assert c.patch("/api/collections/review_ok", json={"embed_model": "candle:all-minilm-l6-v2"}).status_code == 200
    assert c.patch("/api/collections/review_none", json={"embed_model": "candle:x"}).status_code == 404

    # what the registry entry does not tell for certain is left to the first embedding: a Dense layer's width
    for name, modules, arch in [
        ("review-plain", ["Transformer", "Pooling", "Normalize"], "BertModel"),
        ("review-dense", ["Transformer", "Pooling", "Dense"], "BertModel"),
        ("review-causal", None, "LlamaForCausalLM"),
    ]:
        folder = _model_folder(tmp_path, name, 8, modules=modules, arch=arch)
        body = {"path": str(folder), "id": name, "import_mode": "copy"}
        c.post("/api/models", json=body, timeout=60).raise_for_status()
    refused(create("review_plain", 4, "candle:review-plain"), "gives 8-d vectors")
    assert create("review_plain", 8, "candle:review-plain").status_code == 201
    assert create("review_dense", 4, "candle:review-dense").status_code == 201
    refused(create("review_causal", 8, "candle:review-causal"), "does generate, not embed")

    # an llmserver that forwards to an upstream server embeds with that server's models, which no registry lists
    c.post("/api/plugins/llmserver/stop").raise_for_status()
    config = c.get("/api/plugins/llmserver/config").json()["config"]
    upstream = {**config, "upstream_url": "http://127.0.0.1:9/v1"}
    c.put("/api/plugins/llmserver/config", json={"config": upstream}).raise_for_status()
    try:
        assert create("review_upstream", 1536, "llmserver:text-embedding-3-small").status_code == 201
    finally:
        c.put("/api/plugins/llmserver/config", json={"config": config}).raise_for_status()
    refused(create("review_local", 1536, "llmserver:text-embedding-3-small"), "is registered")


def test_count_takes_a_body_of_null_as_none_and_nan_is_not_json(gw: Any) -> None:
    """POST .../points/count, whose body may be left out, refused `null` ("must be a JSON object, not NoneType"),
    and a bare NaN was "not float", where it is not JSON."""
    c = gw.client()
    c.post("/api/collections", json={"name": "review_count", "dim": 2}).raise_for_status()
    c.put("/api/collections/review_count/points", json={"points": [{"id": 1, "vector": [1, 0]}]}).raise_for_status()
    for body in (b"null", b" null\n"):
        r = c.post("/api/collections/review_count/points/count", content=body, headers=JSON)
        assert r.status_code == 200 and r.json() == {"count": 1}, r.text
    for body in (b"NaN", b"-Infinity"):
        r = c.post("/api/collections/review_count/points/count", content=body, headers=JSON)
        assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"], r.text
    r = c.post("/api/collections/review_count/points/scroll", content=b"null", headers=JSON)  # a body it needs
    assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text
    r = c.post("/api/collections/review_count/snapshots/nope/restore", content=b"null", headers=JSON)
    assert r.status_code == 404 and r.json()["error"]["field"] == "snapshot_id", r.text
