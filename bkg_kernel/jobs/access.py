"""Who sees a job: its owner, and an auditor (scope admin:audit). One rule for notebook runs, schedules and the
gateway's background jobs; anyone else gets the same 404 as for a job that does not exist."""

from __future__ import annotations

from collections.abc import Set

SEE_ALL = "admin:audit"  # the scope that sees every job, whoever started it


def visible(
    owner: str | None, scopes: Set[str], username: str, *, owner_id: str | None = None, user_id: str | None = None
) -> bool:
    """Whether a caller (`username` with `scopes`) may see a job of `owner`. Where both user ids are known they
    decide, not the names: a user made later under a deleted user's name is someone else."""
    if SEE_ALL in scopes:
        return True
    if owner_id is not None and user_id is not None:
        return owner_id == user_id
    return owner == username
