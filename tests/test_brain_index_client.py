"""`wb.brain.index(...)` from a notebook: a corpus goes in calls of about INDEX_CHARS of text (one call for all of
it outlasted the client's 120 s wait from about 2,000 chunks on, with no progress shown), each document whole in
one call, with a progress bar, totals returned, and a refused call naming its document by its place in the list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway

from bkg_kernel.client import brain, connect
from bkg_kernel.errors import BkgError, InvalidInput

PLUGINS = ["brainml", "candle"]  # candle embeds

TOPICS = ["volcanoes and basalt lava", "sourdough bread and yeast", "comets and their tails", "tides and the moon"]
DOCS = [{"id": f"d{i}", "text": f"Notes on {TOPICS[i % 4]}, part {i}. " * 8, "metadata": {"part": i}} for i in range(8)]


@pytest.fixture(scope="module")
def wb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    g: Gateway = start_gateway(tmp_path_factory.mktemp("bi") / "data", plugins=PLUGINS)
    yield connect(g.url, api_key=ADMIN_KEY)
    g.stop()


def test_a_corpus_goes_in_calls_of_bounded_size_with_progress(
    wb: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(brain, "INDEX_CHARS", 3 * len(DOCS[0]["text"]))  # three documents a call: three calls
    calls: list[int] = []
    send = brain.Brain._invoke

    def counted(self: brain.Brain, cap: str, body: dict[str, object]) -> object:
        if cap == "brainml.index":
            calls.append(len(body["documents"]))  # type: ignore[arg-type]
        return send(self, cap, body)

    monkeypatch.setattr(brain.Brain, "_invoke", counted)
    r = wb.brain.index("kb", DOCS, chunking={"size": 200, "overlap": 20})  # type: ignore[attr-defined]
    assert calls == [3, 3, 2]
    assert r["collection"] == "kb" and r["documents"] == 8 and r["replaced"] == 0
    assert r["chunks"] >= 8 and r["took_ms"] > 0
    assert "index kb: 100%" in capsys.readouterr().err  # the progress bar, by documents
    stats = wb.brain.stats("kb")  # type: ignore[attr-defined]
    assert stats[0]["documents"] == 8 and stats[0]["chunks"] == r["chunks"]
    hits = wb.brain.query("kb", "comets tails", mode="text", top_k=8).hits  # type: ignore[attr-defined]
    assert {h["doc_id"] for h in hits} == {"d2", "d6"}  # from the first call's documents and the last's

    again = wb.brain.index("kb", DOCS[:3])  # type: ignore[attr-defined]
    assert again["documents"] == 3 and again["replaced"] == 3
    assert capsys.readouterr().err == ""  # one call: no bar


def test_two_versions_of_a_document_anywhere_in_the_list_are_refused_before_any_call(wb: object) -> None:
    docs = [*DOCS[:5], {"id": "d1", "text": "another version"}]
    with pytest.raises(InvalidInput) as refused:
        wb.brain.index("twice", docs)  # type: ignore[attr-defined]
    assert refused.value.field == "input.documents.5.id" and "also documents[1]" in refused.value.message
    names = [c.name for c in wb.collections()]  # type: ignore[attr-defined]
    assert "twice" not in names  # nothing was sent


def test_a_refused_call_names_the_document_in_the_whole_list_and_what_went_in_before(
    wb: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(brain, "INDEX_CHARS", 3 * len(DOCS[0]["text"]))
    docs = [*DOCS[:4], {"id": "empty", "text": ""}, *DOCS[4:]]  # documents[4]: the second call's second
    with pytest.raises(BkgError) as refused:
        wb.brain.index("partly", docs)  # type: ignore[attr-defined]
    err = refused.value
    assert err.status == 422 and err.field is not None and err.field.startswith("input.documents.4.text"), err.field
    assert "(3 of 9 documents were indexed before)" in err.message, err.message
    assert wb.brain.stats("partly")[0]["documents"] == 3  # type: ignore[attr-defined]


def test_texts_the_gateway_embeds_go_in_small_batches_with_progress(
    wb: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Points with texts and no vectors: the gateway embeds them, seconds a batch on two cores; 1,000 to a request
    came near the client's 120 s wait, and the bar showed only from 10,000 points."""
    from bkg_kernel.client import collections

    c = wb.create_collection("notes", 384, embed_model="candle:all-minilm-l6-v2")  # type: ignore[attr-defined]
    sizes: list[int] = []
    call = type(wb).call

    def counted(self: object, method: str, path: str, **kw: object) -> object:
        if method == "PUT" and path.endswith("/points"):
            sizes.append(len(kw["json"]["points"]))  # type: ignore[index]
        return call(self, method, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(type(wb), "call", counted)
    n = collections.EMBED_BATCH + 10
    assert c.upsert(ids=list(range(n)), texts=[f"note {i} on {TOPICS[i % 4]}" for i in range(n)]) == n
    assert sizes == [collections.EMBED_BATCH, 10]
    assert "upsert notes: 100%" in capsys.readouterr().err
    assert c.count() == n
