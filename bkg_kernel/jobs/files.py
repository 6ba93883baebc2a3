"""The files a job notebook may read: the folders the gateway lets its jobs read (`job_file_roots`), never the data
dir's own files.

A job's kernel runs as the gateway's OS user, and a shipped notebook that reads a folder named by a parameter
(`index_documents`, `enroll_faces`) would otherwise read whatever that user can for anyone holding `jobs:run`: the
admin key, the store's database, another user's repositories. The job runner names the roots in the kernel's
environment (`BKG_FILE_ROOTS`, with `BKG_DATA_DIR`); a notebook run by hand, outside a job, reads as its person.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bkg_kernel.errors import escaped, is_utf8

ROOTS_ENV = "BKG_FILE_ROOTS"
FOLDER = "files"  # <data_dir>/files: the default root, and the one part of the data dir a job may read


def roots() -> list[Path] | None:
    """The folders a job may read, resolved; None outside a job (no limit: the person runs it themselves)."""
    value = os.environ.get(ROOTS_ENV)
    if value is None:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]


def readable_folder(folder: str) -> Path:
    """`folder` resolved, once it lies inside one of the job's file roots (PermissionError naming them if not)."""
    if not folder:
        raise ValueError("set the `folder` parameter to the folder to read")
    root = Path(folder).expanduser().resolve()
    allowed = roots()
    if allowed is not None and not any(root.is_relative_to(r) for r in allowed):
        names = ", ".join(str(r) for r in allowed) or "none"
        raise PermissionError(f"{root} is outside the folders jobs may read ({names}): the gateway's setting "
                              "job_file_roots (BKG_JOB_FILE_ROOTS) names them")  # fmt: skip
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return root


def readable_files(root: Path, patterns: Iterable[str], unnamed: list[str] | None = None) -> list[Path]:
    """The files under `root` that match the glob `patterns`, sorted; in a job, only those that really lie in one of
    its file roots (a symlink out of them is left out) and none of the data dir's own files. One whose path is not
    UTF-8 is left out too (no request could carry its name), its path relative to `root`, escaped, added to
    `unnamed`."""
    allowed = roots()
    data = os.environ.get("BKG_DATA_DIR")
    data_dir = Path(data).resolve() if data and allowed is not None else None
    found, odd = set(), set()
    patterns = list(patterns)
    for pattern in patterns:
        if pattern.replace("\\", "/").split("/").count("**") > 2:  # each more multiplies the walk ~9x (a review)
            raise ValueError(f"the pattern {pattern!r} has more than two '**' (each walks every depth again)")
    for pattern in patterns:
        for p in root.glob(pattern):
            if not p.is_file():
                continue
            if allowed is not None:
                real = p.resolve()
                if not any(real.is_relative_to(r) for r in allowed):
                    continue
                if data_dir is not None and _private(real, data_dir, allowed):
                    continue
            if not is_utf8(str(p)):
                odd.add(escaped(str(p.relative_to(root))))
                continue
            found.add(p)
    if unnamed is not None:
        unnamed.extend(sorted(odd))
    return sorted(found)


def _private(real: Path, data_dir: Path, allowed: list[Path]) -> bool:
    """Whether `real` is one of the data dir's own files (keys, the database, plugins' state): in it, and neither in
    its `files` folder nor in a folder of it named as a root. A root that is the data dir itself, or holds it, opens
    only its `files` folder (it had opened the keys: `job_file_roots` set to the data dir)."""
    if not real.is_relative_to(data_dir) or real.is_relative_to(data_dir / FOLDER):
        return False
    return not any(r != data_dir and r.is_relative_to(data_dir) and real.is_relative_to(r) for r in allowed)
