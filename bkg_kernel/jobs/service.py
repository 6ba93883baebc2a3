"""Notebook jobs in the gateway: submit, queue, execute (never here: on the executor), keep, cancel, retry,
schedule, notify.

A run acts as its owner: it gets a bkg key made for it alone, with the scopes its owner held when they started
(or scheduled) it and still hold, expiring after the run's timeout and revoked when it ends; the kernel sees that
key and never the admin key. A run or schedule made with an API key lives no longer than that key: once it is
revoked or expired, a running run's key is revoked with it (the key derives from it and expires no later), a
queued run fails before it starts and a schedule turns itself off at its next fire (until
someone who holds its scopes turns it on again, with a key of their own). A login session or a Hub token stands for
the user, not a key: what it made lives as long as the user's role allows.

Every state change and cell is published on the WebSocket topic `jobs` (plugin `notebook`), and written to the
store's database on a thread. The schedules' part of `JobService` is `scheduling.Schedules`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from bkg_kernel.auth import AuthService, Principal
from bkg_kernel.auth.service import RUN_KEY, RUN_KEY_PREFIX
from bkg_kernel.errors import BkgError, Conflict, Forbidden, NotFound, TooManyRequests
from bkg_kernel.jobs import files, kept, notebooks
from bkg_kernel.jobs.access import SEE_ALL, sees_detail
from bkg_kernel.jobs.history import FINISHED, History
from bkg_kernel.jobs.pool import Executor, LocalPool
from bkg_kernel.jobs.scheduling import MAX_TIMEOUT, RUN_SCOPE, FireDropped, KeyGone, Schedules, _check_limits, _sees
from bkg_kernel.jobs.webhooks import notify
from bkg_kernel.settings import Settings, scrubbed_env

HTML_WAIT_S = 60.0  # a finished run's HTML is asked for before nbconvert wrote it: the request waits this long
CANCEL_WAIT_S = 5.0  # a cancel answers once the run's kernel is gone and the run ended, if that takes no longer
HEARTBEAT = "gateway.alive"  # in runs/: its mtime is the last time this gateway's runs were seen alive

log = logging.getLogger("bkg.jobs")
Emit = Callable[[str, str, dict[str, Any]], None]
KEY_GRACE = 3600.0  # a run's key outlives its timeout by this much (a wait for a busy cluster, a late end)
LISTED_PARAMS = 4096  # bytes of JSON: a run's parameters up to this size are in a listing, larger ones only in GET


class JobService(Schedules):
    """Runs and schedules of notebook jobs (one per gateway; `start()` in the gateway's event loop)."""

    def __init__(
        self,
        settings: Settings,
        store: Any,
        auth: AuthService,
        emit: Emit,
        gateway_url: str,
        clock: Callable[[], float] = time.time,
        executor: Executor | None = None,
        confirm: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings, self.auth, self.emit, self.clock = settings, auth, emit, clock
        # asks whoever vouches for a run's owner (JupyterHub, for its users) whether their role still stands, just
        # before a run acts as them: it raises a BkgError when it does not
        self.confirm = confirm
        self.history = History(store)
        self.data_dir = Path(store.data_dir)
        self.roots = [Path(r) for r in (settings.job_roots or notebooks.default_roots(self.data_dir))]
        self.file_roots = [Path(r) for r in (settings.job_file_roots or [self.data_dir / files.FOLDER])]
        self.runs_dir = self.data_dir / "runs"
        self.gateway_url = gateway_url
        self.executor = executor
        self.live: dict[str, dict[str, Any]] = {}  # queued and running runs
        # run id -> its HTML path (None: none came), resolved by the "html" event that follows a run's end
        self.rendering: dict[str, asyncio.Future[str | None]] = {}
        self.kill_reason: dict[str, str] = {}
        self.dispatched: set[str] = set()  # handed to the executor, waiting for a worker or running
        # schedule id -> times it was turned off or deleted: a fire on its way when that happened is dropped
        self.schedule_changes: dict[str, int] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.queue: asyncio.Queue[str] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.background: set[asyncio.Task[Any]] = set()

    def max_output_bytes(self) -> int:
        """Bytes of output a run keeps, printed or shown (`outputcap`): the setting job_max_output_bytes."""
        return int(self.settings.job_max_output_bytes)

    # -- life -------------------------------------------------------------------------------------
    def _executor(self) -> Executor:
        s = self.settings
        if s.job_executor.startswith("dask://"):
            from bkg_kernel.jobs.cluster import DaskExecutor

            return DaskExecutor(s.job_executor, s.job_workers)
        env = scrubbed_env()
        env.update(BKG_GATEWAY_URL=self.gateway_url, BKG_DATA_DIR=str(self.data_dir), PYTHONUNBUFFERED="1")
        here = str(Path(__file__).resolve().parents[2])  # this checkout first on the workers' path (as the gateway)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        return LocalPool(s.job_workers, env, self.runs_dir / "workers.log")

    async def start(self, recover: bool = True) -> None:
        """Mark runs the last gateway left unfinished, start the executor, the dispatchers and the schedule ticks."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.queue = asyncio.Queue()
        if recover:
            alive_at = await asyncio.to_thread(self._last_beat)
            for r in await asyncio.to_thread(self.history.interrupted, alive_at, self.clock()):
                self._publish(r)
            await asyncio.to_thread(self._revoke_stale_keys)
        if self.executor is None:
            self.executor = self._executor()
        await self.executor.start()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._dispatch()) for _ in range(self.executor.capacity)]
        await asyncio.to_thread(self._pin_paths)
        if not self.settings.job_catch_up:
            await asyncio.to_thread(self._skip_missed)
        self.tasks.append(loop.create_task(self._ticks()))

    async def close(self) -> None:
        """Stop dispatching and ticking, end running runs (marked failed at the next start, ended now) and the
        executor."""
        if self.live:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._beat)
        for timer in self.timers.values():
            timer.cancel()
        tasks = [*self.tasks, *self.background]
        for t in tasks:
            t.cancel()
        if self.executor is not None:
            for run_id in list(self.dispatched):
                with contextlib.suppress(Exception):
                    await self.executor.kill(run_id)
            await self.executor.close()
        await asyncio.gather(*tasks, return_exceptions=True)  # their key revocations land before the store closes

    def _beat(self) -> None:
        """Note that the runs going now are alive now (the heartbeat file's mtime, on the service's clock): a run the
        gateway's stop interrupts ends there, at most a tick before it stopped, not when it starts again."""
        path = self.runs_dir / HEARTBEAT
        path.touch()
        now = self.clock()
        os.utime(path, (now, now))

    def _last_beat(self) -> float | None:
        """When the last gateway on this data dir last saw its runs alive (None: it never had any)."""
        try:
            return (self.runs_dir / HEARTBEAT).stat().st_mtime
        except OSError:
            return None

    def _revoke_stale_keys(self) -> None:
        """Revoke run keys no live run holds (a gateway that died mid-run left them valid), and the keys named as a
        run's from before run keys were marked (a dead gateway's run keys, or keys named like them: revoking takes
        away only, and such names are no caller's now)."""
        for rec in list(self.auth.keys.values()):
            unmarked = rec.run_id is None and rec.name.startswith(RUN_KEY_PREFIX)
            if unmarked or (rec.run_id is not None and rec.run_id not in self.live):
                self._revoke(rec.id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- runs -------------------------------------------------------------------------------------
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
    ) -> dict[str, Any]:
        """Check the notebook and its parameters (before anything runs), then queue a run as `p`; `go_on`, asked
        (on the event loop, with no wait in between) before the run is made and again before it is queued: False
        drops it (`FireDropped` before it is made, cancelled after)."""
        p.require(RUN_SCOPE, "running a notebook job")
        _check_limits(timeout_s, retries)
        waiting = sum(1 for r in self.live.values() if r["owner_id"] == p.user_id)
        if waiting >= self.settings.job_max_waiting:  # one user's thousand runs would queue before everyone else's
            raise TooManyRequests(
                f"{p.username} has {waiting} runs queued or running (job_max_waiting {self.settings.job_max_waiting})"
            )

        def checked() -> tuple[Path, dict[str, Any], int]:  # and their size, once: listings and events use it
            path, params = self._checked(notebook, parameters)
            return path, params, len(json.dumps(params))

        path, params, size = await asyncio.to_thread(checked)
        if go_on is not None and not go_on():
            raise FireDropped
        run = new_run(
            notebook=notebooks.relative_name(path, self.roots), path=str(path), parameters=params,
            owner=p.username, owner_id=p.user_id, scopes=sorted(p.scopes), key_id=self._vouching_key(p),
            schedule_id=schedule_id, retry_of=retry_of, attempt=attempt, retries=retries, timeout_s=timeout_s,
            executor=self.settings.job_executor, created_at=self.clock(),
        )  # fmt: skip
        run["parameters_bytes"] = size
        run_id = run["id"]
        self.live[run_id] = run
        await asyncio.to_thread(self.history.save_run, run)
        if go_on is not None and not go_on():
            await self._finish(run, "cancelled", {"ename": "Cancelled", "evalue": "its schedule was turned off"})
            return public(run)
        self._publish(run)
        assert self.queue is not None, "JobService.start() was not called"
        self.queue.put_nowait(run_id)
        return public(run)

    def _checked(self, notebook: str, parameters: Any) -> tuple[Path, dict[str, Any]]:
        path = notebooks.resolve(notebook, self.roots)
        notebooks.check_kernel(path)
        return path, notebooks.check_parameters(path, parameters)

    async def _dispatch(self) -> None:
        assert self.queue is not None
        while True:
            run_id = await self.queue.get()
            run = self.live.get(run_id)
            if run is None or run["state"] != "queued":
                continue  # cancelled while queued
            sid = run["schedule_id"]
            if sid and any(r["schedule_id"] == sid and self._going(r) for r in self.live.values()):
                self._spawn(self._requeue(run_id))  # job_overlap = queue: one run of a schedule at a time
                continue
            self.dispatched.add(run_id)  # before any await: a cancel from now on goes through the executor
            try:
                await self._execute(run)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here fails one run, never the dispatcher
                log.exception("job run %s", run_id)
                try:
                    await self._finish(run, "failed", {"ename": type(exc).__name__, "evalue": str(exc)})
                except Exception:
                    log.exception("job run %s: recording its failure", run_id)
            finally:
                self.dispatched.discard(run_id)

    def _going(self, run: dict[str, Any]) -> bool:
        """Whether a run holds (or is about to hold) a worker."""
        return bool(run["state"] == "running" or run["id"] in self.dispatched)

    async def _requeue(self, run_id: str) -> None:
        await asyncio.sleep(1.0)
        assert self.queue is not None
        self.queue.put_nowait(run_id)

    async def _execute(self, run: dict[str, Any]) -> None:
        assert self.executor is not None
        try:
            owner = self.auth.users.get(run["owner_id"])
            if owner is not None and self.confirm is not None:
                await self.confirm(owner)
            key_id, token = await asyncio.to_thread(self._run_key, run)
        except BkgError as exc:
            await self._finish(run, "failed", {"ename": type(exc).__name__, "evalue": exc.message})
            return
        if run["id"] in self.kill_reason:  # cancelled while its key was made: it never starts
            self.kill_reason.pop(run["id"], None)
            self.executor.forget(run["id"])  # the kill it was asked for finds no worker: nothing to drop later
            await asyncio.to_thread(self._revoke, key_id)
            await self._finish(run, "cancelled", {"ename": "Cancelled", "evalue": "cancelled before it started"})
            return
        out = self.runs_dir / f"{run['id']}.ipynb"
        keep = self.runs_dir / f"{run['id']}{kept.SUFFIX}"  # the files it keeps (`kept`): a folder of its own
        await asyncio.to_thread(keep.mkdir, exist_ok=True)
        spec = {
            "id": run["id"],
            "input": run["path"],
            "output": str(out),
            "html": str(out.with_suffix(".html")),
            "parameters": run["parameters"],
            "cwd": str(Path(run["path"]).parent),
            # what its cells print is kept up to this, the rest cut with a marker: no run fills the worker or the disk
            "max_output_bytes": self.max_output_bytes(),
            "env": {
                "BKG_API_KEY": token,
                "BKG_GATEWAY_URL": self.gateway_url,
                "BKG_RUN_ID": run["id"],
                "BKG_DATA_DIR": str(self.data_dir),
                files.ROOTS_ENV: os.pathsep.join(str(r) for r in self.file_roots),  # what its notebook may read
                kept.ENV: str(keep),  # what it writes there is kept with the run
            },
        }
        run["message"] = "waiting for a job worker"
        loop = asyncio.get_running_loop()
        self.rendering[run["id"]] = loop.create_future()
        try:
            outcome = await self.executor.run(spec, lambda ev: self._on_event(run, ev))
        finally:
            timer = self.timers.pop(run["id"], None)
            if timer is not None:
                timer.cancel()
            await asyncio.to_thread(self._revoke, key_id)
            # a render not reported in HTML_WAIT_S after the end will not come: stop waiting for it
            loop.call_later(HTML_WAIT_S, self._rendered, run["id"], None)
        if not outcome.get("output"):
            self._rendered(run["id"], None)  # no output notebook: nothing is rendered
        run.update(
            cells_done=outcome.get("cells_done", run["cells_done"]),
            cells_total=outcome.get("cells_total") or run["cells_total"],
            output_path=outcome.get("output"),
        )
        reason = self.kill_reason.pop(run["id"], None)
        state = "succeeded" if outcome.get("ok") else reason or "failed"  # a run that got to its end stands
        error = None if state == "succeeded" else outcome.get("error") or {}
        if reason == "timed_out":
            error = {**(error or {}), "ename": "Timeout", "evalue": f"the run took longer than {run['timeout_s']:g} s"}
        elif reason == "cancelled":
            error = {**(error or {}), "ename": "Cancelled", "evalue": "cancelled"}
        await self._finish(run, state, error)

    def _run_key(self, run: dict[str, Any]) -> tuple[str, str]:
        owner = self._acting(run, "run")  # never more than the owner, and the key that started it, hold today
        if RUN_SCOPE not in owner.scopes:
            raise Forbidden(f"the run's owner {run['owner']!r} no longer holds {RUN_SCOPE!r}", field="owner")
        life = timedelta(seconds=(run["timeout_s"] or MAX_TIMEOUT) + KEY_GRACE)
        expires = datetime.now(UTC).replace(tzinfo=None) + life
        name = RUN_KEY + run["id"]
        # derived from the key that started it: revoking that one ends what the run's kernel can do at once
        rec, token = self.auth.create_key(
            owner.user_id, name, sorted(owner.scopes), expires, actor=run["owner"], parent=owner.key_id
        )
        return str(rec["id"]), token

    def _revoke(self, key_id: str) -> None:
        with contextlib.suppress(NotFound):
            self.auth.revoke_key(key_id, actor="jobs")

    def _vouching_key(self, p: Principal) -> str | None:
        """The API key a run or schedule that `p` makes lives no longer than: `p`'s own; for a run's kernel, the key
        its run lives by (its run key derives from it); none for a login session or a Hub token (they stand for the
        user). A run key no longer live (its run ended) is returned as it is: what it makes lives by a revoked key.
        A run's key is the one the gateway marked so when it made it, whatever a key is named."""
        rec = self.auth.live_key(p.key_id) if p.key_id is not None else None
        return rec.parent_id if rec is not None and rec.run_id is not None else p.key_id

    def _on_event(self, run: dict[str, Any], ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "started":  # a worker took it: the run's time (and its timeout) starts now
            run.update(state="running", started_at=self.clock(), message="running", kernel_pid=ev.get("kernel_pid"))
            self._spawn(asyncio.to_thread(self.history.save_run, dict(run)))
            self._publish(run)
            if run["timeout_s"]:
                self.timers[run["id"]] = asyncio.get_running_loop().call_later(
                    run["timeout_s"], lambda: self._spawn(self._kill(run["id"], "timed_out"))
                )
            if run["id"] in self.kill_reason:  # cancelled while it waited for a worker
                self._spawn(self._kill(run["id"], self.kill_reason[run["id"]]))
        elif kind == "cell":
            run.update(
                cells_done=ev.get("done", 0),
                cells_total=ev.get("total", 0),
                cell=ev.get("index"),
                message=f"cell {ev.get('index')} {ev.get('state')}",
            )
            self._publish(run)
        elif kind == "html":
            if ev.get("path"):
                run["html_path"] = ev["path"]
                if run["state"] in FINISHED:  # rendered after the run ended: keep the link
                    self._spawn(self._late_html(run, ev["path"]))
            self._rendered(run["id"], ev.get("path"))

    async def _late_html(self, run: dict[str, Any], path: str) -> None:
        """Keep the link to a run's HTML rendered after its end; a run deleted meanwhile stays deleted (its page
        goes too)."""
        if await asyncio.to_thread(self.history.set_html, run["id"], path):
            self._publish(run)
        else:
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    def _rendered(self, run_id: str, path: str | None) -> None:
        fut = self.rendering.pop(run_id, None)
        if fut is not None and not fut.done():
            fut.set_result(path)

    async def _finish(self, run: dict[str, Any], state: str, error: dict[str, Any] | None) -> None:
        if run.get("finished_at") is not None:
            return  # ended already (a cancel that raced the end)
        if error is not None:
            error = {"cell_index": None, "source": None, "ename": "", "evalue": "", "traceback": "", **error}
        run.update(state=state, finished_at=self.clock(), error=error, kernel_pid=None)
        run["message"] = state if error is None else f"{state}: {error['ename']}: {error['evalue']}"[:500]
        self.live.pop(run["id"], None)
        gone = (error or {}).get("ename") == KeyGone.__name__  # a retry would live by the same revoked key
        if state in ("failed", "timed_out") and run["attempt"] <= run["retries"] and not gone:
            owner = self._owner(run)
            if owner is not None:  # queued before this run's end is published: a waiting client finds it
                try:
                    again = await self.submit(
                        owner, run["path"], run["parameters"], run["timeout_s"], run["retries"],
                        schedule_id=run["schedule_id"], retry_of=run["id"], attempt=run["attempt"] + 1,
                    )  # fmt: skip
                    run["retried_by"] = again["id"]
                except BkgError as exc:
                    run["message"] += f" (no retry: {exc.message})"
        await asyncio.to_thread(self.history.save_run, run)
        self._publish(run)
        self._spawn(self._after(dict(run)))

    async def _after(self, run: dict[str, Any]) -> None:
        """Webhooks and retention, off the run's path."""
        urls = []
        sid = run["schedule_id"]
        sched = await asyncio.to_thread(self.history.schedule, sid) if sid else None
        if sched and sched["webhook_url"] and (run["state"] != "succeeded" or sched["notify_success"]):
            urls.append(sched["webhook_url"])
        glob = self.settings.job_webhook_url
        if glob and (run["state"] != "succeeded" or self.settings.job_webhook_success):
            urls.append(glob)
        for url in urls:
            await notify(url, public(run), self.settings.webhook_allow)
        gone = await asyncio.to_thread(
            self.history.prune, self.settings.job_keep_runs, self.settings.job_keep_days * 86400
        )

        def unlink() -> None:  # what the rows name, and what their runs wrote without naming it (kept files too)
            for r in gone:
                try:
                    self._remove_files(r)
                except OSError as exc:  # one run's files that will not go do not keep the others
                    log.warning("cannot remove the files of pruned run %s: %s", r["id"], exc)

        await asyncio.to_thread(unlink)

    def _owner(self, row: dict[str, Any]) -> Principal | None:
        """The owner of a run or schedule as they are now: their stored scopes that their role still holds (None: the
        owner is disabled or deleted). Its `key_id` is the key the row lives by, which this does not check."""
        user = self.auth.users.get(row["owner_id"])
        if user is None or user["disabled"]:
            return None
        held = frozenset(self.auth.roles.get(user["role"], ()))
        scopes = frozenset(row["scopes"]) & held
        return Principal(user["id"], user["username"], user["role"], scopes, row.get("key_id"), "job")

    def _acting(self, row: dict[str, Any], what: str) -> Principal:
        """Who a run or schedule (`what`) acts as now: its owner with the scopes they and the key it lives by still
        hold; 403 when the owner is disabled or deleted, `KeyGone` when that key was revoked or has expired."""
        owner = self._owner(row)
        if owner is None:
            raise Forbidden(f"the {what}'s owner {row['owner']!r} is disabled or deleted", field="owner")
        if owner.key_id is None:
            return owner
        held = self.auth.live_key_scopes(owner.key_id)
        if held is None:
            made = "started this run" if what == "run" else "turned this schedule on"
            raise KeyGone(f"key {owner.key_id}, which {made}, has been revoked or has expired")
        return dataclasses.replace(owner, scopes=owner.scopes & held)

    def _publish(self, run: dict[str, Any]) -> None:
        # who owns it and what it ran with decide who gets it and how much of it: the socket drops both. Its
        # parameters as a listing has them: a run of 1 MiB of them sent that much to each subscriber at each cell
        event = public(run) | {"owner_id": run["owner_id"], "scopes": list(run["scopes"])}
        self.emit("jobs", "notebook", _big_parameters_left_out(event))

    async def _kill(self, run_id: str, reason: str) -> None:
        run = self.live.get(run_id)
        if run is None or (run["state"] != "running" and run_id not in self.dispatched):
            return
        self.kill_reason.setdefault(run_id, reason)
        assert self.executor is not None
        await self.executor.kill(run_id)  # a run still waiting for a worker is dropped when it gets one

    # -- reading and steering ---------------------------------------------------------------------
    async def get(self, run_id: str, p: Principal) -> dict[str, Any]:
        """One run (live or kept), if `p` may see it (its owner or an auditor; anyone else gets 404), as `shown`."""
        return shown(await self._seen(run_id, p), p)

    async def _seen(self, run_id: str, p: Principal) -> dict[str, Any]:
        run = self.live.get(run_id) or await asyncio.to_thread(self.history.run, run_id)
        if run is None or not _sees(p, run):
            raise NotFound(f"no job {run_id!r}", field="job_id")
        return run

    async def runs(
        self,
        p: Principal,
        limit: int = 200,
        before: tuple[float, str] | None = None,
        schedule_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs `p` may see (as `listed`), newest first; with `before` (a run's created_at and id), those older than
        that run; with `schedule_id`, only that schedule's (fired, run now or retried automatically)."""
        owner_id = None if SEE_ALL in p.scopes else p.user_id
        rows = await asyncio.to_thread(self.history.runs, owner_id, limit, schedule_id, before, LISTED_PARAMS)
        live = {r["id"]: dict(self.live[r["id"]]) for r in rows if r["id"] in self.live}  # as they are now
        return await asyncio.to_thread(lambda: [listed(live.get(r["id"], r), p) for r in rows])

    def _steer(self, run: dict[str, Any], p: Principal) -> None:
        if run["owner_id"] != p.user_id:
            p.require(RUN_SCOPE, f"steering {run['owner']}'s run")

    async def cancel(self, run_id: str, p: Principal) -> dict[str, Any]:
        """Cancel a queued run, or kill a running one's kernel (its process group goes with it). The answer is the
        run once it ended (a running one: up to CANCEL_WAIT_S for its kernel to go); one still ending (or waiting for a
        worker, which drops it when it gets one) is answered as it is, with the message `cancelling`. It needs
        `jobs:run`, one's own run too: a key narrowed to reading could stop its owner's work."""
        run = await self._seen(run_id, p)
        p.require(RUN_SCOPE, "cancelling a run")
        live = self.live.get(run_id)
        if live is None:
            raise Conflict(f"job {run_id!r} already ended ({run['state']})", field="job_id")
        if live["state"] == "queued" and run_id not in self.dispatched:
            await self._finish(live, "cancelled", {"ename": "Cancelled", "evalue": "cancelled before it started"})
        else:
            await self._kill(run_id, "cancelled")
            waited = 0.0
            while live["state"] == "running" and live.get("finished_at") is None and waited < CANCEL_WAIT_S:
                await asyncio.sleep(0.05)
                waited += 0.05
        out = shown(live, p)
        if live.get("finished_at") is None:
            out["message"] = "cancelling"
        return out

    async def retry(self, run_id: str, p: Principal) -> dict[str, Any]:
        """Run a finished run again as `p`: the notebook file it ran (never another one its name leads to now: 409
        when that file is gone), with its parameters, timeout and retries (its automatic re-runs counted afresh)."""
        run = await self._seen(run_id, p)
        self._steer(run, p)
        if run["state"] not in FINISHED:
            raise Conflict(f"job {run_id!r} is still {run['state']}", field="job_id")
        # a run kept from before its path was (job_runs.path NULL), or refused before it ran, goes by its name
        target = run.get("path") or run["notebook"]
        if Path(target).is_absolute() and not await asyncio.to_thread(Path(target).is_file):
            raise Conflict(
                f"job {run_id!r} ran {target}, which is gone (moved or deleted): a retry runs the same file; "
                f"run the notebook where it is now instead",
                field="job_id",
            )
        return await self.submit(p, target, run["parameters"], run["timeout_s"], run["retries"] or 0, retry_of=run_id)

    async def delete(self, run_id: str, p: Principal) -> None:
        """Delete a finished run: its row and every file it left (output notebook, HTML, images). Its owner with
        `jobs:run`; someone else's, with `jobs:run` and admin:audit (only those see it: anyone else gets 404). A run
        still queued or running is a 409: cancel it first."""
        run = await self._seen(run_id, p)
        whose = "your" if run["owner_id"] == p.user_id else f"{run['owner']}'s"
        needs = [RUN_SCOPE] if run["owner_id"] == p.user_id else [RUN_SCOPE, SEE_ALL]
        p.require_all(needs, f"deleting {whose} run {run_id!r}", "job_id")
        if run_id in self.live or run["state"] not in FINISHED:
            raise Conflict(f"job {run_id!r} is still {run['state']}: cancel it first", field="job_id")
        pending = self.rendering.get(run_id)
        if pending is not None:  # its HTML is being rendered (a second or so): delete that too, not leave it behind
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending), HTML_WAIT_S)
        if not await asyncio.to_thread(self.history.delete_run, run_id):
            raise NotFound(f"no job {run_id!r}", field="job_id")  # deleted meanwhile (by another call, or pruned)
        await asyncio.to_thread(self._remove_files, run)

    def _remove_files(self, run: dict[str, Any]) -> None:
        """Remove what a run left under runs/ (what its row names, and what a worker wrote without naming it:
        `<id>.*`, an images folder `<id>_files`); never a file outside runs/."""
        runs = self.runs_dir.resolve()
        named = [Path(f) for f in (run.get("output_path"), run.get("html_path")) if f]
        for f in [*named, *self.runs_dir.glob(f"{run['id']}.*"), *self.runs_dir.glob(f"{run['id']}_files")]:
            try:
                if not f.resolve().is_relative_to(runs):
                    continue
                if f.is_dir() and not f.is_symlink():
                    kept.remove_tree(f)  # a run's kept files may be a tree thousands of folders deep
                else:
                    f.unlink(missing_ok=True)
            except OSError as exc:  # its row is gone already: what will not go is logged, not a 500
                log.warning("cannot remove %s of run %s: %s", f, run["id"], exc)

    async def output(self, run_id: str, p: Principal, kind: str) -> Path | bytes:
        """The run's output notebook (`ipynb`) or its HTML rendering (`html`), for whoever may see the run and holds
        the scopes it ran with (`sees_detail`, as GET /api/jobs/{id} shows its error): what a run printed (a key it
        made, rows it read) is for those who could have done it, not for a narrower key of its owner (a lab
        kernel's) nor an auditor without them. While it runs, its output notebook so far (the bytes, as papermill
        last saved it: at each cell's start and end); its HTML is rendered once it ended (409 until then)."""
        run = await self._seen(run_id, p)
        if not sees_detail(p, run["scopes"]):  # 403 naming the scopes missing
            p.require_all(run["scopes"], f"reading job {run_id!r}'s output (what it ran with)", "job_id")
        if run_id in self.live and run.get("finished_at") is None:
            if kind == "html":
                raise Conflict(
                    f"job {run_id!r} is still {run['state']}: its HTML is rendered when it ends; format=ipynb gives "
                    "its output notebook so far",
                    field="format",
                )
            so_far = await asyncio.to_thread(self._so_far, run_id)
            if so_far is None:
                raise NotFound(f"job {run_id!r} has no ipynb output yet ({run['state']})", field="job_id")
            return so_far
        name = run["output_path"] if kind == "ipynb" else run["html_path"]
        pending = self.rendering.get(run["id"]) if kind == "html" and not name and run["state"] in FINISHED else None
        if pending is not None:  # rendered just after the run's end (a second or so): wait for it, not a 404
            with contextlib.suppress(TimeoutError):
                name = await asyncio.wait_for(asyncio.shield(pending), HTML_WAIT_S)
        if not name or not await asyncio.to_thread(Path(name).is_file):
            raise NotFound(f"job {run['id']!r} has no {kind} output (yet)", field="job_id")
        return Path(name)

    async def kept_files(self, run_id: str, p: Principal) -> list[dict[str, Any]]:
        """The files a run kept (`kept`: what its notebook wrote into its `BKG_RUN_FILES` folder), for whoever may
        see the run and holds the scopes it ran with, as its output notebook (what a run wrote is for those who
        could have done it). While it runs, those written so far."""
        return await asyncio.to_thread(kept.listing, await self._kept_folder(run_id, p))

    async def kept_file(self, run_id: str, p: Principal, name: str) -> tuple[BinaryIO, os.stat_result]:
        """One file a run kept (`kept_files`' rule), by its name relative to the run's folder: open, with its stat
        (`kept.open_kept`: what was checked is what is read)."""
        return await asyncio.to_thread(kept.open_kept, await self._kept_folder(run_id, p), name)

    async def _kept_folder(self, run_id: str, p: Principal) -> Path:
        run = await self._seen(run_id, p)
        if not sees_detail(p, run["scopes"]):
            p.require_all(run["scopes"], f"reading job {run_id!r}'s files (what it ran with)", "job_id")
        return self.runs_dir / f"{run_id}{kept.SUFFIX}"

    def _so_far(self, run_id: str) -> bytes | None:
        """A running run's output notebook as papermill last wrote it, whole (None: none yet, as before its first
        save, or on a cluster, which sends it back at the end). papermill rewrites the file in place: a read that
        meets a write half done reads again."""
        path = self.runs_dir / f"{run_id}.ipynb"
        for _ in range(50):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                json.loads(data)
            except ValueError:
                time.sleep(0.02)
                continue
            return data
        return None

    def notebooks(self) -> list[dict[str, Any]]:
        """Notebooks that may run as jobs, with their parameters (blocking: reads files)."""
        return notebooks.listing(self.roots)

    # -- runs of schedules (the schedules themselves: `Schedules`, scheduling.py) -----------------
    async def _refused(self, s: dict[str, Any], exc: BkgError) -> dict[str, Any]:
        """Record a scheduled run that could not start (its notebook gone, its owner without jobs:run...)."""
        run = new_run(
            notebook=s["notebook"], path=s.get("path") or s["notebook"], parameters=s["parameters"], owner=s["owner"],
            owner_id=s["owner_id"], scopes=list(s["scopes"]), schedule_id=s["id"], timeout_s=s["timeout_s"],
            created_at=self.clock(),
        )  # fmt: skip
        await self._finish(run, "failed", {"ename": type(exc).__name__, "evalue": exc.message})
        return public(run)


def new_run(**fields: Any) -> dict[str, Any]:
    """A run row, queued, with a new id: `fields` say what it runs, for whom and how."""
    run: dict[str, Any] = {
        "id": "run-" + uuid.uuid4().hex[:12], "parameters": {}, "state": "queued", "schedule_id": None,
        "retry_of": None, "retried_by": None, "attempt": 1, "retries": 0, "timeout_s": None, "executor": None,
        "started_at": None, "finished_at": None, "cells_done": 0, "cells_total": 0, "output_path": None,
        "html_path": None, "error": None, "message": "queued",
    }  # fmt: skip
    run.update(fields)
    return run


def withheld(out: dict[str, Any]) -> dict[str, Any]:
    """A public run without what it printed: its error's source, value and traceback, and the message they were in
    (cut to the state and the exception's name)."""
    err = out.get("error")
    if not err:
        return out
    out = {**out, "error": {**err, "source": None, "evalue": "", "traceback": ""}}
    out["message"] = f"{out['state']}: {err.get('ename') or 'error'}"
    return out


def shown(run: dict[str, Any], p: Principal) -> dict[str, Any]:
    """A run (a row, or a `jobs` event's payload) as `p` sees it: `public(run)`, `withheld` unless `sees_detail`
    (the rule of its output notebook too)."""
    out = public(run)
    return out if sees_detail(p, run["scopes"]) else withheld(out)


def listed(run: dict[str, Any], p: Principal) -> dict[str, Any]:
    """A run as a listing shows it to `p` (`shown`): its parameters only when their JSON is at most LISTED_PARAMS
    bytes, else None, their size always in `parameters_bytes` (GET /api/jobs/{id} has them whole). A row read for a
    listing comes so already; a live run's are sized here (blocking: call it from a thread)."""
    out = shown(run, p)
    if "parameters_bytes" not in out:  # a run made before its size was kept with it
        params = out.get("parameters")
        out["parameters_bytes"] = None if params is None else len(json.dumps(params))  # as the store keeps them
    return _big_parameters_left_out(out)


def _big_parameters_left_out(run: dict[str, Any]) -> dict[str, Any]:
    """`run` (a copy made to be sent) with its parameters None when its `parameters_bytes` is over LISTED_PARAMS."""
    if (run.get("parameters_bytes") or 0) > LISTED_PARAMS:
        run["parameters"] = None
    return run


def public(run: dict[str, Any]) -> dict[str, Any]:
    """A run as the API shows it (no scopes, no owner id; a duration and a progress fraction)."""
    out = {k: v for k, v in run.items() if k not in ("scopes", "owner_id", "path")}
    start, end = run.get("started_at"), run.get("finished_at")
    out["duration_s"] = round((end or time.time()) - start, 3) if start else None
    total = run.get("cells_total") or 0
    out["progress"] = 1.0 if run["state"] == "succeeded" else (run.get("cells_done", 0) / total if total else 0.0)
    out["kind"] = "notebook"
    out["finished"] = end
    return out
