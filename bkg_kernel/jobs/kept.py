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

import os
import stat
from pathlib import Path
from typing import Any

from bkg_kernel.errors import InvalidInput, NotFound

ENV = "BKG_RUN_FILES"
SUFFIX = ".files"  # <runs_dir>/<run id>.files
MAX_FILES = 1000  # listed, and sent back from a Dask worker
MAX_SENT_BYTES = 256 * 2**20  # sent back from a Dask worker, all files together (the rest are left there, named)


def run_files() -> Path:
    """The folder this run keeps its files in (made if missing): `BKG_RUN_FILES` in a job; outside one (a notebook
    run by hand), `run-files` in the working directory."""
    folder = Path(os.environ.get(ENV) or "run-files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _kept(path: Path) -> os.stat_result | None:
    """`path`'s stat when it is a file a run may keep: regular, not a link, no other hard link to it."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


def listing(folder: Path) -> list[dict[str, Any]]:
    """The files kept in `folder` (names relative to it, '/'-separated, sorted), at most `MAX_FILES`; folders that
    are links are not walked."""
    out: list[dict[str, Any]] = []
    if not folder.is_dir():
        return out
    for base, dirs, names in os.walk(folder):  # os.walk does not follow links to folders
        dirs.sort()
        for name in sorted(names):
            path = Path(base, name)
            st = _kept(path)
            if st is None:
                continue
            rel = path.relative_to(folder).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # a name no URL could carry
                continue
            out.append({"name": rel, "bytes": st.st_size, "modified": round(st.st_mtime, 3)})  # as runs' times
            if len(out) >= MAX_FILES:
                return sorted(out, key=lambda f: f["name"])
    return sorted(out, key=lambda f: f["name"])


def _parts(name: Any) -> list[str] | None:
    """A kept file's name as its path's parts, or None for one that cannot be (absolute, `..`, empty parts, NUL)."""
    if not isinstance(name, str) or not name or "\x00" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    return None if any(p in ("", ".", "..") for p in parts) else parts


def one(folder: Path, name: str) -> Path:
    """The kept file `name` (relative, '/'-separated) in `folder`: 422 for a name that cannot be one (absolute,
    `..`, empty parts, NUL), 404 for one not kept there (missing, a link, a folder, outside the folder)."""
    parts = _parts(name)
    if parts is None:
        raise InvalidInput(f"{name!r} cannot name a kept file: a relative path, parts joined by '/', no '..'",
                           field="name")  # fmt: skip
    path = folder.resolve().joinpath(*parts)
    if path.resolve() != path or _kept(path) is None:  # a link on the way, or not a file kept
        raise NotFound(f"no kept file {name!r} (GET its run's /files lists them)", field="name")
    return path


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
            sent[entry["name"]] = (folder / entry["name"]).read_bytes()
        except OSError:
            continue
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
