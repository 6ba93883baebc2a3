"""Image inputs of rustyface: base64 (or a data URL), raw bytes (multipart uploads), or a path under an
allowed root. EXIF orientation is applied; size limits are checked before decoding the pixels."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import BkgError, Forbidden, NotFound, expand_home


class InvalidImage(BkgError):
    """The bytes are not a readable image, or too large (400)."""

    status = 400
    code = "invalid_image"


def load(image: str | bytes, *, field: str, roots: list[Path], max_bytes: int, max_pixels: int) -> Photo:
    """Return the photo in base64 text (or a data URL), raw bytes, or `path:<file>`, its size checked."""
    data = _bytes(image, field=field, roots=roots, max_bytes=max_bytes)
    return Photo(data, field=field, max_pixels=max_pixels)


def _bytes(image: str | bytes, *, field: str, roots: list[Path], max_bytes: int) -> bytes:
    if isinstance(image, bytes):
        data = image
    elif image.startswith("path:"):  # never guess: base64 of a JPEG starts with "/9j/"
        path = expand_home(image.removeprefix("path:"), field).resolve()
        allowed = [r.expanduser().resolve() for r in roots]
        if not any(path.is_relative_to(r) for r in allowed):
            shown = ", ".join(str(r) for r in allowed) or "none configured"
            raise Forbidden(f"{field}: {path} is outside the allowed image roots ({shown})", field=field)
        if not path.is_file():
            raise NotFound(f"{field}: no file at {path}", field=field)
        if path.stat().st_size > max_bytes:
            raise InvalidImage(
                f"{field}: {path.name} is {path.stat().st_size:,} bytes; the limit is {max_bytes:,}", field=field
            )
        data = path.read_bytes()
    else:
        if image.startswith("data:") and "," not in image:
            raise InvalidImage(f"{field}: a data URL needs its data after a comma (data:image/png;base64,...)",
                               field=field)  # fmt: skip
        text = image.split(",", 1)[1] if image.startswith("data:") else image
        if len(text) * 3 // 4 > max_bytes:
            raise InvalidImage(f"{field}: the image is over {max_bytes:,} bytes (max_bytes)", field=field)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage(
                f"{field}: not base64 (send base64 text, a data URL, or path:<file>)", field=field
            ) from None
    if len(data) > max_bytes:
        raise InvalidImage(
            f"{field}: the image is {len(data):,} bytes; the limit is {max_bytes:,} (max_bytes)", field=field
        )
    if not data:
        raise InvalidImage(f"{field}: the image is empty", field=field)
    return data


# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose does)
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip
# a point (x, y) of the upright photo (w x h) -> the same point in the stored pixels, for each transpose
_STORED = {
    "FLIP_LEFT_RIGHT": lambda x, y, w, h: (w - x, y),
    "FLIP_TOP_BOTTOM": lambda x, y, w, h: (x, h - y),
    "ROTATE_180": lambda x, y, w, h: (w - x, h - y),
    "ROTATE_90": lambda x, y, w, h: (h - y, x),
    "ROTATE_270": lambda x, y, w, h: (y, w - x),
    "TRANSPOSE": lambda x, y, w, h: (y, x),
    "TRANSVERSE": lambda x, y, w, h: (h - y, w - x),
}


class Photo:
    """A photo decoded no further than a call needs. A 40-megapixel photo as whole arrays (Pillow's, its RGB
    conversion, numpy's, the BGR copy) took a worker to ~0.9 GB; here the detector's copy comes from a reduced
    decode (a JPEG's DCT scaling, Pillow's `draft`), the full-size pixels are decoded only when a face is aligned
    or cropped, held once as Pillow holds them (8-bit gray or RGB), and only a face's region is ever copied out.
    EXIF orientation is applied to what is taken out, never to the whole photo (a rotation copies it)."""

    def __init__(self, data: bytes, *, field: str, max_pixels: int) -> None:
        self.data, self.field, self.max_pixels = data, field, max_pixels
        self.kind = "image"
        self._full: Any = None
        with self._reading():
            self._img: Any = (img := self._open())  # PNG's getexif decodes it: kept, not decoded again
            self.kind = f"{img.format} file" if img.format else self.kind
            self.format = img.format
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidImage(
                    f"{field}: the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} (max_pixels)",
                    field=field,
                )
            self.upright = _UPRIGHT.get(img.getexif().get(0x0112, 1))  # 0x0112: Orientation
        turned = self.upright in ("ROTATE_90", "ROTATE_270", "TRANSPOSE", "TRANSVERSE")
        self.width, self.height = (h, w) if turned else (w, h)  # as shown, upright

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3), as the BGR array of the whole photo would have."""
        return self.height, self.width, 3

    def scaled(self, long_side: int) -> tuple[np.ndarray, float, float]:
        """A BGR copy at most `long_side` long (what a detector sees), and the factors from its pixels back to the
        photo's (x, y). A JPEG is decoded at 1/2, 1/4 or 1/8 of its size where that is still at least as large."""
        from PIL import Image

        w, h = self.width, self.height
        s = min(1.0, long_side / max(w, h))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        whole = self._stored_size()
        stored = size if (w, h) == whole else (size[1], size[0])
        # decided by the photo alone, so that detect, embed and identify find the same boxes
        reducible = self.format == "JPEG" and min(whole[0] // stored[0], whole[1] // stored[1]) >= 2
        with self._reading():
            box = None
            if reducible:
                img = self._open()
                drafted = img.draft(None, stored)
                box = drafted[1] if drafted else None  # the drafted pixels that hold the whole photo
                img = _eight_bit_rgb(img)
            else:
                img = self._pixels()
            small = img if img.size == stored and box is None else img.resize(stored, Image.Resampling.BOX, box)
            bgr = self._bgr(small)
        return bgr, w / size[0], h / size[1]

    def region(self, box: tuple[float, float, float, float] | list[float]) -> tuple[np.ndarray, int, int]:
        """The BGR pixels of `box` (x1, y1, x2, y2 in the photo's pixels, clipped to the photo; at least one
        pixel), and the box's top-left corner."""
        w, h = self.width, self.height
        x1, y1, x2, y2 = _clip(box, w, h)
        with self._reading():
            full = self._pixels()
            if self.upright is None:
                crop = full.crop((x1, y1, x2, y2))
            else:
                to_stored = _STORED[self.upright]
                (a, b), (c, d) = to_stored(x1, y1, w, h), to_stored(x2, y2, w, h)
                crop = full.crop((min(a, c), min(b, d), max(a, c), max(b, d)))
            return self._bgr(crop), x1, y1

    def release(self) -> None:
        """Forget the full-size pixels (decoded again if a region is asked for later)."""
        self._full = self._img = None

    def _open(self) -> Any:
        from PIL import Image

        with warnings.catch_warnings():  # max_pixels is checked right after, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(self.data))

    def _stored_size(self) -> tuple[int, int]:
        turned = self.upright in ("ROTATE_90", "ROTATE_270", "TRANSPOSE", "TRANSVERSE")
        return (self.height, self.width) if turned else (self.width, self.height)

    def _pixels(self) -> Any:
        """The full-size pixels as stored (not turned upright), 8-bit gray or RGB; decoded once."""
        if self._full is None:
            img, self._img = self._img or self._open(), None
            self._full = _eight_bit_rgb(img)
        return self._full

    def _bgr(self, img: Any) -> np.ndarray:
        """A (small) Pillow image of the stored pixels, upright, as a BGR uint8 array."""
        from PIL import Image

        if self.upright is not None:
            img = img.transpose(Image.Transpose[self.upright])
        rgb = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
        return np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, as OpenCV and insightface expect

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Pillow's failures as a 400 naming the field."""
        from PIL import Image, UnidentifiedImageError

        field = self.field
        try:
            yield
        except InvalidImage:
            raise
        except UnidentifiedImageError:  # its message names a BytesIO object: nothing a user can act on
            raise InvalidImage(f"{field}: not a readable image (not a {READABLE} file)", field=field) from None
        except Image.DecompressionBombError as exc:  # past Pillow's own limit (2 x MAX_IMAGE_PIXELS)
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(found[1]):,} pixels" if found else "too many pixels"
            pillow = 2 * (Image.MAX_IMAGE_PIXELS or self.max_pixels)
            limit = f"{self.max_pixels:,} (max_pixels)" if self.max_pixels <= pillow else f"{pillow:,} (Pillow's)"
            raise InvalidImage(f"{field}: the image is {pixels}; the limit is {limit}", field=field) from None
        except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: Pillow's word for a malformed PNG chunk
            raise InvalidImage(f"{field}: not a readable image (a damaged {self.kind}: {_plain(exc)})",
                               field=field) from None  # fmt: skip


class ArrayPhoto:
    """A BGR uint8 array with a Photo's methods: what `FaceEngine.detect(array)` works from (a notebook, a bench)."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img
        self.height, self.width = img.shape[:2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return tuple(self.img.shape)

    def scaled(self, long_side: int) -> tuple[np.ndarray, float, float]:
        """A copy at most `long_side` long (area-averaged), and the factors back to the array's pixels."""
        import cv2

        h, w = self.height, self.width
        s = min(1.0, long_side / max(h, w))
        if s >= 1.0:
            return self.img, 1.0, 1.0
        small = cv2.resize(self.img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        return small, w / small.shape[1], h / small.shape[0]

    def region(self, box: tuple[float, float, float, float] | list[float]) -> tuple[np.ndarray, int, int]:
        """The pixels of `box` (clipped, at least one pixel) and its top-left corner."""
        x1, y1, x2, y2 = _clip(box, self.width, self.height)
        return self.img[y1:y2, x1:x2], x1, y1


def as_photo(img: Photo | ArrayPhoto | np.ndarray) -> Photo | ArrayPhoto:
    """A Photo as it is; an array wrapped in an ArrayPhoto."""
    return ArrayPhoto(img) if isinstance(img, np.ndarray) else img


def _clip(box: tuple[float, float, float, float] | list[float], w: int, h: int) -> tuple[int, int, int, int]:
    """`box` in whole pixels (outward), inside a w x h photo and at least one pixel."""
    x1, y1 = min(max(0, math.floor(box[0])), w - 1), min(max(0, math.floor(box[1])), h - 1)
    x2, y2 = max(min(w, math.ceil(box[2])), x1 + 1), max(min(h, math.ceil(box[3])), y1 + 1)
    return x1, y1, x2, y2


def decode(data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
    """Return the whole photo as one BGR uint8 array, upright (a full-size copy; the plugin works from a Photo)."""
    photo = Photo(data, field=field, max_pixels=max_pixels)
    return photo.region((0, 0, photo.width, photo.height))[0]


def _eight_bit_rgb(img: Any) -> Any:
    """Decode `img` as 8-bit gray or RGB (the modes a region or a scaled copy is taken from)."""
    img.load()
    img = eight_bit(img)
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def eight_bit(img: Any) -> Any:
    """A 16-bit or 32-bit (integer or float) gray image as 8-bit gray, scaled as cv2.imread scales 16 bits (the
    top 8 of them); Pillow's own convert clips each value at 255 (a 16-bit photo turns almost white). A 32-bit one
    holding 16-bit values is scaled the same; a float one in 0-1 to 0-255; any past those by its maximum. Done a
    band of rows at a time: a float32 copy of a 40-megapixel photo is 160 MB, and each step made one."""
    if img.mode.startswith("I;16"):
        return _banded(img, lambda a: (a.astype(np.uint16, copy=False) >> 8).astype(np.uint8))
    if img.mode not in ("I", "F"):
        return img
    top = max(float(_finite(a).max()) if a.size else 0.0 for a in _bands(img))
    k = 1.0
    if img.mode == "F" and top <= 1.0:
        k = 255.0
    elif img.mode == "I" and 255 < top <= 65535:
        k = 1 / 256.0
    elif top > 255:
        k = 255.0 / top
    return _banded(img, lambda a: np.clip(_finite(a) * k, 0, 255).astype(np.uint8))


BAND_ROWS = 256


def _bands(img: Any) -> Iterator[np.ndarray]:
    """The image's pixels, a band of rows at a time."""
    w, h = img.size
    for y in range(0, max(h, 1), BAND_ROWS):
        yield np.asarray(img.crop((0, y, w, min(h, y + BAND_ROWS))))


def _finite(a: np.ndarray) -> np.ndarray:
    return np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)


def _banded(img: Any, to_8bit: Callable[[np.ndarray], np.ndarray]) -> Any:
    """An 8-bit gray image made a band of rows at a time by `to_8bit`."""
    from PIL import Image

    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    for i, band in enumerate(_bands(img)):
        out[i * BAND_ROWS : i * BAND_ROWS + band.shape[0]] = to_8bit(band)
    return Image.fromarray(out, "L")


READABLE = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _plain(exc: BaseException) -> str:
    """The decoder's reason in words: object reprs (`<_io.BytesIO object at 0x...>`) left out."""
    text = _OBJECT_REPR.sub("", str(exc)).strip().rstrip(":").strip()
    return text or type(exc).__name__


THUMB_PX = 72


def thumbnail(img: Photo | ArrayPhoto | np.ndarray, bbox: list[float], size: int = THUMB_PX) -> str:
    """Return the face in `bbox` (with a margin, squared) as a small JPEG, base64: what a gallery shows."""
    import cv2

    photo = as_photo(img)
    x1, y1, x2, y2 = bbox
    side = max(x2 - x1, y2 - y1) * 1.3
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = photo.width, photo.height
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = photo.region((a, b, c, d) if c > a and d > b else (0, 0, w, h))[0]
    ok, jpg = cv2.imencode(".jpg", cv2.resize(crop, (size, size)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(jpg.tobytes()).decode() if ok else ""
