"""brainml: hybrid retrieval over store collections (inline in the gateway, next to the store it queries).

Documents are chunked, embedded by the collection's `embed_model` (candle or llmserver, computed by the
gateway) and stored with their text, so queries can be vector, BM25 or hybrid (RRF). `brainml.ask` answers
from the retrieved chunks with llmserver and cites them. `brainml.train` fits a classifier on a collection's
embeddings (a background job) and registers it as a model; `brainml.classify` uses it.

Inline, because its own work is store calls and string work (chunking, highlights): as a worker, every query
crossed two more process hops (to the worker, and back to the store it asks), about 2 ms of a 5 ms text query.
What is heavy runs elsewhere: embeddings in candle or llmserver, classifier training (scikit-learn) in a child
process (`models.classifier.train_in_child`), so neither a model nor a training run lives in the gateway.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from bkg_kernel import statefiles
from bkg_kernel.errors import AlreadyExists, CorruptData, InvalidInput, NotFound
from bkg_kernel.models.classifier import Classifier
from bkg_kernel.models.classifier import train_in_child as fit_classifier
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER
from bkg_kernel.models.registry import ID_PATTERN, ModelRegistry, check_id, slug
from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.runtime.contract import JSONResult, Plugin, PluginSettings, Progress, capability
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.store.filters import field_name
from bkg_kernel.store.fulltext import CJK_LETTER, cjk, folded, term, words
from bkg_kernel.store.results import EXPLAIN_KEYS
from bkg_kernel.store.validate import COLLECTION_NAME_PATTERN

INDEX_BATCH = 2048  # chunks per upsert (the gateway embeds them in batches of 1024)


class BrainSettings(PluginSettings):
    """brainml settings."""

    request_timeout: float = Field(
        600.0, gt=0, le=3600, description="Seconds before a request gets a 504 (indexing embeds every chunk)."
    )
    chunk_size: int = Field(800, ge=50, le=20_000, description="Characters per chunk.")
    chunk_overlap: int = Field(100, ge=0, le=5_000, description="Characters shared by neighbouring chunks.")
    embed_model: str = Field(
        f"candle:{DEFAULT_EMBEDDER}", description="For new collections: candle:<id> or llmserver:<id>."
    )
    # Hybrid defaults chosen on PYDOC_TUNING (bench/fusion.py), not on the held-out PYDOC_QUERIES.
    vector_weight: float = Field(
        0.75, ge=0.0, le=1.0, description="Hybrid: weight of the vector ranking in the fusion (Weaviate's alpha)."
    )
    fusion: Literal["rrf", "relative"] = Field(
        "rrf", description="Hybrid: reciprocal rank fusion, or a weighted sum of min-max normalised scores."
    )
    rrf_k: float = Field(
        20.0, ge=0.0, le=1000.0, description="Hybrid RRF: rank offset; lower trusts the top of each list more."
    )
    rerank_model: str | None = Field(
        None,
        description="candle:<cross-encoder> for rerank; unset: re-score by sentences with the collection's model.",
    )
    rerank_candidates: int = Field(20, ge=1, le=200, description="How many retrieved chunks a rerank re-scores.")
    llm_model: str | None = Field(None, description="llmserver model for brainml.ask (default: its default).")
    ask_max_tokens: int = Field(256, ge=1, le=4096)


class Document(BaseModel):
    """A document to index."""

    id: str | int | None = None
    text: str = Field(..., min_length=1)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Stored with each chunk; doc_id, chunk, start and end are brainml's own."
    )

    @field_validator("metadata")
    @classmethod
    def _own_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(RESERVED & set(v))
        if taken:  # {"doc_id": "B"} would file the chunks under another document, and re-indexing B delete them
            raise ValueError(f"metadata cannot set {', '.join(taken)}: brainml keeps them for each chunk")
        return v


RESERVED = frozenset({"doc_id", "chunk", "start", "end"})


class Chunking(BaseModel):
    """Chunking for this call (default: the settings)."""

    size: int = Field(800, ge=50, le=20_000)
    overlap: int = Field(100, ge=0, le=5_000)


class IndexRequest(BaseModel):
    """Chunk, embed and store documents; re-indexing an id replaces its chunks."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    documents: list[Document] = Field(..., min_length=1, max_length=10_000)
    chunking: Chunking | None = None


