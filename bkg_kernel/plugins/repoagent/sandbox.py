"""Allow-listed commands, run as a process-level sandbox (no container engine runs here).

A command is an argv template from the settings, never a shell line: extra arguments are appended as argv
items only where the command allows them. The child runs in the workspace with a scrubbed environment,
`resource` rlimits (CPU seconds, address space, file size, no core files), stdin closed, in its own
process group. A small launcher leads the group, waits for the command and is its children's subreaper
(PR_SET_CHILD_SUBREAPER): whatever the command starts, in the group or out of it (`setsid`, a double-forked
daemon), is reparented to the launcher when its parent dies, never to init. Before the launcher exits, after the
command's normal exit, when the worker tells it to stop (a timeout, a cancel), or when the worker dies without a
word (SIGKILLed, or with its gateway: the kernel tells it, PR_SET_PDEATHSIG), it kills every descendant left; the
worker then kills the group as well. What remains out of reach of a process-level sandbox: a descendant it may not
signal (a setuid program), and the descendants of a launcher that is itself SIGKILLed before it could sweep.
Output is read as it comes, handed to `on_output`, and kept up to a cap.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bkg_kernel.errors import Forbidden, InvalidInput
from bkg_kernel.plugins.repoagent.workspace import git_safe_env


class CommandSpec(BaseModel):
    """One allow-listed command."""

    argv: list[str] = Field(..., min_length=1, description="Program and fixed arguments (no shell).")
    extra_args: bool = Field(False, description="Whether a caller may append arguments.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Seconds before the process group is killed.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    description: str = ""


class Limits(BaseModel):
    """Resource limits of every command."""

    cpu_seconds: int = Field(600, ge=1, le=86_400, description="RLIMIT_CPU of the child.")
    memory_mb: int = Field(4096, ge=64, le=1_048_576, description="RLIMIT_AS (address space) of the child, MB.")
    file_size_mb: int = Field(256, ge=1, le=1_048_576, description="RLIMIT_FSIZE: the largest file it may write.")
    max_output_bytes: int = Field(1_000_000, ge=1_000, le=100_000_000, description="Output kept; the rest dropped.")


def default_commands() -> dict[str, CommandSpec]:
    """The allow-list a fresh install has: read-only git views. Nothing that runs the workspace's own code (a test
    runner would): such a command can read whatever the gateway's OS user can, the data dir's keys included, so
    an operator adds one only for callers trusted that far."""
    return {
        "git-log": CommandSpec(argv=["git", "log", "--oneline", "-n", "30"], description="The last 30 commits."),
        "git-status": CommandSpec(argv=["git", "status", "--short"], description="Changed files."),
    }  # fmt: skip


@dataclass
class Outcome:
    """What a command did."""

    exit_code: int
    output: str
    truncated: bool
    timed_out: bool
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        """Describe it as JSON."""
        return self.__dict__.copy()


def scrubbed_env(cwd: Path, extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment: PATH (this Python's bin first), HOME in the workspace, no keys or tokens."""
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": str(cwd), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    # git reads $HOME/.gitconfig, and HOME is the workspace, which callers write: no user or system config at all,
    # and the keys through which a repository's config names programs are pinned (workspace.GIT_SAFE)
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "TERM": "dumb", **git_safe_env(cwd)})
    env["GIT_CEILING_DIRECTORIES"] = str(cwd.parent)  # a workspace that is no repository is not in one above it
    return {**env, **extra}


def build_argv(name: str, spec: CommandSpec, args: list[str], env: dict[str, str]) -> list[str]:
    """The argv to run: the template, then the caller's arguments where allowed; argv[0] found on PATH."""
    if args and not spec.extra_args:
        raise Forbidden(f"command {name!r} takes no extra arguments", field="args")
    for i, a in enumerate(args):
        if "\0" in a or len(a) > 4096:
            raise InvalidInput("an argument cannot contain NUL or exceed 4096 characters", field=f"args.{i}")
    exe = shutil.which(spec.argv[0], path=env["PATH"])
    if exe is None:
        raise InvalidInput(f"command {name!r}: {spec.argv[0]!r} is not installed", field="name")
    return [exe, *spec.argv[1:], *args]


