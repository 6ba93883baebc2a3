"""Job notifications: POST a run's summary to a webhook URL (per schedule, or `job_webhook_url` for every run).

A webhook may reach any public host; a loopback, link-local or private one only when `webhook_allow` lists it,
so a schedule cannot make the gateway call services on its own network. A failed call is logged and given up
after three tries; it never changes the run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from bkg_kernel.errors import Forbidden, InvalidInput
from bkg_kernel.models.download import non_public, resolve

log = logging.getLogger("bkg.jobs")
SUMMARY = (
    "id",
    "notebook",
    "state",
    "owner",
    "schedule_id",
    "attempt",
    "parameters",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "cells_done",
    "cells_total",
    "error",
    "message",
    "output_path",
    "html_path",
)


def check_url(url: Any, allow: Sequence[str]) -> str:
    """Return `url` if it is http(s) and its host is public or listed in `allow` (blocking: resolves the host)."""
    target(url, allow)
    return str(url)


def target(url: Any, allow: Sequence[str]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Where to send a webhook: (URL, headers, httpx extensions). A host not listed in `allow` is resolved once,
    checked, and the request goes to that checked address (Host header and TLS name kept), so a DNS answer that
    changes between the check and the request (rebinding) cannot point it at a private address."""
    if not isinstance(url, str) or len(url) > 2000:
        raise InvalidInput("webhook_url must be an http(s) URL", field="webhook_url")
    try:
        u = urlparse(url)
        u.port  # noqa: B018 - a port out of range (or not a number) raises here, not later
    except ValueError as exc:
        raise InvalidInput(f"webhook_url is not a URL: {exc}", field="webhook_url") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InvalidInput(f"webhook_url must be an http(s) URL, not {url[:100]!r}", field="webhook_url")
    host = u.hostname.lower()
    if any(fnmatch.fnmatch(host, pat.lower()) for pat in allow):
        return url, {}, {}
    try:
        addresses = resolve(host)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode (an empty or 64+ label)
        raise InvalidInput(f"cannot resolve the webhook host {host!r}: {exc}", field="webhook_url") from None
    bad = non_public(addresses)
    if bad is not None or not addresses:
        raise Forbidden(f"webhook host {host!r} is {bad}, a non-public address: list it in webhook_allow",
                        field="webhook_url")  # fmt: skip
    ip = addresses[0]
    netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{u.port}" if u.port else "")
    pinned = u._replace(netloc=netloc).geturl()
    extensions = {"sni_hostname": host} if u.scheme == "https" else {}
    return pinned, {"Host": u.netloc.rsplit("@", 1)[-1]}, extensions


async def notify(url: str, run: dict[str, Any], allow: Sequence[str]) -> bool:
    """POST `{"event": "job.<state>", "run": {...}}` to `url`; True when it answered 2xx."""
    import httpx

    body = {"event": f"job.{run['state']}", "run": {k: run.get(k) for k in SUMMARY}}
    try:
        where, headers, extensions = await asyncio.to_thread(target, url, allow)
    except Exception as exc:
        log.warning("job webhook %s refused: %s", url, exc)
        return False
    # made on a thread: a client loads the CA certificates into an SSL context (20-45 ms), not on the loop
    async with await asyncio.to_thread(httpx.AsyncClient, timeout=10, follow_redirects=False) as client:
        for attempt in range(3):
            try:
                r = await client.post(where, json=body, headers=headers, extensions=extensions)
                if r.is_success:
                    return True
                log.warning("job webhook %s answered %s", url, r.status_code)
            except httpx.HTTPError as exc:
                log.warning("job webhook %s: %s", url, exc)
            await asyncio.sleep(0.5 * 2**attempt)
    return False
