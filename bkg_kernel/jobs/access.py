"""Who sees a job: its owner, and an auditor (scope admin:audit). One rule for notebook runs, schedules and the
gateway's background jobs; anyone else gets the same 404 as for a job that does not exist."""

from __future__ import annotations

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
