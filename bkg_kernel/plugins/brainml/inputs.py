"""brainml's wire format: its settings and the input of each capability (their JSON Schema is the API's).

What a call would fail on further in (the store's limits, what training needs of a seed) is refused here, as a
422 naming the caller's own field (`input.query`, `input.documents.3.id`), before anything is made or queued.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from bkg_kernel.models.defaults import DEFAULT_EMBEDDER
from bkg_kernel.models.registry import ID_PATTERN
from bkg_kernel.runtime.contract import PluginSettings
from bkg_kernel.store.validate import COLLECTION_NAME_PATTERN, MAX_ID_CHARS, MAX_QUERY_CHARS

MAX_CHUNKS = 200_000  # chunks one brainml.index call makes (each is a point held in memory until it is stored)
# a chunk is stored as the point "<doc id>#<n>": the document's id leaves room for the longest "#<n>"
MAX_DOC_ID = MAX_ID_CHARS - len(f"#{MAX_CHUNKS - 1}")
MAX_QUERY = MAX_QUERY_CHARS  # characters of a query text: what the store's full-text search takes
SEED_MAX = 2**32 - 1  # scikit-learn and numpy take seeds from 0 to 2**32 - 1


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


RESERVED = frozenset({"doc_id", "chunk", "start", "end"})


class Document(BaseModel):
    """A document to index."""

    id: str | int | None = Field(
        None,
        description=f"Up to {MAX_DOC_ID} characters, not blank (default: one is made); indexing an id again replaces "
        "that document's chunks.",
    )
    text: str = Field(..., min_length=1)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Stored with each chunk; doc_id, chunk, start and end are brainml's own."
    )

    @field_validator("id")
    @classmethod
    def _storable_id(cls, v: str | int | None) -> str | int | None:
        if v is None:
            return v
        text = str(v)
        if not text.strip():  # "" or "  ": a source `ask` would show the LLM and the reader with no name
            raise ValueError("the id is empty or only whitespace: give the document an id, or none to have one made")
        if len(text) > MAX_DOC_ID:  # the store would refuse its chunks' ids, after the collection was made
            raise ValueError(
                f"the id has {len(text):,} characters, more than {MAX_DOC_ID}: each chunk is stored as '<id>#<n>', "
                f"and the store keeps ids of up to {MAX_ID_CHARS} characters"
            )
        return v

    @field_validator("text")
    @classmethod
    def _some_text(cls, v: str) -> str:
        if v.isspace():  # its chunks would match nothing, and `ask` would hand them to the LLM as sources
            raise ValueError("the text is only whitespace: there is nothing to index")
        return v

    @field_validator("metadata")
    @classmethod
    def _own_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(RESERVED & set(v))
        if taken:  # {"doc_id": "B"} would file the chunks under another document, and re-indexing B delete them
            raise ValueError(f"metadata cannot set {', '.join(taken)}: brainml keeps them for each chunk")
        return v


class Chunking(BaseModel):
    """Chunking for this call (default: the settings)."""

    size: int = Field(800, ge=50, le=20_000)
    overlap: int = Field(100, ge=0, le=5_000)


class IndexRequest(BaseModel):
    """Chunk, embed and store documents; re-indexing an id replaces its chunks."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    documents: list[Document] = Field(..., min_length=1, max_length=10_000)
    chunking: Chunking | None = None


def _searchable(v: str, what: str) -> str:
    if v.isspace():  # the store's text search would refuse it, naming its own field; an embedding of it is noise
        raise ValueError(f"the {what} is only whitespace: there is nothing to search for")
    return v


class QueryRequest(BaseModel):
    """Search a collection."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    query: str = Field(..., min_length=1, max_length=MAX_QUERY)
    top_k: int = Field(5, ge=1, le=1000)
    mode: Literal["vector", "text", "hybrid"] = "hybrid"
    filters: dict[str, Any] | None = Field(None, description="On the documents' metadata, e.g. {'lang': 'en'}.")
    vector_weight: float | None = Field(None, ge=0.0, le=1.0, description="Hybrid fusion weight (default: settings).")
    fusion: Literal["rrf", "relative"] | None = Field(None, description="Hybrid fusion method (default: settings).")
    rerank: bool = Field(False, description="Re-score the best candidates (cross-encoder or sentence-level).")
    explain: bool = Field(
        False, description="Add each result's vector and BM25 rank and score next to the fused one (whatever the mode)."
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return _searchable(v, "query")


class AskRequest(BaseModel):
    """Answer a question from a collection's chunks."""

    collection: str = Field(..., pattern=COLLECTION_NAME_PATTERN)
    question: str = Field(..., min_length=1, max_length=MAX_QUERY)
    top_k: int = Field(4, ge=1, le=20)
    filters: dict[str, Any] | None = None

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return _searchable(v, "question")


class StatsRequest(BaseModel):
    """Which collection (default: every collection brainml indexed or queried)."""

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
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the held-out split and of the model's start.")
    filters: dict[str, Any] | None = Field(None, description="Train on the chunks matching this filter only.")


class ClassifyRequest(BaseModel):
    """Label texts with a trained classifier."""

    model_id: str
    texts: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1, max_length=10_000)
