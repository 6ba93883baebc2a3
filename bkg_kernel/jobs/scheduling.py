"""Schedules of notebook jobs: `Schedules`, the part of `JobService` that adds, lists, edits, turns on and off, runs
now and deletes them and fires their runs (a tick every `job_tick_s`); and the rules that a run and a schedule share:
`RUN_SCOPE`, the bounds of a run's timeout and retries, who may see one, and `KeyGone` for the API key one lives by.

A schedule's runs act as its owner with the scopes stored with it, as far as the owner (and the key it lives by) still
holds them when it fires (see `service.py`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bkg_kernel.auth import Principal
from bkg_kernel.errors import BkgError, Forbidden, InvalidInput, NotFound, TooManyRequests
from bkg_kernel.jobs import notebooks, schedule
from bkg_kernel.jobs.access import visible
from bkg_kernel.jobs.history import History
from bkg_kernel.jobs.webhooks import check_url
from bkg_kernel.settings import Settings

log = logging.getLogger("bkg.jobs")
RUN_SCOPE = "jobs:run"
MAX_TIMEOUT = 7 * 24 * 3600.0
EDITABLE_FIELDS = ("cron", "timezone", "parameters", "timeout_s", "retries", "enabled")  # PATCH a schedule


class Schedules:
    """The schedules of `JobService`, which it inherits: it holds what this declares."""

    settings: Settings
    history: History
    clock: Callable[[], float]
    roots: list[Path]
    live: dict[str, dict[str, Any]]  # queued and running runs
    schedule_changes: dict[str, int]

    if TYPE_CHECKING:  # JobService's, for the schedules' runs

        async def submit(
            self,
            p: Principal,
            notebook: str,
            parameters: Any = None,
            timeout_s: float | None = None,
            retries: int = 0,
            *,
            schedule_id: str | None = None,
            retry_of: str | None = None,
            attempt: int = 1,
            go_on: Callable[[], bool] | None = None,
        ) -> dict[str, Any]: ...

        def _checked(self, notebook: str, parameters: Any) -> tuple[Path, dict[str, Any]]: ...

        def _vouching_key(self, p: Principal) -> str | None: ...

        def _owner(self, row: dict[str, Any]) -> Principal | None: ...

        def _acting(self, row: dict[str, Any], what: str) -> Principal: ...

        async def _refused(self, s: dict[str, Any], exc: BkgError) -> dict[str, Any]: ...

        def _beat(self) -> None: ...

    async def add_schedule(self, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """Schedule a notebook as `p` (who must be able to run it now)."""
        p.require(RUN_SCOPE, "scheduling a notebook job")
        cron, tz = body.get("cron"), body.get("timezone") or "UTC"
        if not isinstance(tz, str):
            raise InvalidInput("timezone must be an IANA time zone name", field="timezone")
        await asyncio.to_thread(schedule.check, str(cron), tz)  # croniter's work, on a thread like every fire time
        path, params = await asyncio.to_thread(self._checked, str(body.get("notebook")), body.get("parameters"))
        webhook = body.get("webhook_url")
        if webhook is not None:
            await asyncio.to_thread(check_url, webhook, self.settings.webhook_allow)
        timeout_s, retries = body.get("timeout_s"), body.get("retries", 0)
        _check_limits(timeout_s, retries)
        owned = sum(1 for s in await asyncio.to_thread(self.history.schedules) if s["owner_id"] == p.user_id)
        if owned >= self.settings.job_max_schedules:
            raise TooManyRequests(
                f"{p.username} owns {owned} schedules (job_max_schedules {self.settings.job_max_schedules}): delete one"
            )
        now = self.clock()
        row = {
            "id": "sched-" + uuid.uuid4().hex[:10],
            "notebook": notebooks.relative_name(path, self.roots),
            "parameters": params,
            "cron": cron,
            "timezone": tz,
            "enabled": bool(body.get("enabled", True)),
            "owner": p.username,
            "owner_id": p.user_id,
            "scopes": sorted(p.scopes),
            "key_id": self._vouching_key(p),
            "timeout_s": timeout_s,
            "retries": retries,
            "webhook_url": webhook,
            "notify_success": bool(body.get("notify_success", False)),
            "created_at": now,
            "last_fire": now,
            "last_run_id": None,
            "path": str(path),  # what every fire runs (the name alone could come to mean another root's file)
        }
        await asyncio.to_thread(self.history.save_schedule, row)
        return await asyncio.to_thread(self._schedule_public, row)

    def _schedule_public(self, s: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k not in ("owner_id", "scopes", "path")}
        if not s["enabled"]:  # off: it has no next run
            out["next_run_at"] = None
            return out
        try:
            out["next_run_at"] = schedule.next_fire(s["cron"], s["timezone"], max(self.clock(), s["last_fire"] or 0))
        except Exception:  # a row stored before its cron or zone was checked this well: listed, never due
            out["next_run_at"] = None
        return out

    async def schedules(self, p: Principal) -> list[dict[str, Any]]:
        """Schedules `p` may see, with their next run time."""

        def listed() -> list[dict[str, Any]]:  # a next fire time each: croniter's work, off the event loop
            return [self._schedule_public(s) for s in self.history.schedules() if _sees(p, s)]

        return await asyncio.to_thread(listed)

    async def schedule(self, schedule_id: str, p: Principal) -> dict[str, Any]:
        """One schedule `p` may see (404 otherwise), as the listing shows it."""
        s = await self._visible_schedule(schedule_id, p)
        return await asyncio.to_thread(self._schedule_public, s)

    async def _visible_schedule(self, schedule_id: str, p: Principal) -> dict[str, Any]:
        s = await asyncio.to_thread(self.history.schedule, schedule_id)
        if s is None or not _sees(p, s):
            raise NotFound(f"no schedule {schedule_id!r}", field="schedule_id")
        return s

    def _vouch(self, s: dict[str, Any], p: Principal, doing: str, field: str | None = None) -> None:
        """Refuse `p` making a schedule's runs act (`doing`: turning it on, changing what it runs, running it now)
        unless they could have made it: `jobs:run` and every scope its runs act with (its owner's too: their key
        narrowed since gets no more through it), its owner still enabled."""
        whose = "your" if s["owner_id"] == p.user_id else f"{s['owner']}'s"
        p.require_all([RUN_SCOPE], f"{doing} {whose} schedule {s['id']!r}", field)
        if self._owner(s) is None:
            raise Forbidden(f"the schedule's owner {s['owner']!r} is disabled or deleted", field=field or "owner")
        p.require_all(s["scopes"], f"{doing} schedule {s['id']!r} (its runs act with them)", field)

    async def update_schedule(self, schedule_id: str, body: dict[str, Any], p: Principal) -> dict[str, Any]:
        """Change any of a schedule's cron, timezone, parameters, timeout_s, retries and enabled, checked as on
        create. `enabled` alone is `set_enabled`; any other change takes what turning it on takes (`_vouch`) and binds
        the schedule to the key of who made it, as turning it on does. A new cron or zone counts from now (no fire
        it would have had before now runs), and a fire on its way as the change lands is dropped: the next tick
        fires what the schedule is now."""
        changes = {k: v for k, v in body.items() if k in EDITABLE_FIELDS}
        if set(changes) <= {"enabled"}:
            if "enabled" not in changes:
                raise InvalidInput(f"nothing to change: give any of {', '.join(EDITABLE_FIELDS)}", field="body")
            return await self.set_enabled(schedule_id, bool(changes["enabled"]), p)
        s = await self._visible_schedule(schedule_id, p)
        self._vouch(s, p, "editing", next(k for k in changes if k != "enabled"))  # the refusal names what it changes
        cron, tz = changes.get("cron", s["cron"]), changes.get("timezone", s["timezone"])
        if "timezone" in changes and not isinstance(tz, str):
            raise InvalidInput("timezone must be an IANA time zone name", field="timezone")
        if "cron" in changes or "timezone" in changes:
            await asyncio.to_thread(schedule.check, str(cron), tz)
        if "parameters" in changes:
            target = s.get("path") or s["notebook"]
            _, changes["parameters"] = await asyncio.to_thread(self._checked, target, changes["parameters"])
        _check_limits(changes.get("timeout_s", s["timeout_s"]), changes.get("retries", s["retries"]))
        now = self.clock()
        enabled = bool(changes.get("enabled", s["enabled"]))
        changes["enabled"] = enabled
        if "cron" in changes or "timezone" in changes or (enabled and not s["enabled"]):
            changes["last_fire"] = max(s["last_fire"] or 0, now)
        changes["key_id"] = self._vouching_key(p)  # it lives as long as the key of who vouched for it last
        if not await asyncio.to_thread(self.history.update_schedule, s["id"], changes):
            raise NotFound(f"no schedule {schedule_id!r}", field="schedule_id")  # deleted meanwhile
        self._turned_off(s["id"])  # a fire read before this change is dropped
        return await asyncio.to_thread(self._schedule_public, {**s, **changes})

    async def run_schedule(self, schedule_id: str, p: Principal) -> dict[str, Any]:
        """Run a schedule now, on or off, as a fire would: as its owner, with the scopes it keeps as far as they and
        the key it lives by still hold them. Who asks must be able to have made it (`_vouch`): they set its runs
        acting."""
        s = await self._visible_schedule(schedule_id, p)
        self._vouch(s, p, "running", "schedule_id")
        owner = self._acting(s, "schedule")  # 403: its owner disabled, or the key it lives by gone
        run = await self.submit(
            owner, s.get("path") or s["notebook"], s["parameters"], s["timeout_s"], s["retries"], schedule_id=s["id"]
        )
        await asyncio.to_thread(self.history.update_schedule, s["id"], {"last_run_id": run["id"]})
        return run

    async def _schedule(self, schedule_id: str, p: Principal, *, enabled: bool | None = None) -> dict[str, Any]:
        """A schedule `p` may turn on or off (`enabled`) or delete (None): with `jobs:run`, or their own off
        without it (stopping one's own work takes no right to start it: a role or key that lost `jobs:run` still
        turns off a schedule that would fire and fail for them). Deleting takes `jobs:run`, its owner's too: a
        read-only key never destroys what is stored."""
        s = await self._visible_schedule(schedule_id, p)
        if not (enabled is False and s["owner_id"] == p.user_id):
            doing = {True: "turning on", False: "turning off", None: "deleting"}[enabled]
            whose = "your" if s["owner_id"] == p.user_id else f"{s['owner']}'s"
            field = None if enabled is None else "enabled"
            p.require_all([RUN_SCOPE], f"{doing} {whose} schedule {schedule_id!r}", field)
        return s

    async def set_enabled(self, schedule_id: str, enabled: bool, p: Principal) -> dict[str, Any]:
        """Enable (with `jobs:run`) or disable a schedule (enabling does not run the fires missed while it was
        off)."""
        s = await self._schedule(schedule_id, p, enabled=enabled)
        if enabled:  # its runs act as its owner with the scopes stored with it (as far as the owner holds them, now
            # and later): turning it on grants them all, so who turns it on holds them all (jobs:run: `_schedule`)
            if self._owner(s) is None:
                raise Forbidden(f"the schedule's owner {s['owner']!r} is disabled or deleted", field="enabled")
            p.require_all(s["scopes"], f"turning schedule {schedule_id!r} on (its runs act with them)", "enabled")
        s["enabled"] = enabled
        if enabled:
            s["last_fire"] = max(s["last_fire"] or 0, self.clock())
            s["key_id"] = self._vouching_key(p)  # from now on it lives as long as the key of who turned it on
        last_fire = s["last_fire"] if enabled else None
        await asyncio.to_thread(self.history.set_enabled, s["id"], enabled, last_fire, s.get("key_id"))
        if not enabled:
            self._turned_off(s["id"])
        return await asyncio.to_thread(self._schedule_public, s)

    async def delete_schedule(self, schedule_id: str, p: Principal) -> None:
        """Delete a schedule (its runs stay)."""
        s = await self._schedule(schedule_id, p)
        await asyncio.to_thread(self.history.delete_schedule, s["id"])
        self._turned_off(s["id"])

    def _turned_off(self, schedule_id: str) -> None:
        """Count a schedule turned off or deleted (once it is written: a tick that read it before drops its fire,
        one that reads it after sees it off; so no run of it is queued after the caller is answered)."""
        self.schedule_changes[schedule_id] = self.schedule_changes.get(schedule_id, 0) + 1

    def _pin_paths(self) -> None:
        """Give each schedule made before its notebook's full path was kept (migration 0011: it kept a name, which
        each fire resolved anew) the file its name resolves to now, once: the one it ran so far, and from now on
        runs even when another root gets a notebook of that name (as a schedule made now does). A name that leads to
        no one file now (gone, in two roots, outside them) stays a name: its fires fail saying why, as they did."""
        for s in self.history.schedules():
            if s.get("path"):
                continue
            try:
                path = notebooks.resolve(s["notebook"], self.roots)
            except BkgError as exc:
                log.info("schedule %s: %s stays a name to resolve at each fire: %s", s["id"], s["notebook"], exc)
                continue
            except Exception:  # one unreadable schedule never keeps the gateway from starting
                log.exception("schedule %s: cannot resolve its notebook %r", s["id"], s["notebook"])
                continue
            self.history.pin_path(s["id"], str(path))

    def _skip_missed(self) -> None:
        now = self.clock()
        for s in self.history.schedules():
            try:
                if schedule.due(s["cron"], s["timezone"], s["last_fire"] or 0, now) is not None:
                    self.history.mark_fired(s["id"], now, None)
            except Exception:  # one unreadable schedule never keeps the gateway from starting
                log.exception("schedule %s: cannot compute its fire times", s["id"])

    def _due(self, now: float) -> list[tuple[dict[str, Any], float]]:
        """The enabled schedules with a fire due at `now`, and that fire (blocking: croniter's work for every
        schedule, on a thread)."""
        due = []
        for s in self.history.schedules():
            if not s["enabled"]:
                continue
            try:
                fire = schedule.due(s["cron"], s["timezone"], s["last_fire"] or 0, now)
            except Exception:  # one unreadable schedule never stops the others
                log.exception("schedule %s: cannot compute its fire times", s["id"])
                continue
            if fire is not None:
                due.append((s, fire))
        return due

    async def _ticks(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking job schedules")
            if self.live:  # the runs going now are alive now
                try:
                    await asyncio.to_thread(self._beat)
                except OSError as exc:
                    log.warning("job runs' heartbeat not written: %s", exc)
            await asyncio.sleep(self.settings.job_tick_s)

    async def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Start the runs that schedules have due at `now` (default: the clock); return them."""
        now = self.clock() if now is None else now
        started = []
        changes = dict(self.schedule_changes)  # before the schedules are read (see `_turned_off`)
        for s, fire in await asyncio.to_thread(self._due, now):
            busy = any(r["schedule_id"] == s["id"] for r in self.live.values())  # queued counts: no backlog
            if busy and self.settings.job_overlap == "skip":
                log.info("schedule %s: skipped the %s fire, its last run is still going", s["id"], fire)
                await asyncio.to_thread(self.history.mark_fired, s["id"], fire, None)
                continue
            sid = s["id"]

            def go_on(sid: str = sid, seen: int = changes.get(sid, 0)) -> bool:
                return self.schedule_changes.get(sid, 0) == seen

            try:
                owner = self._acting(s, "schedule")
                run = await self.submit(owner, s.get("path") or s["notebook"], s["parameters"], s["timeout_s"],
                                        s["retries"], schedule_id=sid, go_on=go_on)  # fmt: skip
            except FireDropped:  # turned off or deleted as it fired: no run
                continue
            except BkgError as exc:  # the owner sees a failed run (and its webhook fires), once per fire
                run = await self._refused(s, exc)
                if isinstance(exc, KeyGone):  # for good: off until someone turns it on again with a key of theirs
                    await asyncio.to_thread(self.history.disable_if_bound, s["id"], s.get("key_id"))
            except Exception as exc:  # one schedule that meets a bug never keeps the others from firing
                log.exception("schedule %s: cannot fire", sid)
                run = await self._refused(s, BkgError(f"the schedule could not fire: {type(exc).__name__}: {exc}"))
            await asyncio.to_thread(self.history.mark_fired, s["id"], fire, run["id"])
            started.append(run)
        return started


class FireDropped(Exception):
    """A schedule's fire, dropped before its run was made: the schedule was turned off or deleted meanwhile."""


class KeyGone(Forbidden):
    """The API key a run or schedule lives by was revoked or has expired."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="key_id")


def _sees(p: Principal, row: dict[str, Any]) -> bool:
    """Whether `p` may see a run or schedule: its owner (by user id) or an auditor."""
    return visible(p, row["owner"], row.get("owner_id"))


def _check_limits(timeout_s: Any, retries: Any) -> None:
    """Refuse a timeout or a retry count out of bounds (422 naming the field)."""
    if timeout_s is not None and not (isinstance(timeout_s, int | float) and 0 < timeout_s <= MAX_TIMEOUT):
        raise InvalidInput(f"timeout_s must be a number of seconds from 1 to {MAX_TIMEOUT:.0f}", field="timeout_s")
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
        raise InvalidInput("retries must be an integer from 0 to 10", field="retries")
