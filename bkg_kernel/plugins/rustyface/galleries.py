"""Face galleries: one store collection per gallery (`faces-<name>`, cosine, HNSW), one point per enrolled
face with its subject, source and box. The worker reaches the store through the gateway that owns it."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from bkg_kernel.errors import AlreadyExists, BkgError, Conflict, NotFound
from bkg_kernel.plugins import gateway_api
from bkg_kernel.store import validate

PREFIX = "faces-"


class Galleries:
    """Gallery and subject operations over the gateway's collections API."""

    def __init__(self, http: Any, dim: int, model: str = "") -> None:
        self.http, self.dim, self.model = http, dim, model

    def _call(self, method: str, path: str, gallery: str | None = None, **kw: Any) -> Any:
        try:
            return gateway_api.call(self.http, method, path, **kw)
        except BkgError as exc:
            if exc.status == 404 and gallery is not None:
                raise NotFound(f"gallery {gallery!r} does not exist", field="gallery") from None
            raise

    @staticmethod
    def collection(gallery: str) -> str:
        validate.collection_name(gallery, "gallery")
        return PREFIX + gallery

    def create(self, gallery: str) -> dict[str, Any]:
        body = {"name": self.collection(gallery), "dim": self.dim, "metric": "cosine", "index": "hnsw"}
        try:
            self._call("POST", "/api/collections", json=body)
        except BkgError as exc:
            if exc.status == 409:
                raise AlreadyExists(f"gallery {gallery!r} already exists", field="gallery") from None
            raise
        return self.describe(gallery)

    def all(self) -> list[dict[str, Any]]:
        cols = self._call("GET", "/api/collections")["collections"]
        return [
            {"gallery": c["name"][len(PREFIX) :], "faces": c["count"]} for c in cols if c["name"].startswith(PREFIX)
        ]

    def require(self, gallery: str) -> None:
        """Raise 404 unless the gallery exists, 409 when its faces come from a pack of another size."""
        info = self._call("GET", f"/api/collections/{self.collection(gallery)}", gallery)
        if info["dim"] != self.dim:
            raise Conflict(
                f"gallery {gallery!r} holds {info['dim']}-d faces from another face pack; the pack in use "
                f"({self.model}) gives {self.dim}-d embeddings: enroll into a new gallery",
                field="gallery",
            )

    def describe(self, gallery: str) -> dict[str, Any]:
        info = self._call("GET", f"/api/collections/{self.collection(gallery)}", gallery)
        subjects = self.subjects(gallery)
        return {"gallery": gallery, "faces": info["count"], "subjects": len(subjects), "created_at": info["created_at"]}

    def delete(self, gallery: str) -> dict[str, Any]:
        self._call("DELETE", f"/api/collections/{self.collection(gallery)}", gallery)
        return {"gallery": gallery, "deleted": True}

    def _scroll(self, gallery: str, filter: dict[str, Any] | None, with_vectors: bool) -> list[dict[str, Any]]:
        try:
            return list(gateway_api.scroll(self.http, self.collection(gallery), filter, with_vectors=with_vectors))
        except BkgError as exc:
            if exc.status == 404:
                raise NotFound(f"gallery {gallery!r} does not exist", field="gallery") from None
            raise

    def subjects(self, gallery: str) -> list[dict[str, Any]]:
        counts = Counter((p["payload"] or {}).get("subject") for p in self._scroll(gallery, None, False))
        return [{"subject": s, "faces": n} for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))]

    def rename(self, gallery: str, subject: str, new_name: str) -> dict[str, Any]:
        pts = self._scroll(gallery, {"subject": subject}, True)
        if not pts:
            raise NotFound(f"gallery {gallery!r} has no subject {subject!r}", field="subject")
        for p in pts:
            p["payload"] = {**(p["payload"] or {}), "subject": new_name}
        points = [{"id": p["id"], "vector": p["vector"], "payload": p["payload"]} for p in pts]
        self._call("PUT", f"/api/collections/{self.collection(gallery)}/points", gallery, json={"points": points})
        return {"gallery": gallery, "subject": new_name, "faces": len(pts)}

    def delete_subject(self, gallery: str, subject: str) -> dict[str, Any]:
        path = f"/api/collections/{self.collection(gallery)}/points/delete"
        n = self._call("POST", path, gallery, json={"filter": {"subject": subject}})["deleted"]
        if not n:
            raise NotFound(f"gallery {gallery!r} has no subject {subject!r}", field="subject")
        return {"gallery": gallery, "subject": subject, "deleted_faces": n}

    def add_faces(self, gallery: str, faces: list[dict[str, Any]]) -> list[str]:
        points = [
            {"id": f"face-{uuid.uuid4().hex[:16]}", "vector": f["embedding"], "payload": f["payload"]} for f in faces
        ]
        self._call("PUT", f"/api/collections/{self.collection(gallery)}/points", gallery, json={"points": points})
        return [p["id"] for p in points]

    def nearest(self, gallery: str, vector: list[float], k: int) -> list[dict[str, Any]]:
        body = {"vector": vector, "k": k}
        return list(
            self._call("POST", f"/api/collections/{self.collection(gallery)}/query", gallery, json=body)["results"]
        )
