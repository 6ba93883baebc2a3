"""The notebook side of brainml: `wb.brain.query(...)` renders a ranked table with the matches highlighted."""

from __future__ import annotations

from collections.abc import Iterator
from html import escape
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from bkg_kernel.client import transport
from bkg_kernel.client.jobs import when
from bkg_kernel.client.transport import renumber
from bkg_kernel.display import ShownOnce, Table, html_table, streamed_answer
from bkg_kernel.errors import BkgError, InvalidInput
from bkg_kernel.models.classifier import tested_labels

if TYPE_CHECKING:
    from bkg_kernel.client.workbench import Workbench

# What one brainml.index call carries: about 250 chunks of text, seconds of embedding on two cores, where a whole
# corpus in one call outlasted the client's wait (120 s) from about 2,000 chunks on, the gateway still at work.
INDEX_CHARS = 200_000
INDEX_DOCS = 500


class Ranked(dict[str, Any]):
    """brainml.query's answer; renders as a ranked table with <mark>ed highlights. `hits` are its results, best
    first; `to_pandas()` makes them a DataFrame."""

    @property
    def hits(self) -> list[dict[str, Any]]:
        return list(self["results"])

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self["results"])

    def _repr_html_(self) -> str:
        rows = [
            (r["rank"], r["id"], f"{r['score']:.4f}", _highlighted(r["chunk"], r["highlights"]),
             ", ".join(f"{k}={v}" for k, v in r["metadata"].items()))
            for r in self["results"]
        ]  # fmt: skip
        cap = f"{len(self['results'])} results ({self['mode']}) in {self['latency_ms']:.1f} ms"
        return html_table(["rank", "id", "score", "chunk", "metadata"], rows, cap, raw={"chunk"})


class Asked(ShownOnce, dict[str, Any]):
    """brainml.ask's answer: the text, then the chunks it was given (`sources`), those it cites as [n] marked
    (`citations`: empty when it cites none). Streamed into its cell as it was written, it is not shown again
    there as the cell's result."""

    def __str__(self) -> str:
        return str(self["answer"])

    def _repr_html_(self) -> str:
        given = self.get("sources", self["citations"])  # a gateway before `sources` sent every chunk as citations
        cited = {c["n"] for c in self["citations"]}
        rows = [(s["n"], "✓" if s["n"] in cited else "", s["doc_id"], s["id"], f"{s['score']:.4f}") for s in given]
        said = f"cites {len(cited)} of {len(given)}" if cited else f"cites none of the {len(given)}"
        table = html_table(["n", "cited", "document", "chunk", "score"], rows, f"the answer {said} sources "
                           f"({self['model']})")  # fmt: skip
        return f"<div style='white-space:pre-wrap'>{escape(str(self['answer']))}</div>{table}"


class Stats(Table):
    """brainml.stats: per collection, documents, chunks, model, last index, queries and latency."""

    columns = ("collection", "documents", "chunks", "embed_model", "dim", "last_index", "queries", "avg_query_ms")
    caption = "brainml collections"

    def cells(self, row: dict[str, Any]) -> list[Any]:
        """Return the row's cells, the last index time in UTC (the row keeps its epoch seconds)."""
        return [when(row.get(c), "UTC") if c == "last_index" else row.get(c) for c in self.columns]


class TrainReport(dict[str, Any]):
    """brainml.train's result: held-out metrics and a per-label table (a label with no held-out chunks, one
    document say, is marked not tested: its metrics are null, not 0)."""

    def _repr_html_(self) -> str:
        m = self["metrics"]
        rows = [
            (r["label"], _metric(r["precision"]), _metric(r["recall"]), _metric(r["f1"]),
             r["support"] or "0: <i>not tested</i>")
            for r in m["per_label"]
        ]  # fmt: skip
        cap = (
            f"{self['model_id']} ({self['architecture']} on {self['embed_model']}): "
            f"accuracy {m['accuracy']:.3f} (majority {m['majority_baseline']:.3f}), macro F1 {m['f1_macro']:.3f} "
            f"over {tested_labels(m)} on {m['test_examples']} held-out chunks of {m['test_documents']} documents"
        )
        table = html_table(["label", "precision", "recall", "F1", "support"], rows, cap, raw={"support"})
        return table + _confusion_html([r["label"] for r in m["per_label"]], m.get("confusion") or [])


