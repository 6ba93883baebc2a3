"""The notebook side of brainml: `wb.brain.query(...)` renders a ranked table with the matches highlighted."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bkg_kernel.client import Workbench


class Ranked(dict[str, Any]):
    """brainml.query's answer; renders as a ranked table with <mark>ed highlights."""

    def _repr_html_(self) -> str:
        rows = []
        for r in self["results"]:
            text, marked, at = r["chunk"], [], 0
            for a, b in r["highlights"]:
                marked += [escape(text[at:a]), f"<mark>{escape(text[a:b])}</mark>"]
                at = b
            marked.append(escape(text[at:]))
            meta = escape(", ".join(f"{k}={v}" for k, v in r["metadata"].items()))
            rows.append(
                f"<tr><td>{r['rank']}</td><td>{escape(str(r['id']))}</td><td>{r['score']:.4f}</td>"
                f"<td style='text-align:left'>{''.join(marked)}</td><td>{meta}</td></tr>"
            )
        head = "<tr><th>rank</th><th>id</th><th>score</th><th>chunk</th><th>metadata</th></tr>"
        cap = f"{len(self['results'])} results ({self['mode']}) in {self['latency_ms']:.1f} ms"
        return f"<table class='bkg-table'><caption>{escape(cap)}</caption>{head}{''.join(rows)}</table>"


class TrainReport(dict[str, Any]):
    """brainml.train's result: held-out metrics and a per-label table."""

    def _repr_html_(self) -> str:
        m = self["metrics"]
        rows = "".join(
            f"<tr><td>{escape(r['label'])}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
            f"<td>{r['f1']:.3f}</td><td>{r['support']}</td></tr>"
            for r in m["per_label"]
        )
        cap = (
            f"{escape(self['model_id'])} ({escape(self['architecture'])} on {escape(self['embed_model'])}): "
            f"accuracy {m['accuracy']:.3f} (majority {m['majority_baseline']:.3f}), macro F1 {m['f1_macro']:.3f} "
            f"on {m['test_examples']} held-out chunks of {m['test_documents']} documents"
        )
        head = "<tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
        return f"<table class='bkg-table'><caption>{cap}</caption>{head}{rows}</table>"


class Predictions(dict[str, Any]):
    """brainml.classify's result: one row per text."""

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{escape(p['text'][:120])}</td><td><b>{escape(p['label'])}</b></td>"
            f"<td>{p['score']:.3f}</td></tr>"
            for p in self["predictions"]
        )
        head = "<tr><th>text</th><th>label</th><th>probability</th></tr>"
        return f"<table class='bkg-table'><caption>{escape(self['model_id'])}</caption>{head}{rows}</table>"


class Brain:
    """brainml through the gateway."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb

    def _invoke(self, cap: str, body: dict[str, Any]) -> Any:
        return self.wb.call("POST", f"/api/plugins/brainml/invoke/{cap}", json=body)

    def index(self, collection: str, documents: list[dict[str, Any]], **opts: Any) -> dict[str, Any]:
        """Chunk, embed and store documents ({id?, text, metadata})."""
        return dict(self._invoke("brainml.index", {"collection": collection, "documents": documents, **opts}))

    def query(self, collection: str, query: str, **opts: Any) -> Ranked:
        """Search a collection (mode vector|text|hybrid, top_k, filters); a ranked table in a notebook."""
        return Ranked(self._invoke("brainml.query", {"collection": collection, "query": query, **opts}))

    def ask(self, collection: str, question: str, **opts: Any) -> dict[str, Any]:
        """Answer from the collection with citations."""
        return dict(self._invoke("brainml.ask", {"collection": collection, "question": question, **opts}))

    def stats(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Documents, chunks, model, last index, queries and latency per collection."""
        return list(self._invoke("brainml.stats", {"collection": collection})["collections"])

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
