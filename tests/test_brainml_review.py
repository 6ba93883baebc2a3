"""What a review of brainml found against a live gateway (real MiniLM embeddings through candle): one text query
on a collection without embed_model made every stats listing a 422, even after a restart; concurrent first index
calls into a new collection lost documents to a 409; a refused index call still made its collection; brainml.train
queued jobs that then failed (labels 1 and "1", a seed sklearn refuses, one document a label); refusals named the
store's fields (`text`, `filter...`, `points[150].id`, `model`) rather than the caller's; whitespace texts and
blank ids were indexed; and a dropped collection's counters came back with one made under its name."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway

from bkg_kernel.client import brain, connect
from bkg_kernel.errors import InvalidInput
from bkg_kernel.plugins.brainml.inputs import MAX_DOC_ID

PLUGINS = ["brainml", "candle"]  # candle embeds; nothing here reaches the LLM


def invoke(g: Gateway, cap: str, body: dict[str, Any], key: str = ADMIN_KEY) -> httpx.Response:
    with g.client(key) as c:
        return c.post(f"/api/plugins/brainml/invoke/{cap}", json=body, timeout=120)


def error(r: httpx.Response) -> dict[str, Any]:
    return dict(r.json()["error"])


def exists(g: Gateway, name: str) -> bool:
    with g.client() as c:
        return c.get(f"/api/collections/{name}").status_code == 200


def stats_of(g: Gateway, name: str) -> dict[str, Any]:
    r = invoke(g, "brainml.stats", {"collection": name})
    assert r.status_code == 200, r.text
    return dict(r.json()["collections"][0])


def jobs(g: Gateway) -> int:
    with g.client() as c:
        return len(c.get("/api/jobs").json()["jobs"])


def test_the_stats_listing_survives_a_text_query_on_a_collection_without_embed_model(gw: Gateway) -> None:
    assert invoke(gw, "brainml.index", {"collection": "listed", "documents": [{"text": "lava and basalt"}]}).is_success
    with gw.client() as c:
        assert c.post("/api/collections", json={"name": "raw4", "dim": 4}).is_success
    r = invoke(gw, "brainml.query", {"collection": "raw4", "query": "cat", "mode": "text"})
    assert r.status_code == 200, r.text
    r = invoke(gw, "brainml.stats", {})
    assert r.status_code == 200, r.text
    rows = {row["collection"]: row for row in r.json()["collections"]}
    assert rows["raw4"]["embed_model"] is None and rows["raw4"]["queries"] == 1 and rows["raw4"]["dim"] == 4, rows
    assert rows["listed"]["documents"] == 1  # everyone else's collections are listed as before
    assert stats_of(gw, "raw4")["queries"] == 1
    r = invoke(gw, "brainml.query", {"collection": "raw4", "query": "cat"})  # hybrid needs the model: a 422 still
    assert r.status_code == 422 and error(r)["field"] == "collection" and "embed_model" in error(r)["message"]


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_first_index_calls_into_a_new_collection_all_index(gw: Gateway, round_: int) -> None:
    name, n = f"race-{round_}", 4
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with gw.client() as c:
            body = {"collection": name, "documents": [{"id": f"r{i}", "text": f"document {i} of the race"}]}
            barrier.wait()
            return c.post("/api/plugins/brainml/invoke/brainml.index", json=body, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    assert [r.status_code for r in answers] == [200] * n, [r.text for r in answers]
    assert stats_of(gw, name)["documents"] == n


def test_an_index_call_refused_for_want_of_llm_use_makes_no_collection(gw: Gateway) -> None:
    with gw.client() as admin:
        role = {"name": "writer", "scopes": ["collections:read", "collections:write"]}
        assert admin.post("/admin/roles", json=role).status_code == 201
        user = admin.post("/admin/users", json={"username": "wes", "role": "writer"}).json()
        key = admin.post("/admin/keys", json={"name": "wes's", "user_id": user["id"]}).json()["key"]
    r = invoke(gw, "brainml.index", {"collection": "unmade", "documents": [{"text": "hello there"}]}, key=key)
    assert r.status_code == 403 and "llm:use" in error(r)["message"], r.text
    assert not exists(gw, "unmade")


LABELLED = [  # per document: a label field training cannot learn from, and one it can
    {"mixed": 1, "objects": "a", "lonely": "w", "ok": "x"},
    {"mixed": 1, "objects": "a", "lonely": "x", "ok": "x"},
    {"mixed": "1", "objects": {"k": 1}, "lonely": "y", "ok": "y"},
    {"mixed": "1", "objects": {"k": 1}, "lonely": "z", "ok": "y"},
]


def test_train_refuses_before_queueing_what_its_job_would_fail_on(gw: Gateway) -> None:
    docs = [{"id": f"l{i}", "text": f"labelled note {i}", "metadata": meta} for i, meta in enumerate(LABELLED)]
    assert invoke(gw, "brainml.index", {"collection": "labels", "documents": docs}).is_success
    before = jobs(gw)
    for field, says in (("mixed", "at least 2 labels"), ("objects", "at least 2 labels"), ("lonely", "2 or more")):
        for cap in ("brainml.train_check", "brainml.train"):  # the gateway asks the check before it queues
            r = invoke(gw, cap, {"collection": "labels", "label_field": field})
            assert r.status_code == 422 and error(r)["field"] == "label_field", (cap, field, r.text)
            assert says in error(r)["message"], (cap, field, r.text)
    for seed in (-1, 2**32, 2**70):
        r = invoke(gw, "brainml.train", {"collection": "labels", "label_field": "ok", "seed": seed})
        assert r.status_code == 422 and error(r)["field"] == "input.seed", (seed, r.text)
    assert jobs(gw) == before
    r = invoke(gw, "brainml.train_check", {"collection": "labels", "label_field": "ok", "seed": 2**32 - 1})
    assert r.status_code == 200 and r.json()["labels"] == 2, r.text


def test_refusals_name_the_field_the_caller_sent(gw: Gateway) -> None:
    docs = [{"id": "cat", "text": "The cat sleeps on the mat.", "metadata": {"lang": "en"}}]
    assert invoke(gw, "brainml.index", {"collection": "fields", "documents": docs}).is_success
    bad_filter = {"lang": {"$foo": 1}}
    cases = [
        ("brainml.query", {"query": "x" * 10_001}, 422, "input.query"),
        ("brainml.query", {"query": "   "}, 422, "input.query"),
        ("brainml.query", {"query": " \n ", "mode": "text"}, 422, "input.query"),
        ("brainml.ask", {"question": "q" * 20_000}, 422, "input.question"),
        ("brainml.ask", {"question": "\t "}, 422, "input.question"),
        ("brainml.query", {"query": "cat", "filters": bad_filter}, 422, "filters.lang.$foo"),
        ("brainml.query", {"query": "cat", "mode": "text", "filters": bad_filter}, 422, "filters.lang.$foo"),
        ("brainml.ask", {"question": "cat?", "filters": bad_filter}, 422, "filters.lang.$foo"),
    ]
    for cap, body, status, field in cases:
        r = invoke(gw, cap, {"collection": "fields", **body})
        assert r.status_code == status and error(r)["field"] == field, (cap, body, r.text[:300])
    r = invoke(gw, "brainml.classify", {"model_id": "no-such-model", "texts": ["a cat"]})
    assert r.status_code == 404 and error(r)["field"] == "model_id", r.text
    r = invoke(gw, "brainml.query", {"collection": "fields", "query": "x" * 10_000, "mode": "text"})
    assert r.status_code == 200, r.text  # the longest query the store searches


def test_a_document_id_too_long_for_the_store_is_refused_naming_the_document(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [{"id": "fine", "text": "a fine note"}, {"id": "x" * 600, "text": "an id of 600 characters"}]
    r = invoke(gw, "brainml.index", {"collection": "longids", "documents": docs})
    assert r.status_code == 422 and error(r)["field"] == "input.documents.1.id", r.text
    assert "600" in error(r)["message"] and not exists(gw, "longids")
    # from a notebook, in calls of 3 documents: the sixth document of the list is named, not the third of its call
    monkeypatch.setattr(brain, "INDEX_DOCS", 3)
    wb = connect(gw.url, api_key=ADMIN_KEY)
    docs = [{"id": f"n{i}", "text": f"note {i}"} for i in range(5)] + [{"id": "y" * 600, "text": "too long an id"}]
    with pytest.raises(InvalidInput) as refused:
        wb.brain.index("longids", docs, progress=False)
    assert refused.value.field == "input.documents.5.id", refused.value.message
    assert "3 of 6 documents were indexed before" in refused.value.message
    longest = {"id": "z" * MAX_DOC_ID, "text": "the longest id that fits"}
    r = invoke(gw, "brainml.index", {"collection": "longids", "documents": [longest]})
    assert r.status_code == 200, r.text


def test_metadata_the_store_refuses_names_the_document_and_makes_no_collection(gw: Gateway) -> None:
    deep: dict[str, Any] = {}
    for _ in range(120):  # nested past the store's 100 levels
        deep = {"k": deep}
    docs = [{"id": "ok", "text": "a plain note"}, {"id": "deep", "text": "a deep note", "metadata": {"d": deep}}]
    r = invoke(gw, "brainml.index", {"collection": "deepmeta", "documents": docs})
    assert r.status_code == 422 and error(r)["field"] == "input.documents.1.metadata", r.text
    assert not exists(gw, "deepmeta")


@pytest.mark.parametrize(
    ("doc", "field"),
    [({"id": "w", "text": "   "}, "text"), ({"id": "", "text": "hi"}, "id"), ({"id": " \t", "text": "hi"}, "id")],
)
def test_a_blank_text_or_id_is_refused(gw: Gateway, doc: dict[str, Any], field: str) -> None:
    r = invoke(gw, "brainml.index", {"collection": "blanks", "documents": [{"id": "fine", "text": "fine text"}, doc]})
    assert r.status_code == 422 and error(r)["field"] == f"input.documents.1.{field}", r.text
    assert not exists(gw, "blanks")


def test_stats_start_again_for_a_collection_dropped_and_made_again(gw: Gateway) -> None:
    body = {"collection": "reborn", "documents": [{"id": "a", "text": "volcanoes and lava"}]}
    assert invoke(gw, "brainml.index", body).is_success
    for _ in range(3):
        assert invoke(gw, "brainml.query", {"collection": "reborn", "query": "lava", "mode": "text"}).is_success
    first = stats_of(gw, "reborn")
    assert first["queries"] == 3 and first["last_index"] is not None
    with gw.client() as c:
        assert c.delete("/api/collections/reborn").is_success
    assert invoke(gw, "brainml.index", body).is_success  # made again by brainml
    again = stats_of(gw, "reborn")
    assert again["queries"] == 0 and again["avg_query_ms"] is None and again["last_index"] > first["last_index"]

    assert invoke(gw, "brainml.query", {"collection": "reborn", "query": "lava", "mode": "text"}).is_success
    with gw.client() as c:  # made again by another client
        assert c.delete("/api/collections/reborn").is_success
        made = {"name": "reborn", "dim": 384, "embed_model": "candle:all-minilm-l6-v2"}
        assert c.post("/api/collections", json=made).is_success
    third = stats_of(gw, "reborn")
    assert third["queries"] == 0 and third["last_index"] is None and third["documents"] == 0, third
    listed = {row["collection"]: row for row in invoke(gw, "brainml.stats", {}).json()["collections"]}
    assert listed["reborn"]["queries"] == 0
