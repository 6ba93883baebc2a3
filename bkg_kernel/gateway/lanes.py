"""A lane: a few threads of its own for one kind of long blocking work, with a bound on what may wait for them.

The event loop's default executor serves every route's short store work; work that may take minutes (hashing a
model of gigabytes) started there by anyone who may read would take its threads from everyone. A lane keeps such
work to its own threads, and past `max_pending` (running or waiting) answers 429 at once instead of queueing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bkg_kernel.errors import TooManyRequests


class Lane:
    """`await lane.run(fn, *args)`: `fn(*args)` on the lane's threads (429 when `max_pending` are already in)."""

    def __init__(self, name: str, *, threads: int, max_pending: int, what: str) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.max_pending, self.what = max_pending, what
        self.pending = 0  # touched on the event loop only

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.pending >= self.max_pending:
            raise TooManyRequests(f"{self.pending} {self.what} are running or waiting (at most {self.max_pending})")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1
