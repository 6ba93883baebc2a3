"""A job's kernel client takes everything the kernel sends on IOPub, however far behind it is. IOPub is zmq PUB/SUB:
past the high-water marks (1,000 messages queued on each side) messages were dropped without a word, the cell's
`idle` among them, so a run whose client fell behind (2,000 displays on a loaded machine, in a CI run) waited for
that `idle` until its timeout and failed. A real kernel here, its client not reading while a cell sends 5,000
displays: every one of them arrives, and the `idle` after them."""

from __future__ import annotations

import queue
from pathlib import Path

from jupyter_core.utils import run_sync

from bkg_kernel.jobs import execute

N = 5000


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
            show = "display({'text/plain': str(i)}, raw=True)"
            code = f"from IPython.display import display\nfor i in range({N}):\n    {show}"
            msg_id = kc.execute(code)
            run_sync(_reply)(kc, msg_id)  # the cell has ended: all it sent is queued somewhere, nothing read yet
            shown, idle = run_sync(_drain)(kc)
            assert (shown, idle) == (N, True)
        finally:
            kc.stop_channels()
    finally:
        execute.shutdown(km)
