"""What a new user's trial of brainml found, through a real gateway (real MiniLM embeddings, the real SmolLM2):
a label no test example held showed precision / recall / F1 of 0; a label field no chunk has was a failed job
later instead of a 422 now; every retrieved chunk came back as a citation whatever the answer cited; an empty
text was classified; the stats table showed the last index as epoch seconds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway

import bkg_kernel
from bkg_kernel.client import Workbench
from bkg_kernel.client.brain import Asked
from bkg_kernel.errors import AlreadyExists, InvalidInput, NotFound

BRAIN = ["brainml", "candle", "llmserver"]

TOPICS = {
    "cooking": [
        "Simmer the tomato sauce with garlic and basil for forty minutes, stirring now and then.",
        "Knead the bread dough until smooth, let it rise, then bake it in a hot oven.",
        "Whisk eggs with sugar, fold in the flour and bake the sponge cake until golden.",
    ],
    "space": [
        "The rover drilled into Martian rock and collected samples for a return mission.",
        "Astronomers watched the comet's tail grow as it swung around the sun.",
        "The telescope imaged the moons of Jupiter and the rings of Saturn.",
    ],
    "sport": ["The striker scored twice in the second half and the home team won the championship."],
}
DOCS = [
    {"id": f"{topic}-{i}", "text": text, "metadata": {"label": topic}}
    for topic, texts in TOPICS.items()
    for i, text in enumerate(texts)
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("braintrial") / "data", plugins=BRAIN)
    r = g.client().post("/api/plugins/brainml/invoke/brainml.index", json={"collection": "notes", "documents": DOCS})
    assert r.status_code == 200, r.text
    yield g
    g.stop()


@pytest.fixture(scope="module")
def wb(gw: Gateway) -> Workbench:
    return bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def report(wb: Workbench) -> Any:
    return wb.brain.train("notes", "label", model_id="notes-label", progress=False)


def invoke(g: Gateway, cap: str, body: dict[str, Any]) -> Any:
    return g.client().post(f"/api/plugins/brainml/invoke/{cap}", json=body)


def jobs(g: Gateway) -> int:
    return len(g.client().get("/api/jobs").json()["jobs"])


def test_a_label_without_held_out_chunks_is_not_tested_not_zero(gw: Gateway, report: Any) -> None:
    m = report["metrics"]
    rows = {r["label"]: r for r in m["per_label"]}
    assert rows["sport"] == {"label": "sport", "precision": None, "recall": None, "f1": None, "support": 0,
                             "tested": False}  # fmt: skip
    assert all(rows[lab]["tested"] and rows[lab]["support"] > 0 for lab in ("cooking", "space"))
    assert m["labels_tested"] == 2 and m["labels_total"] == 3
    # the macro F1 is the mean over the labels it tested, as the table says
    assert m["f1_macro"] == pytest.approx((rows["cooking"]["f1"] + rows["space"]["f1"]) / 2)
    html = report._repr_html_()
    sport = re.search(r"<tr><td[^>]*>sport</td>.*?</tr>", html)
    assert sport and "0.000" not in sport.group(0) and "not tested" in sport.group(0), html
    assert "over 2 of 3 labels (1 not tested" in html
    with gw.client() as c:  # the model list says over how many labels its macro F1 is
        entry = c.get(f"/api/models/{report['model_id']}").json()
    assert (entry["meta"]["metrics"]["labels_tested"], entry["meta"]["metrics"]["labels_total"]) == (2, 3), entry


def test_the_report_table_shows_the_held_out_confusion(report: Any) -> None:
    """Where people would rather look than read: the report's table is followed by its confusion matrix, shaded
    by each row's share (the whole picture: `pictures.training_report`)."""
    m = report["metrics"]
    html = report._repr_html_()
    table = html[html.index("bkg-confusion") :]
    cells = [int(n) for n in re.findall(r"<td[^>]*>(\d+)</td>", table)]
    assert len(cells) == len(m["per_label"]) ** 2 and sum(cells) == m["test_examples"], table
    assert cells == [n for row in m["confusion"] for n in row] and "rows the true label" in table
    assert "<th style='text-align:left'>sport</th>" in table  # the untested label's row: zeros, no shade
    from bkg_kernel.client.brain import _confusion_html

    assert "&lt;b&gt;x" in _confusion_html(["<b>x</b>", "y"], [[1, 0], [0, 1]]) and _confusion_html(["a"], []) == ""


def test_the_training_picture_marks_an_untested_label(report: Any) -> None:
    from bkg_kernel.pictures.training import _per_label, training_report

    fig = _per_label(report["metrics"]["per_label"], report["metrics"]["majority_baseline"])
    texts = [r.data_source.data.get("text") for r in fig.renderers if "text" in r.data_source.data]
    assert ["not tested"] in texts
    bars = next(r.data_source.data for r in fig.renderers if "f1" in r.data_source.data)
    sport = bars["label"].index("sport")
    assert bars["f1"][sport] != bars["f1"][sport]  # NaN: no bar, where a 0 drew an empty one
    head = training_report(dict(report), gateway_url="http://127.0.0.1:1")[0].object
    assert "over 2 of 3 labels (1 not tested" in head


