"""brainml through a real gateway: chunking, real MiniLM embeddings (candle), BM25 + vector + hybrid queries,
re-indexing, a grounded answer from the real SmolLM2 with citations, and stats."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import nbformat
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for
from helpers import notebook

from bkg_kernel.plugins.brainml.plugin import chunk, highlights
from bkg_kernel.store.fulltext import term
from bkg_kernel.store.results import EXPLAIN_KEYS

BRAIN = ["brainml", "candle", "llmserver"]  # the plugins brainml uses (candle embeds, llmserver answers ask)

DOCS = [
    {
        "id": "volcano",
        "text": "Volcanoes form where magma reaches the surface. " * 12
        + "Basalt lava flows are fluid and travel far before they cool.",
        "metadata": {"topic": "geology", "lang": "en"},
    },
    {
        "id": "bread",
        "text": "Sourdough bread rises with wild yeast and lactic bacteria. " * 10
        + "A long cold proof gives the crust its flavour.",
        "metadata": {"topic": "cooking", "lang": "en"},
    },
    {
        "id": "orbit",
        "text": "Comets orbit the sun on long elliptical paths and grow tails near perihelion. " * 8,
        "metadata": {"topic": "astronomy", "lang": "en"},
    },
]


# a notebook that asks as people do: a cell ending in the call, then the answer kept as the cell's value
ASK_CELLS = {
    "setup": "import bkg_kernel\nwb = bkg_kernel.connect()",
    "asked": "wb.brain.ask('kb', question, top_k=2)",
    "kept": "print('kept', type(_).__name__, len(_['sources']))",
}


@pytest.fixture(scope="module")
def bgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = tmp_path_factory.mktemp("brain-jobs")
    notebook(roots / "ask.ipynb", "question = ''", *ASK_CELLS.values())
    g = start_gateway(tmp_path_factory.mktemp("brain") / "data", plugins=BRAIN, env={"BKG_JOB_ROOTS": str(roots)})
    yield g
    g.stop()


def invoke(g: Gateway, cap: str, body: dict[str, Any]) -> Any:
    return g.client().post(f"/api/plugins/brainml/invoke/{cap}", json=body)


def test_chunking_covers_the_text_at_word_boundaries() -> None:
    text = " ".join(f"word{i}" for i in range(400))
    spans = chunk(text, 200, 40)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b - a <= 200 for a, b in spans) and all(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))
    assert all(a == 0 or text[a - 1] == " " for a, _ in spans)


@pytest.mark.parametrize(
    "text",
    [
        "機" * 2000,  # no spaces at all (Chinese, Japanese)
        "東京は日本の首都です。" * 150 + " and then some English " * 20,
        "word " * 100 + "x" * 1000 + " tail" * 50,  # a long token (base64, minified code) across a cut
    ],
)
def test_chunking_never_drops_text_without_spaces(text: str) -> None:
    spans = chunk(text, 800, 100)
    covered = np.zeros(len(text), dtype=bool)
    for a, b in spans:
        covered[a:b] = True
    assert covered.all() and spans[-1][1] == len(text)
    assert all(b - a <= 800 for a, b in spans) and all(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


def test_highlights_in_chinese_japanese_and_korean() -> None:
    text = "PythonとPyTorchで機械学習を学ぶ。機械の学習、猫が好き"
    marked = [text[a:b] for a, b in highlights("機械学習 python", text)]
    assert marked == ["Python", "機械学習", "機械", "学習"]  # the pairs of a run mark it whole
    assert [text[a:b] for a, b in highlights("猫", text)] == ["猫"]
    dotted = "İstanbul 猫 학습"  # "İ" lowers to two characters; full text folds it to "istanbul", and marks it
    assert [dotted[a:b] for a, b in highlights("학습 猫 istanbul", dotted)] == ["İstanbul", "猫", "학습"]


def test_index_query_ask_stats(bgw: Gateway) -> None:
    r = invoke(bgw, "brainml.index", {"collection": "kb", "documents": DOCS, "chunking": {"size": 300, "overlap": 50}})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["documents"] == 3 and first["chunks"] > 6 and first["replaced"] == 0
    info = bgw.client().get("/api/collections/kb").json()
    assert info["embed_model"] == "candle:all-minilm-l6-v2" and info["dim"] == 384 and info["count"] == first["chunks"]

    for mode in ("vector", "text", "hybrid"):
        q = invoke(
            bgw, "brainml.query", {"collection": "kb", "query": "lava flows from volcanoes", "mode": mode}
        ).json()
        top = q["results"][0]
        assert top["doc_id"] == "volcano" and top["rank"] == 1 and q["latency_ms"] > 0, (mode, q)
        assert top["metadata"] == {"topic": "geology", "lang": "en"}
        assert any(top["chunk"][a:b].lower() in ("lava", "flows", "volcanoes") for a, b in top["highlights"])
        a, b = top["offsets"]
        assert DOCS[0]["text"][a:b] == top["chunk"]
        assert not set(EXPLAIN_KEYS) & set(top)
    explained = invoke(
        bgw, "brainml.query", {"collection": "kb", "query": "lava flows", "mode": "hybrid", "explain": True}
    ).json()["results"]
    assert all(set(EXPLAIN_KEYS) <= set(h) for h in explained), explained[0]
    assert explained[0]["doc_id"] == "volcano" and explained[0]["text_rank"] == 1
    filtered = invoke(
        bgw, "brainml.query", {"collection": "kb", "query": "lava", "filters": {"topic": "cooking"}, "top_k": 3}
    ).json()
    assert filtered["results"] and {r["doc_id"] for r in filtered["results"]} == {"bread"}

    # re-indexing a document replaces its chunks
    short = {"id": "bread", "text": "Rye bread is dense.", "metadata": {"topic": "cooking"}}
    again = invoke(bgw, "brainml.index", {"collection": "kb", "documents": [short]}).json()
    assert again["replaced"] == 1 and again["chunks"] == 1
    hits = invoke(bgw, "brainml.query", {"collection": "kb", "query": "bread", "top_k": 50}).json()["results"]
    assert [h["id"] for h in hits if h["doc_id"] == "bread"] == ["bread#0"]

    ans = invoke(bgw, "brainml.ask", {"collection": "kb", "question": "How do comets move?", "top_k": 2})
    assert ans.status_code == 200, ans.text
    out = ans.json()
    assert out["answer"] and out["usage"]["completion_tokens"] > 0
    assert out["sources"][0]["doc_id"] == "orbit" and out["sources"][0]["n"] == 1
    assert all(c in out["sources"] for c in out["citations"])  # only those the answer cites as [n]

    from gateway_harness import ADMIN_KEY

    import bkg_kernel

    table = bkg_kernel.connect(bgw.url, api_key=ADMIN_KEY).brain.query("kb", "basalt lava", top_k=3)
    html = table._repr_html_()
    assert "<mark>lava</mark>" in html.lower() and ">rank</th>" in html
    assert table["results"][0]["doc_id"] == "volcano"

    stats = invoke(bgw, "brainml.stats", {"collection": "kb"}).json()["collections"][0]
    bread_chunks = sum(1 for a, b in chunk(DOCS[1]["text"], 300, 50))
    assert stats["documents"] == 3 and stats["chunks"] == first["chunks"] - bread_chunks + 1
    assert stats["embed_model"] == "candle:all-minilm-l6-v2" and stats["dim"] == 384
    assert stats["queries"] >= 7 and stats["avg_query_ms"] > 0 and stats["last_index"] is not None


def test_bad_input(bgw: Gateway) -> None:
    r = invoke(bgw, "brainml.query", {"collection": "nope", "query": "x"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = invoke(bgw, "brainml.index", {"collection": "kb2", "documents": []})
    assert r.status_code == 422 and "documents" in r.json()["error"]["message"]
    r = invoke(
        bgw,
        "brainml.index",
        {"collection": "kb2", "documents": [{"text": "x y"}], "chunking": {"size": 60, "overlap": 60}},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "chunking.overlap"
    bgw.client().post("/api/collections", json={"name": "raw", "dim": 3}).raise_for_status()
    r = invoke(bgw, "brainml.query", {"collection": "raw", "query": "x"})
    assert r.status_code == 422 and "embed_model" in r.json()["error"]["message"]
    # metadata cannot file a document's chunks under another document (re-indexing that one would delete them)
    r = invoke(bgw, "brainml.index", {"collection": "kb2", "documents": [{"text": "x y", "metadata": {"doc_id": "B"}}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.documents.0.metadata", r.text
    assert "doc_id" in r.json()["error"]["message"]
    # found by a review: one id twice in a call (7 and "7" are one id) stored the versions mixed, chunk by chunk
    long, short = {"id": 7, "text": " ".join(f"alpha{i}" for i in range(300))}, {"id": "7", "text": "short text"}
    r = invoke(bgw, "brainml.index", {"collection": "kb2", "documents": [long, short], "chunking": {"size": 200}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.documents.1.id", r.text
    assert "documents[0]" in r.json()["error"]["message"]
    assert bgw.client().get("/api/collections/kb2").status_code == 404  # a refused call makes nothing


def test_a_name_the_capability_does_not_take_is_a_422_not_ignored(bgw: Gateway) -> None:
    """Found by a review: `filter=` for `filters`, `k=` for `top_k`, were dropped without a word, and the query ran
    unfiltered; the notebook client's calls and plain HTTP alike."""
    from bkg_kernel.client import Workbench
    from bkg_kernel.errors import InvalidInput

    r = invoke(bgw, "brainml.query", {"collection": "kb", "query": "x", "filter": {"lang": "en"}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.filter", r.text
    assert "did you mean 'filters'?" in r.json()["error"]["message"]
    wb = Workbench(bgw.url, ADMIN_KEY)
    with pytest.raises(InvalidInput, match="input.k: not an input"):
        wb.brain.query("kb", "solar", k=3)
    ranked = wb.brain.query("kb", "lava flows", top_k=3, mode="text")
    assert ranked.hits and list(ranked.to_pandas()["doc_id"]) == [h["doc_id"] for h in ranked.hits]
    stats = wb.brain.stats("kb")  # a table in a notebook, rows as before
    assert stats[0]["collection"] == "kb" and "<table" in stats._repr_html_()
    asked = wb.brain.ask("kb", "What flows from volcanoes?")
    assert asked["sources"] and str(asked) == asked["answer"] and "sources" in asked._repr_html_()


def _ask_events(g: Gateway, body: dict[str, Any], key: str = ADMIN_KEY) -> list[dict[str, Any]]:
    events = []
    with g.client(key).stream("POST", "/api/brain/ask", json=body, timeout=180) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_ask_streams_the_answer_as_the_model_writes_it(bgw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """brainml.ask showed nothing for the seconds the model wrote: `POST /api/brain/ask` sends the sources, then
    each piece as it comes, then the whole answer; `wb.brain.ask` shows it as it comes."""
    body = {"collection": "kb", "question": "How do comets move?", "top_k": 2}
    events = _ask_events(bgw, body)
    assert events[0]["sources"][0]["doc_id"] == "orbit" and events[0]["sources"][0]["n"] == 1
    pieces = [e["delta"] for e in events if "delta" in e]
    result = events[-1]["result"]
    assert len(pieces) > 1 and "".join(pieces) == result["answer"] and result["sources"] == events[0]["sources"]
    assert result["usage"]["completion_tokens"] >= len(pieces) and result["model"]
    assert all(c in result["sources"] for c in result["citations"])

    c = bgw.client()  # refused before the stream starts: a plain error naming the field
    r = c.post("/api/brain/ask", json={"collection": "kb", "question": " \t"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.question", r.text
    r = c.post("/api/brain/ask", json={"collection": "no-such", "question": "comets?"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "collection", r.text

    from bkg_kernel.client import Workbench

    capsys.readouterr()
    asked = Workbench(bgw.url, ADMIN_KEY).brain.ask("kb", "How do comets move?", top_k=2)
    assert str(asked) in capsys.readouterr().out and asked["sources"][0]["doc_id"] == "orbit"
    whole = Workbench(bgw.url, ADMIN_KEY).brain.ask("kb", "How do comets move?", top_k=2, stream=False)
    assert whole["sources"] == asked["sources"] and capsys.readouterr().out == ""

    # in a notebook (a real kernel: a notebook job) the cell shows the answer as it comes, then the answer with its
    # sources table in the same output, once: no Out[] after it, though it is the cell's value
    run = Workbench(bgw.url, ADMIN_KEY).jobs.run("ask.ipynb", question="How do comets move?", progress=False)
    assert run.ok, run
    out = nbformat.reads(Workbench(bgw.url, ADMIN_KEY).jobs.output(run["id"]), as_version=4)
    cells = {name: next(c.outputs for c in out.cells if c.source == src) for name, src in ASK_CELLS.items()}
    (shown,) = cells["asked"]
    assert shown["output_type"] == "display_data" and "sources" in shown["data"]["text/html"], cells["asked"]
    assert "writing" not in shown["data"]["text/html"]  # the last update: the whole answer, not the text so far
    assert cells["kept"][0]["text"] == "kept Asked 2\n", cells["kept"]


def _asked_tokens(c: Any) -> tuple[int, int]:
    """The admin key's booked LLM requests and tokens."""
    rows = c.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
    mine = [u for u in rows if u["username"] == "admin"]
    return (mine[0]["requests"], mine[0]["total_tokens"]) if mine else (0, 0)


def test_a_streamed_ask_whose_client_leaves_stops_the_model_and_is_booked(bgw: Gateway) -> None:
    c = bgw.client()
    cancelled = c.get("/api/plugins/llmserver/health").json()["cancelled"]
    requests, tokens = _asked_tokens(c)
    body = {"collection": "kb", "question": "Tell me everything about lava, volcanoes, comets and bread.", "top_k": 3}
    with c.stream("POST", "/api/brain/ask", json=body, timeout=180) as r:
        for line in r.iter_lines():
            if '"delta"' in line:
                break  # the client goes once the model has begun
    wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, timeout=60)
    # what the model wrote until then is booked to the asker (the prompt, and at least the piece it read)
    booked = wait_for(lambda: (now := _asked_tokens(c))[0] > requests and now, timeout=30)
    assert booked[1] > tokens, (booked, tokens)


def test_stats_lists_what_is_left_after_a_collection_is_dropped(bgw: Gateway) -> None:
    assert invoke(bgw, "brainml.index", {"collection": "short-lived", "documents": [{"text": "a b c"}]}).is_success
    assert bgw.client().delete("/api/collections/short-lived").is_success
    r = invoke(bgw, "brainml.stats", {})
    assert r.status_code == 200 and "short-lived" not in {c["collection"] for c in r.json()["collections"]}, r.text
    assert invoke(bgw, "brainml.stats", {"collection": "short-lived"}).status_code == 404


def test_brainml_acts_as_its_caller(bgw: Gateway) -> None:
    """A key with only llm:use cannot read a collection through brainml; once its role can, the answer's
    tokens are booked to that key, and brainml's writes are audited under the caller's key."""
    r = invoke(bgw, "brainml.index", {"collection": "private", "documents": DOCS[:2]})
    assert r.status_code == 200, r.text
    admin = bgw.client()
    made = admin.get("/admin/audit", params={"action": "collection.create"}).json()["entries"]
    row = next(e for e in made if e["target"] == "private")
    admin_key_id = next(k["id"] for k in admin.get("/admin/keys").json()["keys"] if k["name"] == "admin (bootstrap)")
    assert row["actor"] == "admin" and row["detail"] == {**row["detail"], "plugin": "brainml", "key": admin_key_id}

    assert admin.post("/admin/roles", json={"name": "asker", "scopes": ["llm:use"]}).status_code == 201
    user = admin.post("/admin/users", json={"username": "ann", "role": "asker"}).json()
    key = admin.post("/admin/keys", json={"name": "ann's", "user_id": user["id"]}).json()
    ann = bgw.client(key["key"])
    ask = {"collection": "private", "question": "How does sourdough rise?", "top_k": 2}
    query = {"collection": "private", "query": "sourdough", "top_k": 2}
    for cap, body in (("brainml.ask", ask), ("brainml.query", query)):
        r = ann.post(f"/api/plugins/brainml/invoke/{cap}", json=body)
        assert r.status_code == 403, (cap, r.text)
        assert "collections:read" in r.json()["error"]["message"], (cap, r.text)
    r = ann.post("/api/brain/ask", json=ask)  # streamed: refused before the stream starts
    assert r.status_code == 403 and "collections:read" in r.json()["error"]["message"], r.text

    assert admin.patch("/admin/roles/asker", json={"scopes": ["llm:use", "collections:read"]}).status_code == 200
    r = ann.post("/api/plugins/brainml/invoke/brainml.query", json=query)
    assert r.status_code == 200 and r.json()["results"][0]["doc_id"] == "bread", r.text
    r = ann.post("/api/plugins/brainml/invoke/brainml.ask", json=ask)
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"]
    usage = admin.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
    mine = next(u for u in usage if u["key_id"] == key["id"])
    assert mine["username"] == "ann" and mine["requests"] == 1 and mine["total_tokens"] == tokens
    streamed = _ask_events(bgw, ask, key["key"])[-1]["result"]["usage"]  # the streamed ask: booked to ann too
    usage = admin.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
    mine = next(u for u in usage if u["key_id"] == key["id"])
    assert mine["requests"] == 2 and mine["total_tokens"] == tokens + streamed["total_tokens"]
    assert not any(str(u.get("username", "")).startswith("plugin:") for u in usage)


@pytest.mark.parametrize(
    "text",
    [
        "Parse JSON: json.loads parses a JSON document; JSONDecoder is another word, _json_ and read_json are not.",
        "İstanbul: the dotted capital lowers to two characters, so offsets fall back to walking words (json parsers).",
        "",
    ],
)
def test_highlights_mark_the_words_full_text_matched(text: str) -> None:
    """A word is marked when full text makes of it a term of the query (its stem: "parses" for "parse"; "_json_"
    and "read_json" split at `_` as the index splits them); stop words ("to", "in") never are."""
    query = "how to parse json in Python"
    terms = {term(w) for w in ("how", "parse", "json", "python")}
    expected = [[m.start(), m.end()] for m in re.finditer(r"[^\W_]+", text) if term(m.group().lower()) in terms]
    assert highlights(query, text) == expected
    assert expected or not text


def test_highlights_follow_stemming_as_bm25_does() -> None:
    """Found by a review: a hit BM25 found by a stem ("runs" for "running") came back with no highlight."""
    text = "It runs a database, ran two databases; happy runners read_csv the data."
    assert [text[a:b] for a, b in highlights("running databases happiness csv", text)] == [
        "runs",
        "database",
        "databases",
        "happy",
        "csv",
    ]  # fmt: skip  ("ran" and "runners" are other terms, as for BM25)
