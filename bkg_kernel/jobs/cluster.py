"""The Dask executor: the same run on a `distributed` cluster (`job_executor = dask://host:port`).

A run is one task (`Client.submit` with a unique key and `pure=False`, no retries: notebooks have side effects).
The task starts `python -m bkg_kernel.jobs.worker --once` in a child process with the notebook it was sent, so a
cluster needs no shared file system: the output notebook and its HTML come back as the task's result and the
gateway keeps them like a local run's. Where the worker sees the notebook's folder (the same file system: the
file at the notebook's path there holds the very notebook sent, as on a LocalCluster or a shared mount), the run's
working folder is that folder, as on the local pool, so a notebook that opens `data.txt` next to it runs the same
on both. Elsewhere (a remote worker) it runs in an empty temporary folder, where files next to the notebook are
not found: the worker's and the gateway's logs say so, and so does a failed run's traceback.

Dask cannot cancel a running task (distributed #2617), so the task watches a `distributed.Event` named for the run
and kills the child and its kernel's process group when it is set. Cell progress travels as worker events on a
topic named for the run (`log_event` / `subscribe_topic`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bkg_kernel.jobs import kept
from bkg_kernel.jobs.pool import OnEvent, failure, kill_group
from bkg_kernel.settings import scrubbed_env

log = logging.getLogger("bkg.jobs")


def _topic(run_id: str) -> str:
    return f"bkg-run-{run_id}"


def _cancel_name(run_id: str) -> str:
    return f"bkg-cancel-{run_id}"


def shared_folder(spec: dict[str, Any]) -> str | None:
    """The notebook's folder when this worker sees it as the gateway does (the file at the notebook's path here
    holds the notebook sent), else None: a remote worker, or a notebook changed since it was sent."""
    folder = Path(spec.get("cwd") or Path(spec["input"]).parent)
    try:
        same = Path(spec["input"]).read_text(encoding="utf-8") == spec["notebook_json"]
    except (OSError, UnicodeError):
        return None
    return str(folder) if same and folder.is_dir() else None


def _temp_note(folder: str, worker: str) -> str:
    return (
        f"ran in a temporary folder on Dask worker {worker}: the notebook's folder {folder} is not on that worker "
        "(or holds another version of the notebook), so files next to the notebook are not found there"
    )


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
    """A temporary folder for one run on this worker, removed after however deep its kept files go
    (`TemporaryDirectory` removes by recursion: a RecursionError on a deep tree lost the run's whole outcome)."""
    tmp = tempfile.mkdtemp(prefix="bkg-run-")
    try:
        yield tmp
    finally:
        kept.remove_tree(Path(tmp))


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: run one notebook in a child process on this worker; return its outcome and output files."""
    from distributed import Event, get_worker

    worker = get_worker()
    topic, cancel = _topic(spec["id"]), Event(_cancel_name(spec["id"]))
    if cancel.is_set():  # cancelled while it waited for a Dask worker
        return {"done": failure(spec["id"], "Cancelled", "cancelled before it started"), "output": None, "html": None}
    shared = shared_folder(spec)
    note = None if shared else _temp_note(str(spec.get("cwd") or Path(spec["input"]).parent), worker.address)
    if note:
        log.warning("run %s %s", spec["id"], note)
    with _scratch() as tmp:
        src, out, html = Path(tmp, "input.ipynb"), Path(tmp, "output.ipynb"), Path(tmp, "output.html")
        src.write_text(spec["notebook_json"], encoding="utf-8")  # the notebook sent runs, even where it is shared
        local = {k: v for k, v in spec.items() if k != "notebook_json"}
        local.update(input=str(src), output=str(out), html=str(html), cwd=shared or tmp)
        keep = Path(tmp, "kept")  # the files it keeps: here, then sent back with its output
        keep.mkdir()
        local["env"] = {**(spec.get("env") or {}), kept.ENV: str(keep)}
        here = str(Path(__file__).resolve().parents[2])  # the bkg this worker imported, whatever the cwd
        env = scrubbed_env()  # the worker's secrets (an admin key, a Hub token) are not the kernel's to read
        env["PYTHONPATH"] = os.pathsep.join(x for x in (here, env.get("PYTHONPATH", "")) if x)
        child = subprocess.Popen(
            [sys.executable, "-m", "bkg_kernel.jobs.worker", "--once", "--sockets", tmp],  # removed with tmp
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp,
            start_new_session=True,
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(local) + "\n")
        child.stdin.close()
        seen: dict[str, Any] = {}

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                seen[ev.get("event", "")] = ev
                if ev.get("event") in ("started", "cell"):
                    worker.log_event(topic, ev)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while child.poll() is None:
            if cancel.is_set():
                kill_group(seen.get("started", {}).get("kernel_pid"))
                kill_group(child.pid)
            time.sleep(0.2)
        reader.join(10)
        done = seen.get("done") or failure(spec["id"], "ChildDied", f"the run's process exited ({child.returncode})")
        if note and done.get("error"):  # why `open("data.txt")` failed here when it works on the local pool
            err = done["error"]
            done = {**done, "error": {**err, "traceback": "\n".join(x for x in (err.get("traceback"), note) if x)}}
        sent, left = kept.collect(keep)
        return {
            "done": done,
            "note": note,
            "output": out.read_text(encoding="utf-8") if out.exists() else None,
            "html": html.read_text(encoding="utf-8") if html.exists() else None,
            "kept": sent,
            "kept_left": left,
        }


class DaskExecutor:
    """Runs on a Dask cluster; `capacity` runs are sent at once (the cluster queues beyond its threads)."""

    name = "dask"

    def __init__(self, address: str, capacity: int) -> None:
        self.address = address.replace("dask://", "tcp://", 1)
        self.capacity = capacity
        self.client: Any = None

    async def start(self) -> None:
        """Connect to the scheduler."""
        from distributed import Client

        self.client = await Client(self.address, asynchronous=True, timeout="20s")

    async def run(self, spec: dict[str, Any], on_event: OnEvent) -> dict[str, Any]:
        """Submit the run as one task and wait for it; write its output where a local run's would be."""
        topic = _topic(spec["id"])
        self.client.subscribe_topic(topic, lambda ev: on_event(ev[1] if isinstance(ev, tuple) else ev))
        text = await asyncio.to_thread(Path(spec["input"]).read_text, encoding="utf-8")
        payload = {**spec, "notebook_json": text}
        key = f"bkg-run-{spec['id']}-{uuid.uuid4().hex[:8]}"
        try:
            fut = self.client.submit(run_task, payload, key=key, pure=False, retries=0)
            result = await fut
        except Exception as exc:  # the task raised, or its worker died (KilledWorker)
            return failure(spec["id"], type(exc).__name__, str(exc)[:2000])
        finally:
            self.client.unsubscribe_topic(topic)
        if result.get("note"):
            log.warning("run %s %s", spec["id"], result["note"])
        done = dict(result["done"])
        done["output"] = None
        if result["output"] is not None:
            await asyncio.to_thread(Path(spec["output"]).write_text, result["output"], encoding="utf-8")
            done["output"] = spec["output"]
        folder = (spec.get("env") or {}).get(kept.ENV)
        if folder and result.get("kept"):
            await asyncio.to_thread(kept.store, Path(folder), result["kept"])
        if result.get("kept_left"):
            log.warning("run %s kept more than %d MB of files: not sent back from the Dask worker: %s", spec["id"],
                        kept.MAX_SENT_BYTES // 2**20, ", ".join(result["kept_left"][:20]))  # fmt: skip
        if result["html"] is not None and spec.get("html"):
            await asyncio.to_thread(Path(spec["html"]).write_text, result["html"], encoding="utf-8")
            on_event({"event": "html", "id": spec["id"], "path": spec["html"]})
        return done

    async def kill(self, run_id: str) -> None:
        """Ask the run's task to kill its child (a Dask task cannot be stopped from outside)."""
        from distributed import Event

        await Event(_cancel_name(run_id), client=self.client).set()

    def forget(self, run_id: str) -> None:
        """Nothing kept here for a run never handed over (its cancel event lives in the scheduler)."""

    async def close(self) -> None:
        """Disconnect (the cluster keeps running)."""
        if self.client is not None:
            await self.client.close()
