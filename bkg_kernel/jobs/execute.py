"""Run one notebook with papermill on a kernel started ahead of time, reporting each cell as it goes.

Used by the local job workers (a warm kernel per worker) and by the Dask task's child process (a cold one). The
run's environment (the owner's bkg key, the gateway URL, the run id) and working folder reach the kernel as a
silent first execution, so a kernel can be started before anyone knows whose run it will be. Cell indices in
events and errors are those of the notebook as written: papermill's injected-parameters cell is not counted.
"""

from __future__ import annotations

import contextlib
import queue
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bkg_kernel import kernels
from bkg_kernel.jobs import notebooks
from bkg_kernel.jobs.outputcap import OutputCap, size

Emit = Callable[[dict[str, Any]], None]
KERNEL = notebooks.KERNEL  # every run, and every warm kernel waiting for one
WARM_IMPORTS = "import bkg_kernel, numpy, json, os, pathlib"  # what most job notebooks import first
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
INJECTED = "injected-parameters"
ENGINE = "bkg-warm"
IOPUB_WAIT_S = 60


def _register_engine() -> None:
    """papermill's nbclient engine, handed a kernel client that is already connected and ready."""
    from nbclient.output_widget import OutputWidget
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines

    class CapturingWidget(OutputWidget):
        """nbclient's stand-in for a front end's `ipywidgets.Output`, keeping what it captures to itself: nbclient
        sends all of a widget's outputs back to the kernel after each new one (which echoes them back on IOPub),
        quadratic in what it shows: a thousand small displays outlasted the 4 s IOPub wait and failed their run, and
        the echoes swelled IOPub past the queue zmq drops beyond (see `connect`), so a cell could hang until its
        timeout."""

        def sync_state(self) -> None:
            """Send nothing: the kernel's `Output.outputs` stays what the kernel set (as with no front end)."""

    class CappedClient(PapermillNotebookClient):
        """papermill's client, keeping no more output than the run's `OutputCap` allows."""

        cap: OutputCap | None = None
        clear_before_next_output: bool  # nbclient's, set as each cell starts

        def _hook(self, msg: dict[str, Any]) -> Any:
            """The output widget that takes this message's outputs (they go to it, not to the cell), or None."""
            stack = self.output_hook_stack[msg["parent_header"].get("msg_id")]
            return stack[-1] if stack else None

        def _clear_now(self, outs: list[Any], cell_index: int) -> None:
            """Do the clear that waited for this output, as nbclient does it (the output itself is not kept)."""
            if self.clear_before_next_output:
                outs[:] = []
                self.clear_display_id_mapping(cell_index)
                self.clear_before_next_output = False

        def clear_output(self, outs: list[Any], msg: dict[str, Any], cell_index: int) -> None:
            if self.cap is not None and not msg["content"].get("wait"):
                hook = self._hook(msg)
                self.cap.refund(outs if hook is None else hook.outputs)  # cleared now: what it held no longer counts
            super().clear_output(outs, msg, cell_index)

        def _update_display_id(self, display_id: str, msg: dict[str, Any]) -> None:
            """Replace the data of the outputs shown under `display_id`, each counted by how much it grows; one
            that would outgrow the budget keeps its old data and its cell says the update was dropped."""
            if self.cap is None:
                return super()._update_display_id(display_id, msg)
            from nbformat.v4 import output_from_msg

            try:
                out = output_from_msg({**msg, "header": {**msg["header"], "msg_type": "display_data"}})
            except ValueError:
                return None
            for cell_idx, output_indices in self._display_id_map.get(display_id, {}).items():
                outs = self.nb["cells"][cell_idx]["outputs"]
                for output_idx in output_indices:
                    if output_idx >= len(outs):
                        continue
                    old = outs[output_idx]
                    grown = size(out) - size({"data": old.get("data"), "metadata": old.get("metadata")})
                    if self.cap.take(grown):
                        old["data"], old["metadata"] = out["data"], out["metadata"]
                    else:
                        self.cap.drop(outs, cell_idx, out, "update_display_data")
            return None

        def output(self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int) -> Any:
            if self.cap is None:
                return super().output(outs, msg, display_id, cell_index)
            hook = self._hook(msg)  # an output widget's outputs count as the cell's do; their markers are the cell's
            if hook is not None and hook.clear_before_next_output:  # its clear that waited for this output, now
                self.cap.refund(hook.outputs)
                hook.outputs, hook.clear_before_next_output = [], False
                if hook.comm_id in self.widget_state:
                    self.widget_state[hook.comm_id]["outputs"] = hook.outputs
            elif hook is None and self.clear_before_next_output:
                self.cap.refund(outs)  # the clear that waited for this output happens now
            kind = msg["msg_type"]
            if kind in ("display_data", "execute_result", "error"):
                return self._rich(outs, msg, display_id, cell_index, hook)
            if kind != "stream":
                return super().output(outs, msg, display_id, cell_index)
            kept, cut = self.cap.keep(msg["content"].get("text", ""))
            if not cut:
                return super().output(outs, msg, display_id, cell_index)
            out = None
            if kept:
                msg = {**msg, "content": {**msg["content"], "text": kept}}
                out = super().output(outs, msg, display_id, cell_index)
            elif hook is None:
                self._clear_now(outs, cell_index)
            self.cap.mark(outs, cell_index, str(msg["content"].get("name", "stdout")), cut)
            return out

        def _rich(
            self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int, hook: Any
        ) -> Any:
            """Keep a display or result while it fits (a cell's short result past it too), else drop it for its
            cell's marker; keep an error while it fits, and past it the cell's latest only, shortened (the one that
            failed the cell comes last: a failed run shows why). `hook`: the output widget that takes it, or None."""
            from nbformat.v4 import output_from_msg

            assert self.cap is not None
            out = output_from_msg(msg)
            if out["output_type"] == "error":
                short = self.cap.error(out)
                if short is out:
                    return super().output(outs, msg, display_id, cell_index)
                msg = {**msg, "content": {**msg["content"], **{k: short[k] for k in ("ename", "evalue", "traceback")}}}
                kept = super().output(outs, msg, display_id, cell_index)
                held = outs if hook is None else hook.outputs
                if held and held[-1]["output_type"] == "error":
                    where, at = self.cap.latest(outs, cell_index, held, held[-1], size(out))
                    if where is outs:
                        self._shift(cell_index, at)
                return kept
            nbytes, kind = size(out), str(out["output_type"])
            if (
                self.cap.result(cell_index, nbytes)
                if kind == "execute_result" and hook is None
                else self.cap.take(nbytes)
            ):
                return super().output(outs, msg, display_id, cell_index)
            if hook is None:
                self._clear_now(outs, cell_index)
            self.cap.drop(outs, cell_index, out, kind)
            return None

        def _shift(self, cell_index: int, at: int) -> None:
            """Output `at` left cell `cell_index`: the displays after it that are updated by id moved up one."""
            for cells in self._display_id_map.values():
                if cell_index in cells:
                    cells[cell_index] = [i - (i > at) for i in cells[cell_index] if i != at]

        def set_widgets_metadata(self) -> None:
            """Save the widgets' state in the notebook's metadata, as much of it as the budget has room for."""
            super().set_widgets_metadata()
            saved = self.nb.metadata.get("widgets") if self.cap is not None else None
            if not saved or self.cap is None:
                return
            models = saved.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
            counted = set()  # output widgets whose outputs were counted as they were captured
            for model_id, widget in self.comm_objects.items():
                state = models.get(model_id, {}).get("state", {})
                mine = getattr(widget, "outputs", None)
                # unless the kernel set them itself since (`append_display_data`): then they count as state
                if mine is not None and (state.get("outputs") is mine or state.get("outputs") == mine):
                    state["outputs"] = mine
                    counted.add(model_id)
            note = self.cap.widgets(models, counted)
            if note:
                self.nb.metadata.setdefault("bkg", {})["output_cap"] = note

    class WarmEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(
            cls,
            nb_man: Any,
            kernel_name: str,
            log_output: bool = False,
            stdout_file: Any = None,
            stderr_file: Any = None,
            start_timeout: float = 60,
            execution_timeout: float | None = None,
            **kwargs: Any,
        ) -> Any:
            kc = kwargs.pop("kc")
            limit = kwargs.pop("max_output_bytes", None)
            kwargs.pop("input_path", None)
            kwargs.pop("timeout", None)
            kwargs.pop("startup_timeout", None)
            client = CappedClient(
                nb_man,
                kernel_name=kernel_name,
                log_output=log_output,
                stdout_file=stdout_file,
                stderr_file=stderr_file,
                startup_timeout=start_timeout,
                timeout=execution_timeout,
                # after a cell's reply, how long its outputs may take to come in and be kept: nbclient's 4 s failed
                # a run whose cell showed 2,000 displays on a loaded machine (a dying kernel still ends it at once)
                iopub_timeout=IOPUB_WAIT_S,
                **kwargs,
            )
            client.kc = kc
            client.widget_registry["@jupyter-widgets/output"]["OutputModel"] = CapturingWidget
            client.cap = OutputCap(int(limit)) if limit is not None else None
            return client.execute()

    papermill_engines.register(ENGINE, WarmEngine)