class QueryRequest(BaseModel):
    """Search a collection."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    query: str = Field(..., min_length=1)
    top_k: int = Field(5, ge=1, le=1000)
    mode: Literal["vector", "text", "hybrid"] = "hybrid"
    filters: dict[str, Any] | None = Field(None, description="On the documents' metadata, e.g. {'lang': 'en'}.")
    vector_weight: float | None = Field(None, ge=0.0, le=1.0, description="Hybrid fusion weight (default: settings).")
    fusion: Literal["rrf", "relative"] | None = Field(None, description="Hybrid fusion method (default: settings).")
    rerank: bool = Field(False, description="Re-score the best candidates (cross-encoder or sentence-level).")
    explain: bool = Field(
        False, description="Add each result's vector and BM25 rank and score next to the fused one (whatever the mode)."
    )


class AskRequest(BaseModel):
    """Answer a question from a collection's chunks."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    question: str = Field(..., min_length=1)
    top_k: int = Field(4, ge=1, le=20)
    filters: dict[str, Any] | None = None


class StatsRequest(BaseModel):
    """Which collection (default: every collection brainml indexed)."""

    collection: str | None = Field(None, pattern=COLLECTION_NAME_PATTERN)


class TrainRequest(BaseModel):
    """Train a classifier on a collection's embeddings to predict a metadata field."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    label_field: str = Field(..., min_length=1, description="The metadata field holding each document's label.")
    model: Literal["logistic", "mlp"] = "logistic"
    test_split: float = Field(0.2, gt=0.0, lt=0.9, description="Share of each label's documents held out.")
    model_id: str | None = Field(
        None, pattern=ID_PATTERN, description="Registry id (default: <collection>-<label_field>-<model>-<time>)."
    )
    epochs: int = Field(30, ge=1, le=1000, description="MLP epochs; for logistic, rounds of 20 lbfgs iterations.")
    hidden: int = Field(256, ge=2, le=4096, description="MLP hidden units.")
    seed: int = 0
    filters: dict[str, Any] | None = Field(None, description="Train on the chunks matching this filter only.")


class ClassifyRequest(BaseModel):
    """Label texts with a trained classifier."""

    model_id: str
    texts: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1, max_length=10_000)


class Result(JSONResult):
    """A JSON result (plain JSON values only: answered as built)."""


MAX_RERANK = 200  # hits one rerank re-scores (the rerank_candidates setting's range)
MAX_SENTENCES = 32  # sentences of a chunk a sentence-level rerank embeds (a chunk is ~800 characters)
MAX_CHUNKS = 200_000  # chunks one brainml.index call makes (each is a point held in memory until it is stored)
MAX_CLASSIFIERS = 16  # trained classifiers kept loaded (the most recently used; an MLP is up to ~1 MB)


def chunk(text: str, size: int, overlap: int, limit: int | None = None) -> list[tuple[int, int]]:
    """Split into (start, end) spans of about `size` characters, cut at whitespace, overlapping by `overlap`; more
    than `limit` spans is the caller's 422 (a small size with an overlap close to it steps a character at a time)."""
    if overlap >= size:
        raise InvalidInput("chunking overlap must be smaller than size", field="chunking.overlap")
    spans: list[tuple[int, int]] = []
    start, n = 0, len(text)
    while start < n:
        if limit is not None and len(spans) >= limit:
            raise InvalidInput(f"these documents make more than {MAX_CHUNKS:,} chunks of {size} characters "
                               f"overlapping by {overlap}, the most one call makes: send fewer documents per call, "
                               "or bigger chunks with less overlap", field="chunking")  # fmt: skip
        end = min(n, start + size)
        if end < n:
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > start else end
        spans.append((start, end))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
        at = start
        while at <= end + 1 and not text[at - 1].isspace():
            at += 1  # begin the next chunk at a word boundary inside the overlap (or just past the cut's space)
        start = at if at <= end + 1 else start  # none (Chinese, Japanese, a long token): mid-word, never past end
    return spans


