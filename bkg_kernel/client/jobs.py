"""The notebook side of jobs: `wb.jobs.run("jobs/x.ipynb", n=5)` runs a notebook under the job roots as the
caller and waits with a progress bar over its cells; `wb.jobs.list()` is a table of runs; a failed run shows the
cell that failed, its source and the error. `wb.jobs()` still lists every job (runs and background jobs)."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tqdm.auto import tqdm

from bkg_kernel.client.transport import request_bytes, seg
from bkg_kernel.display import Table
from bkg_kernel.errors import InvalidInput, JobFailed, Timeout

if TYPE_CHECKING:
    from bkg_kernel.client.workbench import Workbench

PAGE = 10_000  # the most jobs GET /api/jobs answers with at once
COLORS = {
    "succeeded": "#1a7f37", "done": "#1a7f37", "failed": "#cf222e", "timed_out": "#cf222e", "cancelled": "#6e7781",
}  # fmt: skip


def when(t: float | None, tz: str | None = None) -> str:
    """A time as this machine's clock shows it, or in zone `tz` (a schedule's own), with the zone's name."""
    if not t:
        return ""
    try:
        at = datetime.fromtimestamp(t, ZoneInfo(tz)) if tz else datetime.fromtimestamp(t).astimezone()
    except (ZoneInfoNotFoundError, ValueError):
        at = datetime.fromtimestamp(t).astimezone()
    return at.strftime("%Y-%m-%d %H:%M:%S %Z")


def said_goes_on(what: str, stop: str) -> None:
    """Tell whoever interrupted a wait that the work goes on in the gateway, and how to stop it."""
    print(f"stopped waiting: {what} goes on in the gateway; {stop} stops it", file=sys.stderr)


class Run(dict[str, Any]):
    """One notebook run: state, owner, timing, cells, output and, for a failure, the failed cell."""

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.get("state") == "succeeded"

    def ended(self) -> str:
        """How the run ended, once: its state, then the error or why it ended (`failed: ValueError: boom`)."""
        state, message = self["state"], self.get("message") or ""
        # the gateway's message already starts with the state ("failed: ...", "cancelled"): not said twice
        return message if message.startswith(state) else f"{state}: {message}" if message else state

    def _repr_html_(self) -> str:
        """A notebook run's line (cells done, parameters, the failed cell), or a background job's (`brainml.train`:
        its kind, progress and error), which `wb.jobs.get` returns too."""
        color = COLORS.get(self["state"], "#9a6700")
        if "notebook" in self:
            what = f"<code>{escape(self['notebook'])}</code>"
            done = f"{self.get('cells_done', 0)}/{self.get('cells_total', 0)} cells"
            took = self.get("duration_s")
        else:
            what = escape(str(self.get("kind", "")))
            done = f"{float(self.get('progress') or 0):.0%}"
            ended, began = self.get("finished"), self.get("created")
            took = ended - began if isinstance(ended, (int, float)) and isinstance(began, (int, float)) else None
        dur = f" {took:.1f} s" if took is not None else ""
        who = f" · {escape(str(self['owner']))}" if self.get("owner") else ""
        head = (
            f"<b>{escape(str(self['id']))}</b> {what} "
            f"<span style='color:{color};font-weight:bold'>{escape(self['state'])}</span> {done}{dur}{who}"
        )
        parts = [f"<div>{head}</div>"]
        if self.get("parameters"):
            params = ", ".join(f"{escape(k)}={escape(repr(v))}" for k, v in self["parameters"].items())
            parts.append(f"<div>parameters: <code>{params}</code></div>")
        elif self.get("parameters") is None and self.get("parameters_bytes"):  # a listing leaves large ones out
            parts.append(f"<div>parameters: {self['parameters_bytes']:,} bytes, in <code>wb.jobs.get(id)</code></div>")
        err = self.get("error")
        if isinstance(err, dict):
            where = f"cell {err['cell_index']}" if err.get("cell_index") is not None else "the run"
            parts.append(f"<div style='color:#cf222e'>{escape(where)}: {escape(str(err.get('ename')))}: "
                         f"{escape(str(err.get('evalue')))}</div>")  # fmt: skip
            if err.get("source"):
                parts.append(f"<pre style='background:#fff8f8;padding:4px'>{escape(err['source'])}</pre>")
        elif err:
            parts.append(f"<div style='color:#cf222e'>{escape(str(err))}</div>")
        if self.get("output_path"):
            parts.append(f"<div>output: <code>{escape(self['output_path'])}</code></div>")
        return "<div style='border-left:3px solid " + color + ";padding-left:6px'>" + "".join(parts) + "</div>"