# the Python kernel, started by `kernel_app` (ipykernel's, with an unbounded IOPub send queue); jupyter_client puts
# its own Python for "python"
KERNEL_ARGV = ["python", "-m", "bkg_kernel.jobs.kernel_app", "-f", "{connection_file}"]


def _kernel_specs() -> Any:
    """The kernel specs a job kernel is found in: Jupyter's, with the Python kernel started by `kernel_app`."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class JobKernelSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            spec = super().get_kernel_spec(kernel_name)
            if kernel_name == KERNEL:
                spec.argv = list(KERNEL_ARGV)
            return spec

    return JobKernelSpecs()


def spawn_kernel(cwd: str) -> Any:
    """Start a kernel process over Unix sockets (it boots in the background: `warm` waits for it)."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    # jupyter_client names an IPC kernel's sockets after its connection file: <folder>/kernel-<id>-ipc-1 ... -5
    km = AsyncKernelManager(
        kernel_name=KERNEL,
        transport="ipc",
        connection_file=kernels.connection_file(),
        kernel_spec_manager=_kernel_specs(),
    )
    run_sync(km.start_kernel)(cwd=cwd)
    return km


def kernel_pid(km: Any) -> int | None:
    """The kernel's process id (also its process group: kernels start in their own session)."""
    proc = getattr(km.provisioner, "process", None)
    return int(proc.pid) if proc is not None else None


