"""The notebook side of rustyface: `wb.faces.detect(path)`, `wb.faces.identify(...)`, and
`wb.faces.enroll_folder(gallery, folder)` (one subfolder per subject) with a progress bar."""

from __future__ import annotations

import base64
import io
import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from bkg_kernel.display import Table, faces_figure, html_table
from bkg_kernel.errors import BkgError, InvalidInput, escaped, is_utf8

if TYPE_CHECKING:
    from bkg_kernel.client.workbench import Workbench

# what rustyface reads (JPEG, PNG, WebP, GIF, BMP, TIFF), by the names those files go by
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16 / 32-bit gray: rustyface scales them to 8 bits


def encode(image: Any, field: str = "image") -> str:
    """Base64 of an image given as a path, bytes, a PIL image or a numpy array (H x W gray, or H x W x 3 RGB, of
    uint8, or of uint16: its top 8 bits, as cv2.imread reads a 16-bit file); anything else is a 422 naming `field`,
    said here before anything is sent."""
    if isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:  # missing, a folder, not readable: the caller's input, said before anything is sent
            raise InvalidInput(f"{field}: cannot read {image}: {exc.strerror or exc}", field=field) from None
        return base64.b64encode(data).decode()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(image).decode()
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint16:  # Pillow's convert would clip each value at 255: a photo almost white
            image = (image >> 8).astype(np.uint8)
        elif image.dtype.kind == "f":  # 0-1 or 0-255: not to be guessed
            raise InvalidInput(
                f"{field}: an image array is uint8 (or uint16), not {image.dtype}: scale it to 0-255 first "
                "(np.clip(a * 255, 0, 255).astype(np.uint8) for one in 0-1)",
                field=field,
            )
        try:
            img = Image.fromarray(image)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f"{field}: an image array is H x W (gray) or H x W x 3 (RGB) of uint8, not {image.shape} of "
                f"{image.dtype} ({exc})",
                field=field,
            ) from None
    else:
        raise InvalidInput(
            f"{field}: an image is a file path, bytes, a PIL image or a numpy array, not {type(image).__name__}",
            field=field,
        )
    buf = io.BytesIO()
    if img.mode in DEEP_MODES:  # as it is (a lossless TIFF): the gateway scales it to 8 bits, as it does a file
        img.save(buf, "TIFF", compression="tiff_deflate")
    else:
        img.convert("RGB").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Identified(dict[str, Any]):
    """The answer of faces.identify; renders as the image with each face boxed and named."""

    def __init__(self, result: dict[str, Any], image_b64: str) -> None:
        super().__init__(result)
        self._image = image_b64

    def _repr_html_(self) -> str:
        return faces_figure(self, self._image)


class Verdict(dict[str, Any]):
    """faces.verify's answer: same person or not (image_a's main face against image_b's best match), with the
    similarity against the threshold, and `faces_b`: every face of image_b with its similarity."""

    def _repr_html_(self) -> str:
        word = "the same person" if self["same"] else "different people"
        among = len(self.get("faces_b") or [])
        best = f", the best of {among} faces in image_b" if among > 1 else ""
        return (f"<p><b>{word}</b>: similarity {self['similarity']:.3f} (threshold {self['threshold']:.3f}{best}, "
                f"{escape(str(self['model']))})</p>")  # fmt: skip


class GalleryTable(Table):
    """Face galleries with their face counts."""

    columns = ("gallery", "faces")
    caption = "face galleries"


class SubjectTable(Table):
    """A gallery's subjects with their face counts."""

    columns = ("subject", "faces")
    caption = "subjects"


class GalleryInfo(dict[str, Any]):
    """faces.gallery describe: faces, subjects, created."""

    def _repr_html_(self) -> str:
        cols = ["gallery", "faces", "subjects", "created_at"]
        return html_table(cols, [self], f"gallery {self.get('gallery')}")


