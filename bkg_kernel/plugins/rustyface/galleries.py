"""Face galleries: one store collection per gallery (`faces-<name>`, 128-d cosine), one point per enrolled
face with its subject, source and box. The worker reaches the store through the gateway that owns it."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from bkg_kernel.errors import BkgError, NotFound
from bkg_kernel.store import validate

PREFIX = "faces-"


class Galleries:
    """Gallery and subject operations over the gateway's collections API."""

    def __init__(self, http: Any, dim: int) -> None:
        self.http, self.dim = http, dim

    def _call(self, method: str, path: str, gallery: str | None = None, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code == 404 and gallery is not None:
            raise NotFound(f"gallery {gallery!r} does not exist", field="gallery")
        if r.status_code >= 400:
            err = r.json().get("error", {})
            exc = BkgError(err.get("message", r.text[:200]), field=err.get("field"))
            exc.status, exc.code = r.status_code, err.get("code", "store_error")
            raise exc
        return r.json() if r.content else None

    @staticmethod
    def collection(gallery: str) -> str:
        validate.collection_name(gallery, "gallery")
        return PREFIX + gallery

    def create(self, gallery: str) -> dict[str, Any]:
        body = {"name": self.collection(gallery), "dim": self.dim, "metric": "cosine"}
        r = self.http.post("/api/collections", json=body)
        if r.status_code == 409:
            exc = BkgError(f"gallery {gallery!r} already exists", field="gallery")
            exc.status, exc.code = 409, "already_exists"
            raise exc
        if r.status_code >= 400:
            self._call("POST", "/api/collections", json=body)
        return self.describe(gallery)

    def all(self) -> list[dict[str, Any]]:
        cols = self._call("GET", "/api/collections")["collections"]
        return [
            {"gallery": c["name"][len(PREFIX) :], "faces": c["count"]} for c in cols if c["name"].startswith(PREFIX)
        ]

    def describe(self, gallery: str) -> dict[str, Any]:
        info = self._call("GET", f"/api/collections/{self.collection(gallery)}", gallery)
        subjects = self.subjects(gallery)
        return {"gallery": gallery, "faces": info["count"], "subjects": len(subjects), "created_at": info["created_at"]}

    def delete(self, gallery: str) -> dict[str, Any]:
        self._call("DELETE", f"/api/collections/{self.collection(gallery)}", gallery)
        return {"gallery": gallery, "deleted": True}

    def _scroll(self, gallery: str, filter: dict[str, Any] | None, with_vectors: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            body = {"filter": filter, "limit": 10_000, "offset": offset, "with_vectors": with_vectors}
            page = self._call("POST", f"/api/collections/{self.collection(gallery)}/points/scroll", gallery, json=body)
            out += page["points"]
            offset = page["next_offset"]
        return out

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