def _gone(km: Any) -> Callable[[], bool]:
    """Whether `km`'s kernel process has exited (killed by a cancel or a timeout, or crashed): a wait on it stops
    then, not at its deadline (a run cancelled while its kernel was being readied took a minute to end)."""

    def gone() -> bool:
        proc = getattr(km.provisioner, "process", None) if km is not None else None
        return proc is not None and proc.poll() is not None

    return gone


class KernelGone(RuntimeError):
    """The kernel exited while the run waited on it."""


async def _ready(kc: Any, timeout: float, gone: Callable[[], bool]) -> None:
    """Wait until the kernel answers on shell and its IOPub subscription is live (jupyter_client's wait_for_ready
    also waits for 0.2 s of IOPub silence, twice a run: that wait was most of a warm run's overhead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            raise KernelGone("the kernel exited before it answered")
        kc.kernel_info()
        try:
            await kc.get_shell_msg(timeout=1.0)
            await kc.get_iopub_msg(timeout=0.25)  # the kernel's busy/idle for that request: subscribed
            return
        except queue.Empty:
            continue
    raise RuntimeError(f"the kernel did not answer in {timeout:g} s")


async def _execute(kc: Any, code: str, timeout: float, gone: Callable[[], bool]) -> None:
    msg_id = kc.execute(code, silent=True, store_history=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            raise KernelGone("the kernel exited while it was being set up")
        try:
            reply = await kc.get_shell_msg(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"kernel set-up failed: {reply['content'].get('evalue', '')}")
            return
    raise RuntimeError(f"kernel set-up took more than {timeout:g} s")


def connect(km: Any, timeout: float = 60.0) -> Any:
    """A client on the kernel, ready (its channels started)."""
    import zmq
    from jupyter_core.utils import run_sync

    kc = km.client()
    # IOPub is PUB/SUB: past its high-water marks (1,000 messages queued on each side) zmq drops messages without a
    # word, the cell's `idle` among them, and the run waited for it until its timeout. The client's queue is
    # unbounded, so zmq's I/O thread takes all a kernel sends however busy this process is (a cell showing 2,000
    # displays on a loaded machine lost some). The kernel's send queue is unbounded too (`kernel_app`).
    kc.context.setsockopt(zmq.RCVHWM, 0)
    kc.start_channels()
    try:
        run_sync(_ready)(kc, timeout, _gone(km))
    except BaseException:
        kc.stop_channels()
        raise
    kc.allow_stdin = False
    return kc


def silent(kc: Any, code: str, timeout: float = 60.0, km: Any = None) -> None:
    """Run set-up code on the kernel without a trace in the notebook (no execution count, no history); stop as
    soon as `km`'s kernel exits, when given."""
    from jupyter_core.utils import run_sync

    run_sync(_execute)(kc, code, timeout, _gone(km))


