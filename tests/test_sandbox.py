"""The sandbox's launcher with real processes: a command's descendants go with it, a daemon that left its process
group (double fork and `setsid`) too, whether the command ends, times out, is cancelled or its worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bkg_kernel.plugins.repoagent.sandbox import Limits, Outcome, run, scrubbed_env

# argv[1]: where the daemon writes its pid; argv[2]: how long the command sleeps once the daemon runs. The daemon
# leaves the group and the session, keeps the command's stdout, and names itself with a space and parens.
DAEMON = """
import ctypes, os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(15, b"d) 1 (x")  # PR_SET_NAME
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)
    os._exit(0)
os.wait()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("daemon started", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where the daemon writes its pid; whatever the test finds, no daemon outlives it."""
    path = tmp_path / "daemon.pid"
    yield path
    if path.exists() and _alive(pid := int(path.read_text())):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _daemon_gone(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _run(
    pid_file: Path, sleep_s: float, timeout_s: float = 30, should_stop: Callable[[], bool] | None = None
) -> Outcome:
    """Run the daemon's command in the sandbox, the way the worker does."""
    argv = [sys.executable, "-c", DAEMON, str(pid_file), str(sleep_s)]
    env = scrubbed_env(pid_file.parent, {})
    return run(argv, pid_file.parent, env, timeout_s, Limits(), should_stop=should_stop)


def test_a_daemon_goes_when_its_command_ends(pid_file: Path) -> None:
    outcome = _run(pid_file, 0)
    assert outcome.exit_code == 0 and not outcome.timed_out and "daemon started" in outcome.output
    assert _daemon_gone(pid_file), "a setsid daemon outlived its command"


def test_a_daemon_goes_when_its_command_times_out(pid_file: Path) -> None:
    outcome = _run(pid_file, 60, timeout_s=1)
    assert outcome.exit_code == -signal.SIGKILL and outcome.timed_out and "[killed after 1 s" in outcome.output
    assert _daemon_gone(pid_file), "a setsid daemon outlived its command's timeout"


def test_a_daemon_goes_when_its_command_is_cancelled(pid_file: Path) -> None:
    outcome = _run(pid_file, 60, should_stop=pid_file.exists)
    assert outcome.exit_code == -signal.SIGKILL and not outcome.timed_out and "[cancelled" in outcome.output
    assert _daemon_gone(pid_file), "a setsid daemon outlived its cancelled command"


def test_a_daemon_goes_when_its_worker_dies(pid_file: Path) -> None:
    """The worker is SIGKILLed: the kernel tells the launcher (PR_SET_PDEATHSIG), which kills every descendant."""
    worker_code = (
        "import sys; from pathlib import Path; from bkg_kernel.plugins.repoagent.sandbox import Limits, run, "
        "scrubbed_env; p = Path(sys.argv[1]); argv = [sys.executable, '-c', sys.argv[2], str(p), '60']; "
        "run(argv, p.parent, scrubbed_env(p.parent, {}), 60, Limits())"
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_code, str(pid_file), DAEMON])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), "the daemon never started"
    finally:
        worker.kill()
        worker.wait()
    assert _daemon_gone(pid_file), "a setsid daemon outlived its command's worker"
