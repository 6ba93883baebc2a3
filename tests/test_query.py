from __future__ import annotations

import numpy as np
import pytest
from helpers import brute_force, clustered

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store import Store


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_flat_is_exact_for_every_metric(store: Store, metric: str) -> None:
    x = clustered(3000, 24, seed=1)
    c = store.create_collection("m", dim=24, metric=metric)
    c.upsert(ids=list(range(3000)), vectors=x)
    rng = np.random.default_rng(2)
    for q in x[rng.integers(0, 3000, 5)] + 0.1:
        hits = c.query(q, k=10)
        assert hits.ids == brute_force(x, q, 10, metric)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=metric != "l2")
    if metric == "l2":
        q = x[0] + 0.5
        assert c.query(q, k=1)[0].score == pytest.approx(float(np.linalg.norm(x[0] - q)), rel=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_have_high_recall(store: Store, kind: str) -> None:
    x = clustered(5000, 32, seed=3)
    extra = {"ivf_train_min": 2000} if kind == "ivf" else {}
    c = store.create_collection("a", dim=32, index=kind, **extra)
    c.upsert(ids=list(range(5000)), vectors=x)
    rng = np.random.default_rng(4)
    qs = x[rng.integers(0, 5000, 20)] + 0.05
    recall = np.mean([len(set(c.query(q, k=10).ids) & set(brute_force(x, q, 10))) / 10 for q in qs])
    assert recall >= 0.95


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("selectivity", [0.01, 0.1])
@pytest.mark.parametrize("path", ["exact", "index"])
def test_filter_before_rank_returns_full_k(
    store: Store, kind: str, selectivity: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "index":  # force the filtered graph / IVF search instead of exact search over the matches
        monkeypatch.setattr("bkg_kernel.store.index.EXACT_FILTER_MAX", 0)
        monkeypatch.setattr("bkg_kernel.store.index.EXACT_FILTER_SHARE", 0)
    n, k = 6000, 20
    x = clustered(n, 16, seed=5)
    rng = np.random.default_rng(6)
    tagged = rng.random(n) < selectivity
    extra = {"ivf_train_min": 2000} if kind == "ivf" else {}
    c = store.create_collection("f", dim=16, index=kind, **extra)
    c.upsert(ids=list(range(n)), vectors=x, payloads=[{"group": "rare" if t else "common"} for t in tagged])
    allowed = np.flatnonzero(tagged)
    assert len(allowed) >= k
    q = x[np.flatnonzero(~tagged)[0]]  # a query sitting among the points the filter excludes
    hits = c.query(q, k=k, filter={"group": "rare"})
    assert len(hits) == k
    assert all(h.payload == {"group": "rare"} for h in hits)
    assert len(set(hits.ids) & set(brute_force(x, q, k, allowed=allowed))) / k >= 0.95


def test_filter_with_fewer_matches_than_k(store: Store) -> None:
    c = store.create_collection("f", dim=2, index="hnsw")
    c.upsert(ids=list(range(100)), vectors=clustered(100, 2), payloads=[{"i": i} for i in range(100)])
    assert sorted(c.query([1, 1], k=50, filter={"i": {"$lt": 3}}).ids) == [0, 1, 2]
    assert c.query([1, 1], k=50, filter={"i": -1}).ids == []


def test_k_up_to_1000(store: Store) -> None:
    x = clustered(1500, 8)
    for kind in ("flat", "hnsw"):
        c = store.create_collection(f"k{kind}", dim=8, index=kind)
        c.upsert(ids=list(range(1500)), vectors=x)
        hits = c.query(x[0], k=1000)
        assert len(hits) == 1000 and len(set(hits.ids)) == 1000
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(InvalidInput) as err:
            c.query(x[0], k=bad)
        assert err.value.field == "k"


TEXTS = {
    1: "The quick brown fox jumps over the lazy dog",
    2: "A fox is a small omnivorous mammal; foxes live in dens",
    3: "DuckDB is an in-process analytical database",
    4: "FAISS searches dense vectors quickly",
    5: "Café culture in Paris: espresso and croissants",
}


@pytest.fixture
def textcoll(store: Store):  # type: ignore[no-untyped-def]
    c = store.create_collection("t", dim=3)
    vecs = {1: [1, 0, 0], 2: [0.9, 0.1, 0], 3: [0, 1, 0], 4: [0, 0.9, 0.1], 5: [0, 0, 1]}
    c.upsert([{"id": i, "vector": vecs[i], "text": t, "payload": {"n": i}} for i, t in TEXTS.items()])
    return c


def test_bm25_text_search(textcoll) -> None:  # type: ignore[no-untyped-def]
    hits = textcoll.query(text="fox", k=10, with_text=True)
    assert hits.mode == "text"
    assert set(hits.ids) == {1, 2}  # stemming: "foxes" matches too
    assert all(h.score > 0 for h in hits)
    assert "fox" in hits[0].text.lower()
    assert textcoll.query(text="cafe", k=10).ids == [5]  # accents stripped
    assert textcoll.query(text="database", k=10, filter={"n": {"$gt": 3}}).ids == []
    assert textcoll.query(text="zebra", k=10).ids == []
    textcoll.upsert([{"id": 6, "vector": [1, 1, 1], "text": "a zebra crossing"}])
    assert textcoll.query(text="zebra", k=10).ids == [6]  # the full-text index follows writes
    textcoll.delete([6])
    assert textcoll.query(text="zebra", k=10).ids == []


def test_hybrid_fuses_both_rankings(textcoll) -> None:  # type: ignore[no-untyped-def]
    # Vector alone prefers 3 then 4; text alone only knows 4 ("vectors"). Fused, 4 is in both lists: first.
    q = [0, 1, 0.05]
    assert textcoll.query(q, k=2).ids == [3, 4]
    assert textcoll.query(text="dense vectors", k=2).ids == [4]
    hybrid = textcoll.query(q, text="dense vectors", k=3)
    assert hybrid.mode == "hybrid"
    assert hybrid.ids[:2] == [4, 3]
    assert hybrid[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert textcoll.query(q, text="dense vectors", k=3, rrf_k=10)[0].score == pytest.approx(1 / 11 + 1 / 12)
    filtered = textcoll.query(q, text="dense vectors", k=3, filter={"n": {"$ne": 4}})
    assert 4 not in filtered.ids and filtered.ids[0] == 3


def test_relative_score_fusion_weighs_normalised_scores(textcoll) -> None:  # type: ignore[no-untyped-def]
    q = [0, 1, 0.05]
    fused = textcoll.query(q, text="dense vectors", k=5, fusion="relative")
    # 3 tops the vector list (normalised 1) and is not in the text list: 0.5 * 1; 4 has the text list's only
    # score (1) and a vector score between the list's best and worst: above 0.5.
    assert fused.ids[:2] == [4, 3]
    assert fused[1].score == pytest.approx(0.5) and 0.5 < fused[0].score < 1.0
    assert textcoll.query(q, text="dense vectors", k=5, fusion="relative", vector_weight=1.0)[0].id == 3


def test_text_query_on_collection_without_text(store: Store) -> None:
    c = store.create_collection("v", dim=2)
    c.upsert(ids=[1], vectors=[[1, 0]])
    assert c.query(text="anything", k=5).ids == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vector": [1, 0]}, "vector"),
        ({"vector": [1, 0, float("nan")]}, "vector"),
        ({}, "vector"),
        ({"text": "   "}, "text"),
        ({"vector": [1, 0, 0], "mode": "hybrid"}, "text"),
        ({"vector": [1, 0, 0], "mode": "fuzzy"}, "mode"),
        ({"vector": [1, 0, 0], "text": "x", "rrf_k": -1}, "rrf_k"),
        ({"vector": [1, 0, 0], "ef_search": 0}, "ef_search"),
        ({"vector": [1, 0, 0], "text": "x", "fusion": "borda"}, "fusion"),
    ],
)
def test_bad_query(textcoll, kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as err:
        textcoll.query(**kwargs)
    assert err.value.field == field


def test_query_result_shape(textcoll) -> None:  # type: ignore[no-untyped-def]
    r = textcoll.query([1, 0, 0], k=2)
    d = r.to_dict()
    assert set(d) == {"results", "took_ms", "mode"} and d["took_ms"] > 0
    assert d["results"][0] == {"id": 1, "score": pytest.approx(1.0), "payload": {"n": 1}}


def test_hit_texts_stay_right_through_updates_deletes_and_compaction(store: Store) -> None:
    c = store.create_collection("texts", dim=4)
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(1200, 4)).astype("float32")
    c.upsert(ids=list(range(1200)), vectors=vecs, texts=[f"text {i}" for i in range(1200)])

    def texts_of(q: np.ndarray) -> dict[int, str | None]:
        return {h.id: h.text for h in c.query(q, k=5, with_text=True)}

    assert texts_of(vecs[7])[7] == "text 7"  # read, then cached
    assert texts_of(vecs[7])[7] == "text 7"  # from the cache
    c.upsert(ids=[7], vectors=vecs[7:8], texts=["text 7, rewritten"])
    assert texts_of(vecs[7])[7] == "text 7, rewritten"  # an update is a new position: never the cached text
    c.delete(list(range(100, 1000)))  # most points gone: the collection compacts and renumbers positions
    assert store.collection("texts")._next_fid == 300  # noqa: SLF001 - renumbered densely
    for i in (0, 7, 1100, 1199):
        got = texts_of(vecs[i])
        assert got[i] == ("text 7, rewritten" if i == 7 else f"text {i}")
        assert all(t == ("text 7, rewritten" if pid == 7 else f"text {pid}") for pid, t in got.items())