def warm(km: Any) -> None:
    """Wait until the kernel answers and import what job notebooks use first."""
    kc = connect(km)
    try:
        silent(kc, WARM_IMPORTS, km=km)
    finally:
        kc.stop_channels()


def shutdown(km: Any) -> None:
    """Stop a kernel and reap its process (a killed one too)."""
    from jupyter_core.utils import run_sync

    with contextlib.suppress(Exception):  # already dead and reaped
        run_sync(km.shutdown_kernel)(now=True)


def _how_it_ended(km: Any) -> str:
    """How the kernel process ended (`exit code 1`, `killed by SIGKILL`), or "" while it runs or is unknown."""
    import signal

    proc = getattr(km.provisioner, "process", None) if km is not None else None
    code = proc.poll() if proc is not None else None
    if code is None:
        return ""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def mark_failed(output: str, raw_index: int, ename: str, evalue: str, note: str) -> None:
    """Mark cell `raw_index` of the written output notebook as the failed one, as papermill marks a cell that raised
    (`papermill.status: failed`, `exception: true`, an error output, the banner at the top linking to it): for a run
    that ended with no error from the kernel (it died, or was killed, while that cell ran)."""
    import nbformat
    from papermill.exceptions import PapermillExecutionError
    from papermill.execute import raise_for_execution_errors

    path = Path(output)
    if not path.is_file():
        return
    nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    if not 0 <= raw_index < len(nb.cells):
        return
    cell = nb.cells[raw_index]
    cell.setdefault("outputs", []).append(
        nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}", note])
    )
    cell.metadata.setdefault("papermill", {}).update(status="failed", exception=True)
    nb.metadata.setdefault("papermill", {})["exception"] = True
    for later in nb.cells[raw_index + 1 :]:  # papermill's end marked them completed: they never started
        meta = later.metadata.get("papermill", {})
        if meta.get("status") == "completed" and not meta.get("start_time"):
            meta["status"] = "pending"
    with contextlib.suppress(PapermillExecutionError):
        raise_for_execution_errors(nb, str(path))  # papermill's own banner and anchor; it writes the notebook


def code_cells(path: Path) -> int:
    """How many cells of the notebook will run (non-empty code cells)."""
    import nbformat

    nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    return sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())


