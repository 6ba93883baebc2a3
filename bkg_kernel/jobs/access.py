"""Who sees a job: its owner, and an auditor (scope admin:audit). One rule for notebook runs, schedules and the
gateway's background jobs; anyone else gets the same 404 as for a job that does not exist."""

from __future__ import annotations

from collections.abc import Set

SEE_ALL = "admin:audit"  # the scope that sees every job, whoever started it


def visible(owner: str | None, scopes: Set[str], username: str) -> bool:
    """Whether a caller (`username` with `scopes`) may see a job of `owner`."""
    return owner == username or SEE_ALL in scopes
