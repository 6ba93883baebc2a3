"""The bkg store: DuckDB is the source of truth, FAISS holds the search indexes.

from bkg_kernel.store import Store
with Store("./data") as store:
    docs = store.create_collection("docs", dim=384, metric="cosine", index="hnsw")
    docs.upsert([{"id": 1, "vector": v, "payload": {"lang": "en"}, "text": "hello"}])
    docs.query(v, k=10, filter={"lang": "en"})
"""

from bkg_kernel.store.collection import Collection, UpsertResult
from bkg_kernel.store.results import CollectionInfo, Hit, Point, QueryResult, SnapshotInfo
from bkg_kernel.store.store import Store

__all__ = [
    "Collection",
    "CollectionInfo",
    "Hit",
    "Point",
    "QueryResult",
    "SnapshotInfo",
    "Store",
    "UpsertResult",
]