def run(spec: dict[str, Any], km: Any, emit: Emit) -> dict[str, Any]:
    """Run `spec["input"]` into `spec["output"]` with `spec["parameters"]` on kernel `km`; return the outcome.

    The outcome holds ok, cells (run / total), duration and, for a failure, the cell index (as written), its
    source, ename, evalue and traceback. The output notebook is written either way (papermill marks the failed
    cell with an error banner), with no more than `spec["max_output_bytes"]` of output (`outputcap`). A kernel that
    dies while a cell runs (a crash, `os._exit`, out of memory, or killed by a cancel or a timeout) fails that cell:
    the error names it and the output notebook marks it as papermill marks a cell that raised."""
    import papermill as pm

    if ENGINE not in pm.engines.papermill_engines._engines:  # noqa: SLF001
        _register_engine()
    env, cwd = dict(spec.get("env") or {}), str(spec.get("cwd") or Path(spec["input"]).parent)
    kc = connect(km)
    silent(kc, f"import os as _o; _o.environ.update({env!r}); _o.chdir({cwd!r}); del _o", km=km)
    total = code_cells(Path(spec["input"]))
    state = {"offset": 0, "done": 0}
    running: dict[str, Any] = {}  # the cell that runs now: its index in the output notebook and as written, source

    def index(cell: Any, cell_index: int) -> int | None:
        if INJECTED in cell.get("metadata", {}).get("tags", []):
            return None
        return cell_index - state["offset"]

    def started(cell: Any, cell_index: int, **_: Any) -> None:
        running.update(raw=cell_index, index=index(cell, cell_index), source=str(cell.get("source", "")))
        if index(cell, cell_index) is None:
            state["offset"] += 1
            return
        emit(
            {
                "event": "cell",
                "id": spec["id"],
                "index": index(cell, cell_index),
                "state": "running",
                "done": state["done"],
                "total": total,
            }
        )

    def executed(cell: Any, cell_index: int, execute_reply: Any = None, **_: Any) -> None:
        running.clear()  # it ended (with an error too: papermill reports that one)
        i = index(cell, cell_index)
        if i is None:
            return
        state["done"] += 1
        ok = not execute_reply or execute_reply.get("content", {}).get("status") == "ok"
        emit(
            {
                "event": "cell",
                "id": spec["id"],
                "index": i,
                "state": "done" if ok else "error",
                "done": state["done"],
                "total": total,
            }
        )

    t0 = time.monotonic()
    error: dict[str, Any] | None = None
    try:
        pm.execute_notebook(
            notebooks.literal_path(spec["input"]),  # papermill fills {name} in both paths from the parameters
            notebooks.literal_path(spec["output"]),
            parameters=spec.get("parameters") or {},
            engine_name=ENGINE,  # papermill's nbclient engine on our connected client: no second ready wait
            kernel_name=KERNEL,  # what runs it (a notebook that declares no kernel too; another kernel is refused)
            language="python",
            km=km,
            kc=kc,
            progress_bar=False,
            on_cell_start=started,
            on_cell_executed=executed,
            execution_timeout=spec.get("cell_timeout_s"),
            max_output_bytes=spec.get("max_output_bytes"),  # output past this is cut or dropped (outputcap)
        )
    except pm.PapermillExecutionError as exc:
        error = {
            "cell_index": exc.cell_index - state["offset"],
            "source": exc.source[:20_000],
            "ename": exc.ename[:200],
            "evalue": exc.evalue[:2000],  # what a notebook raises is its author's: kept, sent and stored bounded
            "traceback": _ANSI.sub("", "\n".join(exc.traceback))[-20_000:],  # the end names the failing line
        }
    except Exception as exc:  # the kernel died (a crash, a cancel, a timeout) or could not run at all
        how = _how_it_ended(km)
        error = {
            "cell_index": None,
            "source": None,
            "ename": type(exc).__name__,
            "evalue": (f"{exc} ({how})" if how else str(exc))[:2000],
            "traceback": "",
        }
        if running:  # it ended while this cell ran: that cell failed (a cancel or a timeout names it too)
            error.update(cell_index=running["index"], source=running["source"][:20_000])
            note = (
                "The kernel ended while this cell ran: it crashed (a segfault, os._exit, out of memory) or the run "
                "was cancelled or timed out and its kernel killed."
            )
            with contextlib.suppress(Exception):  # the run's error is reported either way
                mark_failed(spec["output"], running["raw"], error["ename"], error["evalue"], note)
    finally:
        kc.stop_channels()
    return {
        "event": "done",
        "id": spec["id"],
        "ok": error is None,
        "error": error,
        "cells_done": state["done"],
        "cells_total": total,
        "duration_s": round(time.monotonic() - t0, 3),
        "output": spec["output"] if Path(spec["output"]).exists() else None,
    }
