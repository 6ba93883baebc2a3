"""The small files that hold bkg's state beside the store (`plugins.json`, the key files, a plugin's own JSON):
written whole or not at all, and read back with a clear word when a crash or a full disk left one damaged.

`write` takes a temp file of its own in the same folder (two writers never share one), puts it on the disk, renames
it over the old file and syncs the folder, so a power loss leaves the old file or the new one, never a torn or empty
one. `load` turns a file that is not what it should be into a `CorruptData` naming it; `set_aside` keeps such a
file under another name (`<name>.damaged-<UTC time>`) for the owner who can lose it (a plugin's statistics) and
starts afresh; `sweep` removes the temp files of writers that were killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bkg_kernel.errors import CorruptData

log = logging.getLogger("bkg.state")


def write(path: Path, data: str | bytes, durable: bool = True, private: bool = False) -> Path:
    """Replace `path` with `data`, whole or not at all, with the mode a new file gets (the umask's), or readable by
    its owner only when `private` (a key). `durable=False` for what may be lost (counters written often): not
    forced to the disk, so a power loss may leave the old file, or an empty one that `load` reports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600 until renamed
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    if durable:
        _sync_folder(path.parent)
    return path


def write_json(path: Path, value: Any, durable: bool = True) -> Path:
    """`write` of `value` as JSON."""
    return write(path, json.dumps(value, indent=1), durable)


def load(path: Path, kind: type = dict) -> Any:
    """`path`'s JSON, which must be a `kind`; a file that is not JSON, or holds something else, is a `CorruptData`
    that names it. A file that cannot be read at all (no permission, an I/O error) raises its OSError: it is not
    damaged, and nothing may be set aside or started afresh over it."""
    raw = path.read_bytes()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise CorruptData(f"{path} cannot be read ({why})") from None
    if not isinstance(value, kind):
        raise CorruptData(f"{path} holds {_named(type(value))}, not {_named(kind)}")
    return value


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged `path` to `<name>.damaged-<UTC time>` (kept for its owner to look at) and log `why`."""
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    os.replace(path, aside)
    log.warning("%s; kept as %s, and started without it", why, aside.name)
    return aside


def sweep(path: Path) -> int:
    """Remove the temp files that killed writers of `path` left (call where no other writer runs: at open)."""
    gone = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            gone += 1
    return gone


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting it, set back at once: at import, before threads write files
    os.umask(mask)
    return mask


_UMASK = _umask()


def _named(kind: type) -> str:
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(kind, f"a {kind.__name__}")


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
