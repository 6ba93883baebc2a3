"""What a new user's trial of rustyface found, through a real gateway with the real YuNet + SFace models and real
photos (insightface's group photo and Tom Hanks, skimage's astronaut): a broken image said in words (no object
reprs), a refused photo of `enroll_folder` named by its file (not by its place in a batch), enroll's default
sources spelled like its field (`images[i]`), and a notebook figure of a large photo that stays small."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import insightface
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway
from helpers import astronaut, b64, jpeg
from PIL import Image

import bkg_kernel

IMAGES = Path(insightface.__file__).parent / "data" / "images"
NOT_AN_IMAGE = b"not really a jpeg"


@pytest.fixture(scope="module")
def fgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("faces-trial") / "data", plugins=["rustyface"])
    g.client().post("/api/plugins/rustyface/invoke/faces.gallery", json={"action": "create", "gallery": "trial"})
    yield g
    g.stop()


@pytest.fixture(scope="module")
def wb(fgw: Gateway) -> Any:
    return bkg_kernel.connect(fgw.url, api_key=ADMIN_KEY)


def test_every_capability_says_a_broken_image_in_words(fgw: Gateway) -> None:
    """The trial saw `(UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f...>)`."""
    c = fgw.client()
    good = b64(jpeg(astronaut()))
    truncated = jpeg(astronaut())[:2000]
    for data, words in (
        (NOT_AN_IMAGE, "not a readable image (not a JPEG, PNG, WebP, GIF, BMP or TIFF file)"),
        (truncated, "not a readable image (a damaged JPEG file: image file is truncated"),
    ):
        bad = b64(data)
        for cap, body, field in (
            ("faces.detect", {"image": bad}, "image"),
            ("faces.embed", {"image": bad}, "image"),
            ("faces.verify", {"image_a": good, "image_b": bad}, "image_b"),
            ("faces.enroll", {"gallery": "trial", "subject": "x", "images": [good, bad]}, "images[1]"),
            ("faces.identify", {"gallery": "trial", "image": bad}, "image"),
        ):
            r = c.post(f"/api/plugins/rustyface/invoke/{cap}", json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["field"] == field, (cap, r.text)
            assert err["message"].startswith(f"{field}: {words}"), (cap, err)
            assert not re.search(r"0x[0-9a-f]+|BytesIO|Error\b", err["message"]), (cap, err)
    # an upload goes through the same decoding
    r = c.post("/api/faces/detect", files={"image": ("broken.jpg", NOT_AN_IMAGE, "image/jpeg")})
    assert r.status_code == 400 and "(not a JPEG, PNG" in r.json()["error"]["message"] and "0x" not in r.text


def test_enroll_folder_names_a_refused_photo_by_its_file(wb: Any, tmp_path: Path) -> None:
    (tmp_path / "eileen").mkdir()
    (tmp_path / "tom").mkdir()
    astronaut().save(tmp_path / "eileen" / "e1.jpg")
    (tmp_path / "eileen" / "broken.jpg").write_bytes(NOT_AN_IMAGE)
    Image.open(IMAGES / "Tom_Hanks_54745.png").convert("RGB").save(tmp_path / "tom" / "t.jpg")
    summary = wb.faces.enroll_folder("folder", tmp_path, progress=False)
    assert summary["enrolled"] == 2, summary
    # the file the user gave, not `images[0]` (its place in a batch of the client's making), and no object repr
    assert summary["skipped"] == [
        {"source": "eileen/broken.jpg", "reason": "refused: not a readable image (not a JPEG, PNG, WebP, GIF, BMP "
         "or TIFF file)"}
    ]  # fmt: skip


def test_enroll_names_unnamed_images_as_its_field_does(fgw: Gateway, wb: Any) -> None:
    blank = Image.new("RGB", (200, 200), "white")
    r = wb.faces.enroll("trial", "eileen", [astronaut(), blank])
    assert r["enrolled"][0]["source"] == "images[0]", r  # was `image[0]` while the field is `images`
    assert r["skipped"] == [{"source": "images[1]", "reason": "no face found"}]
    caps = {c["id"]: c for c in fgw.client().get("/api/plugins/rustyface").json()["capabilities"]}
    described = caps["faces.enroll"]["input_schema"]["properties"]["sources"]["description"]
    assert "images[i]" in described and "image[i]" not in described.replace("images[i]", "")


def figure(html: str) -> tuple[str, Image.Image]:
    kind, data = re.match(r"<figure><img src='data:image/(\w+);base64,([^']+)'", html).groups()  # type: ignore[union-attr]
    return kind, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def assert_every_box_drawn(shown: Image.Image, faces: list[dict[str, Any]], width: int) -> None:
    """Each face's box is drawn where it is on the scaled photo: its top edge green (known) or red (unknown)."""
    px = np.asarray(shown).astype(int)
    scale = shown.width / width
    for face in faces:
        x1, y1, x2, _ = (round(v * scale) for v in face["bbox"])
        band = px[max(0, y1 - 1) : y1 + 3, x1 + 4 : x2 - 3]  # the top edge, a line 2 px wide, a JPEG's blur around
        r, g, b = band[..., 0], band[..., 1], band[..., 2]
        known = face.get("subject", "face") != "unknown"
        hue = (g > r + 40) & (g > b + 40) if known else (r > g + 60) & (r > b + 60)
        assert hue.any(axis=0).mean() > 0.9, (face["bbox"], hue.any(axis=0).mean())


def test_a_large_photo_s_figure_is_a_small_jpeg_with_every_box(wb: Any, tmp_path: Path) -> None:
    """The trial's 129 KB group photo rendered as 846 KB of HTML (a full-colour PNG)."""
    found = wb.faces.detect(IMAGES / "t1.jpg")
    html = found._repr_html_()
    assert len(found["faces"]) == 6 and len(html) < 250_000, len(html)
    kind, shown = figure(html)
    assert kind == "jpeg" and max(shown.size) == 800 and html.count("face 0.") == 6
    assert_every_box_drawn(shown, found["faces"], 1280)
    # twice as large: the same figure size, the boxes scaled to match; identified faces too (red: unknown)
    Image.open(IMAGES / "t1.jpg").resize((2560, 1772)).save(tmp_path / "big.jpg", quality=95)
    who = wb.faces.identify("trial", tmp_path / "big.jpg")
    html = who._repr_html_()
    kind, shown = figure(html)
    assert len(who["faces"]) == 6 and len(html) < 250_000 and kind == "jpeg" and shown.size == (800, 554)
    assert_every_box_drawn(shown, who["faces"], 2560)
    # a small photo, or a transparent one, stays a PNG (crisp, and small anyway)
    small = wb.faces.detect(IMAGES / "Tom_Hanks_54745.png")
    kind, shown = figure(small._repr_html_())
    assert kind == "png" and shown.size == (112, 112) and len(small["faces"]) == 1
    clear = astronaut().convert("RGBA")
    clear.putalpha(255)
    buf = io.BytesIO()
    clear.save(buf, "PNG")
    kind, _ = figure(wb.faces.detect(buf.getvalue())._repr_html_())
    assert kind == "png"
