"""Large photos in the rustyface worker, through a real gateway with the real YuNet + SFace models: a 40-megapixel
JPEG's face is found where it is and identified as in the small original, without whole-photo copies (the worker's
peak RSS, the kernel's high-water mark); pixel limits, Pillow's decompression-bomb one included, are 400s naming
the field; EXIF orientation is applied to what is taken from a photo, not to a copy of the whole photo."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from gateway_harness import Gateway
from helpers import astronaut, b64, jpeg
from PIL import Image, ImageOps

from bkg_kernel.plugins.rustyface import images

PLUGINS = ["rustyface"]
MB = 2**20
OFFSET, ZOOM = (4200, 2400), 3  # where the astronaut goes in the large photo, and how much larger


def large_photo(w: int, h: int) -> bytes:
    """The astronaut, three times her size, at OFFSET in a w x h photo of coffee with grain: a JPEG of ~11 MB,
    as a 40-megapixel camera writes."""
    import skimage.data

    back = np.asarray(Image.fromarray(skimage.data.coffee()).resize((w, h), Image.Resampling.BILINEAR))
    grain = np.random.default_rng(0).integers(-10, 11, size=(h, w, 1), dtype=np.int16)
    photo = Image.fromarray(np.clip(back + grain, 0, 255).astype(np.uint8))
    del back, grain
    face = astronaut()
    photo.paste(face.resize((face.width * ZOOM, face.height * ZOOM), Image.Resampling.BICUBIC), OFFSET)
    return jpeg(photo, quality=90)


def invoke(gw: Gateway, cap: str, body: dict[str, Any]) -> httpx.Response:
    return gw.client().post(f"/api/plugins/rustyface/invoke/{cap}", json=body, timeout=300)


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    both = w * h
    return both / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - both)


def peak_growth(gw: Gateway, call: Any) -> tuple[httpx.Response, int]:
    """Run `call` and return its answer and how far the worker's RSS rose above what it was before, at its peak
    (the kernel's high-water mark, VmHWM, started again from the RSS of the moment by clear_refs)."""
    worker = psutil.Process(gw.client().get("/api/plugins/rustyface/status").json()["pid"])
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")
    before = worker.memory_info().rss
    r = call()
    status = Path(f"/proc/{worker.pid}/status").read_text()
    peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    return r, peak - before


def test_a_40_megapixel_photo_in_bounded_memory(gw: Gateway) -> None:
    """Found by a review: a 40-megapixel photo took the worker ~0.9 GB above what it held (Pillow's decode, an
    EXIF-transposed copy, an RGB conversion, numpy's copy and the BGR one, 120-160 MB each; detection then used a
    640 px copy). Now detection reads a JPEG decoded at 1/8 (DCT scaling) and a face is aligned from its region of
    the full-size pixels, decoded once and held once. Bounds, with a clear margin both ways (measured: detect +70
    MB here, +583 MB before; identify +170 MB, +560 MB before): the request in transit (its JSON text, the text
    parsed, the file's bytes: under 4x the file), plus for identify one full-size decode (Pillow holds RGB as 4
    bytes a pixel), plus 100 MB for the rest (the small copy, the answer, the allocator's slack)."""
    small = astronaut()
    ok(invoke(gw, "faces.gallery", {"action": "create", "gallery": "big"}))
    # the models load in the worker on first use: before anything is measured
    ok(invoke(gw, "faces.enroll", {"gallery": "big", "subject": "eileen", "images": [b64(jpeg(small))]}))
    expected = ok(invoke(gw, "faces.detect", {"image": b64(jpeg(small))}))["faces"][0]
    place = [v * ZOOM + OFFSET[i % 2] for i, v in enumerate(expected["bbox"])]
    w, h = 7744, 5152
    data = large_photo(w, h)

    r, grew = peak_growth(gw, lambda: invoke(gw, "faces.detect", {"image": b64(data)}))
    found = ok(r)
    assert (found["width"], found["height"]) == (w, h) and len(found["faces"]) == 1, found
    face = found["faces"][0]
    assert iou(face["bbox"], place) > 0.75, (face["bbox"], place)
    # eyes, nose and mouth corners within 15% of the face's width: found on a copy where the face is ~22 px wide,
    # each of its pixels is 12 of the photo's
    near = 0.15 * (place[2] - place[0])
    for (x, y), (sx, sy) in zip(face["landmarks"], expected["landmarks"], strict=True):
        assert abs(x - (sx * ZOOM + OFFSET[0])) < near and abs(y - (sy * ZOOM + OFFSET[1])) < near
    assert grew < 4 * len(data) + 100 * MB, f"detect: the worker grew {grew / MB:.0f} MB"

    with gw.client() as c:
        c.timeout = httpx.Timeout(300)
        upload = {"image": ("large.jpg", data, "image/jpeg")}
        r, grew = peak_growth(gw, lambda: c.post("/api/faces/identify", files=upload, data={"gallery": "big"}))
    who = ok(r)["faces"]
    assert len(who) == 1 and who[0]["subject"] == "eileen" and who[0]["matches"][0]["similarity"] > 0.7, who
    assert iou(who[0]["bbox"], face["bbox"]) > 0.99  # detect and identify find the same box
    assert grew < 4 * w * h + 4 * len(data) + 100 * MB, f"identify: the worker grew {grew / MB:.0f} MB"

    same = ok(invoke(gw, "faces.verify", {"image_a": b64(jpeg(small)), "image_b": b64(data)}))
    assert same["same"] is True and same["similarity"] > 0.7, same


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that says it is w x h (8-bit gray) and holds one row: what a decompression bomb starts with."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1)))


def test_pixel_limits_are_400s_naming_the_field(gw: Gateway) -> None:
    """Past Pillow's decompression-bomb limit (2 x 89,478,485 pixels) the answer said "not a readable image
    (too many pixels: ... could be decompression bomb DOS attack.)"; it names the size and the setting now. A
    photo within max_pixels is no longer refused because a detector would pad its sides to multiples of 32: the
    detector only sees a copy at most det_size long."""
    r = invoke(gw, "faces.detect", {"image": b64(png_header_only(20_000, 20_000))})
    err = r.json()["error"]
    assert r.status_code == 400 and err["field"] == "image", r.text
    assert "400,000,000 pixels" in err["message"] and "max_pixels" in err["message"], err
    assert "bomb" not in err["message"] and "not a readable image" not in err["message"], err
    # past Pillow's warning limit, under its error limit: refused by max_pixels, before any pixel is decoded
    r = invoke(gw, "faces.detect", {"image": b64(png_header_only(10_000, 9_000))})
    err = r.json()["error"]
    assert r.status_code == 400 and err["field"] == "image", r.text
    assert "10000x9000 = 90,000,000 pixels; the limit is 40,000,000 (max_pixels)" in err["message"], err
    buf = io.BytesIO()
    Image.new("L", (7744, 5164), 128).save(buf, "PNG")  # 39,990,016 pixels; its sides padded: 40,144,896
    found = ok(invoke(gw, "faces.detect", {"image": b64(buf.getvalue())}))
    assert (found["width"], found["height"]) == (7744, 5164) and found["faces"] == []


ORIENTATIONS = range(1, 9)
# the transpose that stores an upright photo under each EXIF orientation (the inverse of exif_transpose's)
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """`upright` stored turned, with the EXIF orientation that shows it upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    method = STORE[orientation]
    buf = io.BytesIO()
    (upright.transpose(method) if method is not None else upright).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_a_region_is_taken_upright_from_the_stored_pixels(orientation: int) -> None:
    """The photo is never turned as a whole (a copy of all of it): a region and the scaled copy are taken from
    the stored pixels and turned; they are exactly what the whole photo, turned upright, shows there."""
    upright = astronaut().crop((0, 0, 512, 300))  # not square: rotations swap the sides
    data = stored(upright, orientation, "PNG")
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).tobytes() == upright.tobytes()
    photo = images.Photo(data, field="image", max_pixels=10**7)
    assert (photo.width, photo.height) == (512, 300)
    bgr = np.asarray(upright)[:, :, ::-1]
    for box in [(10, 20, 200, 90), (450.4, 250.6, 600, 400), (-5, -5, 3, 7), (0, 0, 512, 300)]:
        crop, x0, y0 = photo.region(box)
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(512, int(np.ceil(box[2]))), min(300, int(np.ceil(box[3])))
        assert (x0, y0) == (x1, y1) and np.array_equal(crop, bgr[y1:y2, x1:x2]), (orientation, box)
    small, fx, fy = photo.scaled(256)
    assert small.shape == (150, 256, 3) and (fx, fy) == (2.0, 2.0)
    want = np.asarray(upright.resize((256, 150), Image.Resampling.BOX))[:, :, ::-1]
    assert np.abs(small.astype(int) - want).max() <= 1  # scaled, then turned: rounded in another order


def test_every_exif_orientation_embeds_as_upright(gw: Gateway) -> None:
    """Through the worker: the same face in the same place, the same person, whichever way a JPEG is stored."""
    upright = astronaut()
    want = ok(invoke(gw, "faces.embed", {"image": b64(jpeg(upright, quality=95))}))["faces"][0]
    for orientation in ORIENTATIONS:
        out = ok(invoke(gw, "faces.embed", {"image": b64(stored(upright, orientation, "JPEG"))}))
        assert len(out["faces"]) == 1, (orientation, out["faces"])
        face = out["faces"][0]
        assert iou(face["bbox"], want["bbox"]) > 0.9, (orientation, face["bbox"], want["bbox"])
        assert float(np.dot(face["embedding"], want["embedding"])) > 0.95, orientation
