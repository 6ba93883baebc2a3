"""Cron schedules (croniter) in a time zone: validation, the next fire time, and which fire is due now.

A schedule remembers the last fire time it ran for. At a tick, the newest fire time at or before now that is
later than that one is due: however many fires were missed while the gateway was down, one run catches up
(`job_catch_up`), like cron's anacron-style catch-up rather than a burst.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bkg_kernel.errors import InvalidInput, Unavailable

# croniter's `R` (a random value, drawn again by every croniter made: a schedule fired many times an hour) and `H`
# (a hashed one): a field, or a part of one (`R/10`, `H(0-29)`), that is the letter alone; `THU` and `MAR` are names
_DRAWN = re.compile(r"(?:^|[\s,/-])[RrHh](?=$|[\s,/(-])")


def zone(tz: str) -> ZoneInfo:
    """The time zone named `tz` (422 naming the field when unknown)."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: "America" is a folder of zones
        raise InvalidInput(
            f"unknown time zone {tz!r} (an IANA name such as 'Europe/Paris' or 'UTC')", field="timezone"
        ) from exc


def drawn(cron: str) -> str | None:
    """Why `cron` has no fixed fire times (croniter's random `R` or hashed `H`), or None when it has them."""
    if isinstance(cron, str) and _DRAWN.search(cron.strip()):
        return (f"{cron!r} uses R or H (a random or hashed value), which bkg does not take: a schedule fires at "
                "fixed times; pick them (e.g. '17 * * * *')")  # fmt: skip
    return None


def check(cron: str, tz: str) -> None:
    """Refuse a cron expression croniter cannot read (5 fields: minute hour day month weekday), or one with a
    random or hashed field (croniter's R and H)."""
    try:
        from croniter import croniter
    except ImportError as exc:
        raise Unavailable("schedules need croniter: pip install 'bkg-kernel[jobs]'", field="cron") from exc

    here = zone(tz)
    why = drawn(cron)
    if why is not None:
        raise InvalidInput(why, field="cron")
    if not isinstance(cron, str) or len(cron) > 200 or not croniter.is_valid(cron) or len(cron.split()) != 5:
        raise InvalidInput(
            f"{cron!r} is not a cron expression (minute hour day month weekday, e.g. '0 3 * * *')", field="cron"
        )
    try:  # readable is not enough: '0 0 30 2 *' (February 30th) never comes
        it = _croniter(cron, datetime.now(here))
        it.get_next(float)
        it.get_prev(float)
    except (ValueError, OverflowError) as exc:  # CroniterBadDateError is a ValueError
        raise InvalidInput(f"{cron!r} never fires ({exc})", field="cron") from None


def _croniter(cron: str, start: datetime) -> Any:
    """croniter over `cron` from `start`; a ValueError for a random or hashed field (a row stored before they were
    refused: listed without a next run, never due)."""
    from croniter import croniter

    why = drawn(cron)
    if why is not None:
        raise ValueError(why)
    return croniter(cron, start)


def next_fire(cron: str, tz: str, after: float) -> float:
    """The first fire time strictly after `after` (Unix seconds)."""
    return float(_croniter(cron, datetime.fromtimestamp(after, zone(tz))).get_next(float))


def latest_fire(cron: str, tz: str, now: float) -> float:
    """The newest fire time at or before `now` (croniter counts from whole seconds: one a second ahead of `now`,
    a fire at `now` included, and any fire past `now` stepped over)."""
    it = _croniter(cron, datetime.fromtimestamp(now + 1, zone(tz)))
    fire = float(it.get_prev(float))
    return float(it.get_prev(float)) if fire > now else fire


def due(cron: str, tz: str, last: float, now: float) -> float | None:
    """The fire time to run now, if one came after `last`; None when nothing is due.

    When the clocks go back, a wall time comes twice: a schedule at a fixed hour (`30 1 * * *`) runs at its first
    coming only, as Vixie cron does, unless that one was missed; one whose minute or hour is a wildcard
    (`0 * * * *`, `*/20 1 * * *`) runs at both, being about elapsed time."""
    fire = latest_fire(cron, tz, now)
    if fire <= last:
        return None
    local = datetime.fromtimestamp(fire, zone(tz))
    minute, hour = cron.split()[:2]
    if local.fold and not minute.startswith("*") and not hour.startswith("*"):
        first = local.replace(fold=0).timestamp()
        if first < fire and last >= first:  # the same wall time ran an hour ago
            return None
    return fire
