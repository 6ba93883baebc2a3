"""Work a request waits for, given up once its client goes away: Starlette runs a handler whose answer is not a
stream to its end even when nobody will read that answer. `while_connected` cancels the wait instead, and the plugin
call it waited on is abandoned (its slot's work told to stop: a generation ends between two tokens), as Ollama stops
a generation whose connection closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from bkg_kernel.errors import ClientGone

T = TypeVar("T")


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the request's client disconnects first: then `work` is cancelled and `ClientGone`
    raised. Call it once the request's body has been read (what the client sends next can only be its leaving)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    me = asyncio.current_task()
    if me is not None and me.cancelling():  # the server is stopping this handler meanwhile: that goes first
        raise asyncio.CancelledError
    raise ClientGone("the client went away before its answer was ready")
