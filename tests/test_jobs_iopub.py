"""A job's kernel and its client keep everything the kernel sends on IOPub, however far behind the reader is. IOPub
is zmq PUB/SUB: past the high-water marks (1,000 messages queued on each side) messages were dropped without a word,
the cell's `idle` among them, so a run whose client fell behind (2,000 displays on a loaded machine, in a CI run)
waited for that `idle` until its timeout and failed, or kept a part of its outputs. Real kernels here: a client not
reading while a cell sends 5,000 displays gets every one of them and the `idle` after them; a subscriber that takes
one at a time (so the kernel queues them) gets every one too."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from jupyter_core.utils import run_sync

from bkg_kernel.jobs import execute

N = 5000
SHOW = "display({'text/plain': str(i)}, raw=True)"


async def _drain(kc: object) -> tuple[int, bool]:
    shown, idle = 0, False
    while True:
        try:
            msg = await kc.get_iopub_msg(timeout=5)  # type: ignore[attr-defined]
        except queue.Empty:
            return shown, idle
        shown += msg["msg_type"] == "display_data"
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" and shown:
            idle = True


async def _reply(kc: object, msg_id: str) -> None:
    while True:
        reply = await kc.get_shell_msg(timeout=120)  # type: ignore[attr-defined]
        if reply["parent_header"].get("msg_id") == msg_id:
            assert reply["content"]["status"] == "ok", reply["content"]
            return


def test_a_client_far_behind_its_kernel_loses_no_output(tmp_path: Path) -> None:
    km = execute.spawn_kernel(str(tmp_path))
    try:
        kc = execute.connect(km)
        try:
            code = f"from IPython.display import display\nfor i in range({N}):\n    {SHOW}"
            msg_id = kc.execute(code)
            run_sync(_reply)(kc, msg_id)  # the cell has ended: all it sent is queued somewhere, nothing read yet
            shown, idle = run_sync(_drain)(kc)
            assert (shown, idle) == (N, True)
        finally:
            kc.stop_channels()
    finally:
        execute.shutdown(km)


def _sub(km: object) -> Any:
    """A bare IOPub subscriber that takes one message at a time: a reader as slow as zmq lets it be, so what the
    kernel sends queues on the kernel's side."""
    import zmq

    info = km.get_connection_info()  # type: ignore[attr-defined]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.rcvhwm = 1
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{info['ip']}-{info['iopub_port']}")
    return sub


def _shown_to(sub: Any, kc: object, code: str, quiet_ms: int = 5000) -> int:
    """Run `code` on `kc` and count the displays `sub` gets of it (read once the cell has ended, until `quiet_ms`
    pass without a message)."""
    msg_id = kc.execute(code)  # type: ignore[attr-defined]
    run_sync(_reply)(kc, msg_id)
    shown = 0
    while sub.poll(quiet_ms):
        parts = sub.recv_multipart()
        shown += parts[0].endswith(b"display_data")
    return shown


def test_a_kernel_far_ahead_of_its_reader_drops_no_output(tmp_path: Path) -> None:
    """The kernel's side: its IOPub send queue is unbounded too (`kernel_app`): a reader held to one message at a
    time, which makes the kernel queue nearly all of 5,000 displays, gets every one of them. With ipykernel's own
    launcher 1,000 or so arrived."""
    km = execute.spawn_kernel(str(tmp_path))
    try:
        kc = execute.connect(km)
        sub = _sub(km)
        try:
            show = "from IPython.display import display\ndisplay({'text/plain': 'x'}, raw=True)"
            assert any(_shown_to(sub, kc, show, quiet_ms=300) for _ in range(50))  # subscribed (a PUB drops before)
            code = f"from IPython.display import display\nfor i in range({N}):\n    {SHOW}"
            assert _shown_to(sub, kc, code) == N
        finally:
            sub.close(linger=0)
            kc.stop_channels()
    finally:
        execute.shutdown(km)


def test_a_job_kernel_imports_from_its_notebooks_folder(tmp_path: Path) -> None:
    """`kernel_app` takes the notebook's folder off `sys.path` while ipykernel loads; the notebook's code still
    imports a module next to it, as in a kernel ipykernel's own launcher starts (a `-P` to Python lost it)."""
    (tmp_path / "next_to_it.py").write_text("ANSWER = 42\n")
    km = execute.spawn_kernel(str(tmp_path))
    try:
        kc = execute.connect(km)
        try:
            msg_id = kc.execute("import next_to_it\nassert next_to_it.ANSWER == 42")
            run_sync(_reply)(kc, msg_id)
        finally:
            kc.stop_channels()
    finally:
        execute.shutdown(km)