def _confusion_html(labels: list[Any], matrix: list[list[int]], most: int = 20) -> str:
    """The held-out confusion matrix as a shaded table (rows: the true label, columns: the predicted one; a cell's
    shade is its share of its row), for up to `most` labels; `pictures.training_report` draws the whole report."""
    if not matrix or len(labels) > most or len(matrix) != len(labels):
        return ""

    def cell(n: int, total: int) -> str:
        share = n / total if total else 0.0
        ink = "#fff" if share > 0.55 else "inherit"
        return f"<td style='text-align:right;background:rgba(31,119,180,{share:.2f});color:{ink}'>{n}</td>"

    head = "".join(f"<th style='text-align:right'>{escape(str(label))}</th>" for label in labels)
    body = "".join(
        f"<tr><th style='text-align:left'>{escape(str(label))}</th>{''.join(cell(n, sum(row)) for n in row)}</tr>"
        for label, row in zip(labels, matrix, strict=True)
    )
    cap = "held-out confusion: rows the true label, columns the predicted one (shade: share of the row)"
    return (
        f"<table class='bkg-table bkg-confusion'><caption style='text-align:left'>{cap}</caption>"
        f"<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


class Predictions(dict[str, Any]):
    """brainml.classify's result: one row per text."""

    def _repr_html_(self) -> str:
        rows = [(p["text"][:120], f"<b>{escape(p['label'])}</b>", f"{p['score']:.3f}") for p in self["predictions"]]
        return html_table(["text", "label", "probability"], rows, self["model_id"], raw={"label"})


class Brain:
    """brainml through the gateway."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb

    def _invoke(self, cap: str, body: dict[str, Any]) -> Any:
        return self.wb.invoke("brainml", cap, body)

    def index(
        self, collection: str, documents: list[dict[str, Any]], *, progress: bool | None = None, **opts: Any
    ) -> dict[str, Any]:
        """Chunk, embed and store documents ({id?, text, metadata}); re-indexing an id replaces its chunks.

        Sent in calls of about `INDEX_CHARS` of text, each document whole in one call, with a progress bar when
        it takes more than one; returns the totals (documents, chunks, replaced, took_ms). A call the gateway
        refuses says how many documents the calls before it indexed, and names the document in the whole list."""
        ids: dict[str, int] = {}
        for i, doc in enumerate(documents):  # one call refuses two versions of a document: so does the whole list
            if isinstance(doc, dict) and doc.get("id") is not None and ids.setdefault(str(doc["id"]), i) != i:
                raise InvalidInput(
                    f"input.documents.{i}.id: document {doc['id']!r} is also documents[{ids[str(doc['id'])]}] of "
                    "this list: send one version of a document per call",
                    field=f"input.documents.{i}.id",
                )
        done: dict[str, Any] = {"collection": collection, "documents": 0, "chunks": 0, "replaced": 0, "took_ms": 0.0}
        parts = list(_index_batches(documents))
        show = len(parts) > 1 if progress is None else progress
        with tqdm(total=len(documents), desc=f"index {collection}", unit="doc", disable=not show) as bar:
            for start, part in parts:
                body = {"collection": collection, "documents": part, **opts}
                try:
                    r = self._invoke("brainml.index", body)
                except BkgError as exc:
                    indexed = int(done["documents"])
                    before = f"{indexed:,} of {len(documents):,} documents were indexed before" if indexed else ""
                    renumber(exc, "documents", start, before)
                    raise
                for key in ("documents", "chunks", "replaced", "took_ms"):
                    done[key] += r[key]
                bar.update(len(part))
        return done

    def query(self, collection: str, query: str, **opts: Any) -> Ranked:
        """Search a collection (mode vector|text|hybrid, top_k, filters); a ranked table in a notebook."""
        return Ranked(self._invoke("brainml.query", {"collection": collection, "query": query, **opts}))

    def ask(self, collection: str, question: str, *, stream: bool = True, echo: bool = True, **opts: Any) -> Asked:
        """Answer from the collection: `sources` the chunks given, `citations` those the answer cites as [n].

        With `stream` (and `echo`) the answer appears as the model writes it (a notebook shows it, then the
        sources table, in one output; elsewhere it is printed); without, it comes whole."""
        body = {"collection": collection, "question": question, **opts}
        if not stream:
            return Asked(self._invoke("brainml.ask", body))
        events = transport.stream(self.wb.http, "POST", "/api/brain/ask", json=body)
        return streamed_answer(events, Asked, f"chunks of {collection}" if echo else None)

    def stats(self, collection: str | None = None) -> Stats:
        """Documents, chunks, model, last index, queries and latency per collection (a table in a notebook)."""
        return Stats(self._invoke("brainml.stats", {"collection": collection})["collections"])

    def train(self, collection: str, label_field: str, *, wait: bool = True, progress: bool = True, **opts: Any) -> Any:
        """Train a classifier (model logistic|mlp, test_split, ...) as a background job with a progress bar.

        Returns the report (metrics, model_id); with `wait=False`, the job to follow with `wb.wait_job(id)`.
        """
        body = {"collection": collection, "label_field": label_field, **opts}
        job = self._invoke("brainml.train", body)["job"]
        if not wait:
            return job
        return TrainReport(self.wb.wait_job(job["id"], progress=progress))

    def classify(self, model_id: str, texts: list[str]) -> Predictions:
        """Label texts with a trained classifier."""
        return Predictions(self._invoke("brainml.classify", {"model_id": model_id, "texts": texts}))


def _index_batches(documents: list[Any]) -> Iterator[tuple[int, list[Any]]]:
    """(index of the first, documents) of each call: at most INDEX_DOCS documents and, past the first document,
    INDEX_CHARS of text (one longer document goes alone). No documents: one call, which the gateway refuses."""
    start, size = 0, 0
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else None
        n = len(text) if isinstance(text, str) else 0
        if i > start and (i - start >= INDEX_DOCS or size + n > INDEX_CHARS):
            yield start, documents[start:i]
            start, size = i, 0
        size += n
    yield start, documents[start:]


def _highlighted(text: str, spans: list[list[int]]) -> str:
    """The text, escaped, with each [start, end) span in <mark>."""
    marked, at = [], 0
    for a, b in spans:
        marked += [escape(text[at:a]), f"<mark>{escape(text[a:b])}</mark>"]
        at = b
    marked.append(escape(text[at:]))
    return "".join(marked)
