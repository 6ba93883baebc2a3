"""Uploads for rustyface: `POST /api/faces/{capability}` as multipart/form-data (files for the image fields,
plain fields for the rest), so a browser or `curl -F image=@photo.jpg` needs no base64. Built by
`RustyFace.routes(api)`. (No `from __future__ import annotations`: FastAPI must see the local dependency.)"""

import asyncio
import base64
import json
import math
import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from bkg_kernel.auth import Principal
from bkg_kernel.errors import InvalidInput
from bkg_kernel.runtime.bodyjson import BIG_BODY, RawJSON
from bkg_kernel.runtime.contract import Capability, GatewayAPI

MAX_FIELD_CHARS = 65_536  # a form field that is not a file: an option, parsed as JSON on the event loop


def build(api: GatewayAPI, capabilities: Mapping[str, Capability]) -> APIRouter:
    """Return the `/api/faces` upload router (scope faces:use; runs as the caller); `capabilities` (rustyface's)
    say which fields are text and which are lists."""
    router = APIRouter(prefix="/api/faces", tags=["faces"])
    faces = api.need("faces:use")

    @router.post("/{capability}")
    @api.big_bodies  # the form is streamed: photos up to the gateway's max_body_mb
    async def upload(capability: str, request: Request, p: Annotated[Principal, Depends(faces)]) -> Any:
        """Run `faces.<capability>` with the images uploaded as files (multipart/form-data)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidInput(
                "send multipart/form-data with the image as a file field (image=@photo.jpg)", field="body"
            )
        form = await request.form()
        found = capabilities.get(f"faces.{capability}")
        fields = found.input.model_fields if found is not None else {}
        data: dict[str, Any] = {}
        names: list[str] = []  # the files of a list of images, as uploaded: what an enroll names them by
        for key, value in form.multi_items():
            kinds = _kinds(fields[key].annotation) if key in fields else set()
            if isinstance(value, UploadFile):
                image = await asyncio.to_thread(_base64, await value.read())
                if kinds and all(get_origin(k) is list for k in kinds):  # `images`: one file field per image
                    names.append(value.filename or f"{key}[{len(data.get(key, []))}]")
                    data.setdefault(key, []).append(image)
                else:
                    data[key] = image
                continue
            if len(value) > MAX_FIELD_CHARS:  # options (a score, a gallery, a name), parsed here on the loop
                raise InvalidInput(f"form field {key!r} has {len(value):,} characters; an option takes at most "
                                   f"{MAX_FIELD_CHARS:,} (images go in file fields)", field=key)  # fmt: skip
            if kinds == {str}:  # a name is its text as typed: `gallery=2024` or `subject=null` is not a number
                data[key] = value
                continue
            try:
                data[key] = json.loads(value)
            except ValueError:  # not JSON, or a number past Python's 4,300 digits: the text itself
                data[key] = value
        if "sources" in fields and "sources" not in data and names and len(names) == len(data.get("images", [])):
            data["sources"] = names  # a face enrolled from photo.jpg says so, not images[0]
        # the photos go to the worker as JSON bytes made on a thread, which the pipe writes as they are: a dict of
        # tens of MB of base64 text was pickled on the event loop (~50 ms for a 32 MB photo)
        if any(_text_size(v) > BIG_BODY for v in data.values()):
            return await api.invoke("rustyface", f"faces.{capability}", await asyncio.to_thread(_raw, data), p)
        return await api.invoke("rustyface", f"faces.{capability}", data, p)

    return router


def _kinds(annotation: Any) -> set[Any]:
    """The types a field takes, None left out (`str | None` -> {str})."""
    union = get_origin(annotation) in (Union, types.UnionType)
    return {a for a in (get_args(annotation) if union else (annotation,)) if a is not type(None)}


def _text_size(value: Any) -> int:
    """The characters of a field's text: a string's, or a list's strings' (an enroll's images)."""
    if isinstance(value, str):
        return len(value)
    return sum(len(v) for v in value if isinstance(v, str)) if isinstance(value, list) else 0


def _raw(data: dict[str, Any]) -> RawJSON | dict[str, Any]:
    """The form as JSON bytes; one orjson cannot write as JSON reads it (an integer past 64 bits, a lone surrogate,
    Infinity: it would write null) goes as it is, to be refused by the worker as before (422 naming it)."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in data.values()):
        return data
    try:
        return RawJSON(orjson.dumps(data))
    except orjson.JSONEncodeError:
        return data


def _base64(raw: bytes) -> str:
    """`raw` as base64 text, 3 MB at a time: one call over a 30 MB photo would hold the interpreter ~70 ms."""
    step = 3 * 2**20  # a multiple of 3: the pieces join into the whole's encoding
    return "".join(base64.b64encode(raw[i : i + step]).decode() for i in range(0, len(raw), step))