# letters and digits that make a word, as full text splits them: `_` splits (`read_csv` is two words), and
# Chinese, Japanese or Korean letters stand apart (a word may touch them)
WORD_CHAR = re.compile(f"(?!{CJK_LETTER})[^\\W_]")
WORD = re.compile(f"(?:{WORD_CHAR.pattern})+")
_PLACE = frozenset(("doc_id", "chunk", "start", "end"))  # where a chunk sits: not its metadata


class Marks:
    """What `highlights` marks in a hit, made once per query: every word that makes one of the terms full text
    made of the query (its stem: "running" marks "runs" and "run", as BM25 found them; stop words none), found
    from the prefixes such words start with; and the pairs of Chinese, Japanese or Korean letters it looked for,
    found wherever they stand. Both are folded as full text folds them ("cafe" for "Café", "strasse" for
    "Straße")."""

    __slots__ = ("pairs", "prefixes", "terms")

    def __init__(self, query: str) -> None:
        ws = words(query, query=True)
        self.pairs = {w for w in ws if cjk(w)}
        self.terms = {t for w in ws if len(w) >= 2 and not cjk(w) and (t := term(w))}
        self.prefixes = {p for t in self.terms for p in word_starts(t)}


def word_starts(t: str) -> tuple[str, ...]:
    """What every word whose stem is `t` starts with: the stem, less the end Snowball may have written ("happy":
    "happi", "making": "make", "capability": "capabl", "skies": "sky", "dying": "die")."""
    if len(t) < 3:
        return (t,)
    if len(t) == 3 and t.endswith("ie"):
        return t[:2], t[0] + "y"
    if t[-1] in "ei" or t.endswith("bl") or t == "sky":
        return (t[:-1],)
    return (t,)


def highlights(query: str, text: str, marks: Marks | None = None) -> list[list[int]]:
    """Spans of the words in the text that full text matched the query on (`Marks`), sorted, overlaps merged
    (`marks`: `Marks(query)`, when a page of hits has them already).

    Each prefix is found with `str.find` in the text as full text folds it, and only the words it starts are
    analysed (a page of 30 hits: ~0.15 ms, where analysing every word of the text in Python took 1.5 ms); where
    folding changed a length ("Straße", "…", a combining accent), the spans are taken back to the text's own."""
    if marks is None:
        marks = Marks(query)
    low, unfold = (text.lower(), None) if text.isascii() else folded(text)
    spans = []
    terms, pairs = marks.terms, marks.pairs
    for prefix in marks.prefixes:
        i = low.find(prefix)
        while i >= 0:
            if i == 0 or not WORD_CHAR.match(low, i - 1):
                j = WORD.match(low, i).end()  # type: ignore[union-attr]  # (the prefix is letters)
                if term(low[i:j]) in terms:
                    spans.append([i, j])
                i = low.find(prefix, j)
            else:
                i = low.find(prefix, i + 1)
    for w in pairs:
        i = low.find(w)
        while i >= 0:
            spans.append([i, i + len(w)])
            i = low.find(w, i + 1)
    if unfold is not None:
        spans = [unfold(a, b) for a, b in spans]
    spans.sort()
    merged: list[list[int]] = []  # overlapping pairs ("機械", "械学", "学習") mark one run; a word found twice, once
    for a, b in spans:
        if merged and a <= merged[-1][1] and (pairs or a < merged[-1][1]):
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


# [2], [1, 3] or [1][3]: the numbered sources an answer cites, as the prompt asks ("Cite each source you use as [n]")
CITE = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


