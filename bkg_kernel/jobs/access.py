"""Who sees a job, and how much of it. A job is its owner's and an auditor's (scope admin:audit): anyone else gets
the same 404 as for a job that does not exist. What its work printed or made is for who holds the scopes it ran
with. One rule for notebook runs, schedules and the gateway's background jobs, over HTTP and the WebSocket."""

from __future__ import annotations

from collections.abc import Iterable

from bkg_kernel.auth.principal import Principal

SEE_ALL = "admin:audit"  # the scope that sees every job, whoever started it


def visible(p: Principal, owner: str | None, owner_id: str | None) -> bool:
    """Whether `p` may see a job of `owner` (user id `owner_id`). The ids decide, not the names: a user made later
    under a deleted user's name is someone else; only a row kept from before ids were recorded goes by name."""
    if SEE_ALL in p.scopes:
        return True
    if owner_id is not None:
        return owner_id == p.user_id
    return owner == p.username


def sees_detail(p: Principal, scopes: Iterable[str]) -> bool:
    """Whether `p`, who may see a job, sees what its work printed or made (a run's failed cell, error value,
    traceback and output notebook; a background job's result, error and messages): only who holds every scope it
    ran with. A run's printout is its data (a key it made, rows it read): its owner's narrower key (a lab kernel's)
    sees no more of it than an auditor without those scopes, that it failed and how (the exception's name)."""
    return set(scopes) <= p.scopes
