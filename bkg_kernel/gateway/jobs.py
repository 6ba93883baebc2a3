"""Background jobs of the gateway (model downloads, and later training runs): state, progress, result.

Kept in memory for the life of the gateway; progress is published on the WebSocket topic `jobs`.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bkg_kernel.errors import BkgError, NotFound

Emit = Callable[[str, str, dict[str, Any]], None]
KEEP = 200  # finished jobs kept for GET /api/jobs


@dataclass
class Job:
    """One unit of background work."""

    id: str
    kind: str
    state: str = "queued"  # queued | running | done | failed
    progress: float = 0.0  # 0..1
    message: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the job as JSON data."""
        return asdict(self)


class Jobs:
    """Start jobs on threads and keep their state."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, fn: Callable[[Callable[[float, str], None]], dict[str, Any]]) -> Job:
        """Run `fn(progress)` on a thread; `progress(fraction, message)` updates the job and notifies."""
        job = Job(id=f"job-{int(time.time())}-{next(self._ids)}", kind=kind)
        with self._lock:
            self.jobs[job.id] = job
            done = [j for j in self.jobs.values() if j.finished is not None]
            for old in sorted(done, key=lambda j: j.created)[: max(0, len(done) - KEEP)]:
                self.jobs.pop(old.id, None)

        def progress(fraction: float, message: str = "") -> None:
            job.progress, job.message = max(0.0, min(1.0, fraction)), message
            self.emit("jobs", job.kind, job.to_dict())

        def run() -> None:
            job.state = "running"
            self.emit("jobs", job.kind, job.to_dict())
            try:
                job.result = fn(progress)
                job.state, job.progress = "done", 1.0
            except BkgError as exc:
                job.state, job.error = "failed", exc.message
            except Exception as exc:
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            job.finished = time.time()
            self.emit("jobs", job.kind, job.to_dict())

        threading.Thread(target=run, name=f"bkg-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        """Return a job or raise 404."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job