def citations(answer: str, n_sources: int) -> tuple[list[int], list[dict[str, str]]]:
    """The source numbers an answer cites by [n] markers, in the order first cited, and the markers that name no
    source (`{"cited": "[7]", "why": ...}`), as repoagent's repo.ask drops them; none cited: an empty list."""
    cited: dict[int, None] = {}
    dropped: list[dict[str, str]] = []
    for m in CITE.finditer(answer):
        for part in m.group(1).split(","):
            n = int(part)
            if 1 <= n <= n_sources:
                cited.setdefault(n)
            else:
                dropped.append({"cited": f"[{n}]", "why": f"there is no source [{n}]"})
    return list(cited), dropped


def split_sentences(text: str) -> list[str]:
    """Sentences (and paragraphs) of a chunk, for sentence-level reranking; the whole text when it has none."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?:])\s+|\n\s*\n", text)]
    return [p for p in parts if len(p) > 10] or [text]


class BrainML(Plugin):
    """Index documents, search them (vector / BM25 / hybrid), answer questions with citations."""

    id = "brainml"
    name = "brainml"
    version = "0.1.0"
    description = (
        "Hybrid retrieval over store collections (FAISS vectors + the store's BM25 index, fused by weighted RRF): "
        "index with chunking, query with highlights, ask with citations (llmserver), classifiers trained with "
        "scikit-learn."
    )
    mode = "inline"  # see the module docstring
    Settings = BrainSettings
    settings: BrainSettings

    def start(self) -> None:
        assert self.context is not None and self.context.model_dir is not None
        self.registry = ModelRegistry(self.context.model_dir)
        self.state_path = self.context.work_dir / "stats.json"
        self.stats_data: dict[str, dict[str, Any]] = {}
        statefiles.sweep(self.state_path)
        if self.state_path.exists():
            try:  # counters and dates only: a damaged file is set aside and counting starts again
                self.stats_data = statefiles.load(self.state_path)
            except CorruptData as exc:
                statefiles.set_aside(self.state_path, exc.message)
        self.lock = threading.Lock()
        # brainml runs inline: every call into it is a thread of the gateway process, so threading locks suffice
        self.writers = NamedLocks()  # a collection's index writes, one call at a time
        self.saved_at = 0.0
        self.classifiers: OrderedDict[tuple[str, str], Classifier] = OrderedDict()

    @property
    def store(self) -> StoreHandle:
        """The store, as the caller of the running call."""
        assert self.context is not None
        return self.context.store

    def _save(self, at_most_every: float = 0.0) -> None:
        """Write the stats (under `self.lock`); with `at_most_every`, skip it when the last write is that recent
        (query counters: a crash loses at most that many seconds of them)."""
        now = time.monotonic()
        if now - self.saved_at < at_most_every:
            return
        statefiles.write_json(self.state_path, self.stats_data, durable=False)
        self.saved_at = now

    def stop(self) -> None:
        with self.lock:
            self._save()

    def _collection(self, name: str, create: bool) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self.store.describe(name)
        except NotFound:
            if not create:
                msg = f"collection {name!r} does not exist (index documents into it first)"
                raise NotFound(msg, field="collection") from None
            spec = self.settings.embed_model
            info = self.store.create_collection(name, self.registry.embedding_dim(spec), embed_model=spec)
        if not info.get("embed_model"):
            msg = f"collection {name!r} has no embed_model: brainml needs one to embed text"
            raise InvalidInput(msg, field="collection")
        return info

    # -- capabilities -------------------------------------------------------------------------------
    @capability("brainml.index", scope="collections:write", big_input=True)
    def index(self, inp: IndexRequest) -> Result:
        """Chunk documents, embed them with the collection's model and store them for vector and text search."""
        t0 = time.perf_counter()
        size = inp.chunking.size if inp.chunking else self.settings.chunk_size
        overlap = inp.chunking.overlap if inp.chunking else self.settings.chunk_overlap
        points: list[dict[str, Any]] = []
        stale: list[dict[str, Any]] = []  # per document: its chunks past the new last one
        seen: dict[str, int] = {}
        for i, doc in enumerate(inp.documents):
            doc_id = str(doc.id) if doc.id is not None else f"doc-{uuid.uuid4().hex}"
            if seen.setdefault(doc_id, i) != i:  # two versions in one call would be stored mixed, chunk by chunk
                raise InvalidInput(
                    f"input.documents.{i}.id: document {doc_id!r} is also documents[{seen[doc_id]}] of this call: "
                    "send one version of a document per call",
                    field=f"input.documents.{i}.id",
                )
            spans = chunk(doc.text, size, overlap, limit=MAX_CHUNKS - len(points))
            for n, (a, b) in enumerate(spans):
                payload = {"doc_id": doc_id, "chunk": n, "start": a, "end": b, **doc.metadata}
                points.append({"id": f"{doc_id}#{n}", "text": doc.text[a:b], "payload": payload})
            stale.append({"$and": [{"doc_id": doc_id}, {"chunk": {"$gte": len(spans)}}]})
        info = self._collection(inp.collection, create=True)  # after chunking: a refused call makes none
        spec, dim = info["embed_model"], info["dim"]
        # Every chunk embedded before anything is written: a failed embedding leaves the previous version whole,
        # and a slow one holds up no other call's writes (the lock below).
        for a in range(0, len(points), INDEX_BATCH):
            batch = points[a : a + INDEX_BATCH]
            vecs = self.store.embed(spec, [p["text"] for p in batch], dim)  # the collection's width, as an upsert
            for p, v in zip(batch, vecs, strict=True):
                p["vector"] = v
        ids = [str(d.id) for d in inp.documents if d.id is not None]
        # One writer per collection from the count to the delete. Interleaved, two calls re-indexing a document cut
        # it short (V2 upserts, V1 upserts and deletes, V2 deletes V1's chunks past V2's last), or mixed versions (a
        # count of no earlier version, taken before the other call's upsert, skipped the delete).
        with self.writers.hold(inp.collection):
            replaced = self.store.count_distinct(inp.collection, "doc_id", {"doc_id": {"$in": ids}}) if ids else 0
            # new chunks first (same ids replace old ones), then the old version's surplus chunks
            for a in range(0, len(points), INDEX_BATCH):
                self.store.upsert(inp.collection, points[a : a + INDEX_BATCH])
            if replaced:
                for a in range(0, len(stale), 256):
                    self.store.delete(inp.collection, filter={"$or": stale[a : a + 256]})
        with self.lock:
            s = self.stats_data.setdefault(inp.collection, {"queries": 0, "query_ms_total": 0.0})
            s.update(last_index=time.time(), embed_model=info["embed_model"], dim=info["dim"])
            self._save()
        took = (time.perf_counter() - t0) * 1000
        return Result(
            collection=inp.collection, documents=len(inp.documents), chunks=len(points), replaced=replaced, took_ms=took
        )

    @capability("brainml.query", scope="collections:read")
    def query(self, inp: QueryRequest) -> Result:
        """Search chunks (vector, BM25 or hybrid) with metadata filters; results carry highlights."""
        t0 = time.perf_counter()
        if inp.rerank and inp.top_k > MAX_RERANK:  # each candidate's sentences are embedded, or scored in pairs
            raise InvalidInput(f"a rerank re-scores at most {MAX_RERANK} hits: ask for top_k up to {MAX_RERANK}",
                               field="top_k")  # fmt: skip
        weight = self.settings.vector_weight if inp.vector_weight is None else inp.vector_weight
        k = max(inp.top_k, self.settings.rerank_candidates) if inp.rerank else inp.top_k
        try:  # one round trip: the store embeds the query with the collection's model and says what is missing
            hits = self.store.query(
                inp.collection, text=inp.query, k=k, mode=inp.mode, filter=inp.filters, with_text=True,
                vector_weight=weight, fusion=inp.fusion or self.settings.fusion, rrf_k=self.settings.rrf_k,
                explain=inp.explain,
            )  # fmt: skip
        except NotFound as exc:
            if exc.field != "name":
                raise
            raise NotFound(
                f"collection {inp.collection!r} does not exist (index documents into it first)", field="collection"
            ) from None
        except InvalidInput as exc:
            if exc.field != "vector":
                raise
            raise InvalidInput(
                f"collection {inp.collection!r} has no embed_model: brainml needs one to embed text", field="collection"
            ) from None
        if inp.rerank and hits:
            embed_model = self._collection(inp.collection, create=False)["embed_model"]
            hits = self._rerank(inp.query, hits, embed_model)[: inp.top_k]
        results = []
        marks = Marks(inp.query)
        extra = ("retrieval_score", *EXPLAIN_KEYS) if inp.rerank or inp.explain else ()
        for rank, hit in enumerate(hits, start=1):
            p = hit.get("payload") or {}
            text = hit.get("text") or ""
            r = {"id": hit["id"], "doc_id": p.get("doc_id"), "chunk": text, "offsets": [p.get("start"), p.get("end")],
                 "score": hit["score"]}  # fmt: skip
            for key in extra:
                if key in hit:
                    r[key] = hit[key]
            r["rank"] = rank
            r["metadata"] = {key: v for key, v in p.items() if key not in _PLACE}
            r["highlights"] = highlights(inp.query, text, marks)
            results.append(r)
        latency = (time.perf_counter() - t0) * 1000
        with self.lock:
            s = self.stats_data.setdefault(inp.collection, {"queries": 0, "query_ms_total": 0.0})
            s["queries"] += 1
            s["query_ms_total"] += latency
            self._save(at_most_every=1.0)
        return Result(collection=inp.collection, mode=inp.mode, results=results, latency_ms=round(latency, 3))

    def _rerank(self, query: str, hits: list[dict[str, Any]], embed_model: str) -> list[dict[str, Any]]:
        """Re-score hits: a cross-encoder when `rerank_model` is set, else sentence-level similarity.

        Sentence level: the mean of the chunk's cosine to the query and the best cosine of one of its
        sentences, so one precise sentence inside a long chunk lifts it (MaxSim at sentence granularity).
        """
        texts = [h.get("text") or "" for h in hits]
        if self.settings.rerank_model:
            scores = self.store.rerank(self.settings.rerank_model, query, texts)
        else:
            sents = [split_sentences(t)[:MAX_SENTENCES] for t in texts]
            flat = [query, *texts, *(s for ss in sents for s in ss)]
            vecs = self.store.embed(embed_model, flat)
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            q, chunk_vecs, at, scores = vecs[0], vecs[1 : 1 + len(texts)], 1 + len(texts), []
            for i, ss in enumerate(sents):
                best = float((vecs[at : at + len(ss)] @ q).max())
                at += len(ss)
                scores.append(0.5 * float(chunk_vecs[i] @ q) + 0.5 * best)
        ranked = sorted(zip(scores, range(len(hits)), hits, strict=True), key=lambda t: (-t[0], t[1]))
        return [{**h, "retrieval_score": h["score"], "score": float(sc)} for sc, _, h in ranked]

    @capability("brainml.ask", scope="llm:use")
    def ask(self, inp: AskRequest) -> Result:
        """Answer from the best chunks with llmserver; `citations` are the `sources` the answer cites as [n]."""
        hits = self.query(
            QueryRequest(collection=inp.collection, query=inp.question, top_k=inp.top_k, filters=inp.filters)
        ).results  # type: ignore[attr-defined]
        if not hits:
            raise NotFound(f"nothing in {inp.collection!r} matches the question", field="question")
        context = "\n\n".join(f"[{i + 1}] {h['chunk']}" for i, h in enumerate(hits))
        system = "Answer the question using only the numbered sources. Cite each source you use as [n]."
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Sources:\n{context}\n\nQuestion: {inp.question}"},
        ]
        body: dict[str, Any] = {"messages": messages, "max_tokens": self.settings.ask_max_tokens, "temperature": 0}
        if self.settings.llm_model:
            body["model"] = self.settings.llm_model
        r = self.store.chat(body, route="brainml.ask")
        answer = r["choices"][0]["message"]["content"]
        sources = [
            {"n": i + 1, "id": h["id"], "doc_id": h["doc_id"], "offsets": h["offsets"], "score": h["score"]}
            for i, h in enumerate(hits)
        ]
        cited, dropped = citations(answer or "", len(sources))
        return Result(
            collection=inp.collection,
            question=inp.question,
            answer=answer,
            citations=[sources[n - 1] for n in cited],
            sources=sources,
            dropped=dropped,
            model=r["model"],
            usage=r["usage"],
        )

    @capability("brainml.stats", scope="collections:read")
    def stats(self, inp: StatsRequest) -> Result:
        """Per collection: documents, chunks, embedding model and dimension, last index time, queries, latency."""
        names = [inp.collection] if inp.collection else sorted(self.stats_data)
        out = []
        for name in names:
            try:
                info = self._collection(name, create=False)
            except NotFound:
                if inp.collection:
                    raise
                continue  # indexed once, dropped since: not listed (it used to make every listing a 404)
            docs = self.store.count_distinct(name, "doc_id")
            s = self.stats_data.get(name, {"queries": 0, "query_ms_total": 0.0})
            out.append(
                {
                    "collection": name,
                    "documents": docs,
                    "chunks": info["count"],
                    "embed_model": info["embed_model"],
                    "dim": info["dim"],
                    "last_index": s.get("last_index"),
                    "queries": s["queries"],
                    "avg_query_ms": round(s["query_ms_total"] / s["queries"], 3) if s["queries"] else None,
                }  # fmt: skip
            )
        return Result(collections=out)

    def _check_train(self, inp: TrainRequest, model_id: str | None) -> tuple[dict[str, Any], int]:
        """What brainml.train refuses before it reads a chunk, in one count: a model id taken (409), no such
        collection (404), one without embed_model, a label field no (filtered) chunk has, or one label (422);
        return the collection's description and how many distinct labels it has."""
        if model_id is not None:
            check_id(model_id, "model_id")  # it names a folder: checked before anything is written
            if any(m.id == model_id for m in self.registry.list()):
                raise AlreadyExists(f"model {model_id!r} is already registered", field="model_id")
        info = self._collection(inp.collection, create=False)
        try:
            labels = self.store.count_distinct(inp.collection, field_name(inp.label_field), inp.filters)
        except InvalidInput as exc:  # named as this call names them
            f = exc.field or ""
            if f == "field":
                raise InvalidInput(exc.message, field="label_field") from None
            if f.startswith("filter"):
                raise InvalidInput(exc.message, field="filters" + f.removeprefix("filter")) from None
            raise
        if labels == 0:
            where = " matching the filters" if inp.filters else ""
            raise InvalidInput(
                f"no chunk of {inp.collection!r}{where} has a value for {inp.label_field!r} in its metadata",
                field="label_field",
            )
        if labels < 2:
            raise InvalidInput(
                f"training needs at least 2 labels; every labelled chunk of {inp.collection!r} has the same "
                f"{inp.label_field!r}",
                field="label_field",
            )
        return info, labels

    @capability("brainml.train_check", scope="models:write")
    def train_check(self, inp: TrainRequest) -> Result:
        """Check a brainml.train input as its job would at its start (404, 409, 422), without queueing one."""
        info, labels = self._check_train(inp, inp.model_id)
        return Result(collection=inp.collection, label_field=inp.label_field, chunks=info["count"], labels=labels)

    @capability("brainml.train", scope="models:write", job=True, check="brainml.train_check")
    def train(self, inp: TrainRequest, progress: Progress) -> Result:
        """Train a logistic or MLP classifier on the collection's embeddings; register it; report held-out metrics."""
        assert self.context is not None and self.context.model_dir is not None
        model_id = inp.model_id or slug(
            f"{inp.collection}-{inp.label_field}-{inp.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        info, _ = self._check_train(inp, model_id)  # again: the collection may have changed since the client's check
        progress(0.0, f"reading the embeddings of {inp.collection}")
        vectors, labels, groups = [], [], []
        for p in self.store.iter_points(inp.collection, inp.filters, with_vectors=True):
            payload = p.get("payload") or {}
            value = payload.get(inp.label_field)
            if value is None or isinstance(value, (dict, list)):
                continue
            vectors.append(p["vector"])
            labels.append(str(value))
            groups.append(str(payload.get("doc_id", p["id"])))
        if not vectors:
            raise InvalidInput(
                f"no chunk of {inp.collection!r} has a value for {inp.label_field!r} in its metadata",
                field="label_field",
            )
        x = np.asarray(vectors, dtype=np.float32)
        progress(0.05, f"training {inp.model} on {len(x)} chunks, {len(set(labels))} labels")
        net, metrics = fit_classifier(
            x,
            labels,
            groups,
            model=inp.model,
            test_split=inp.test_split,
            epochs=inp.epochs,
            hidden=inp.hidden,
            seed=inp.seed,
            progress=lambda f, m="": progress(0.05 + 0.9 * f, m),
        )
        net.info = {
            "embed_model": info["embed_model"],
            "dim": int(info["dim"]),
            "architecture": inp.model if inp.model == "logistic" else f"mlp({inp.hidden})",
            "collection": inp.collection,
            "label_field": inp.label_field,
            "metrics": metrics,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        folder = self.context.model_dir / "classifiers" / model_id
        if folder.exists():
            raise AlreadyExists(f"{folder} already exists in the model dir", field="model_id")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with self.registry.staged(model_id) as stage:  # whole or not at all, and one of two trains to one id wins
            net.save(stage)
            self.registry.place(stage, folder, field="model_id")
        try:
            entry = self.registry.add(folder, id=model_id, kind="classifier", source=f"brainml.train:{inp.collection}")
        except BaseException:  # placed by this call: not left in the model dir unregistered
            shutil.rmtree(folder, ignore_errors=True)
            raise
        progress(1.0, f"registered {model_id}")
        return Result(model_id=entry.id, labels=net.labels, **net.info)

    def _classifier(self, model_id: str) -> Classifier:
        entry = self.registry.get(model_id)
        if entry.kind != "classifier":
            raise InvalidInput(f"model {model_id!r} is a {entry.kind}, not a classifier", field="model_id")
        key = (model_id, entry.sha256)
        with self.lock:
            net = self.classifiers.get(key)
            if net is not None:
                self.classifiers.move_to_end(key)
                return net
        net = Classifier.load(self.registry.resolve(entry))
        with self.lock:  # the most recently used few stay loaded: one retrained or deleted ages out
            self.classifiers[key] = net
            while len(self.classifiers) > MAX_CLASSIFIERS:
                self.classifiers.popitem(last=False)
        return net

    @capability("brainml.classify", scope="models:read", big_input=True)
    def classify(self, inp: ClassifyRequest) -> Result:
        """Label texts with a classifier from brainml.train: best label, its probability and every label's."""
        t0 = time.perf_counter()
        for i, text in enumerate(inp.texts):
            if not text.strip():  # its embedding is the model's guess at nothing, labelled with some probability
                raise InvalidInput(f"input.texts.{i}: the text is only whitespace: there is nothing to classify",
                                   field=f"input.texts.{i}")  # fmt: skip
        net = self._classifier(inp.model_id)
        spec = net.info["embed_model"]
        x = self.store.embed(spec, inp.texts)
        if x.shape[1] != net.info["dim"]:
            raise InvalidInput(f"{spec} now gives {x.shape[1]}-d vectors; {inp.model_id} expects {net.info['dim']}")
        proba = net.predict_proba(x)
        out = []
        for text, row in zip(inp.texts, proba, strict=True):
            best = int(row.argmax())
            scores = {lab: round(float(v), 6) for lab, v in zip(net.labels, row, strict=True)}
            out.append({"text": text, "label": net.labels[best], "score": float(row[best]), "scores": scores})
        took = (time.perf_counter() - t0) * 1000
        return Result(model_id=inp.model_id, labels=net.labels, predictions=out, latency_ms=round(took, 3))
