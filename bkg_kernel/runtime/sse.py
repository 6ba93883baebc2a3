"""A plugin's stream as server-sent events, for plugin routes (`routes(api)` hooks).

The first chunk is awaited before the response starts, so whatever fails before it (validation, an
allow-list, a model that will not load) is still a plain HTTP error; later failures become an `{"error": ...}`
event. The stream ends with `data: [DONE]`, and a client that leaves cancels the work (its slot frees at once).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from bkg_kernel.errors import BkgError


async def event_stream(
    chunks: AsyncGenerator[dict[str, Any], None],
    render: Callable[[dict[str, Any]], dict[str, Any] | None],
    error: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """Return a `text/event-stream` response of `render(chunk)` for each chunk (None: the chunk is not sent); a
    failure mid-stream is the event `error(<its error body>)` (default: the body as it is)."""
    from fastapi.responses import StreamingResponse

    try:
        first: dict[str, Any] | None = await chunks.__anext__()
    except StopAsyncIteration:
        first = None

    async def events() -> AsyncIterator[str]:
        try:
            pending = [first] if first is not None else []
            while True:
                event = render(pending.pop() if pending else await chunks.__anext__())
                if event is not None:
                    yield f"data: {json.dumps(event)}\n\n"
        except StopAsyncIteration:
            yield "data: [DONE]\n\n"
        except BkgError as exc:  # the worker died or timed out mid-stream: say so in the stream
            said = exc.to_dict()
            yield f"data: {json.dumps(error(said) if error is not None else said)}\n\n"
        finally:
            await chunks.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
