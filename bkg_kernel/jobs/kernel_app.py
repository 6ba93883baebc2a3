"""The kernel a job runs in: ipykernel's own, but its IOPub socket queues without a bound.

IOPub is zmq PUB/SUB: past its send high-water mark (1,000 messages queued for a subscriber) a PUB socket drops
messages without a word, and ipykernel has no setting for it. A cell that shows thousands of displays faster than a
busy machine lets the job's client read them lost some (the client's side is unbounded already: `execute.connect`).
Started as `python -m bkg_kernel.jobs.kernel_app -f <connection file>` (`execute.spawn_kernel`). As
`ipykernel_launcher` does, it takes the notebook's folder off `sys.path` while ipykernel loads (IPython puts it back
for the notebook's code, after the standard library).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def app_class() -> Any:
    """ipykernel's kernel application with an unbounded IOPub send queue."""
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    class JobKernelApp(IPKernelApp):
        def init_iopub(self, context: Any) -> None:
            # a default on the kernel's context applies to the sockets made while it is set: IOPub's alone here
            context.setsockopt(zmq.SNDHWM, 0)
            try:
                super().init_iopub(context)
            finally:
                context.sockopts.pop(zmq.SNDHWM, None)

    return JobKernelApp


if __name__ == "__main__":
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    app_class().launch_instance()
