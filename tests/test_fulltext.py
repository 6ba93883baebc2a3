"""The store's own BM25 index: analysis, scores against the formula, incremental updates that never bring a deleted
document back, and consistency with the rows after SIGKILL, reopen, compaction and snapshot/restore."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bkg_kernel.datasets import python_docs
from bkg_kernel.store import Store, fulltext
from bkg_kernel.store.fulltext import STOP_WORDS, TextIndex, words


def _terms(text: str, query: bool = False) -> list[str]:
    """The terms the index makes of a text (or looks for, for a `query`), in order, repeats kept (its analysis,
    through a throwaway index)."""
    t = TextIndex()
    return [t.vocab[i] for i in t._ids(words(text, query), grow=True) if i >= 0]


def test_analysis_folds_splits_drops_stop_words_and_stems() -> None:
    assert words("Café-au-lait read_csv os.path.join ÉCOLE") == [
        "cafe", "au", "lait", "read", "csv", "os", "path", "join", "ecole",
    ]  # fmt: skip
    assert set(_terms("The foxes are running to the databases")) == {"fox", "run", "databas"}
    assert "first" not in STOP_WORDS and "value" not in STOP_WORDS  # a short stop list: these carry meaning here
    assert _terms("x" * 41) == []  # over-long tokens (hashes, base64) are not terms
    # letters without a decomposition fold as Lucene's ASCII folding writes them (found by a review)
    assert words("Straße Søren Æsir Łódź œuvre Đorđe Þór ẞ") == [
        "strasse", "soren", "aesir", "lodz", "oeuvre", "dorde", "thor", "ss",
    ]  # fmt: skip


def test_chinese_japanese_and_korean_are_split_into_letters_and_pairs() -> None:
    # written without spaces: a run is indexed as its letters and overlapping pairs, asked for by its pairs
    assert words("机器学习") == ["机", "器", "学", "习", "机器", "器学", "学习"]
    assert words("机器学习", query=True) == ["机器", "器学", "学习"]
    assert words("猫", query=True) == ["猫"]  # a lone letter is asked for by itself
    assert words("PyTorchで機械学習, café", query=True) == ["pytorch", "で機", "機械", "械学", "学習", "cafe"]
    assert words("ｶﾞｰﾄﾞ", query=True) == words("ガード", query=True) == ["ガー", "ード"]  # half width: full
    assert words("한국어 분석", query=True) == ["한국", "국어", "분석"]
    assert _terms("機械学習 databases") == ["機", "械", "学", "習", "機械", "械学", "学習", "databas"]


def test_chinese_japanese_and_korean_texts_are_found_by_their_words(store: Store) -> None:
    texts = {
        1: "机器学习是人工智能的一个分支。",
        2: "深度学习使用多层神经网络。",
        3: "東京は日本の首都です。猫が好きです。",
        4: "PyTorchで機械学習を学ぶ",
        5: "한국어 형태소 분석기는 문장을 나눈다",
        6: "machine learning in English, without any of those letters",
    }
    c = store.create_collection("cjk", dim=2)
    c.upsert([{"id": i, "vector": [1, 0], "text": t} for i, t in texts.items()])
    assert c.query(text="机器学习", k=5).ids[0] == 1
    assert set(c.query(text="学习", k=5).ids) == {1, 2}  # both hold the word; neither holds "學習" or "学習"
    assert c.query(text="首都", k=5).ids == [3] and c.query(text="猫", k=5).ids == [3]
    assert c.query(text="機械学習", k=5).ids == [4] and c.query(text="pytorch", k=5).ids == [4]
    assert c.query(text="형태소 분석", k=5).ids == [5]
    assert set(c.query(text="学", k=5).ids) == {1, 2, 4}  # a lone letter finds the texts holding it
    assert c.query(text="learning", k=5).ids == [6]
    scores = {h.id: h.score for h in c.query(text="深度学习", k=5)}
    assert max(scores, key=scores.__getitem__) == 2 and scores[2] == pytest.approx(_bm25(texts, "深度学习")[2])


def test_texts_without_terms_and_queries_without_terms(store: Store) -> None:
    c = store.create_collection("stop", dim=2)
    c.upsert([{"id": 1, "vector": [1, 0], "text": "the and of"}, {"id": 2, "vector": [0, 1], "text": ""}])
    assert c.query(text="the", k=5).ids == [] and c.query(text="anything", k=5).ids == []
    c.upsert([{"id": 3, "vector": [1, 1], "text": "the cat"}])
    c.delete([3])
    assert c.query(text="cat", k=5).ids == []  # the term is known, no live document holds it


def _bm25(docs: dict[int, str], query: str) -> dict[int, float]:
    """Lucene's BM25 (k1 1.2, b 0.75), written out from the formula, over the same analysis."""
    toks = {i: Counter(_terms(t)) for i, t in docs.items()}
    n = len(docs)
    avgdl = sum(sum(c.values()) for c in toks.values()) / n
    out: dict[int, float] = {}
    for q in set(_terms(query, query=True)):
        df = sum(1 for c in toks.values() if q in c)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, c in toks.items():
            if q in c:
                tf, dl = c[q], sum(c.values())
                out[i] = out.get(i, 0.0) + idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))
    return out


