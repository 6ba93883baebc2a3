"""The gateway's background jobs over HTTP (`/api/jobs`): model downloads and plugin job capabilities.

A job and its result are visible to the one who started it and to auditors (scope admin:audit) only: another
caller gets the same 404 as for a job that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from bkg_kernel.auth import Principal
from bkg_kernel.errors import NotFound
from bkg_kernel.gateway.jobs import Job
from bkg_kernel.gateway.state import gateway, need

router = APIRouter(tags=["jobs"])
READ = Depends(need("plugins:read"))


def _job(request: Request, job_id: str, p: Principal) -> Job:
    job = gateway(request).jobs.get(job_id)
    if not job.visible_to(p.scopes, p.username):
        raise NotFound(f"no job {job_id!r}", field="job_id")
    return job


@router.get("/api/jobs")
async def list_jobs(request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """The caller's background jobs (every job for admin:audit), newest first."""
    jobs = sorted(gateway(request).jobs.jobs.values(), key=lambda j: j.created, reverse=True)
    return {"jobs": [j.to_dict() for j in jobs if j.visible_to(p.scopes, p.username)]}


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """One job: state, progress, result or error."""
    return _job(request, job_id, p).to_dict()


@router.post("/api/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, p: Annotated[Principal, READ]) -> dict[str, Any]:
    """Cancel a running job (its owner, or an auditor who also holds plugins:write)."""
    gw = gateway(request)
    job = _job(request, job_id, p)
    if job.owner != p.username:
        gw.principal(request, "plugins:write")
    return gw.jobs.cancel(job_id).to_dict()