class Page(str):
    """A run's output as an HTML page: still its text, but shown in a notebook as the page itself, in a sandboxed
    frame, as the jobs widget shows it: its styles stay inside, its scripts do not run (what the run's cells printed
    cannot act in the notebook)."""

    def _repr_html_(self) -> str:
        return (f"<iframe sandbox='' srcdoc='{escape(self, quote=True)}' "
                "style='width:100%;height:600px;border:1px solid #d0d7de'></iframe>")  # fmt: skip


def failure(err: dict[str, Any] | None) -> str:
    """A run's error in one line: where (a cell, or the run: one cancelled or lost ended in no cell), name, value."""
    if not err:
        return ""
    where = f"cell {err['cell_index']}" if err.get("cell_index") is not None else "the run"
    return f"{where}: {err.get('ename')}: {err.get('evalue')}"


class RunTable(Table):
    """Runs, newest first."""

    columns = ("id", "notebook", "state", "owner", "created", "duration_s", "cells", "error")

    def cells(self, row: dict[str, Any]) -> list[Any]:
        failed = failure(row.get("error"))
        return [row["id"], row.get("notebook", row.get("kind")), row["state"], row.get("owner"),
                when(row.get("created_at")), row.get("duration_s"),
                f"{row.get('cells_done', 0)}/{row.get('cells_total', 0)}", failed[:120]]  # fmt: skip


class KeptTable(Table):
    """The files a run kept."""

    columns = ("name", "bytes", "modified")

    def cells(self, row: dict[str, Any]) -> list[Any]:
        return [row["name"], row["bytes"], when(row.get("modified"))]


class ScheduleTable(Table):
    """Schedules with their next run time."""

    columns = ("id", "notebook", "cron", "timezone", "enabled", "owner", "next_run", "last_run_id")

    def cells(self, row: dict[str, Any]) -> list[Any]:
        return [row["id"], row["notebook"], row["cron"], row["timezone"], row["enabled"], row["owner"],
                when(row.get("next_run_at"), row.get("timezone")), row.get("last_run_id")]  # fmt: skip


