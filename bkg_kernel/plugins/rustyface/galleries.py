"""Face galleries: one store collection per gallery (`faces-<name>`, cosine, HNSW), one point per enrolled
face with its subject, source and box, reached through the plugin's store handle (as the caller of the call:
their collections scopes apply)."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from bkg_kernel.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.store import validate

PREFIX = "faces-"
# a collection name less the prefix's six characters (the request schemas state it)
GALLERY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,57}$"

# rustyface serves every call from one worker process (a thread each, up to max_concurrent): a lock per gallery
# in that process keeps one gallery's writes apart.
_WRITERS = NamedLocks()


def writing(collection: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of a gallery's writes for a `with` block."""
    return _WRITERS.hold(collection)


class Galleries:
    """Gallery and subject operations over the store's collections."""

    def __init__(self, store: StoreHandle, dim: int, model: str = "") -> None:
        self.store, self.dim, self.model = store, dim, model

    @staticmethod
    def collection(gallery: str) -> str:
        validate.collection_name(gallery, "gallery")
        if len(PREFIX + gallery) > 64:
            raise InvalidInput(f"a gallery name has at most {64 - len(PREFIX)} characters", field="gallery")
        return PREFIX + gallery

    @contextlib.contextmanager
    def _gallery(self, gallery: str) -> Iterator[str]:
        """Yield the gallery's collection name; a missing collection is a missing gallery."""
        try:
            yield self.collection(gallery)
        except NotFound as exc:
            if exc.field in ("collection", "name", None):
                raise NotFound(f"gallery {gallery!r} does not exist", field="gallery") from None
            raise

    def create(self, gallery: str) -> dict[str, Any]:
        try:
            self.store.create_collection(self.collection(gallery), self.dim, metric="cosine", index="hnsw")
        except AlreadyExists:
            raise AlreadyExists(f"gallery {gallery!r} already exists", field="gallery") from None
        return self.describe(gallery)

    def all(self) -> list[dict[str, Any]]:
        cols = self.store.list_collections()
        return [
            {"gallery": c["name"][len(PREFIX) :], "faces": c["count"]} for c in cols if c["name"].startswith(PREFIX)
        ]

    def require(self, gallery: str) -> None:
        """Raise 404 unless the gallery exists, 409 when its faces come from a pack of another size."""
        with self._gallery(gallery) as name:
            info = self.store.describe(name)
        if info["dim"] != self.dim:
            raise Conflict(
                f"gallery {gallery!r} holds {info['dim']}-d faces from another face pack; the pack in use "
                f"({self.model}) gives {self.dim}-d embeddings: enroll into a new gallery",
                field="gallery",
            )

    def describe(self, gallery: str) -> dict[str, Any]:
        with self._gallery(gallery) as name:
            info = self.store.describe(name)
            subjects = self.store.count_distinct(name, "subject")
        return {"gallery": gallery, "faces": info["count"], "subjects": subjects, "created_at": info["created_at"]}

    def delete(self, gallery: str) -> dict[str, Any]:
        with self._gallery(gallery) as name, writing(name):  # not under a rename: it would refill a gallery made again
            self.store.drop_collection(name)
        return {"gallery": gallery, "deleted": True}

    def _points(self, gallery: str, filter: dict[str, Any] | None, with_vectors: bool) -> list[dict[str, Any]]:
        with self._gallery(gallery) as name:
            return list(self.store.iter_points(name, filter, with_vectors=with_vectors))

    def faces(self, gallery: str, subject: str | None, per_subject: int) -> list[dict[str, Any]]:
        """Each subject with its face count and up to `per_subject` faces (id, source, thumbnail if stored)."""
        by: dict[str, dict[str, Any]] = {}
        for p in self._points(gallery, {"subject": subject} if subject else None, False):
            payload = p["payload"] or {}
            s = by.setdefault(str(payload.get("subject")), {"subject": payload.get("subject"), "faces": 0, "shown": []})
            s["faces"] += 1
            if len(s["shown"]) < per_subject:
                s["shown"].append({"id": p["id"], "source": payload.get("source"), "thumb": payload.get("thumb")})
        return [by[k] for k in sorted(by)]

    def subjects(self, gallery: str) -> list[dict[str, Any]]:
        counts = Counter((p["payload"] or {}).get("subject") for p in self._points(gallery, None, False))
        return [{"subject": s, "faces": n} for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))]

    def rename(self, gallery: str, subject: str, new_name: str) -> dict[str, Any]:
        # Read and written back under the gallery's lock: faces deleted in between came back under the new name.
        with writing(self.collection(gallery)):
            pts = self._points(gallery, {"subject": subject}, True)
            if not pts:
                raise NotFound(f"gallery {gallery!r} has no subject {subject!r}", field="subject")
            points = [
                {"id": p["id"], "vector": p["vector"], "payload": {**(p["payload"] or {}), "subject": new_name}}
                for p in pts
            ]
            with self._gallery(gallery) as name:
                self.store.upsert(name, points)
        return {"gallery": gallery, "subject": new_name, "faces": len(pts)}

    def delete_subject(self, gallery: str, subject: str) -> dict[str, Any]:
        with self._gallery(gallery) as name, writing(name):
            n = self.store.delete(name, filter={"subject": subject})
        if not n:
            raise NotFound(f"gallery {gallery!r} has no subject {subject!r}", field="subject")
        return {"gallery": gallery, "subject": subject, "deleted_faces": n}

    def add_faces(self, gallery: str, faces: list[dict[str, Any]]) -> list[str]:
        points = [
            {"id": f"face-{uuid.uuid4().hex[:16]}", "vector": f["embedding"], "payload": f["payload"]} for f in faces
        ]
        with self._gallery(gallery) as name, writing(name):
            self.store.upsert(name, points)
        return [p["id"] for p in points]

    def nearest(self, gallery: str, vector: list[float], k: int) -> list[dict[str, Any]]:
        with self._gallery(gallery) as name:
            return self.store.query(name, vector=vector, k=k)
