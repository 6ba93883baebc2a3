"""Jobs over HTTP (`/api/jobs`): notebook runs (papermill, kept in the store's database, ids `run-...`) and the
gateway's background jobs (model downloads, plugin job capabilities such as brainml.train; kept in memory).

A job is visible to the one who started it and to auditors (scope admin:audit) only: another caller gets the same
404 as for a job that does not exist. What its work printed or made (a failed cell's source, error and traceback,
its output notebook; a background job's result, error and messages) is for who holds the scopes it ran with, not
for every auditor nor for its owner's narrower key. Running or scheduling a notebook needs `jobs:run`, and so do
turning a schedule on, editing it, running it now and deleting it (all but deleting: with every scope its runs act
with); its owner turns a schedule off without it. Deleting a finished run takes `jobs:run` (someone else's: and
admin:audit). Cancelling a background job takes the scope its work needs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import mimetypes
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from bkg_kernel.auth import Principal
from bkg_kernel.errors import InvalidInput, NotFound, Unavailable
from bkg_kernel.gateway.jobs import Job
from bkg_kernel.gateway.jsonresp import FastJSONResponse, PagedJSONResponse
from bkg_kernel.gateway.state import gateway, need
from bkg_kernel.jobs import notebooks, schedule
from bkg_kernel.jobs.service import MAX_TIMEOUT, JobService
from bkg_kernel.strict import StrictBody

router = APIRouter(tags=["jobs"])
READ = Depends(need("plugins:read"))
RUN = Depends(need("jobs:run"))


NOTEBOOK = r"^[^\x00]*\.ipynb$"  # a path to a notebook; NUL never
# a name (`MON`, `JAN`, `L`) but never a lone R or H: croniter's random and hashed values have no fixed fire times
CRON_FIELD = r"(?:[0-9*?/,#-]|[A-GI-QS-Za-gi-qs-z]|[A-Za-z]{2,})+"
CRON = rf"^\s*{CRON_FIELD}(\s+{CRON_FIELD}){{4}}\s*$"  # five fields; their ranges are checked by the scheduler
MAX_PAGE = 10_000  # runs and jobs in one answer of GET /api/jobs
PAGE_CURSOR = "page-"  # a next_before: the (created_at, id) of a page's last job, which need not exist any more


class RunRequest(StrictBody):
    """Run a notebook under the job roots with parameters (checked against its `parameters` cell)."""

    notebook: str = Field(max_length=1000, pattern=NOTEBOOK, description="Path under a job root, e.g. jobs/x.ipynb.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT, description="Whole-run limit; then timed_out.")
    retries: int = Field(0, ge=0, le=10, description="Automatic re-runs after a failure or timeout.")

    @field_validator("notebook", mode="before")
    @classmethod
    def _notebook(cls, notebook: Any) -> Any:
        return notebook_path(notebook)


def notebook_path(notebook: Any) -> Any:
    """Say what a notebook path takes, rather than which pattern it missed."""
    if isinstance(notebook, str) and not re.match(NOTEBOOK, notebook):
        why = "a path cannot contain NUL" if "\x00" in notebook else "a notebook's path ends in .ipynb (jobs/x.ipynb)"
        raise PydanticCustomError("string_pattern_mismatch", why)
    return notebook


class ScheduleRequest(StrictBody):
    """Run a notebook on a cron schedule, as the caller."""

    notebook: str = Field(max_length=1000, pattern=NOTEBOOK)
    cron: str = Field(max_length=200, pattern=CRON, description="minute hour day month weekday, e.g. '0 3 * * *'")
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA time zone the cron is read in.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT)
    retries: int = Field(0, ge=0, le=10)
    webhook_url: str | None = Field(None, max_length=2000, description="Called on failure (and success if asked).")
    notify_success: bool = False
    enabled: bool = True

    @field_validator("cron", mode="before")
    @classmethod
    def _fixed(cls, cron: Any) -> Any:
        return fixed_cron(cron)

    @field_validator("notebook", mode="before")
    @classmethod
    def _notebook(cls, notebook: Any) -> Any:
        return notebook_path(notebook)


def fixed_cron(cron: Any) -> Any:
    """Say why a random or hashed field (croniter's R and H) is refused, or what a cron takes, rather than which
    pattern it missed."""
    why = schedule.drawn(cron)
    if why is not None:
        raise ValueError(why)
    if isinstance(cron, str) and len(cron) <= 200 and not re.match(CRON, cron):
        n = len(cron.split())
        why = (
            f"a cron is five fields, minute hour day month weekday, e.g. '0 3 * * *' (this one has {n})"
            if n != 5
            else "a cron field takes digits, names (MON, JAN, L) and * ? / , # - only, e.g. '0 3 * * MON-FRI'"
        )
        raise PydanticCustomError("string_pattern_mismatch", why)
    return cron


class SchedulePatch(StrictBody):
    """Change a schedule: any of these (checked as on create); `enabled` alone turns it on or off."""

    cron: str | None = Field(None, max_length=200, pattern=CRON, description="A new cron: fires count from now.")
    timezone: str | None = Field(None, min_length=1, max_length=64, description="IANA time zone the cron is read in.")
    parameters: dict[str, Any] | None = None
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT, description="null: no limit.")
    retries: int | None = Field(None, ge=0, le=10)
    enabled: bool | None = None

    @field_validator("cron", mode="before")
    @classmethod
    def _fixed(cls, cron: Any) -> Any:
        return fixed_cron(cron)

    @field_validator("cron", "timezone", "parameters", "retries", "enabled")
    @classmethod
    def _given(cls, value: Any) -> Any:
        """A field given as null would mean nothing (only timeout_s takes null: no limit)."""
        if value is None:
            raise ValueError("give a value or leave the field out")
        return value


def runs(request: Request) -> JobService:
    """The gateway's notebook job service."""
    svc = gateway(request).runs
    if svc is None:
        raise Unavailable("notebook jobs are not running in this gateway")
    return svc


def _job(request: Request, job_id: str, p: Principal) -> Job:
    gw = gateway(request)
    job = gw.jobs.get(job_id)
    if not job.visible_to(p):
        raise NotFound(f"no job {job_id!r}", field="job_id")
    return job


@router.get("/api/jobs", response_model=None)
async def list_jobs(
    request: Request,
    p: Annotated[Principal, READ],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="How many jobs, newest first.")] = 200,
    before: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="The last page's next_before (or a job's id): the jobs older."),
    ] = None,
    schedule_id: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only this schedule's notebook runs.")
    ] = None,
) -> FastJSONResponse:
    """The caller's jobs, notebook runs and background jobs together (every job for admin:audit), newest first, a
    page of `limit`; `next_before` is the `before` of the next page (null at the end: it holds on when the job the
    page ended with is deleted meanwhile), and a job's id is a `before` too. With `schedule_id`, only the runs of
    that schedule. A run's parameters are listed up to 4 KiB of JSON; larger ones are null here, their size in
    `parameters_bytes` (GET /api/jobs/{id} has them whole)."""
    svc = runs(request)
    cursor = await _cursor(request, svc, before, p) if before is not None else None
    gw = gateway(request)
    jobs = [j for j in gw.jobs.jobs.values() if j.visible_to(p)] if schedule_id is None else []
    notebook_runs = await svc.runs(p, limit + 1, cursor, schedule_id)

    def listed() -> FastJSONResponse:  # hundreds of jobs, a command's output each: built and encoded on a thread
        mine = [j.shown(p) | {"created_at": j.created} for j in jobs]
        if cursor is not None:
            mine = [j for j in mine if (j["created_at"], j["id"]) < cursor]
        both = sorted(mine + notebook_runs, key=lambda j: (j["created_at"], j["id"]), reverse=True)
        page = both[:limit]
        more = len(both) > limit
        return PagedJSONResponse({"jobs": page, "next_before": page_cursor(page[-1]) if more else None}, "jobs")

    return await asyncio.to_thread(listed)