def test_scores_are_bm25_over_the_live_documents(store: Store) -> None:
    texts = {
        1: "json encoder turns objects into json text",
        2: "the decoder reads json text back into objects",
        3: "gzip compresses a file",
        4: "compress and decompress data with zlib; compress streams",
        5: "a queue of tasks",
    }
    c = store.create_collection("bm", dim=2)
    c.upsert([{"id": i, "vector": [1, 0], "text": t} for i, t in texts.items()])
    for q in ("json objects", "compress data", "decompressing files"):
        got = {h.id: h.score for h in c.query(text=q, k=10)}
        want = _bm25(texts, q)
        assert got.keys() == want.keys()
        assert all(got[i] == pytest.approx(want[i], rel=1e-5) for i in want), q
    c.delete([1])  # the deleted document leaves N, avgdl and the document frequencies at once
    del texts[1]
    got = {h.id: h.score for h in c.query(text="json objects", k=10)}
    assert got.keys() == {2} and got[2] == pytest.approx(_bm25(texts, "json objects")[2], rel=1e-5)


def test_a_batch_analysed_in_slices_and_one_built_by_many_merges_score_as_the_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A big batch is analysed a slice of its texts at a time (a whole batch's words at once would hold the GIL
    for a third of a second): every slice boundary, texts longer than a slice and texts without words keep
    each word with its own document; and postings merged segment after segment keep term-then-position order."""
    rng = np.random.default_rng(7)
    vocab = ["json", "encoder", "decoder", "gzip", "file", "stream", "queue", "task", "thread", "socket", "path"]
    texts: list[str | None] = [" ".join(rng.choice(vocab, int(rng.integers(1, 40)))) for _ in range(300)]
    texts[5] = " ".join(vocab * 30)  # longer than a slice by itself
    texts[17], texts[18], texts[200] = None, "", "the of and"  # no text, empty, nothing but stop words
    monkeypatch.setattr(fulltext, "CHARS_PER_CALL", 64)  # a slice every few texts
    whole = TextIndex()
    whole.add(0, texts)
    merged = TextIndex()
    for i, t in enumerate(texts):  # one segment each, merged as a binary counter: many merges
        merged.add(i, [t])
    assert len(merged.segments) < 10
    live = {i: t for i, t in enumerate(texts) if t}
    for q in ("json stream", "queue task thread", "path", "gzip socket encoder"):
        want = _bm25(live, q)
        for index in (whole, merged):
            docs, scores = index.search(q, k=len(texts))
            got = dict(zip(docs.tolist(), scores.tolist(), strict=True))
            assert got.keys() == want.keys(), q
            assert all(got[i] == pytest.approx(want[i], rel=1e-5) for i in want), q


def test_writes_update_the_index_in_place_and_deleted_documents_never_return(store: Store) -> None:
    rng = np.random.default_rng(0)
    c = store.create_collection("inc", dim=4)
    c.upsert(ids=list(range(500)), vectors=rng.normal(size=(500, 4)), texts=[f"common doc{i}" for i in range(500)])
    assert c.query(text="doc7", k=5).ids == [7]
    index = c._text
    segments_before = len(index.segments)
    for i in range(40):  # small writes: appended as segments and merged, never rebuilt
        c.upsert([{"id": 1000 + i, "vector": [1, 0, 0, 0], "text": f"common fresh{i}"}])
        assert c.query(text=f"fresh{i}", k=5).ids == [1000 + i]
    assert c._text is index and len(index.segments) <= segments_before + 8
    c.upsert([{"id": 7, "vector": [1, 0, 0, 0], "text": "rewritten"}])  # a replace: the old text must not match
    assert c.query(text="doc7", k=5).ids == []
    assert c.query(text="rewritten", k=5).ids == [7]
    c.delete([8])
    c.delete(filter={"missing": 1})  # deletes nothing
    assert c.query(text="doc8", k=5).ids == []
    assert 8 not in c.query(text="common", k=1000).ids
    assert c.query(text="common", k=1000, filter={}).ids.count(9) == 1
    c.delete(list(range(10, 400)))  # most positions dead: the collection compacts, the index is rebuilt
    assert c.query(text="doc8", k=5).ids == [] and c.query(text="doc450", k=5).ids == [450]
    live = c.query(text="common", k=1000).ids
    assert len(live) == c.count() - 1 and 7 not in live  # every live point with the word, once; 7 was rewritten


def test_filtered_text_search_ranks_only_the_matches(store: Store) -> None:
    c = store.create_collection("f", dim=2)
    c.upsert(
        [{"id": i, "vector": [1, 0], "text": "shared word " * (1 + i % 3), "payload": {"n": i}} for i in range(60)]
    )
    hits = c.query(text="shared", k=10, filter={"n": {"$gte": 50}})
    assert len(hits) == 10 and all(h.payload["n"] >= 50 for h in hits)


def _consistent(c, texts: dict[int, str]) -> None:  # type: ignore[no-untyped-def]
    """The collection's text search answers exactly as an index rebuilt from `texts` (the rows) would."""
    fresh = TextIndex()
    keys = sorted(texts)
    fresh.add(0, [texts[k] for k in keys])
    for q in ("delta", "doc3", "doc1999", "rare", "rare delta"):  # all matches (< k): no ties at a cut-off
        fids, scores = fresh.search(q, 1000)
        want = [(keys[f], round(s, 4)) for f, s in zip(fids.tolist(), scores.tolist(), strict=True)]
        got = [(h.id, round(h.score, 4)) for h in c.query(text=q, k=1000)]
        assert sorted(got) == sorted(want), q


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from bkg_kernel.store import Store
    s = Store(sys.argv[1])
    c = s.create_collection("docs", dim=8)
    words = ["alpha", "beta", "gamma", "delta"]
    rng = np.random.default_rng(0)
    c.upsert(ids=list(range(2000)), vectors=rng.normal(size=(2000, 8)),
             texts=[f"{words[i % 4]} {words[i % 3]} doc{i}" for i in range(2000)])
    c.query(text="alpha", k=1)
    c.flush()  # a saved index; the writes below are only in DuckDB (and memory) when the process dies
    c.delete(list(range(0, 300, 3)))
    c.upsert([{"id": i, "vector": [1] * 8, "text": f"rare rewritten doc{i}"} for i in range(1, 40, 2)])
    print("written", flush=True)
    import time
    time.sleep(60)
