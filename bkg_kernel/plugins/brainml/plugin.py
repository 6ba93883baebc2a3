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

import contextlib
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from bkg_kernel.errors import AlreadyExists, BkgError, Conflict, InvalidInput, NotFound
from bkg_kernel.models.classifier import Classifier
from bkg_kernel.models.classifier import train_in_child as fit_classifier
from bkg_kernel.models.registry import ModelRegistry, check_id, slug
from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.plugins.brainml.counters import Counters
from bkg_kernel.plugins.brainml.inputs import (
    MAX_CHUNKS,
    AskRequest,
    BrainSettings,
    ClassifyRequest,
    IndexRequest,
    QueryRequest,
    StatsRequest,
    TrainRequest,
)
from bkg_kernel.runtime.contract import GatewayAPI, JSONResult, Plugin, Progress, capability
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.store.filters import field_name
from bkg_kernel.store.fulltext import CJK_LETTER, cjk, folded, term, words
from bkg_kernel.store.results import EXPLAIN_KEYS

if TYPE_CHECKING:
    from fastapi import APIRouter

INDEX_BATCH = 2048  # chunks per upsert (the gateway embeds them in batches of 1024)


class Result(JSONResult):
    """A JSON result (plain JSON values only: answered as built)."""


MAX_RERANK = 200  # hits one rerank re-scores (the rerank_candidates setting's range)
MAX_SENTENCES = 32  # sentences of a chunk a sentence-level rerank embeds (a chunk is ~800 characters)
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


def embeddable(info: dict[str, Any]) -> dict[str, Any]:
    """A collection's description, when brainml can embed text for it (422 naming `collection` when not)."""
    if not info.get("embed_model"):
        msg = f"collection {info['name']!r} has no embed_model: brainml needs one to embed text"
        raise InvalidInput(msg, field="collection")
    return info


def as_called(exc: InvalidInput, text: str = "query") -> InvalidInput:
    """A store's 422 naming the field as the caller named it: its query `text` as `text` says (`query`, or
    `question` for brainml.ask), its `filter...` as `filters...`; any other as it was."""
    f = exc.field or ""
    if f == "text":
        return InvalidInput(exc.message, field=text)
    if f == "filter" or f.startswith(("filter.", "filter[")):
        return InvalidInput(exc.message, field="filters" + f.removeprefix("filter"))
    return exc


POINT_FIELD = re.compile(r"points\[(\d+)\]\.(id|text|payload)$")
DOCUMENT_FIELD = {"id": "id", "text": "text", "payload": "metadata"}


def document_named(exc: InvalidInput, owners: list[int], at: int) -> InvalidInput:
    """A store's 422 on a chunk of an upsert that began at point `at`, naming the document as the caller sent it
    (`input.documents.3.metadata`, where the store said `points[40].payload`)."""
    m = POINT_FIELD.match(exc.field or "")
    if m is None or at + int(m.group(1)) >= len(owners):
        return exc
    field = f"input.documents.{owners[at + int(m.group(1))]}.{DOCUMENT_FIELD[m.group(2)]}"
    return InvalidInput(f"{field}: {exc.message}", field=field)


def label_of(payload: dict[str, Any], label_field: str) -> str | None:
    """A chunk's label as training learns it: its value as text (1 and "1" are one label); None for a chunk with
    none, null, or an object or list there (not a label)."""
    value = payload.get(label_field)
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)


