"""The gateway's background jobs over HTTP (`/api/jobs`): model downloads and plugin job capabilities."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from bkg_kernel.auth import Principal
from bkg_kernel.gateway.state import gateway, need

router = APIRouter(tags=["jobs"])


@router.get("/api/jobs", dependencies=[Depends(need("plugins:read"))])
async def list_jobs(request: Request) -> dict[str, Any]:
    """Background jobs, newest first."""
    jobs = sorted(gateway(request).jobs.jobs.values(), key=lambda j: j.created, reverse=True)
    return {"jobs": [j.to_dict() for j in jobs]}


@router.get("/api/jobs/{job_id}", dependencies=[Depends(need("plugins:read"))])
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    """One job: state, progress, result or error."""
    return gateway(request).jobs.get(job_id).to_dict()


@router.post("/api/jobs/{job_id}/cancel")
async def cancel_job(
    job_id: str, request: Request, p: Annotated[Principal, Depends(need("plugins:read"))]
) -> dict[str, Any]:
    """Cancel a running plugin job (its owner, or a key with plugins:write)."""
    gw = gateway(request)
    job = gw.jobs.get(job_id)
    if job.owner != p.username:
        gw.principal(request, "plugins:write")
    return gw.jobs.cancel(job_id).to_dict()
