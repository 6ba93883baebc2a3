"""brainml's highlights fold as full text folds: a query "cafe" marks the "Café" BM25 found it in, "straße" marks
"strasse", at the offsets of the text as it stands (however folding changed its length); and they follow every
ending the stemmer writes ("making" marks "making"). Checked as functions, against the store's own BM25, and through
brainml.query on a real gateway."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import Gateway, start_gateway

from bkg_kernel.datasets import python_docs
from bkg_kernel.plugins.brainml.plugin import WORD, Marks, highlights
from bkg_kernel.store import Store
from bkg_kernel.store.fulltext import cjk, term, words


def marked(query: str, text: str) -> list[str]:
    return [text[a:b] for a, b in highlights(query, text)]


@pytest.mark.parametrize(
    ("query", "text", "expected"),
    [
        ("cafe", "Un Café, des cafés, CAFÉ noir et un cafe.", ["Café", "cafés", "CAFÉ", "cafe"]),
        ("café", "cafe, CAFE, Cafés and café", ["cafe", "CAFE", "Cafés", "café"]),  # the accent in the query alone
        ("strasse", "Die Straße, die STRASSE, die strasse; STRAẞE", ["Straße", "STRASSE", "strasse", "STRAẞE"]),
        ("Straße", "eine strasse, die Straße, zwei Straßen", ["strasse", "Straße"]),  # ("strassen": another term)
        ("aesir", "Æsir, æsir and AESIR", ["Æsir", "æsir", "AESIR"]),
        ("æsir", "the aesir", ["aesir"]),
        ("soren", "Søren and SØREN, soren", ["Søren", "SØREN", "soren"]),
        ("søren", "Soren", ["Soren"]),
        ("lodz thor dorde", "Łódź, Þór, Đorđe", ["Łódź", "Þór", "Đorđe"]),
        ("istanbul", "İstanbul, İSTANBUL and istanbul", ["İstanbul", "İSTANBUL", "istanbul"]),  # İ lowers to 2
        ("λόγος", "ΛΌΓΟΣ και λογος", ["ΛΌΓΟΣ", "λογος"]),  # final sigma: lower case of the word as a whole
        ("ecole", "École, ÉCOLE", ["École", "ÉCOLE"]),
        ("fine", "a ﬁne day", ["ﬁne"]),  # a ligature: one character, two letters
    ],
)
def test_highlights_mark_folded_words_either_way(query: str, text: str, expected: list[str]) -> None:
    assert marked(query, text) == expected


def test_offsets_do_not_drift_where_folding_changes_a_length() -> None:
    """ß, æ, "…", ligatures grow when folded; a combining accent (text in NFD) goes: the spans stay the text's own."""
    nfd = "cafe\u0301"  # "café" written as "e" and a combining acute
    text = f"Straße… œuvre ﬁne {nfd}s, Æsir ½ {nfd} naïve ß json Cafe\u0301"
    assert marked("cafe json naive", text) == [f"{nfd}s", nfd, "naïve", "json", "Cafe\u0301"]  # the accent marked too
    assert marked("oeuvre", text) == ["œuvre"]
    assert marked("strasse", text) == ["Straße"]
    assert marked("ss", "a ß b ss") == ["ß", "ss"]
    assert marked("5kg", "5㎏ or 5kg") == ["5㎏", "5kg"]  # "㎏": "kg", inside a word
    assert marked("rad", "1 ㎯, 2 rad") == ["㎯", "rad"]  # "㎯": "rad∕s2", two words in one character
    assert marked("s2", "1 ㎯") == ["㎯"]
    orphan = "\u0301json x"  # an accent on nothing, before the word: not marked
    assert marked("json", orphan) == ["json"] and highlights("json", orphan) == [[1, 5]]


def test_chinese_japanese_and_korean_beside_accents() -> None:
    text = "Café で機械学習を学ぶ。Straße の猫、학습"
    assert marked("機械学習 cafe strasse 猫 학습", text) == ["Café", "機械学習", "Straße", "猫", "학습"]
    before = ["Python", "機械学習", "機械", "学習"]  # as before: the pairs of a run mark it whole
    assert marked("機械学習 python", "PythonとPyTorchで機械学習を学ぶ。機械の学習、猫が好き") == before


# letters that fold every way (accents, ß and the like, NFD accents, ligatures, İ, final sigma), separators, digits
_ALPHABET = [*"abcsezAZ09 -_.,'", "é", "É", "ß", "ẞ", "æ", "Ø", "ł", "þ", "\u0301", "\u0308", "ﬁ", "…", "İ", "Σ", "ς",
             "й", "ё", "ö", "\u00a0", "™", "²"]  # fmt: skip


def test_folded_reads_the_words_full_text_reads() -> None:
    """`folded` splits into exactly the words of `words` (the index's), and each word's span in the text reads as
    that word again."""
    from bkg_kernel.store.fulltext import folded  # (here: the other tests run against a full text without it)

    rng = random.Random(7)
    texts = ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    texts += [c for c in map(chr, range(0x110000)) if len(c.lower()) != 1]  # İ: lower case changes its length
    for text in texts:
        low, unfold = folded(text)
        found = list(WORD.finditer(low))
        assert [m.group() for m in found] == words(text), text
        for m in found:
            a, b = unfold(*m.span()) if unfold else m.span()
            # (a final sigma is one by its neighbours: "ΑΣ" alone ends in "ς", "ΑΣ.Β" holds a "σ")
            again = [w.replace("ς", "σ") for w in words(text[a:b])]
            assert again == [m.group().replace("ς", "σ")], (text, m.group(), text[a:b])