def check_labels(inp: TrainRequest, documents: dict[str, set[str]]) -> None:
    """422 naming `label_field` for labels training cannot learn from (`documents`: per label, the documents that
    have it): none, one, or none with two documents (one is held out for testing, one kept to train on)."""
    where = f"{inp.collection!r}" + (" matching the filters" if inp.filters else "")
    if not documents:
        raise InvalidInput(f"no chunk of {where} has a value for {inp.label_field!r} in its metadata (an object or a "
                           "list is not a label)", field="label_field")  # fmt: skip
    if len(documents) < 2:
        raise InvalidInput(
            f"training needs at least 2 labels; every labelled chunk of {where} has the same {inp.label_field!r}, "
            f"{next(iter(documents))!r} (labels compare as text: 1 and '1' are one label)",
            field="label_field",
        )
    if all(len(docs) < 2 for docs in documents.values()):
        raise InvalidInput(
            f"no label of {inp.label_field!r} in {where} has 2 or more documents, so none can be held out for "
            "testing: index more documents of at least one label",
            field="label_field",
        )


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

    @classmethod
    def routes(cls, api: GatewayAPI) -> APIRouter:
        """Mount `/api/brain/ask`: `brainml.ask` streamed as server-sent events."""
        from bkg_kernel.plugins.brainml import routes

        return routes.build(api)

    def start(self) -> None:
        assert self.context is not None and self.context.model_dir is not None
        self.registry = ModelRegistry(self.context.model_dir)
        self.counters = Counters(self.context.work_dir / "stats.json")
        self.lock = threading.Lock()
        # brainml runs inline: every call into it is a thread of the gateway process, so threading locks suffice
        self.writers = NamedLocks()  # a collection's making and its index writes, one call at a time
        self.classifiers: OrderedDict[tuple[str, str], Classifier] = OrderedDict()

    @property
    def store(self) -> StoreHandle:
        """The store, as the caller of the running call."""
        assert self.context is not None
        return self.context.store

    def stop(self) -> None:
        self.counters.save()

    def _collection(self, name: str) -> dict[str, Any]:
        """Describe a collection brainml can embed text for: 404 naming `collection` when there is none, 422 when it
        has no embed_model."""
        try:
            info: dict[str, Any] = self.store.describe(name)
        except NotFound:
            msg = f"collection {name!r} does not exist (index documents into it first)"
            raise NotFound(msg, field="collection") from None
        return embeddable(info)

    def _create(self, name: str, spec: str, dim: int) -> tuple[dict[str, Any], bool]:
        """The collection `name`, made with `spec` and `dim` unless another client made it meanwhile (a concurrent
        create is this call's success), and whether this call made it. Hold `self.writers` for `name`: brainml's
        own index calls into a new collection wait for the first to make it."""
        for _ in range(3):
            try:
                return embeddable(self.store.describe(name)), False
            except NotFound:
                pass
            try:
                return self.store.create_collection(name, dim, embed_model=spec), True
            except AlreadyExists:
                continue  # made by another client since the describe: describe that one
        raise Conflict(f"collection {name!r} was made and dropped again while this call indexed: try again",
                       field="collection")  # fmt: skip

    def _embed(self, points: list[dict[str, Any]], spec: str, dim: int) -> None:
        """Give each point its `vector`: its text embedded by `spec`, `dim` wide (as the collection's upsert needs)."""
        for a in range(0, len(points), INDEX_BATCH):
            batch = points[a : a + INDEX_BATCH]
            vecs = self.store.embed(spec, [p["text"] for p in batch], dim)
            for p, v in zip(batch, vecs, strict=True):
                p["vector"] = v

    # -- capabilities -------------------------------------------------------------------------------
    @capability("brainml.index", scope="collections:write", big_input=True)
    def index(self, inp: IndexRequest) -> Result:
        """Chunk documents, embed them with the collection's model and store them for vector and text search."""
        t0 = time.perf_counter()
        size = inp.chunking.size if inp.chunking else self.settings.chunk_size
        overlap = inp.chunking.overlap if inp.chunking else self.settings.chunk_overlap
        points: list[dict[str, Any]] = []
        owners: list[int] = []  # per point, the index of its document in this call (what a refusal names)
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
            owners += [i] * len(spans)
            stale.append({"$and": [{"doc_id": doc_id}, {"chunk": {"$gte": len(spans)}}]})
        try:
            info: dict[str, Any] | None = self._collection(inp.collection)
        except NotFound:
            info = None  # made below, once every chunk is embedded: a call refused until then (a caller without
            # llm:use, a model that fails) makes none
        spec = info["embed_model"] if info else self.settings.embed_model
        dim = int(info["dim"]) if info else self.registry.embedding_dim(spec)
        # Every chunk embedded before anything is written: a failed embedding leaves the previous version whole,
        # and a slow one holds up no other call's writes (the lock below).
        self._embed(points, spec, dim)
        ids = [str(d.id) for d in inp.documents if d.id is not None]
        # One writer per collection from the count to the delete. Interleaved, two calls re-indexing a document cut
        # it short (V2 upserts, V1 upserts and deletes, V2 deletes V1's chunks past V2's last), or mixed versions (a
        # count of no earlier version, taken before the other call's upsert, skipped the delete).
        with self.writers.hold(inp.collection):
            made = False
            if info is None:
                info, made = self._create(inp.collection, spec, dim)
                if (info["embed_model"], int(info["dim"])) != (spec, dim):  # made meanwhile with another model
                    self._embed(points, info["embed_model"], int(info["dim"]))
            try:
                replaced = self.store.count_distinct(inp.collection, "doc_id", {"doc_id": {"$in": ids}}) if ids else 0
                # new chunks first (same ids replace old ones), then the old version's surplus chunks
                for a in range(0, len(points), INDEX_BATCH):
                    try:
                        self.store.upsert(inp.collection, points[a : a + INDEX_BATCH])
                    except InvalidInput as exc:
                        raise document_named(exc, owners, a) from None
                if replaced:
                    for a in range(0, len(stale), 256):
                        self.store.delete(inp.collection, filter={"$or": stale[a : a + 256]})
            except BaseException:
                if made:  # made by this call, and no other brainml call wrote to it (they wait for this lock)
                    with contextlib.suppress(BkgError):
                        self.store.drop_collection(inp.collection)
                raise
        self.counters.indexed(inp.collection, str(info.get("created_at", "")))
        took = (time.perf_counter() - t0) * 1000
        return Result(
            collection=inp.collection, documents=len(inp.documents), chunks=len(points), replaced=replaced, took_ms=took
        )

    @capability("brainml.query", scope="collections:read")
    def query(self, inp: QueryRequest) -> Result:
        """Search chunks (vector, BM25 or hybrid) with metadata filters; results carry highlights."""
        return self._search(inp, "query")

    def _search(self, inp: QueryRequest, asked: str) -> Result:
        """brainml.query; `asked` is the caller's name for the query text (`question` for brainml.ask), what a
        refusal of it names."""
        t0 = time.perf_counter()
        if inp.rerank and inp.top_k > MAX_RERANK:  # each candidate's sentences are embedded, or scored in pairs
            raise InvalidInput(f"a rerank re-scores at most {MAX_RERANK} hits: ask for top_k up to {MAX_RERANK}",
                               field="top_k")  # fmt: skip
        weight = self.settings.vector_weight if inp.vector_weight is None else inp.vector_weight
        k = max(inp.top_k, self.settings.rerank_candidates) if inp.rerank else inp.top_k
        counted = self.counters.entry(inp.collection)
        try:  # one round trip: the store embeds the query with the collection's model and says what is missing
            hits = self.store.query(
                inp.collection, text=inp.query, k=k, mode=inp.mode, filter=inp.filters, with_text=True,
                vector_weight=weight, fusion=inp.fusion or self.settings.fusion, rrf_k=self.settings.rrf_k,
                explain=inp.explain,
            )  # fmt: skip
        except NotFound as exc:
            if exc.field != "name":
                raise
            self.counters.forget(inp.collection, counted)  # dropped: a collection made again starts from zero
            raise NotFound(
                f"collection {inp.collection!r} does not exist (index documents into it first)", field="collection"
            ) from None
        except InvalidInput as exc:
            if exc.field != "vector":
                raise as_called(exc, asked) from None
            raise InvalidInput(
                f"collection {inp.collection!r} has no embed_model: brainml needs one to embed text", field="collection"
            ) from None
        if inp.rerank and hits:
            embed_model = self._collection(inp.collection)["embed_model"]
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
        self.counters.queried(inp.collection, latency)
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
        """Answer from the best chunks with llmserver; `citations` are the `sources` the answer cites as [n]
        (streamed as it is written: `POST /api/brain/ask`)."""
        sources, body = self._prompt(inp)
        r = self.store.chat(body, route="brainml.ask")
        return self._answered(inp, sources, r["choices"][0]["message"]["content"], r["model"], r["usage"])

    def stream(self, capability_id: str, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """`brainml.ask` as it is written: `{"sources": [...]}` once the chunks are found, `{"delta": text}` as the
        model writes, then `{"result": ...}` (what `ask` answers). Cancelled (the client left): the generation
        stops at its next token."""
        if capability_id != "brainml.ask":
            yield from super().stream(capability_id, data, cancelled)
            return
        inp = self._validate(self.capabilities()[capability_id], data)
        assert isinstance(inp, AskRequest)
        sources, body = self._prompt(inp)
        yield {"sources": sources}
        parts: list[str] = []
        reply: dict[str, Any] = {}  # the model and the usage, as the last chunk says them
        for piece in self.store.chat_pieces(body, route="brainml.ask", cancelled=cancelled, reply=reply):
            parts.append(piece)
            yield {"delta": piece}
        answered = self._answered(inp, sources, "".join(parts), reply.get("model") or "", reply.get("usage") or {})
        yield {"result": dict(answered.__pydantic_extra__ or {})}

    def _prompt(self, inp: AskRequest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The chunks an answer is given (`sources`, numbered from 1) and the chat request that gives them."""
        hits = self._search(
            QueryRequest(collection=inp.collection, query=inp.question, top_k=inp.top_k, filters=inp.filters),
            "question",
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
        sources = [
            {"n": i + 1, "id": h["id"], "doc_id": h["doc_id"], "offsets": h["offsets"], "score": h["score"]}
            for i, h in enumerate(hits)
        ]
        return sources, body

    def _answered(
        self, inp: AskRequest, sources: list[dict[str, Any]], answer: str | None, model: str, usage: dict[str, Any]
    ) -> Result:
        cited, dropped = citations(answer or "", len(sources))
        return Result(
            collection=inp.collection,
            question=inp.question,
            answer=answer,
            citations=[sources[n - 1] for n in cited],
            sources=sources,
            dropped=dropped,
            model=model,
            usage=usage,
        )

    @capability("brainml.stats", scope="collections:read")
    def stats(self, inp: StatsRequest) -> Result:
        """Per collection: documents, chunks, embedding model and dimension, last index time, queries, latency."""
        names = [inp.collection] if inp.collection else self.counters.names()
        out = []
        for name in names:
            counted = self.counters.entry(name)
            try:  # any collection, with an embed_model or not (a text query needs none): described as it is
                info = self.store.describe(name)
                docs = self.store.count_distinct(name, "doc_id")
            except NotFound:
                if inp.collection:
                    msg = f"collection {name!r} does not exist (index documents into it first)"
                    raise NotFound(msg, field="collection") from None
                self.counters.forget(name, counted)  # dropped since: not listed (it made every listing a 404)
                continue
            s = self.counters.of(name, str(info.get("created_at", "")))  # zero for one dropped and made again
            out.append(
                {
                    "collection": name,
                    "documents": docs,
                    "chunks": info["count"],
                    "embed_model": info.get("embed_model"),
                    "dim": info["dim"],
                    "last_index": s["last_index"],
                    "queries": s["queries"],
                    "avg_query_ms": round(s["query_ms_total"] / s["queries"], 3) if s["queries"] else None,
                }  # fmt: skip
            )
        return Result(collections=out)

    def _check_train(self, inp: TrainRequest, model_id: str | None) -> dict[str, Any]:
        """What brainml.train refuses before it reads a chunk: a model id taken (409), no such collection (404),
        one without embed_model, or a label field no (filtered) chunk has (422); the collection's description."""
        if model_id is not None:
            check_id(model_id, "model_id")  # it names a folder: checked before anything is written
            if any(m.id == model_id for m in self.registry.list()):
                raise AlreadyExists(f"model {model_id!r} is already registered", field="model_id")
        info = self._collection(inp.collection)
        try:
            labelled = self.store.count_distinct(inp.collection, field_name(inp.label_field), inp.filters)
        except InvalidInput as exc:  # named as this call names them
            if exc.field == "field":
                raise InvalidInput(exc.message, field="label_field") from None
            raise as_called(exc) from None
        if labelled == 0:
            check_labels(inp, {})
        return info

    @capability("brainml.train_check", scope="models:write")
    def train_check(self, inp: TrainRequest) -> Result:
        """Check a brainml.train input as its job would at its start (404, 409, 422), without queueing one."""
        info = self._check_train(inp, inp.model_id)
        documents: dict[str, set[str]] = {}
        try:  # the labels as training reads them (`label_of`): 1 and "1" one label, an object none
            for p in self.store.iter_points(inp.collection, inp.filters):
                payload = p.get("payload") or {}
                if (label := label_of(payload, inp.label_field)) is not None:
                    documents.setdefault(label, set()).add(str(payload.get("doc_id", p["id"])))
        except InvalidInput as exc:
            raise as_called(exc) from None
        check_labels(inp, documents)
        return Result(
            collection=inp.collection, label_field=inp.label_field, chunks=info["count"], labels=len(documents)
        )

    @capability("brainml.train", scope="models:write", job=True, check="brainml.train_check")
    def train(self, inp: TrainRequest, progress: Progress) -> Result:
        """Train a logistic or MLP classifier on the collection's embeddings; register it; report held-out metrics."""
        assert self.context is not None and self.context.model_dir is not None
        model_id = inp.model_id or slug(
            f"{inp.collection}-{inp.label_field}-{inp.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        info = self._check_train(inp, model_id)  # again: the collection may have changed since the client's check
        progress(0.0, f"reading the embeddings of {inp.collection}")
        vectors, labels, groups = [], [], []
        documents: dict[str, set[str]] = {}
        for p in self.store.iter_points(inp.collection, inp.filters, with_vectors=True):
            payload = p.get("payload") or {}
            label = label_of(payload, inp.label_field)
            if label is None:
                continue
            vectors.append(p["vector"])
            labels.append(label)
            groups.append(str(payload.get("doc_id", p["id"])))
            documents.setdefault(label, set()).add(groups[-1])
        check_labels(inp, documents)  # what the check counted, on what was read
        x = np.asarray(vectors, dtype=np.float32)
        progress(0.05, f"training {inp.model} on {len(x)} chunks, {len(documents)} labels")
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
        try:
            entry = self.registry.get(model_id)
        except NotFound as exc:  # the registry's own word for it is `model`
            raise NotFound(exc.message, field="model_id") from None
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
