"""Image inputs of rustyface: base64 (or a data URL), raw bytes (multipart uploads), or a path under an
allowed root. EXIF orientation is applied; size limits are checked before decoding the pixels."""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from bkg_kernel.errors import BkgError, Forbidden, NotFound, expand_home


class InvalidImage(BkgError):
    """The bytes are not a readable image, or too large (400)."""

    status = 400
    code = "invalid_image"


def load(image: str | bytes, *, field: str, roots: list[Path], max_bytes: int, max_pixels: int) -> np.ndarray:
    """Return a BGR uint8 array from base64 text (or a data URL), raw bytes, or `path:<file>`."""
    data = _bytes(image, field=field, roots=roots, max_bytes=max_bytes)
    return decode(data, field=field, max_pixels=max_pixels)


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


def decode(data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
    """Decode with Pillow (EXIF orientation applied), refusing images over `max_pixels` before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    kind = "image"
    try:
        img: Any = Image.open(io.BytesIO(data))
        kind = f"{img.format} file" if img.format else kind
        w, h = img.size
        if w * h > max_pixels:
            raise InvalidImage(
                f"{field}: the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", field=field
            )
        padded = -(-w // 32) * 32 * (-(-h // 32) * 32)  # the detector pads each side to a multiple of 32
        if padded > max_pixels:
            raise InvalidImage(f"{field}: the image is {w}x{h}, which face detection pads to {padded:,} pixels "
                               f"(each side a multiple of 32); the limit is {max_pixels:,}: crop it",
                               field=field)  # fmt: skip
        img = ImageOps.exif_transpose(img)
        rgb = np.asarray(eight_bit(img).convert("RGB"))
    except InvalidImage:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object: nothing a user can act on
        raise InvalidImage(f"{field}: not a readable image (not a {READABLE} file)", field=field) from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"{field}: not a readable image (too many pixels: {_plain(exc)})", field=field) from None
    except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: Pillow's word for a malformed PNG chunk
        raise InvalidImage(f"{field}: not a readable image (a damaged {kind}: {_plain(exc)})", field=field) from None
    return np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, as OpenCV and insightface expect


def eight_bit(img: Any) -> Any:
    """A 16-bit or 32-bit (integer or float) gray image as 8-bit gray, scaled as cv2.imread scales 16 bits (the
    top 8 of them); Pillow's own convert clips each value at 255 (a 16-bit photo turns almost white). A 32-bit one
    holding 16-bit values is scaled the same; a float one in 0-1 to 0-255; any past those by its maximum."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if img.mode not in ("I", "F"):
        return img
    a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if img.mode == "F" and top <= 1.0:
        a *= 255.0
    elif img.mode == "I" and 255 < top <= 65535:
        a /= 256.0
    elif top > 255:
        a *= 255.0 / top
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


READABLE = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _plain(exc: BaseException) -> str:
    """The decoder's reason in words: object reprs (`<_io.BytesIO object at 0x...>`) left out."""
    text = _OBJECT_REPR.sub("", str(exc)).strip().rstrip(":").strip()
    return text or type(exc).__name__


THUMB_PX = 72


def thumbnail(img: np.ndarray, bbox: list[float], size: int = THUMB_PX) -> str:
    """Return the face in `bbox` (with a margin, squared) as a small JPEG, base64: what a gallery shows."""
    import cv2

    x1, y1, x2, y2 = bbox
    side = max(x2 - x1, y2 - y1) * 1.3
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = img.shape[:2]
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = img[b:d, a:c] if c > a and d > b else img
    ok, jpg = cv2.imencode(".jpg", cv2.resize(crop, (size, size)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(jpg.tobytes()).decode() if ok else ""