def run(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout_s: float,
    limits: Limits,
    on_output: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Run `argv` in its own process group with rlimits; kill it and every descendant when it ends, on timeout
    or when `should_stop()`."""

    mb = 1024 * 1024
    rl = [limits.cpu_seconds, limits.memory_mb * mb, limits.file_size_mb * mb]
    # The limits are set by a tiny launcher, not a preexec_fn: forking a threaded worker and running Python in
    # the child before exec can deadlock. The launcher stays, as the group's leader, until the command ends.
    wrapped = [sys.executable, "-S", "-c", _LIMITER, *map(str, rl), str(os.getpid()), *argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        wrapped, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    kept: list[bytes] = []
    size = [0, 0]  # kept bytes, total bytes

    def pump() -> None:
        stdout = proc.stdout
        assert isinstance(stdout, io.BufferedReader)
        for block in iter(lambda: stdout.read1(65536), b""):
            size[1] += len(block)
            room = limits.max_output_bytes - size[0]
            if room > 0:
                kept.append(block[:room])
                size[0] += min(room, len(block))
                if on_output is not None:
                    on_output(block[:room].decode(errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = stopped = False
    try:
        while True:
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > timeout_s:
                    timed_out = True
                    break
                if should_stop is not None and should_stop():
                    stopped = True
                    break
    finally:
        if proc.poll() is None:  # timed out or stopped: the launcher kills every descendant, then itself
            proc.send_signal(_TOLD)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _kill_group(proc.pid)  # the group too, whether it ended, timed out or was stopped (the launcher if stuck)
        proc.wait()
        reader.join(5)
    duration = time.monotonic() - t0
    code = proc.returncode
    if (timed_out or stopped) and code == -_TOLD:  # told before it could catch it: it had started nothing
        code = -signal.SIGKILL
    output = b"".join(kept).decode(errors="replace")
    if timed_out:
        output += f"\n[killed after {timeout_s:g} s: the command and its children were stopped]\n"
    elif stopped:
        output += "\n[cancelled: the command and its children were stopped]\n"
    if size[1] > size[0]:
        output += f"\n[output cut at {limits.max_output_bytes} bytes of {size[1]}]\n"
    return Outcome(code, output, size[1] > size[0], timed_out, round(duration, 3))


# A signal no command sends its own group (a `kill -TERM 0` stays the command's business): the worker's word to
# the launcher to stop (and the kernel's, when the worker dies).
_TOLD = signal.SIGRTMIN + 3

_LIMITER = """
import ctypes, os, resource, signal, sys, time
cpu, mem, fsize, parent = (int(v) for v in sys.argv[1:5])
prctl = getattr(ctypes.CDLL(None), "prctl", None)
launcher = os.getpid()


def children():  # every process whose parent is this launcher (/proc/N/stat: the ppid is after the last ')')
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(b")", 1)[1].split()[1]) == launcher:
            found.append(int(name))
    return found


def sweep():  # kill every descendant: each one killed hands its own children to this subreaper, so until none
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:  # no child left, so no descendant either
            return
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone, or one it may not signal (setuid)
                pass
        time.sleep(0.01)


def stop(*_):  # the worker timed out, cancelled, or died: the command and all it started go, then this launcher
    sweep()
    os.kill(launcher, signal.SIGKILL)


told = signal.SIGRTMIN + 3  # sandbox._TOLD
signal.signal(told, stop)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the workspace, the command's or this one's
if prctl is not None:  # told when the worker that runs it dies (PR_SET_PDEATHSIG); orphans of the command
    prctl(1, told)  # come to this launcher, not to init (PR_SET_CHILD_SUBREAPER)
    prctl(36, 1)
if os.getppid() != parent:
    stop()
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    signal.signal(told, signal.SIG_DFL)
    if prctl is not None:  # and the command dies if its launcher is killed
        prctl(1, signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(137)
    try:
        os.execv(sys.argv[5], sys.argv[5:])
    except OSError as exc:
        os.write(2, f"cannot run {sys.argv[5]}: {exc}\\n".encode())
        os._exit(127)
while True:  # reap the orphans that come meanwhile too, until the command itself ends
    got, status = os.waitpid(-1, 0)
    if got == pid:
        break
signal.signal(told, signal.SIG_IGN)  # it ended: the sweep below does what a late word would ask
sweep()
code = os.waitstatus_to_exitcode(status)
if code < 0:  # killed by a signal: so is this launcher, and the worker sees that signal
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL keeps its default
        pass
    os.kill(launcher, -code)
    os._exit(128 - code)  # a signal whose default is to ignore it
os._exit(code)
"""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
