"""Face galleries: one store collection per gallery (`faces-<name>`, cosine, HNSW), one point per enrolled
face with its subject, source and box, reached through the plugin's store handle (as the caller of the call:
their collections scopes apply)."""

from __future__ import annotations

import contextlib
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from bkg_kernel.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from bkg_kernel.namedlocks import NamedLocks
from bkg_kernel.runtime.storehandle import StoreHandle
from bkg_kernel.store import validate
from bkg_kernel.store.validate import MAX_K

PREFIX = "faces-"
# a collection name less the prefix's six characters (the request schemas state it)
GALLERY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,57}$"

SUBJECT_MAX = 200
UNKNOWN = "unknown"  # what faces.identify calls a face that no subject matches

# rustyface serves every call from one worker process (a thread each, up to max_concurrent): a lock per gallery
# in that process keeps one gallery's writes apart.
_WRITERS = NamedLocks()


def writing(collection: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of a gallery's writes for a `with` block."""
    return _WRITERS.hold(collection)


def subject_name(name: str) -> str:
    """Return `name` if it may name a subject (enroll's `subject`, rename's `new_name`), else raise ValueError
    saying why: 1-200 characters, not blank, no spaces around it, no control characters, and not `unknown`."""
    if not name.strip():
        raise ValueError("a subject name cannot be empty or only whitespace")
    if len(name) > SUBJECT_MAX:
        raise ValueError(f"a subject name has at most {SUBJECT_MAX} characters, not {len(name):,}")
    if name != name.strip():  # "tom " and "tom" would be two subjects that look like one
        raise ValueError(f"a subject name cannot start or end with whitespace: {name!r}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ValueError(f"a subject name cannot hold control characters (a newline, a tab): {name!r}")
    if name.casefold() == UNKNOWN:
        raise ValueError(f"{name!r} is reserved: faces.identify names a face that matches no subject {UNKNOWN!r}")
    return name


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
        """Raise 404 unless the gallery exists, 409 when its faces come from another face pack (another size, or
        another pack's name on its faces: their similarities to this pack's would mean nothing)."""
        with self._gallery(gallery) as name:
            info = self.store.describe(name)
            if info["dim"] != self.dim:
                raise Conflict(
                    f"gallery {gallery!r} holds {info['dim']}-d faces from another face pack; the pack in use "
                    f"({self.model}) gives {self.dim}-d embeddings: enroll into a new gallery",
                    field="gallery",
                )
            first, _ = self.store.scroll(name, None, limit=1)  # a gallery holds one pack's faces: one tells
        if first:
            self.check_model(gallery, first[0].get("payload") or {})

    def check_model(self, gallery: str, payload: dict[str, Any]) -> None:
        """Raise 409 when a stored face's payload names another pack than the one in use."""
        model = payload.get("model", self.model)
        if model != self.model:
            raise Conflict(
                f"gallery {gallery!r} holds faces from {model}, not from the pack in use ({self.model}): their "
                f"similarities would mean nothing; set the pack back to {model}, or enroll into a new gallery",
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
        """Give the subject's faces `new_name`; onto a subject that exists the two become one (as CompreFace
        does), and the answer says `merged`."""
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
                merged = new_name != subject and self.store.count(name, {"subject": new_name}) > 0
                self.store.upsert(name, points)
                total = self.store.count(name, {"subject": new_name}) if merged else len(pts)
        return {"gallery": gallery, "subject": new_name, "faces": len(pts), "merged": merged, "subject_faces": total}

    def delete_face(self, gallery: str, face_id: str, subject: str | None = None) -> dict[str, Any]:
        """Delete one face by its id (if `subject` is given, only one of theirs)."""
        with self._gallery(gallery) as name, writing(name):
            found = self.store.get(name, [face_id], with_vectors=False)
            owner = (found[0].get("payload") or {}).get("subject") if found else None
            if not found or (subject is not None and owner != subject):
                whose = f" of subject {subject!r}" if subject is not None else ""
                raise NotFound(f"gallery {gallery!r} has no face {face_id!r}{whose}", field="face_id")
            self.store.delete(name, ids=[face_id])
            left = self.store.count(name, {"subject": owner}) if isinstance(owner, str) else None
        return {"gallery": gallery, "face_id": face_id, "subject": owner, "deleted": True, "subject_faces": left}

    def delete_subject(self, gallery: str, subject: str, keep: list[str] | None = None) -> dict[str, Any]:
        """Delete the subject's faces, but those in `keep` (a re-run's new faces, enrolled before the old go)."""
        with self._gallery(gallery) as name, writing(name):
            if keep is None:
                n = self.store.delete(name, filter={"subject": subject})
                found = n
            else:
                ids = [p["id"] for p in self.store.iter_points(name, {"subject": subject})]
                kept = set(keep)
                old = [i for i in ids if i not in kept]
                n, found = (self.store.delete(name, ids=old) if old else 0), len(ids)
        if not found:
            raise NotFound(f"gallery {gallery!r} has no subject {subject!r}", field="subject")
        return {"gallery": gallery, "subject": subject, "deleted_faces": n}

    def add_faces(self, gallery: str, faces: list[dict[str, Any]]) -> list[str]:
        points = [
            {"id": f"face-{uuid.uuid4().hex[:16]}", "vector": f["embedding"], "payload": f["payload"]} for f in faces
        ]
        with self._gallery(gallery) as name, writing(name):
            self.store.upsert(name, points)
        return [p["id"] for p in points]

    def nearest(
        self, gallery: str, vector: list[float], k: int, filter: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        with self._gallery(gallery) as name:
            return self.store.query(name, vector=vector, k=k, filter=filter)

    def best_subjects(self, gallery: str, vector: list[float], top_k: int, threshold: float) -> dict[str, float]:
        """Up to `top_k` subjects at or above `threshold`, each with its best similarity: the nearest faces first,
        then, while a subject with many faces fills them, the nearest faces of the subjects not yet seen."""
        best: dict[str, float] = {}
        k = min(MAX_K, top_k * 20)
        while len(best) < top_k:
            seen = {"subject": {"$nin": list(best)}} if best else None
            hits = self.nearest(gallery, vector, k, seen)
            for hit in hits:
                payload = hit.get("payload") or {}
                self.check_model(gallery, payload)
                subject = str(payload.get("subject"))
                if hit["score"] >= threshold and subject not in best:
                    best[subject] = hit["score"]
            # each round finds a new subject or ends: the gallery is spent, or the rest are below the threshold
            if len(hits) < k or not hits or hits[-1]["score"] < threshold:
                break
        return dict(sorted(best.items(), key=lambda kv: -kv[1])[:top_k])
