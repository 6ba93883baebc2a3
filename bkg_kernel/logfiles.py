"""Log files that bkg hands to the processes it starts (the auto-started gateway's `gateway.log`, the job workers'
`runs/workers.log`): opened for appending, and rotated first once they pass `MAX_BYTES`, keeping `KEEP` older
copies (`gateway.log.1` the newest), as Ollama keeps its server logs. The processes write to them only when
something goes wrong, so a start is a fine time to look."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO

MAX_BYTES = 10 * 2**20
KEEP = 3


def open_log(path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> BinaryIO:
    """`path` opened for appending (its folder made), after rotating it when it holds `max_bytes` or more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a log that cannot be rotated is still written to
        if path.stat().st_size >= max_bytes:
            for n in range(keep - 1, 0, -1):
                older = path.with_name(f"{path.name}.{n}")
                if older.exists():
                    older.replace(path.with_name(f"{path.name}.{n + 1}"))
            path.replace(path.with_name(f"{path.name}.1"))
    return open(path, "ab")  # noqa: SIM115 - handed to a child process by the caller