def test_train_refuses_a_missing_label_field_or_collection_before_queueing_a_job(gw: Gateway, wb: Workbench) -> None:
    before = jobs(gw)
    with pytest.raises(InvalidInput) as bad:
        wb.brain.train("notes", "nosuchfield", progress=False)
    assert bad.value.status == 422 and bad.value.field == "label_field" and "nosuchfield" in bad.value.message
    with pytest.raises(NotFound) as missing:
        wb.brain.train("nope", "label", progress=False)
    assert missing.value.field == "collection"
    with pytest.raises(InvalidInput) as unmatched:  # the filter leaves no labelled chunk
        wb.brain.train("notes", "label", filters={"label": "gardening"}, progress=False)
    assert unmatched.value.field == "label_field" and "matching the filters" in unmatched.value.message
    with pytest.raises(InvalidInput, match="at least 2 labels") as one:
        wb.brain.train("notes", "label", filters={"label": "space"}, progress=False)
    assert one.value.field == "label_field"
    assert jobs(gw) == before  # none of them queued a job

    # the same checks over HTTP, with the same input as brainml.train
    ok = invoke(gw, "brainml.train_check", {"collection": "notes", "label_field": "label"})
    assert ok.status_code == 200 and ok.json()["labels"] == 3 and ok.json()["chunks"] == len(DOCS), ok.text
    r = invoke(gw, "brainml.train_check", {"collection": "notes", "label_field": "nosuchfield"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "label_field", r.text
    r = invoke(gw, "brainml.train_check", {"collection": "nope", "label_field": "label"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "collection", r.text
    r = invoke(gw, "brainml.train_check", {"collection": "notes", "label_field": "label", "filters": {"$bad": 1}})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("filters"), r.text
    # brainml.train itself, over HTTP: the gateway asks its check (`@capability(check=...)`) before it queues it
    r = invoke(gw, "brainml.train", {"collection": "notes", "label_field": "nosuchfield"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "label_field", r.text
    r = invoke(gw, "brainml.train", {"collection": "nope", "label_field": "label"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "collection", r.text
    assert jobs(gw) == before


def test_train_refuses_a_taken_model_id_before_queueing(gw: Gateway, wb: Workbench, report: Any) -> None:
    before = jobs(gw)
    with pytest.raises(AlreadyExists) as taken:
        wb.brain.train("notes", "label", model_id=report["model_id"], progress=False)
    assert taken.value.field == "model_id" and jobs(gw) == before


def test_citations_are_the_sources_the_answer_cites() -> None:
    from bkg_kernel.plugins.brainml.plugin import citations

    assert citations("Simmer it [2]. Bake it [1, 3], then [2][1].", 4) == ([2, 1, 3], [])
    cited, dropped = citations("It was [5] and [0].", 4)
    assert cited == [] and dropped == [{"cited": f"[{n}]", "why": f"there is no source [{n}]"} for n in (5, 0)]
    assert citations("No markers at all.", 4) == ([], [])
    sources = [{"n": n, "id": f"d{n}#0", "doc_id": f"d{n}", "offsets": [0, 9], "score": 0.5} for n in (1, 2, 3)]
    none = Asked({"answer": "I do not know.", "citations": [], "sources": sources, "model": "m"})._repr_html_()
    assert "cites none of the 3 sources" in none
    one = Asked({"answer": "Yes [2].", "citations": [sources[1]], "sources": sources, "model": "m"})._repr_html_()
    assert "cites 1 of 3 sources" in one and one.count("✓") == 1
    # a gateway from before `sources` sent every chunk as a citation: still drawn
    assert "cites 3 of 3" in Asked({"answer": "x", "citations": sources, "model": "m"})._repr_html_()


def test_ask_keeps_every_retrieved_chunk_as_a_source_and_cites_only_what_the_answer_cites(gw: Gateway) -> None:
    r = invoke(gw, "brainml.ask", {"collection": "notes", "question": "What did the rover collect?", "top_k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [s["n"] for s in out["sources"]] == [1, 2, 3]
    assert out["sources"][0]["doc_id"] == "space-0" and {"id", "offsets", "score"} <= set(out["sources"][0])
    marked = [int(n) for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", out["answer"]) for n in group.split(",")]
    expected = list(dict.fromkeys(n for n in marked if 1 <= n <= 3))
    assert [c["n"] for c in out["citations"]] == expected, out
    assert all(c == out["sources"][c["n"] - 1] for c in out["citations"])
    assert [d["cited"] for d in out["dropped"]] == [f"[{n}]" for n in marked if not 1 <= n <= 3]


def test_classify_refuses_an_empty_or_blank_text(gw: Gateway, report: Any) -> None:
    for text in ("", "   \n\t"):
        r = invoke(gw, "brainml.classify", {"model_id": report["model_id"], "texts": ["Bake the bread.", text]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input.texts.1", r.text
    r = invoke(gw, "brainml.classify", {"model_id": report["model_id"], "texts": ["Bake the bread at 220 degrees."]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "cooking", r.text


def test_stats_table_shows_the_last_index_in_utc(wb: Workbench) -> None:
    stats = wb.brain.stats("notes")
    assert isinstance(stats[0]["last_index"], float)  # the data keeps its epoch seconds
    html = stats._repr_html_()
    assert re.search(r"<td[^>]*>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", html), html
    assert str(stats[0]["last_index"])[:6] not in html
