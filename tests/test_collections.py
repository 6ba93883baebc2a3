from __future__ import annotations

from pathlib import Path

import pytest

from bkg_kernel.errors import AlreadyExists, BkgError, InvalidInput, NotFound
from bkg_kernel.store import Store


def test_create_list_describe_drop(store: Store) -> None:
    store.create_collection("docs", dim=8, metric="cosine", index="hnsw", m=16)
    store.create_collection("faces", dim=4, metric="l2", index="flat")
    assert store.list_collections().names == ["docs", "faces"]
    info = store.describe("docs")
    assert (info.dim, info.metric, info.index, info.count) == (8, "cosine", "hnsw", 0)
    assert info.params["m"] == 16 and info.params["ef_search"] == 64
    assert info.last_snapshot is None
    faces = store["faces"]
    faces.upsert(ids=[1, 2], vectors=[[0, 0, 0, 1], [0, 0, 1, 0]], texts=["a cat", "a dog"])
    assert store.describe("faces").count == 2
    assert store.describe("faces").bytes_on_disk > 0
    faces.flush()  # an upsert alone writes no index file: without this the drop would have nothing to remove
    written = sorted(p.name for p in (store.data_dir / "indexes").glob(f"{faces.table}.*"))
    assert written == [f"{faces.table}.{ext}" for ext in ("faiss", "fts", "meta.json")]
    store.drop_collection("faces")
    assert store.list_collections().names == ["docs"]
    with pytest.raises(NotFound):
        store.collection("faces")
    assert not [p.name for p in (store.data_dir / "indexes").glob(f"{faces.table}.*")]


def test_recreate_after_drop_is_empty(store: Store) -> None:
    c = store.create_collection("a", dim=2)
    c.upsert(ids=[1], vectors=[[1, 0]])
    store.drop_collection("a")
    c2 = store.create_collection("a", dim=2)
    assert c2.count() == 0
    assert len(c2.query([1, 0], k=5)) == 0


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"name": "", "dim": 4}, "name", "non-empty"),
        ({"name": "a/b", "dim": 4}, "name", "'/'"),
        ({"name": "-x", "dim": 4}, "name", "starting with"),
        ({"name": "ok", "dim": 0}, "dim", "dim must be"),
        ({"name": "ok", "dim": "4"}, "dim", "dim must be"),
        ({"name": "ok", "dim": 4, "metric": "hamming"}, "metric", "unknown metric 'hamming'"),
        ({"name": "ok", "dim": 4, "index": "lsh"}, "index", "unknown index 'lsh'"),
        ({"name": "ok", "dim": 4, "index": "hnsw", "nlist": 3}, "params", "unknown hnsw index parameter"),
        ({"name": "ok", "dim": 4, "index": "hnsw", "m": -1}, "params.m", "from 2 to 256"),
    ],
)
def test_bad_collection_input(store: Store, kwargs: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        store.create_collection(**kwargs)
    assert err.value.field == field
    assert words in err.value.message
    assert err.value.status == 422
    assert err.value.to_dict()["error"]["field"] == field
    assert store.list_collections().names == []


def test_duplicate_name_refused_and_existing_kept(store: Store) -> None:
    c = store.create_collection("docs", dim=2)
    c.upsert(ids=["x"], vectors=[[1, 2]])
    with pytest.raises(AlreadyExists) as err:
        store.create_collection("docs", dim=3)
    assert err.value.status == 409
    assert store["docs"].count() == 1 and store.describe("docs").dim == 2


def test_error_root_and_shape() -> None:
    err = InvalidInput("vector has 3 values", field="points[0].vector")
    assert isinstance(err, BkgError)
    assert err.to_dict() == {
        "error": {
            "status": 422,
            "code": "invalid_input",
            "message": "vector has 3 values",
            "field": "points[0].vector",
        }
    }


def test_notebook_reprs(store: Store) -> None:
    c = store.create_collection("docs", dim=2)
    c.upsert([{"id": 1, "vector": [1, 0], "payload": {"lang": "en"}, "text": "<b>bold</b>"}])
    html = c.query([1, 0], k=1, with_text=True)._repr_html_()
    assert "<table" in html and "&lt;b&gt;bold&lt;/b&gt;" in html and "lang" in html
    assert "<table" in store._repr_html_() and "docs" in store._repr_html_()
    assert "docs" in c._repr_html_()
    assert c.query([1, 0], k=1).to_pandas().loc[0, "id"] == 1


def test_embed_model_is_kept_reopened_and_snapshotted(data_dir: Path) -> None:
    s = Store(data_dir)
    s.create_collection("docs", dim=3, embed_model="candle:all-minilm-l6-v2")
    assert s.describe("docs").embed_model == "candle:all-minilm-l6-v2"
    with pytest.raises(InvalidInput) as exc:
        s.create_collection("bad", dim=3, embed_model="all-minilm-l6-v2")
    assert exc.value.field == "embed_model"
    s.collection("docs").upsert([{"id": 1, "vector": [1, 0, 0]}])
    snap = s.snapshot("docs")
    s.set_embed_model("docs", "llmserver:smollm2-135m-instruct")
    s.close()
    s = Store(data_dir)
    assert s.collection("docs").embed_model == "llmserver:smollm2-135m-instruct"
    restored = s.restore_snapshot("docs", snap.id, "docs2")
    assert restored.embed_model == "candle:all-minilm-l6-v2"
    s.set_embed_model("docs", None)
    assert s.describe("docs").embed_model is None
    s.close()