def test_every_ending_the_stemmer_writes_is_marked() -> None:
    """Snowball writes some stems past the word's own letters ("making": "make", "capability": "capabl", "skies":
    "sky", "dying": "die"): each word marks itself and the words of its stem, as BM25 matches them."""
    docs = python_docs(["json", "os", "pathlib", "typing", "logging", "argparse"])
    vocab = {w for d in docs for w in words(d["text"])}
    vocab |= {"making", "using", "capability", "possibilities", "skies", "dying", "lying", "tying", "happily", "cries"}
    missed = [w for w in sorted(vocab) if len(w) >= 2 and term(w) and highlights(w, w) != [[0, len(w)]]]
    assert missed == []
    text = "We make it, making them; dies, dying, died. Capable capability"
    want = ["make", "making", "dies", "dying", "died", "Capable", "capability"]
    assert marked("made makes die capability", text) == want


def test_marks_are_the_query_folded() -> None:
    marks = Marks("Cafés STRAẞE naïve 猫")
    assert marks.terms == {"cafe", "strass", "naiv"} and marks.pairs == {"猫"}


# texts with accents and folded letters; each query finds some of them by BM25, with and without the accents
TEXTS = {
    "fr": "Le Café de Flore sert un café noir; les cafés de Paris ouvrent tôt.",
    "plain": "A cafe serves coffee; the cafe on Main Street opens early.",
    "de": "Die Straße ist lang. Zwei Straßen kreuzen die STRASSE am Platz.",
    "nfd": "Ein Cafe\u0301 an der Strasse\u2026 und Søren trinkt Æblegløgg.",
    "cjk": "東京のCafé で機械学習を学ぶ。Straße の猫",
    "tr": "İstanbul'da bir kafe; İSTANBUL",
}
QUERIES = ["cafe", "café", "strasse", "Straße", "soren", "æblegløgg", "機械学習 cafe", "CAFÉ STRASSE", "istanbul"]


def expected_marks(query: str, text: str) -> list[str]:
    """The words of the text BM25 matched the query on, worked out the slow way: every run of letters of the text
    (with its accents) whose own words, as full text reads them, hold one of the query's terms; CJK letters kept
    apart, as full text keeps them."""
    terms = {term(w) for w in words(query, query=True) if not cjk(w)} - {None}
    runs = re.finditer(r"(?:(?![\u3040-\u30ff\u4e00-\u9fff])[^\W_]|[\u0300-\u036f])+", text)
    return [m.group() for m in runs if any(term(w) in terms for w in words(m.group()))]


@pytest.fixture
def texts(store: Store) -> Iterator[Any]:
    coll = store.create_collection("fold", dim=4)
    coll.upsert([{"id": k, "vector": [1.0, 0, 0, 0], "text": t} for k, t in TEXTS.items()], progress=False)
    yield coll


@pytest.mark.parametrize("query", QUERIES)
def test_highlights_mark_what_bm25_matched(texts: Any, query: str) -> None:
    """Every hit of the store's own BM25 has its matched words marked, and only those, at the text's offsets."""
    hits = texts.query(None, query, k=10, mode="text", with_text=True)
    assert hits, query
    marks = Marks(query)
    for h in hits:
        got = [h.text[a:b] for a, b in highlights(query, h.text, marks)]
        want = expected_marks(query, h.text)
        if not cjk(query):
            assert got == want, (query, h.id)
        else:
            assert set(want) <= set(got), (query, h.id)
        assert got, (query, h.id)  # BM25 found it on some word: one is marked


@pytest.fixture(scope="module")
def bgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("fold") / "data", plugins=["brainml", "candle"])
    yield g
    g.stop()


def test_brainml_query_marks_accented_words(bgw: Gateway) -> None:
    c = bgw.client()
    docs = [{"id": k, "text": t} for k, t in TEXTS.items()]
    r = c.post("/api/plugins/brainml/invoke/brainml.index", json={"collection": "fold", "documents": docs})
    assert r.status_code == 200, r.text
    for query in ("cafe", "café", "strasse", "Straße", "soren", "istanbul"):
        body = {"collection": "fold", "query": query, "mode": "text", "top_k": 10}
        results = c.post("/api/plugins/brainml/invoke/brainml.query", json=body).json()["results"]
        assert results, query
        for hit in results:
            got = [hit["chunk"][a:b] for a, b in hit["highlights"]]
            assert got == expected_marks(query, hit["chunk"]) and got, (query, hit["doc_id"], got)
    body = {"collection": "fold", "query": "cafe", "mode": "text", "top_k": 10}
    by_doc = {h["doc_id"]: h for h in c.post("/api/plugins/brainml/invoke/brainml.query", json=body).json()["results"]}
    fr = by_doc["fr"]
    assert [fr["chunk"][a:b] for a, b in fr["highlights"]] == ["Café", "café", "cafés"]
    assert by_doc["nfd"]["highlights"] == [[4, 9]]  # "Cafe" and its combining accent
