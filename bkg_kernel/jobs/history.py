"""Runs and schedules as rows of the store's database (tables `job_runs` and `job_schedules`, migrations 0006 and
0008; a run's notebook path, `job_runs.path`, migration 0013).

Blocking: call these from a thread (the service does), never from the gateway's event loop. Times are Unix
seconds; `parameters` and `error` are JSON.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

RUN_COLUMNS = (
    "id",
    "notebook",
    "parameters",
    "state",
    "owner",
    "owner_id",
    "scopes",
    "key_id",
    "schedule_id",
    "retry_of",
    "retried_by",
    "attempt",
    "retries",
    "timeout_s",
    "executor",
    "created_at",
    "started_at",
    "finished_at",
    "cells_done",
    "cells_total",
    "output_path",
    "html_path",
    "error",
    "message",
    "path",
)
SCHEDULE_COLUMNS = (
    "id",
    "notebook",
    "parameters",
    "cron",
    "timezone",
    "enabled",
    "owner",
    "owner_id",
    "scopes",
    "key_id",
    "timeout_s",
    "retries",
    "webhook_url",
    "notify_success",
    "created_at",
    "last_fire",
    "last_run_id",
    "path",
)
# what a listing reads of a run: all but its parameters (up to 1 MiB each; `runs(params_up_to=...)`) and its path
LISTED_COLUMNS = tuple(c for c in RUN_COLUMNS if c not in ("parameters", "path"))
_JSON = ("parameters", "error")
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")
EDITABLE = ("cron", "timezone", "parameters", "timeout_s", "retries", "enabled", "last_fire", "key_id", "last_run_id")
log = logging.getLogger("bkg.jobs")


def _out(row: dict[str, Any]) -> dict[str, Any]:
    for k in _JSON:
        if k in row and isinstance(row[k], str):
            row[k] = json.loads(row[k])
    if "scopes" in row and row["scopes"] is not None:
        row["scopes"] = list(row["scopes"])
    return row


def _in(value: Any, column: str) -> Any:
    return json.dumps(value) if column in _JSON and value is not None else value


class History:
    """The job tables of an open Store (its connection and lock are shared)."""

    def __init__(self, store: Any) -> None:
        self.con, self.mutex = store._con, store._mutex  # noqa: SLF001

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.mutex:
            cur = self.con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [_out(dict(zip(names, r, strict=True))) for r in cur.fetchall()]

    def _upsert(self, table: str, columns: tuple[str, ...], row: dict[str, Any], where: str = "") -> None:
        cols = [c for c in columns if c in row]
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
        sql = (
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
            f"ON CONFLICT (id) DO UPDATE SET {sets} {where}"
        )
        with self.mutex:
            self.con.execute(sql, [_in(row[c], c) for c in cols])

    # -- runs -------------------------------------------------------------------------------------
    def save_run(self, run: dict[str, Any]) -> None:
        """Insert or update a run; a write of a run still going never replaces one that ended (a late progress
        write cannot undo the end)."""
        self._upsert(
            "job_runs", RUN_COLUMNS, run, "WHERE job_runs.finished_at IS NULL OR excluded.finished_at IS NOT NULL"
        )

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run, or None."""
        rows = self._rows("SELECT * FROM job_runs WHERE id = ?", [run_id])
        return rows[0] if rows else None

    def runs(
        self,
        owner_id: str | None = None,
        limit: int = 200,
        schedule_id: str | None = None,
        before: tuple[float, str] | None = None,
        params_up_to: int | None = None,
    ) -> list[dict[str, Any]]:
        """Runs, newest first (of the user `owner_id` only when given; only those older than `before`, the
        (created_at, id) of the last run of the page before, when given). With `params_up_to`, as a listing shows
        them: a run's parameters only when their JSON is at most that many bytes (else None), their size in
        `parameters_bytes`, and no path (a page of runs never reads, parses or sends their megabytes)."""
        where: list[str] = []
        params: list[Any] = []
        columns = "*"
        if params_up_to is not None:
            columns = (
                f"{', '.join(LISTED_COLUMNS)}, CASE WHEN strlen(parameters) <= ? THEN parameters END AS parameters, "
                "strlen(parameters) AS parameters_bytes"
            )
            params.append(params_up_to)
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        if schedule_id is not None:
            where.append("schedule_id = ?")
            params.append(schedule_id)
        if before is not None:  # the id breaks a tie: runs made at one instant are each on one page
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([before[0], before[0], before[1]])
        sql = f"SELECT {columns} FROM job_runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._rows(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit])

    def delete_run(self, run_id: str) -> bool:
        """Delete a finished run's row; whether there was one (a run still going is never deleted here)."""
        with self.mutex:
            row = self.con.execute(
                f"DELETE FROM job_runs WHERE id = ? AND state IN {FINISHED!r} RETURNING id", [run_id]
            ).fetchall()
        return bool(row)

    def set_html(self, run_id: str, path: str) -> bool:
        """Record a run's HTML rendering (an update only: a run deleted meanwhile stays deleted); whether the run is
        there."""
        with self.mutex:
            row = self.con.execute("UPDATE job_runs SET html_path = ? WHERE id = ? RETURNING id", [path, run_id])
            return bool(row.fetchall())

    def interrupted(self, alive_at: float | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """Mark runs that were queued or running when the gateway stopped as failed, ended when it was last seen
        alive (`alive_at`, its last heartbeat; never before the run's start or creation, the last time the run
        itself was known alive, which is all there is without a heartbeat); return them."""
        rows = self._rows("SELECT * FROM job_runs WHERE state IN ('queued', 'running')")
        now = time.time() if now is None else now
        for r in rows:
            seen = r["started_at"] or r["created_at"]
            r.update(
                state="failed",
                finished_at=min(max(seen, alive_at or seen), max(seen, now)),
                message="interrupted: the gateway stopped during this run",
                error={
                    "cell_index": None,
                    "source": None,
                    "ename": "GatewayStopped",
                    "evalue": "the gateway stopped while this run was queued or running",
                    "traceback": "",
                },
            )
            self.save_run(r)
        return rows

    def prune(self, keep: int, max_age_s: float) -> list[dict[str, Any]]:
        """Delete finished runs beyond each owner's newest `keep` or older than `max_age_s`; return the deleted rows
        (per owner: one user's many runs never push out another's history)."""
        done = self._rows(
            "SELECT id, output_path, html_path, finished_at, row_number() OVER (PARTITION BY owner_id "
            f"ORDER BY created_at DESC) AS n FROM job_runs WHERE state IN {FINISHED!r}"
        )
        cutoff = time.time() - max_age_s
        gone = [r for r in done if r["n"] > keep or (r["finished_at"] or 0) < cutoff]
        if gone:
            with self.mutex:
                self.con.execute("DELETE FROM job_runs WHERE id IN (SELECT unnest(?))", [[r["id"] for r in gone]])
        return gone

    # -- schedules --------------------------------------------------------------------------------
    def save_schedule(self, schedule: dict[str, Any]) -> None:
        """Insert or update a schedule."""
        self._upsert("job_schedules", SCHEDULE_COLUMNS, schedule)

    def mark_fired(self, schedule_id: str, fire: float, run_id: str | None) -> None:
        """Record a schedule's fire (an update only: a schedule deleted meanwhile stays deleted). Its last fire only
        moves forward: an edit of its cron that landed while this fire was recorded set it to the edit's time, and a
        fire of the new cron from before the edit must not run at the next tick."""
        with self.mutex:
            self.con.execute(
                "UPDATE job_schedules SET last_fire = greatest(coalesce(last_fire, ?), ?), "
                "last_run_id = coalesce(?, last_run_id) WHERE id = ?",
                [fire, fire, run_id, schedule_id],
            )

    def set_enabled(
        self, schedule_id: str, enabled: bool, last_fire: float | None = None, key_id: str | None = None
    ) -> None:
        """Enable or disable a schedule (an update only); enabling binds it to `key_id` (None: to no key)."""
        with self.mutex:
            self.con.execute(
                "UPDATE job_schedules SET enabled = ?, last_fire = coalesce(?, last_fire), "
                "key_id = CASE WHEN ? THEN ? ELSE key_id END WHERE id = ?",
                [enabled, last_fire, enabled, key_id, schedule_id],
            )

    def update_schedule(self, schedule_id: str, changes: dict[str, Any]) -> bool:
        """Change some of a schedule's fields (`EDITABLE` ones; an update only: a schedule deleted meanwhile stays
        deleted, and what a fire wrote meanwhile and `changes` leaves alone stands); whether it is there."""
        cols = [c for c in changes if c in EDITABLE]
        if not cols:
            return self.schedule(schedule_id) is not None
        sets = ", ".join(f"{c} = ?" for c in cols)
        with self.mutex:
            row = self.con.execute(
                f"UPDATE job_schedules SET {sets} WHERE id = ? RETURNING id",
                [*(_in(changes[c], c) for c in cols), schedule_id],
            )
            return bool(row.fetchall())

    def disable_if_bound(self, schedule_id: str, key_id: str | None) -> None:
        """Disable a schedule still bound to `key_id` (one turned on again meanwhile, with another key, stays on)."""
        with self.mutex:
            self.con.execute(
                "UPDATE job_schedules SET enabled = FALSE WHERE id = ? AND key_id IS NOT DISTINCT FROM ?",
                [schedule_id, key_id],
            )

    def pin_path(self, schedule_id: str, path: str) -> None:
        """Give a schedule that has no notebook path (made before migration 0011) `path` (an update only, of such a
        schedule only)."""
        with self.mutex:
            self.con.execute("UPDATE job_schedules SET path = ? WHERE id = ? AND path IS NULL", [path, schedule_id])

    def schedule(self, schedule_id: str) -> dict[str, Any] | None:
        """One schedule, or None."""
        rows = self._rows("SELECT * FROM job_schedules WHERE id = ?", [schedule_id])
        return rows[0] if rows else None

    def schedules(self) -> list[dict[str, Any]]:
        """Every schedule, oldest first."""
        return self._rows("SELECT * FROM job_schedules ORDER BY created_at")

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its runs stay in the history)."""
        with self.mutex:
            self.con.execute("DELETE FROM job_schedules WHERE id = ?", [schedule_id])