class Jobs:
    """Notebook jobs through the gateway (`/api/jobs`)."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb

    def __call__(
        self, limit: int = 200, before: str | None = None, *, schedule_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The jobs the caller may see (notebook runs and background jobs), newest first: `limit` of them, older
        than `before` when given (a page's `next_before`, or a job's id); only the runs of schedule `schedule_id` when
        given. A run's parameters larger than 4 KiB of JSON are None here (`parameters_bytes` says how large): `get`
        has them."""
        return list(self.page(limit, before, schedule_id=schedule_id)["jobs"])

    def page(self, limit: int = 200, before: str | None = None, *, schedule_id: str | None = None) -> dict[str, Any]:
        """One page of `GET /api/jobs`: its `jobs` and its `next_before` (the `before` of the next page, which holds
        even once the job the page ended with is deleted; None at the end); only the runs of schedule `schedule_id`
        when given."""
        params: dict[str, Any] = {"limit": limit} | ({"before": before} if before is not None else {})
        if schedule_id is not None:
            params["schedule_id"] = schedule_id
        return dict(self.wb.call("GET", "/api/jobs", params=params))

    def notebooks(self, notebook: str | None = None) -> list[dict[str, Any]]:
        """Notebooks that may run as jobs, with their parameters; with `notebook`, the one a run of that name would
        run (found by the gateway as the run would be)."""
        params = {"notebook": notebook} if notebook is not None else None
        return list(self.wb.call("GET", "/api/jobs/notebooks", params=params)["notebooks"])

    def submit(
        self, notebook: str, parameters: dict[str, Any] | None = None, *, timeout_s: float | None = None,
        retries: int = 0,
    ) -> Run:  # fmt: skip
        """Queue a run and return it at once."""
        body = {"notebook": notebook, "parameters": parameters or {}, "timeout_s": timeout_s, "retries": retries}
        return Run(self.wb.call("POST", "/api/jobs", json=body))

    def run(
        self, notebook: str, parameters: dict[str, Any] | None = None, *, timeout_s: float | None = None,
        retries: int = 0, wait: bool = True, progress: bool = True, raise_on_failure: bool = False, **params: Any,
    ) -> Run:  # fmt: skip
        """Run a notebook with parameters (a dict or keywords) and wait for it with a progress bar over its cells."""
        run = self.submit(notebook, {**(parameters or {}), **params}, timeout_s=timeout_s, retries=retries)
        if not wait:
            return run
        run = self.wait(run["id"], progress=progress)
        if raise_on_failure and not run.ok:
            raise JobFailed(f"run {run['id']} {run.ended()}", state=run["state"], field="job_id")
        return run

    def get(self, run_id: str) -> Run:
        """One run."""
        return Run(self.wb.call("GET", f"/api/jobs/{seg(run_id)}"))

    def wait(
        self, run_id: str, *, progress: bool = True, timeout: float | None = None,
        cancel_hint: str = "wb.jobs.cancel({id!r})",
    ) -> Run:  # fmt: skip
        """Wait for a run to end (and its automatic retries), with a progress bar; return the last attempt.

        Interrupting the wait (Ctrl-C, the notebook's stop button) stops only the waiting: the run belongs to the
        gateway and goes on (as a jupyter-scheduler job does), and the message says how to stop it: `cancel_hint`
        with the run's `{id}` (the CLI's says `bkg jobs cancel {id}`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=1, desc=run_id, unit="cell", disable=not progress, leave=False)
        try:
            while True:
                run = self.get(run_id)
                bar.total = max(1, run.get("cells_total") or 1)
                bar.n = run.get("cells_done", 0)
                bar.set_postfix_str(f"{run['state']} {run.get('message', '')}"[:60], refresh=True)
                if run["finished_at"] is not None:
                    retry = self._retry_of(run)
                    if retry is None:
                        return run
                    run_id = retry
                if deadline is not None and time.monotonic() > deadline:
                    raise Timeout(f"run {run_id} still {run['state']} after {timeout:g}s", field="job_id")
                time.sleep(0.2)
        except KeyboardInterrupt:
            said_goes_on(f"run {run_id}", cancel_hint.format(id=run_id))
            raise
        finally:
            bar.close()

    def _retry_of(self, run: Run) -> str | None:
        """The automatic retry a failed run was replaced by (set before its end is published)."""
        return None if run["state"] == "succeeded" else run.get("retried_by")

    def list(self, limit: int = 50, before: str | None = None, *, schedule_id: str | None = None) -> RunTable:
        """Notebook runs, newest first (a table in a notebook): `limit` of them (as many pages as that takes), older
        than `before` when given (a run's id, or a page's `next_before`); only the runs of schedule `schedule_id` when
        given. Their parameters as a listing has them (large ones left out): `get(run_id)` for a run's own."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:  # -1 had left out the oldest
            raise InvalidInput(f"limit must be a whole number from 1, not {limit!r}", field="limit")
        found: list[dict[str, Any]] = []
        while len(found) < limit:
            page = self.page(min(limit - len(found), PAGE), before, schedule_id=schedule_id)
            found += [j for j in page["jobs"] if j.get("kind") == "notebook"]
            before = page.get("next_before")
            if before is None:
                break
        return RunTable(found[:limit])

    def cancel(self, run_id: str) -> Run:
        """Cancel a queued or running run (its kernel is killed)."""
        return Run(self.wb.call("POST", f"/api/jobs/{seg(run_id)}/cancel"))

    def retry(self, run_id: str) -> Run:
        """Run a finished run again: the same notebook file, parameters, timeout and retries."""
        return Run(self.wb.call("POST", f"/api/jobs/{seg(run_id)}/retry"))

    def delete(self, run_id: str) -> None:
        """Delete a finished run and the files it left (its output notebook and HTML); cancel a running one first."""
        self.wb.call("DELETE", f"/api/jobs/{seg(run_id)}")

    def output(self, run_id: str, format: str = "ipynb") -> str:
        """The run's output notebook (JSON text; while it runs, as far as it got) or, once it ended, its HTML
        rendering (`format="html"`: a `Page`, which a notebook shows as the page rather than its source)."""
        text = str(self.wb.call("GET", f"/api/jobs/{seg(run_id)}/output", params={"format": format}))
        return Page(text) if format == "html" else text

    def files(self, run_id: str) -> KeptTable:
        """The files the run kept: what its notebook wrote into its run's folder (`bkg_kernel.jobs.kept.run_files()`,
        `BKG_RUN_FILES`), a table in a notebook; while it runs, those so far."""
        return KeptTable(self.wb.call("GET", f"/api/jobs/{seg(run_id)}/files")["files"])

    def file(
        self, run_id: str, name: str, to: str | os.PathLike[str] | None = None, *, max_bytes: int | None = None
    ) -> bytes:
        """One file the run kept, by its name in `files` (`"out/report.csv"`); with `to`, also written there. With
        `max_bytes`, a file longer than that is a 413 (read no further)."""
        path = "/".join(seg(part) for part in str(name).split("/"))  # each part a segment: '/' stays the separator
        data = request_bytes(self.wb.http, "GET", f"/api/jobs/{seg(run_id)}/files/{path}", max_bytes=max_bytes)
        if to is not None:
            Path(to).write_bytes(data)
        return data

    def schedule(
        self, notebook: str, cron: str, parameters: dict[str, Any] | None = None, *, timezone: str = "UTC",
        **options: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """Run a notebook on a cron schedule as the caller (options: timeout_s, retries, webhook_url, ...)."""
        body = {"notebook": notebook, "cron": cron, "parameters": parameters or {}, "timezone": timezone, **options}
        return dict(self.wb.call("POST", "/api/jobs/schedules", json=body))

    def schedules(self) -> ScheduleTable:
        """Schedules with their next run time (a table in a notebook)."""
        return ScheduleTable(self.wb.call("GET", "/api/jobs/schedules")["schedules"])

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        """One schedule with its next run time."""
        return dict(self.wb.call("GET", f"/api/jobs/schedules/{seg(schedule_id)}"))

    def update_schedule(self, schedule_id: str, **changes: Any) -> dict[str, Any]:
        """Change a schedule: any of cron, timezone, parameters, timeout_s, retries, enabled."""
        return dict(self.wb.call("PATCH", f"/api/jobs/schedules/{seg(schedule_id)}", json=changes))

    def run_schedule(self, schedule_id: str) -> Run:
        """Run a schedule now (as its owner, as its fire would); return the run at once."""
        return Run(self.wb.call("POST", f"/api/jobs/schedules/{seg(schedule_id)}/run"))

    def enable(self, schedule_id: str, enabled: bool = True) -> dict[str, Any]:
        """Enable (or disable) a schedule."""
        return dict(self.wb.call("PATCH", f"/api/jobs/schedules/{seg(schedule_id)}", json={"enabled": enabled}))

    def disable(self, schedule_id: str) -> dict[str, Any]:
        """Disable a schedule."""
        return self.enable(schedule_id, False)

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its runs stay)."""
        self.wb.call("DELETE", f"/api/jobs/schedules/{seg(schedule_id)}")
