"""The model registry over HTTP (`/api/models`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ConfigDict, Field

from bkg_kernel.auth import Principal
from bkg_kernel.errors import InvalidInput, expand_home
from bkg_kernel.gateway.errors import ErrorField
from bkg_kernel.gateway.lanes import Lane
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.models.registry import ModelRegistry, slug
from bkg_kernel.strict import StrictBody

router = APIRouter(tags=["models"])
READ, WRITE = Depends(need("models:read")), need("models:write")
ModelId = Annotated[str, ErrorField("model")]  # as the registry's errors name it


class NewModel(StrictBody):
    """Register a model: `path` (a file or folder; outside the model dir needs `import_mode`) or `url`."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [  # exactly one of path or url
                {"required": ["path"], "properties": {"path": {"type": "string"}, "url": {"type": "null"}}},
                {"required": ["url"], "properties": {"url": {"type": "string"}, "path": {"type": "null"}}},
            ]
        },
    )
    path: str | None = Field(
        None, min_length=1, max_length=4096, description="Absolute (or `~/...`): a path on the gateway's machine."
    )
    url: str | None = Field(None, pattern=r"^https?://[^/?#]+/+[^/?#]", max_length=4096)
    id: str | None = Field(None, description="Defaults to the file name without its extension; never empty.")
    kind: (
        Literal["gguf-llm", "gguf-embedding", "hf-transformers", "onnx", "face-pack", "torch-program", "classifier"]
        | None
    ) = None
    license: str | None = None
    import_mode: Literal["copy", "link"] | None = None


def registry(request: Request) -> ModelRegistry:
    """Return the gateway's model registry."""
    return gateway(request).models


async def defaults_registered(request: Request) -> None:
    """Wait (once, right after start) until the packaged default models are registered."""
    ready = gateway(request).models_ready
    if not ready.is_set():
        await asyncio.to_thread(ready.wait, 120)


@router.get("/api/models", dependencies=[READ])
async def list_models(request: Request, kind: str | None = None) -> dict[str, Any]:
    """Every registered model (of one kind)."""
    await defaults_registered(request)
    reg = registry(request)  # the manifest is a file: read (and validated) on a thread, never on the loop
    return {"models": await asyncio.to_thread(lambda: [m.model_dump() for m in reg.list(kind)])}


@router.post("/api/models", status_code=201)
async def add_model(
    body: NewModel, request: Request, response: Response, p: Annotated[Principal, Depends(WRITE)]
) -> dict[str, Any]:
    """Register a model by path (201), or download it from a URL in the background (202 with a job)."""
    from bkg_kernel.models import download

    gw = gateway(request)
    reg = registry(request)
    if (body.path is None) == (body.url is None):
        raise InvalidInput("give exactly one of path or url", field="path")
    if body.url is not None:
        name = download.check_url(body.url)
        url, allow = body.url, gw.settings.download_allow
        model_id = slug(name) if body.id is None else body.id  # "" is a bad id, not the default one
        await asyncio.to_thread(reg.check_new, model_id, name)  # a bad or taken id: 422 / 409 now
        await asyncio.to_thread(download.check_host, url, allow)  # refused now (403), not in a failed job later
        max_bytes = int(gw.settings.max_download_mb * 2**20)

        def run(progress: Any) -> dict[str, Any]:
            entry = download.download(
                reg, url, progress, id=body.id, kind=body.kind, license=body.license, allow=allow, max_bytes=max_bytes,
                keep_free=gw.settings.min_free_mb * 2**20,
            )  # fmt: skip
            gw.auth.audit(p.username, "model.add", entry.id, source=url)
            return entry.model_dump()

        job = gw.jobs.start("models.download", run, owner=p, scope="models:write")
        response.status_code = 202
        return {"job": job.to_dict()}
    path = body.path
    assert path is not None
    if not expand_home(path, "path").is_absolute():  # relative to the gateway's working dir: no caller knows it
        raise InvalidInput(
            f"path {path[:200]!r} is relative: give an absolute path (a relative one would be looked up in the "
            "gateway's working directory; wb.add_model makes a notebook's relative path absolute)",
            field="path",
        )
    # a copy of gigabytes, hashed: on the import lane, never the pool every other route's store work uses
    entry = await _IMPORT.run(
        lambda: reg.add(path, id=body.id, kind=body.kind, license=body.license, import_mode=body.import_mode)
    )
    gw.auth.audit(p.username, "model.add", entry.id, path=entry.path)
    return entry.model_dump()


@router.get("/api/models/{model_id}", dependencies=[READ])
async def get_model(model_id: ModelId, request: Request) -> dict[str, Any]:
    """One model's manifest entry."""
    await defaults_registered(request)
    reg = registry(request)
    out: dict[str, Any] = await asyncio.to_thread(lambda: reg.get(model_id).model_dump())
    return out


# Hashing a model reads all of it (gigabytes): verifies run on their own two threads, never the pool every other
# route's store work uses, and a caller who piles them up gets a 429 instead of a queue of hours.
_VERIFY = Lane("bkg-verify", threads=2, max_pending=8, what="model verifications")
_IMPORT = Lane("bkg-import", threads=1, max_pending=4, what="model imports")


@router.post("/api/models/{model_id}/verify", dependencies=[READ])
async def verify_model(model_id: ModelId, request: Request) -> dict[str, Any]:
    """Recompute the sha256 and report drift."""
    result: dict[str, Any] = await _VERIFY.run(registry(request).verify, model_id)
    return result


@router.delete("/api/models/{model_id}")
async def remove_model(
    model_id: ModelId, request: Request, p: Annotated[Principal, Depends(WRITE)], delete_files: bool = False
) -> dict[str, Any]:
    """Unregister a model (and, with delete_files, delete its file from the model dir)."""
    gw = gateway(request)
    entry = await asyncio.to_thread(registry(request).remove, model_id, delete_files=delete_files)
    gw.auth.audit(p.username, "model.remove", model_id, delete_files=delete_files)
    return {"removed": entry.model_dump()}
