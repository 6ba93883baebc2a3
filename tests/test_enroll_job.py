"""The shipped job notebook `jobs/enroll_faces.ipynb`, run as a real papermill job against a real gateway with
rustyface (YuNet + SFace) and real photos: a re-run with `replace` leaves no duplicates, and a person whose new
photos show no face keeps the faces they had (the notebook deleted them first, then enrolled nothing)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import insightface
import pytest
from gateway_harness import Gateway, start_gateway, wait_for
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`people/<person>/<photo>`: two photos of Tom Hanks, and for `astro` a grey square (no face)."""
    root = tmp_path_factory.mktemp("files")
    hanks = Image.open(IMAGES / "Tom_Hanks_54745.png").convert("RGB")
    (root / "people" / "hanks").mkdir(parents=True)
    hanks.save(root / "people" / "hanks" / "1.png")
    ImageOps.mirror(hanks).save(root / "people" / "hanks" / "2.jpg")
    (root / "people" / "astro").mkdir()
    Image.new("RGB", (320, 320), (128, 128, 128)).save(root / "people" / "astro" / "1.png")
    return root


@pytest.fixture(scope="module")
def egw(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Iterator[Gateway]:
    env = {"BKG_JOB_ROOTS": str(ROOT / "notebooks"), "BKG_JOB_FILE_ROOTS": str(photos)}
    g = start_gateway(tmp_path_factory.mktemp("enroll") / "data", env=env, plugins=["rustyface"])
    yield g
    g.stop()


def run_job(gw: Gateway, parameters: dict[str, Any]) -> dict[str, Any]:
    c = gw.client()
    r = c.post("/api/jobs", json={"notebook": "jobs/enroll_faces.ipynb", "parameters": parameters})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    done = wait_for(lambda: (x := c.get(f"/api/jobs/{run_id}").json())["finished_at"] and x, 300)
    assert done["state"] == "succeeded", done["error"]
    return dict(done)


def faces_of(gw: Gateway, gallery: str) -> dict[str, int]:
    r = gw.client().post("/api/plugins/rustyface/invoke/faces.subjects", json={"gallery": gallery})
    assert r.status_code == 200, r.text
    return {s["subject"]: s["faces"] for s in r.json()["subjects"]}


def test_a_rerun_replaces_and_a_person_with_no_new_face_keeps_theirs(egw: Gateway, photos: Path) -> None:
    c = egw.client()
    r = c.post("/api/plugins/rustyface/invoke/faces.gallery", json={"gallery": "team", "action": "create"})
    assert r.status_code == 200, r.text
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG")
    body = {"gallery": "team", "subject": "astro", "images": [base64.b64encode(buf.getvalue()).decode()]}
    r = c.post("/api/plugins/rustyface/invoke/faces.enroll", json=body)
    assert r.status_code == 200 and len(r.json()["enrolled"]) == 1, r.text
    params = {"folder": str(photos / "people"), "gallery": "team", "replace": True}
    run_job(egw, params)
    assert faces_of(egw, "team") == {"astro": 1, "hanks": 2}  # astro's new photo shows no face: the old one stays
    run_job(egw, params)
    assert faces_of(egw, "team") == {"astro": 1, "hanks": 2}  # replaced, not added to
