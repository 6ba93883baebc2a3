"""A lane (`bkg_kernel.gateway.lanes`): long blocking work on its own threads, bounded, never the loop's pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bkg_kernel.errors import TooManyRequests
from bkg_kernel.gateway.lanes import Lane


def test_a_full_lane_refuses_at_once_and_leaves_the_default_pool_free() -> None:
    release = threading.Event()
    started: list[str] = []

    def long_work(tag: str) -> str:
        started.append(threading.current_thread().name)
        release.wait(30)
        return tag

    async def main() -> None:
        lane = Lane("t-lane", threads=2, max_pending=3, what="hashes")
        work = [asyncio.create_task(lane.run(long_work, f"w{i}")) for i in range(3)]
        deadline = asyncio.get_running_loop().time() + 30
        while len(started) < 2:  # the lane's threads start when they start: polled, not a fixed wait
            assert asyncio.get_running_loop().time() < deadline, started
            await asyncio.sleep(0.01)
        assert len(started) == 2 and all(n.startswith("t-lane") for n in started)  # two run, one waits
        with pytest.raises(TooManyRequests) as exc:
            await lane.run(long_work, "one too many")
        assert "3 hashes" in exc.value.message and len(started) == 2  # the third still waits for a thread
        # the loop's own executor is untouched by the lane's work
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
        release.set()
        assert await asyncio.gather(*work) == ["w0", "w1", "w2"]
        assert lane.pending == 0 and await lane.run(str.upper, "again") == "AGAIN"
        lane.pool.shutdown()

    asyncio.run(main())