class Faces:
    """rustyface through the gateway."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb

    def _invoke(self, cap: str, body: dict[str, Any]) -> Any:
        return self.wb.invoke("rustyface", cap, body)

    def detect(self, image: Any, **opts: Any) -> Identified:
        """Faces in an image (path, bytes, PIL image or array): box, landmarks, score; in a notebook, the image with
        each face boxed and scored."""
        data = encode(image)
        return Identified(self._invoke("faces.detect", {"image": data, **opts}), data)

    def embed(self, image: Any, **opts: Any) -> dict[str, Any]:
        """One normalized embedding per face of an image (path, bytes, PIL image or array), with its box."""
        return dict(self._invoke("faces.embed", {"image": encode(image), **opts}))

    def verify(self, image_a: Any, image_b: Any, **opts: Any) -> Verdict:
        """Whether the main face of image_a is among the faces of image_b (a group photo too): the best match's
        similarity against the threshold (a line in a notebook), and `faces_b`, each face with its similarity."""
        body = {"image_a": encode(image_a, "image_a"), "image_b": encode(image_b, "image_b"), **opts}
        return Verdict(self._invoke("faces.verify", body))

    def identify(self, gallery: str, image: Any, **opts: Any) -> Identified:
        """The best subjects of a gallery for each face; in a notebook, the image with boxes and names drawn."""
        data = encode(image)
        return Identified(self._invoke("faces.identify", {"gallery": gallery, "image": data, **opts}), data)

    def create_gallery(self, gallery: str) -> dict[str, Any]:
        """Create a gallery."""
        return dict(self._invoke("faces.gallery", {"action": "create", "gallery": gallery}))

    def galleries(self) -> GalleryTable:
        """Every gallery with its face count (a table in a notebook)."""
        return GalleryTable(self._invoke("faces.gallery", {"action": "list"})["galleries"])

    def gallery(self, gallery: str) -> GalleryInfo:
        """One gallery: faces, subjects, created."""
        return GalleryInfo(self._invoke("faces.gallery", {"action": "describe", "gallery": gallery}))

    def delete_gallery(self, gallery: str) -> dict[str, Any]:
        """Delete a gallery with every face enrolled in it."""
        return dict(self._invoke("faces.gallery", {"action": "delete", "gallery": gallery}))

    def subjects(self, gallery: str) -> SubjectTable:
        """A gallery's subjects with their face counts (a table in a notebook)."""
        return SubjectTable(self._invoke("faces.subjects", {"gallery": gallery})["subjects"])

    def subject_faces(self, gallery: str, subject: str | None = None, *, per_subject: int = 12) -> list[dict[str, Any]]:
        """Each subject (or one) with its face count and up to `per_subject` faces: id, source, thumbnail."""
        body = {"gallery": gallery, "action": "faces", "subject": subject, "per_subject": per_subject}
        return list(self._invoke("faces.subjects", body)["subjects"])

    def rename_subject(self, gallery: str, subject: str, new_name: str) -> dict[str, Any]:
        """Give a subject's faces a new name. Onto a subject that exists, the two are merged into one (as
        CompreFace does): the answer says `merged` and `subject_faces`, the faces the subject now has."""
        body = {"gallery": gallery, "action": "rename", "subject": subject, "new_name": new_name}
        return dict(self._invoke("faces.subjects", body))

    def delete_subject(self, gallery: str, subject: str) -> dict[str, Any]:
        """Delete a subject with all their faces (`deleted_faces` says how many)."""
        return dict(self._invoke("faces.subjects", {"gallery": gallery, "action": "delete", "subject": subject}))

    def delete_face(self, gallery: str, face_id: str, *, subject: str | None = None) -> dict[str, Any]:
        """Delete one enrolled face by its id (from `enroll` or `subject_faces`); with `subject`, only if it is
        theirs. The answer says whose it was and how many faces they have left."""
        body = {"gallery": gallery, "action": "delete_face", "face_id": face_id, "subject": subject}
        return dict(self._invoke("faces.subjects", body))

    def enroll(self, gallery: str, subject: str, images: Any, **opts: Any) -> dict[str, Any]:
        """Enroll the main face of each image (a list of them, or one) as `subject`: the largest, nearest the
        centre; each enrolled face says `faces_in_image`. An image with another face of a similar size is refused
        (422 naming it): crop it to the subject."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or hasattr(images, "getim"):
            images = [images]  # one image (a PIL image has getim), not a sequence of them
        encoded = [encode(img, f"images[{i}]") for i, img in enumerate(images)]
        body = {"gallery": gallery, "subject": subject, "images": encoded, **opts}
        return dict(self._invoke("faces.enroll", body))

    def enroll_folder(
        self,
        gallery: str,
        folder: str | os.PathLike[str],
        *,
        batch: int = 8,
        replace: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Enroll `folder/<subject>/<image>` files (the gallery is created if missing); return a summary.

        A photo the gallery refuses (not an image, too many pixels, two faces of a similar size) is skipped with its
        reason, and the rest of its batch enrolled; so is one whose subject or file name is not UTF-8 (no request can
        carry it), its name escaped, one in a hidden folder (`.ipynb_checkpoints`) or hidden itself (`._1.jpg`), and
        every photo of a subject whose name the gallery refuses. `replace`: once a subject's new faces are enrolled,
        delete the ones it had before, so that running it again adds no duplicates (a run that fails keeps them)."""
        if batch < 1:
            raise InvalidInput("batch must be 1 or more", field="batch")
        root = Path(folder)
        if not root.is_dir():
            raise InvalidInput(f"{root} is not a folder (of one folder of photos per subject)", field="folder")
        work, skipped = [], []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                source = escaped(f"{d.name}/{f.name}")
                if d.name.startswith("."):
                    skipped.append({"source": source, "reason": "in a hidden folder (not a subject)"})
                elif f.name.startswith("."):
                    skipped.append({"source": source, "reason": "a hidden file"})
                elif not is_utf8(f"{d.name}/{f.name}"):
                    skipped.append({"source": source, "reason": "its name is not UTF-8"})
                else:
                    work.append((d.name, f))
        images = len(work) + len(skipped)
        if not any(g["gallery"] == gallery for g in self.galleries()):
            self.create_gallery(gallery)
        known = {s["subject"] for s in self.subjects(gallery)} if replace else set()
        enrolled = replaced = 0
        with tqdm(total=len(work), desc=f"enroll {gallery}", unit="img", disable=not progress) as bar:
            for subject in dict.fromkeys(s for s, _ in work):
                files = [f for s, f in work if s == subject]
                ids: list[str] = []
                for a in range(0, len(files), batch):
                    part = files[a : a + batch]
                    new, refused = self._enroll_each(gallery, subject, part)
                    ids += new
                    skipped += refused
                    bar.update(len(part))
                enrolled += len(ids)
                if subject in known and ids:  # the old faces go only once the new are in
                    body = {"gallery": gallery, "action": "delete", "subject": subject, "keep": ids}
                    replaced += int(self._invoke("faces.subjects", body)["deleted_faces"])
        return {"gallery": gallery, "images": images, "enrolled": enrolled, "replaced": replaced, "skipped": skipped}

    def _enroll_each(self, gallery: str, subject: str, files: list[Path]) -> tuple[list[str], list[dict[str, Any]]]:
        """Enroll a batch, returning the new faces' ids and the photos skipped; one the gallery refuses for a bad
        photo (400 / 422) is tried photo by photo, one it refuses for the subject's name is skipped whole."""
        sources = [f"{subject}/{f.name}" for f in files]
        try:
            r = self.enroll(gallery, subject, files, sources=sources)
            return [e["id"] for e in r["enrolled"]], list(r["skipped"])
        except BkgError as exc:
            if exc.status not in (400, 422):
                raise
            if len(files) == 1 or (exc.field or "").endswith("subject"):  # named by its file, not its batch place
                return [], [{"source": s, "reason": f"refused: {_unplaced(exc)}"} for s in sources]
        ids, refused = list[str](), list[dict[str, Any]]()
        for f in files:
            new, more = self._enroll_each(gallery, subject, [f])
            ids, refused = ids + new, refused + more
        return ids, refused


def _unplaced(exc: BkgError) -> str:
    """The error's message without its `images[i]: ` prefix."""
    field, message = exc.field or "", exc.message
    if field.startswith("images[") and message.startswith(f"{field}: "):
        return message.removeprefix(f"{field}: ")
    return message
