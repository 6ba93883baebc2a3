"""The files a run keeps: what its notebook writes into its run's folder (`BKG_RUN_FILES`), listed and fetched with
the run (`GET /api/jobs/{id}/files`, `wb.jobs.files`, `bkg jobs files`) and deleted with it, as jupyter-scheduler
keeps a job's output files beside its output notebook.

In a notebook: `from bkg_kernel.jobs.kept import run_files; df.to_csv(run_files() / "report.csv")`. Each run has a
folder of its own (`<data_dir>/runs/<run id>.files`; on a Dask worker a temporary one, sent back when the run ends),
so two runs of one notebook never overwrite each other's files, unlike files written next to the notebook.

Only regular files are kept and served: a link (to the admin key, say) or a file with other hard links is left out,
so what a run keeps is what it wrote, never a way to read the gateway's own files.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

from bkg_kernel.errors import InvalidInput, NotFound

log = logging.getLogger("bkg.jobs")

ENV = "BKG_RUN_FILES"
SUFFIX = ".files"  # <runs_dir>/<run id>.files
MAX_FILES = 1000  # listed, and sent back from a Dask worker
MAX_ENTRIES = 20_000  # entries a listing looks at, files and folders (a run may leave a million)
MAX_DEPTH = 32  # folders deep
MAX_SENT_BYTES = 256 * 2**20  # sent back from a Dask worker, all files together (the rest are left there, named)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO opens at once, and is then refused


def run_files() -> Path:
    """The folder this run keeps its files in (made if missing): `BKG_RUN_FILES` in a job; outside one (a notebook
    run by hand), `run-files` in the working directory."""
    folder = Path(os.environ.get(ENV) or "run-files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open_folder(folder: Path) -> int | None:
    """The run's folder opened as itself (a link put in its place is not followed), or None when there is none."""
    try:
        return os.open(folder, _DIR)
    except OSError:
        return None


def _kept(st: os.stat_result) -> bool:
    """Whether a file opened (or looked at) is one a run keeps: regular, with no other hard link to it."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def listing(folder: Path) -> list[dict[str, Any]]:
    """The files kept in `folder` (names relative to it, '/'-separated, sorted): at most `MAX_FILES`, looking at
    `MAX_ENTRIES` entries at most, `MAX_DEPTH` folders deep; no link is followed, the folder's own included. Walked
    without recursion (a tree 10,000 deep is no matter), each folder opened when it is read: a few descriptors open
    at a time, however many folders there are."""
    out: list[dict[str, Any]] = []
    top = _open_folder(folder)
    if top is None:
        return out
    stack: list[list[str]] = [[]]  # folders to read, as their parts under the top
    seen = 0
    try:
        while stack and len(out) < MAX_FILES and seen < MAX_ENTRIES:
            parts = stack.pop()
            fd = _open_parts(top, parts)
            if fd is None:
                continue
            prefix = "".join(f"{p}/" for p in parts)
            try:  # each entry looked at while its folder is open (an entry's stat is made relative to it)
                with os.scandir(fd) as it:
                    entries = sorted(itertools.islice(it, MAX_ENTRIES - seen), key=lambda e: e.name)
                    seen += len(entries)
                    for entry in entries:
                        try:
                            (prefix + entry.name).encode("utf-8")
                            st = entry.stat(follow_symlinks=False)
                        except (UnicodeEncodeError, OSError):  # a name no URL could carry; gone meanwhile
                            continue
                        if stat.S_ISDIR(st.st_mode) and len(parts) + 1 < MAX_DEPTH:
                            stack.append([*parts, entry.name])
                        elif _kept(st) and len(out) < MAX_FILES:
                            out.append(
                                {"name": prefix + entry.name, "bytes": st.st_size, "modified": round(st.st_mtime, 3)}
                            )
            finally:
                if fd != top:
                    os.close(fd)
    finally:
        os.close(top)
    return sorted(out, key=lambda f: f["name"])


def _open_parts(top: int, parts: list[str]) -> int | None:
    """The folder `parts` under the open folder `top`, opened part by part without following a link (`top` itself
    for no parts); None when one is not a folder (any more)."""
    fd = top
    try:
        for part in parts:
            inner = os.open(part, _DIR, dir_fd=fd)
            if fd != top:
                os.close(fd)
            fd = inner
    except OSError:
        if fd != top:
            os.close(fd)
        return None
    return fd


def remove_tree(path: Path) -> None:
    """Remove a folder and all in it, following no link, however deep (`rm -rf`: shutil.rmtree recurses, and a
    RecursionError gets past its ignore_errors); what will not go is logged, never raised."""
    try:
        done = subprocess.run(["rm", "-rf", "--", str(path)], check=False, capture_output=True, text=True)
    except OSError as exc:  # no rm here
        log.warning("cannot remove %s: %s", path, exc)
        return
    if done.returncode != 0:
        log.warning("cannot remove all of %s: %s", path, done.stderr.strip()[-500:])


def _parts(name: Any) -> list[str] | None:
    """A kept file's name as its path's parts, or None for one that cannot be (absolute, `..`, empty parts, NUL)."""
    if not isinstance(name, str) or not name or "\x00" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    return None if any(p in ("", ".", "..") for p in parts) else parts


def open_kept(folder: Path, name: str) -> tuple[BinaryIO, os.stat_result]:
    """The kept file `name` (relative, '/'-separated) in `folder`, open, and its stat: 422 for a name that cannot be
    one (absolute, `..`, empty parts, NUL), 404 for one not kept there (missing, a link, on the way or in the
    folder's place, a folder, a FIFO, a hard-linked file). Each part is opened without following a link and the
    file is checked as opened, so a link swapped in after a check is never read; serve from the file returned."""
    parts = _parts(name)
    if parts is None:
        raise InvalidInput(f"{name!r} cannot name a kept file: a relative path, parts joined by '/', no '..'",
                           field="name")  # fmt: skip
    missing = NotFound(f"no kept file {name!r} (GET its run's /files lists them)", field="name")
    fd = _open_folder(folder)
    if fd is None:
        raise missing
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(parts[-1], _FILE, dir_fd=fd)
    except OSError:
        raise missing from None
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if not _kept(st):
        os.close(file_fd)
        raise missing
    os.set_blocking(file_fd, True)
    return os.fdopen(file_fd, "rb"), st


def collect(folder: Path) -> tuple[dict[str, bytes], list[str]]:
    """The kept files in `folder` to send back from a Dask worker: {name: bytes} up to `MAX_SENT_BYTES` in all,
    and the names left out past it."""
    sent: dict[str, bytes] = {}
    left: list[str] = []
    total = 0
    for entry in listing(folder):
        if total + entry["bytes"] > MAX_SENT_BYTES:
            left.append(entry["name"])
            continue
        try:
            f, _ = open_kept(folder, entry["name"])
        except (NotFound, InvalidInput):
            continue
        with f:
            sent[entry["name"]] = f.read(entry["bytes"])
        total += entry["bytes"]
    return sent, left


def store(folder: Path, sent: dict[str, Any]) -> None:
    """Write the files a Dask worker sent back into the run's `folder`, each name checked as `one` checks it."""
    for name, data in sent.items():
        parts = _parts(name)
        if parts is None or not isinstance(data, bytes):
            continue
        path = folder.resolve().joinpath(*parts)
        if path.resolve() != path:  # through a link (none is made here: a name sent twice, as file and folder)
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:  # a name sent as a file and as a folder: the first one stays
            continue