def page_cursor(job: dict[str, Any]) -> str:
    """The `before` of the page after the one `job` ends: its (created_at, id), opaque."""
    raw = json.dumps([job["created_at"], job["id"]], separators=(",", ":")).encode()
    return PAGE_CURSOR + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_at(before: str) -> tuple[float, str]:
    """The (created_at, id) a `next_before` holds (422 naming `before` when it holds none)."""
    text = before[len(PAGE_CURSOR) :]
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise ValueError(at)
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(job_id)
    except (ValueError, TypeError, OverflowError):  # binascii.Error and a bad UTF-8 are ValueErrors
        raise InvalidInput(
            f"before {before[:60]!r} is no page's next_before (give it as a page gave it, or a job id)",
            field="query.before",
        ) from None
    return float(at), job_id


async def _cursor(request: Request, svc: JobService, before: str, p: Principal) -> tuple[float, str]:
    """The (created_at, id) `before` holds: a page's next_before, or the id of a job the caller may see (404 naming
    `before` if not)."""
    if before.startswith(PAGE_CURSOR):
        return _page_at(before)
    try:
        if before.startswith("run-"):
            return (await svc.get(before, p))["created_at"], before
        job = _job(request, before, p)
    except NotFound:
        raise NotFound(
            f"no job {before!r} (before: a page's next_before, or a job's id)", field="query.before"
        ) from None
    return job.created, job.id


