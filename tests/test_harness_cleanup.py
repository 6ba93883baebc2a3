"""The test harness's gateways stop themselves when the test process ends, also where nothing stopped them (a
module fixture whose setup failed after its gateway started): a real gateway, started by a real Python process that
then exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
from gateway_harness import wait_for

HERE = Path(__file__).resolve().parent


def test_a_gateway_left_running_stops_when_its_test_process_ends(tmp_path: Path) -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from gateway_harness import start_gateway; "
        "g = start_gateway(Path(sys.argv[2]), plugins=['sysinfo']); print(g.proc.pid, flush=True)"
    )  # exits without g.stop(), as a failed fixture does
    out = subprocess.run(
        [sys.executable, "-c", script, str(HERE), str(tmp_path / "data")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.split()[-1])
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30)