""")


def test_index_survives_sigkill_consistent_with_the_rows(data_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    words_ = ["alpha", "beta", "gamma", "delta"]
    texts = {i: f"{words_[i % 4]} {words_[i % 3]} doc{i}" for i in range(2000) if not (i < 300 and i % 3 == 0)}
    texts.update({i: f"rare rewritten doc{i}" for i in range(1, 40, 2)})
    with Store(data_dir) as s:
        c = s["docs"]
        _consistent(c, texts)  # the saved index, caught up from DuckDB: deletes masked, new texts added
        assert c.query(text="doc6", k=5).ids == []  # deleted before the kill
    (data_dir / "indexes").joinpath(next(p.name for p in (data_dir / "indexes").glob("*.fts"))).write_bytes(b"junk")
    with Store(data_dir) as s:
        _consistent(s["docs"], texts)  # a damaged file is rebuilt from the rows


def test_snapshot_restore_brings_the_index_back_with_the_rows(store: Store) -> None:
    c = store.create_collection("snap", dim=2)
    texts = {i: f"alpha beta doc{i}" if i % 2 else f"gamma doc{i}" for i in range(300)}
    c.upsert([{"id": i, "vector": [1, i], "text": t} for i, t in texts.items()])
    c.delete([3, 5])
    del texts[3], texts[5]
    snap = c.snapshot()
    c.upsert([{"id": 1999, "vector": [1, 0], "text": "doc1999 rare"}])
    c.delete([7])
    restored = store.restore_snapshot("snap", snap.id, into="snap2")
    _consistent(restored, texts)
    assert restored.query(text="doc1999", k=5).ids == [] and restored.query(text="doc7", k=5).ids == [7]
    store.restore_snapshot("snap", snap.id)  # over the live collection
    _consistent(store["snap"], texts)


def test_a_real_corpus_indexes_and_answers(store: Store) -> None:
    docs = python_docs(["json", "gzip", "shutil", "textwrap"])
    c = store.create_collection("py", dim=2)
    c.upsert([{"id": d["id"], "vector": [1, 0], "text": d["text"]} for d in docs])
    assert c.query(text="remove common leading whitespace", k=3).ids[0] == "textwrap.dedent"
    assert "shutil.rmtree" in c.query(text="recursively delete a directory tree", k=5).ids
