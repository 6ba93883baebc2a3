"""Background jobs of the gateway (model downloads, plugin job capabilities such as brainml.train).

State, progress and result are kept in memory for the life of the gateway (what a job makes, a model, is
stored by the job itself); progress is published on the WebSocket topic `jobs`. A job keeps the scope its work
needs (its capability's): cancelling it takes that scope, its owner's too, and what the work made or said (its
result, its error, its progress messages: a command's output) is for who holds that scope, not for every auditor
nor its owner's narrower key.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import BkgError, Cancelled, Conflict, NotFound
from bkg_kernel.jobs.access import sees_detail, visible

Emit = Callable[[str, str, dict[str, Any]], None]
KEEP = 200  # finished jobs kept for GET /api/jobs, per owner (one user's burst never pushes out another's)


@dataclass
class Job:
    """One unit of background work."""

    id: str
    kind: str
    state: str = "queued"  # queued | running | done | failed | cancelled
    progress: float = 0.0  # 0..1
    message: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    # a failure that was a bkg error: its code, status and field, so a client raises what the call would have
    # raised had it not run as a job (`errors.from_dict`)
    error_code: str | None = None
    error_status: int | None = None
    error_field: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    plugin: str | None = None
    owner: str | None = None
    owner_id: str | None = None  # who it belongs to (a user made later under the same name is someone else)
    scope: str = field(kw_only=True)  # the scope its work needs (its capability's, or its route's), given at start

    def to_dict(self) -> dict[str, Any]:
        """Return the job as the API shows it (no owner id and no scope, as for notebook runs)."""
        out = asdict(self)
        del out["owner_id"], out["scope"]
        return out

    def event(self) -> dict[str, Any]:
        """The job for the WebSocket topic `jobs`: `to_dict()`, the owner id and the scope, which decide who gets it
        and how much of it (`shown_event`; the socket takes both out before sending)."""
        return self.to_dict() | {"owner_id": self.owner_id, "scope": self.scope}

    def visible_to(self, p: Principal) -> bool:
        """A job is its owner's, and an auditor's (scope admin:audit); its result as `shown`."""
        return visible(p, self.owner, self.owner_id)

    def shown(self, p: Principal) -> dict[str, Any]:
        """`to_dict()` as `p` sees it (`shown_event`, the WebSocket's rule too)."""
        return shown_event(self.event(), p)


def shown_event(payload: dict[str, Any], p: Principal) -> dict[str, Any]:
    """A background job (`Job.event()`, or a `jobs` event's payload) as `p` sees it: without its owner id and scope,
    and `withheld` unless `p` holds that scope (`sees_detail`, as for a notebook run), its owner's key too."""
    out = {k: v for k, v in payload.items() if k not in ("owner_id", "scope")}
    scope = payload.get("scope")
    return out if scope is not None and sees_detail(p, [scope]) else withheld(out)


def withheld(out: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it without what its work made or said: no result, an error cut to its state, no
    progress message (a command's output, a file's name)."""
    hidden = {"error_code": None, "error_status": None, "error_field": None}  # what the error said, as its text
    return {**out, "result": None, "error": None if out["error"] is None else out["state"], "message": ""} | hidden


class Jobs:
    """Start jobs on threads and keep their state."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Asked to cancel: checked between chunks too, since Python 3.11's wait_for can lose a task.cancel()
        # that lands as a chunk arrives (the job then ran to "done" after its client cancelled it).
        self._cancelling: set[str] = set()
        self._cancel_events: dict[str, threading.Event] = {}

    def _new(self, kind: str, **kw: Any) -> Job:
        job = Job(id=f"job-{int(time.time())}-{next(self._ids)}", kind=kind, **kw)
        with self._lock:
            self.jobs[job.id] = job
            done = [j for j in self.jobs.values() if j.finished is not None and j.owner_id == job.owner_id]
            for old in sorted(done, key=lambda j: j.created)[: max(0, len(done) - KEEP)]:
                self.jobs.pop(old.id, None)
        return job

    def _progress(self, job: Job, fraction: float, message: str = "") -> None:
        job.progress, job.message = max(0.0, min(1.0, fraction)), message
        self.emit("jobs", job.kind, job.event())

    def _end(self, job: Job, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        job.state, job.result, job.error, job.finished = state, result, error, time.time()
        if state == "done":
            job.progress = 1.0
        self.emit("jobs", job.kind, job.event())

    def start(
        self, kind: str, fn: Callable[[Callable[[float, str], None]], dict[str, Any]], *, owner: Principal, scope: str
    ) -> Job:
        """Run `fn(progress)` on a thread for `owner`; `progress(fraction, message)` updates the job and notifies.
        `scope`: what the work needs (the starting route's), to cancel it or see what it made."""
        job = self._new(kind, owner=owner.username, owner_id=owner.user_id, scope=scope)
        cancel = self._cancel_events[job.id] = threading.Event()

        def progress(fraction: float, message: str = "") -> None:
            if cancel.is_set():  # each progress report is where a thread job stops once cancelled
                raise Cancelled(f"job {job.id} was cancelled")
            self._progress(job, fraction, message)

        def run() -> None:
            job.state = "running"
            self.emit("jobs", job.kind, job.event())
            try:
                self._end(job, "done", fn(progress))
            except Cancelled as exc:
                self._end(job, "cancelled", error=exc.message)
            except BkgError as exc:
                job.error_code, job.error_status, job.error_field = exc.code, exc.status, exc.field
                self._end(job, "failed", error=exc.message)
            except Exception as exc:
                traceback.print_exc()
                self._end(job, "failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._cancel_events.pop(job.id, None)

        threading.Thread(target=run, name=f"bkg-{job.id}", daemon=True).start()
        return job

    def start_stream(
        self, kind: str, chunks: AsyncIterator[dict[str, Any]], *, plugin: str, owner: Principal, scope: str
    ) -> Job:
        """Run a plugin's job capability (`{"progress"...}` chunks, then `{"result": ...}`) as an asyncio task;
        `scope` is the capability's."""
        job = self._new(kind, plugin=plugin, owner=owner.username, owner_id=owner.user_id, scope=scope)

        async def run() -> None:
            job.state = "running"
            self.emit("jobs", job.kind, job.event())
            result: dict[str, Any] | None = None
            try:
                async for chunk in chunks:
                    if job.id in self._cancelling and "result" not in chunk:
                        raise asyncio.CancelledError
                    if "result" in chunk:
                        result = chunk["result"]
                    else:
                        self._progress(job, float(chunk.get("progress", 0.0)), str(chunk.get("message", "")))
                if job.id in self._cancelling and result is None:
                    raise asyncio.CancelledError
                self._end(job, "done", result)  # a result that was already in stands
            except asyncio.CancelledError:
                self._end(job, "cancelled", error="cancelled")
            except BkgError as exc:
                job.error_code, job.error_status, job.error_field = exc.code, exc.status, exc.field
                self._end(job, "failed", error=exc.message)
            except Exception as exc:
                traceback.print_exc()
                self._end(job, "failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._tasks.pop(job.id, None)
                self._cancelling.discard(job.id)
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()  # cancels the work in the plugin and frees its slot

        self._tasks[job.id] = asyncio.get_running_loop().create_task(run())
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a running job: a plugin job at once, a thread job (a download) at its next progress report."""
        job = self.get(job_id)
        event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()
            return job
        task = self._tasks.get(job_id)
        if task is None:
            if job.finished is not None:
                raise Conflict(f"job {job_id!r} already ended ({job.state})", field="job_id")
            raise Conflict(f"job {job_id!r} ({job.kind}) cannot be cancelled", field="job_id")
        self._cancelling.add(job_id)
        task.cancel()
        return job

    def get(self, job_id: str) -> Job:
        """Return a job or raise 404."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job