@router.post("/api/jobs", status_code=202)
async def run_notebook(body: RunRequest, request: Request, p: Annotated[Principal, RUN]) -> dict[str, Any]:
    """Queue a notebook run as the caller; follow it under /api/jobs/{id} or on the WebSocket topic `jobs`."""
    return await runs(request).submit(p, body.notebook, body.parameters, body.timeout_s, body.retries)


@router.get("/api/jobs/notebooks")
async def job_notebooks(
    request: Request,
    p: Annotated[Principal, READ],
    notebook: Annotated[
        str | None, Query(max_length=1000, description="Only the notebook a run of this name would run.")
    ] = None,
) -> dict[str, Any]:
    """Notebooks under the job roots that may run as jobs, with their parameters (name, type, default, help); with
    `notebook`, the one a run of that name would run, found as the run would find it (its errors too)."""
    svc = runs(request)
    roots = [str(r) for r in svc.roots]
    if notebook is not None:
        path = await asyncio.to_thread(notebooks.resolve, notebook, svc.roots)
        return {"roots": roots, "notebooks": [await asyncio.to_thread(notebooks.entry, path, svc.roots)]}
    return {"roots": roots, "notebooks": await asyncio.to_thread(svc.notebooks)}


@router.get("/api/jobs/schedules")
async def list_schedules(request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """The caller's schedules (every schedule for admin:audit) with their next run time."""
    return {"schedules": await runs(request).schedules(p)}


@router.post("/api/jobs/schedules", status_code=201)
async def add_schedule(body: ScheduleRequest, request: Request, p: Annotated[Principal, RUN]) -> dict[str, Any]:
    """Schedule a notebook (its runs act as the caller, with the caller's scopes of now)."""
    return await runs(request).add_schedule(p, body.model_dump())


@router.get("/api/jobs/schedules/{schedule_id}")
async def get_schedule(schedule_id: str, request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """One schedule, as the listing shows it (its owner's, or any for admin:audit; anyone else: 404)."""
    return await runs(request).schedule(schedule_id, p)


@router.patch("/api/jobs/schedules/{schedule_id}")
async def patch_schedule(
    schedule_id: str, body: SchedulePatch, request: Request, p: Annotated[Principal, READ]
) -> dict[str, Any]:
    """Change a schedule (cron, timezone, parameters, timeout_s, retries, enabled; checked as on create). Turning it
    on or changing what it runs takes `jobs:run` and every scope it runs with (and makes it live by the caller's
    key); its owner turns it off with plugins:read (stopping one's own work takes no right to start it), anyone
    else with `jobs:run`."""
    return await runs(request).update_schedule(schedule_id, body.model_dump(exclude_unset=True), p)


@router.post("/api/jobs/schedules/{schedule_id}/run", status_code=202)
async def run_schedule(schedule_id: str, request: Request, p: Annotated[Principal, RUN]) -> dict[str, Any]:
    """Run a schedule now (on or off), as its fire would: as its owner, with its scopes as far as they still hold
    them; the caller needs `jobs:run` and every scope it runs with."""
    return await runs(request).run_schedule(schedule_id, p)


@router.delete("/api/jobs/schedules/{schedule_id}", status_code=204)
async def delete_schedule(schedule_id: str, request: Request, p: Annotated[Principal, RUN]) -> Response:
    """Delete a schedule (with `jobs:run`, its owner's too: a read-only key destroys nothing); its runs stay in the
    history."""
    await runs(request).delete_schedule(schedule_id, p)
    return Response(status_code=204)


@router.get("/api/jobs/{job_id}", response_model=None)
async def get_job(job_id: str, request: Request, p: Annotated[Principal, READ]) -> FastJSONResponse:
    """One job: state, progress, result or error (a notebook run: cells, output, and the failed cell). Encoded on
    a thread: a run carries its parameters (up to 1 MiB), a job its result, and clients poll this."""
    if job_id.startswith("run-"):
        run = await runs(request).get(job_id, p)
        return await asyncio.to_thread(FastJSONResponse, run)
    job = _job(request, job_id, p)
    return await asyncio.to_thread(lambda: FastJSONResponse(job.shown(p)))  # to_dict copies the result deeply


@router.delete("/api/jobs/{job_id}", status_code=204)
async def delete_job(job_id: str, request: Request, p: Annotated[Principal, READ]) -> Response:
    """Delete a finished notebook run and every file it left (output notebook, HTML): its owner with `jobs:run`,
    someone else's with `jobs:run` and admin:audit; a run still queued or running is a 409 (cancel it first)."""
    if not job_id.startswith("run-"):
        raise NotFound(f"no notebook run {job_id!r}", field="job_id")
    await runs(request).delete(job_id, p)
    return Response(status_code=204)


@router.get("/api/jobs/{job_id}/output")
async def job_output(
    job_id: str, request: Request, p: Annotated[Principal, READ], format: Literal["ipynb", "html"] = "ipynb"
) -> Any:
    """A notebook run's output notebook (`format=ipynb`; while it runs, as far as it got) or its HTML rendering
    (`format=html`, once it ended)."""
    svc = runs(request)
    found = await svc.output(job_id, p, format)
    media = "application/x-ipynb+json" if format == "ipynb" else "text/html"
    # a run's HTML is the notebook's own output (scripts included): shown sandboxed, never in the gateway's origin
    headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
    if isinstance(found, bytes):  # a running run's notebook so far, read whole (papermill rewrites it as it goes)
        headers["Content-Disposition"] = f'attachment; filename="{job_id}.{format}"'
        return Response(found, media_type=media, headers=headers)
    return FileResponse(found, media_type=media, filename=f"{job_id}.{format}", headers=headers)


@router.get("/api/jobs/{job_id}/files")
async def job_files(job_id: str, request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """The files a notebook run kept: what its notebook wrote into its run's folder (`BKG_RUN_FILES`,
    `bkg_kernel.jobs.kept.run_files()`), names relative to it, sizes and times; while it runs, those so far."""
    if not job_id.startswith("run-"):
        raise NotFound(f"no notebook run {job_id!r}", field="job_id")
    return {"files": await runs(request).kept_files(job_id, p)}


@router.get("/api/jobs/{job_id}/files/{name:path}")
async def job_file(job_id: str, name: str, request: Request, p: Annotated[Principal, READ]) -> Any:
    """One file a notebook run kept, as an attachment (a page it wrote is never shown in the gateway's origin)."""
    if not job_id.startswith("run-"):
        raise NotFound(f"no notebook run {job_id!r}", field="job_id")
    f, st = await runs(request).kept_file(job_id, p, name)
    filename = name.rsplit("/", 1)[-1]
    headers = {
        "Content-Security-Policy": "sandbox",
        "X-Content-Type-Options": "nosniff",
        "Content-Length": str(st.st_size),
        "Content-Disposition": f"attachment; filename*=utf-8''{quote(filename, safe='')}",
    }
    media = mimetypes.guess_type(filename)[0] or "application/octet-stream"

    def chunks() -> Iterator[bytes]:  # from the file as it was checked and opened, never by its path again
        with f:
            left = st.st_size
            while left > 0 and (chunk := f.read(min(left, 2**20))):
                left -= len(chunk)
                yield chunk

    return StreamingResponse(chunks(), media_type=media, headers=headers)  # a sync iterator: read on threads


@router.post("/api/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """Cancel a job: a notebook run's kernel is killed with its process group; a background job stops. A background
    job takes the scope its work needs, its owner's too (a key narrowed to reading stops no work, as for runs), and
    plugins:write for someone else's."""
    if job_id.startswith("run-"):
        return await runs(request).cancel(job_id, p)
    gw = gateway(request)
    job = _job(request, job_id, p)
    p.require(job.scope, f"cancelling job {job_id!r} ({job.kind})")
    if job.owner_id != p.user_id:
        gw.principal(request, "plugins:write")
    return gw.jobs.cancel(job_id).to_dict()


@router.post("/api/jobs/{job_id}/retry", status_code=202)
async def retry_job(job_id: str, request: Request, p: Annotated[Principal, RUN]) -> dict[str, Any]:
    """Run a finished notebook run again with the same notebook and parameters, as the caller."""
    if not job_id.startswith("run-"):
        raise NotFound(f"no notebook run {job_id!r}", field="job_id")
    return await runs(request).retry(job_id, p)
