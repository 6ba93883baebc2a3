"""Fetch a model from a URL into the model dir, then register it; nothing half-written stays behind.

Guarded like a server-side fetch should be: only http(s); a host on a loopback, link-local, private or otherwise
non-public address is refused unless `download_allow` lists it (and when `download_allow` is set, only the hosts
it lists are fetched from); every redirect is checked the same way before it is followed (at most 5);
`max_download_mb` caps the size, declared or streamed; each download writes its own partial file; a cancelled
download (its job's cancel) stops between chunks and leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from bkg_kernel.errors import Forbidden, InsufficientStorage, InvalidInput, Unavailable, check_path_text
from bkg_kernel.models.registry import ModelEntry, ModelRegistry, slug

Progress = Callable[[float, str], None]
MAX_REDIRECTS = 5
STALE_PARTIAL_S = 86_400  # a download's file untouched this long was left by a process that died


def check_url(url: str) -> str:
    """Return the file name a URL names; refuse anything but http(s) URLs of one file."""
    try:
        u = urlparse(url)
        u.port  # noqa: B018 - a port out of range raises here, not later
    except ValueError as exc:  # "Invalid IPv6 URL", a bad port
        raise InvalidInput(f"not a URL: {exc} in {url!r}", field="url") from None
    name = Path(u.path).name
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InvalidInput(f"source must be an http(s) URL, not {url!r}", field="url")
    try:  # what the resolver will do with it: a name IDNA cannot encode is no host name
        u.hostname.encode("idna")
    except UnicodeError as exc:
        raise InvalidInput(f"{u.hostname!r} is not a host name ({exc})", field="url") from None
    if not name:
        raise InvalidInput(f"the URL {url!r} does not name a file", field="url")
    check_path_text(name, "url", max_name=200)  # the download's temporary name adds a suffix
    return name


def _listed(host: str, allow: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(host.lower(), pattern.lower()) for pattern in allow)


def check_host(url: str, allow: Sequence[str]) -> None:
    """Refuse a URL whose host is not allowed: not in `allow` when it is set, or resolving to a loopback,
    link-local, private, reserved or multicast address that `allow` does not list (403 naming the setting)."""
    host = urlparse(url).hostname or ""
    listed = _listed(host, allow)
    if allow and not listed:
        raise Forbidden(f"downloads come only from the hosts in download_allow; {host!r} is not one", field="url")
    if listed:
        return
    try:
        ip = non_public(resolve(host))
    except UnicodeError as exc:  # a redirect's host IDNA cannot encode
        raise InvalidInput(f"{host!r} is not a host name ({exc})", field="url") from None
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise InvalidInput(f"no host named {host!r} ({exc.strerror})", field="url") from None  # the caller's URL
        raise Unavailable(f"cannot resolve {host!r} now: {exc}", field="url") from None  # DNS itself failed
    except OSError as exc:
        raise Unavailable(f"cannot resolve {host!r}: {exc}", field="url") from None
    if ip is not None:
        raise Forbidden(
            f"{host!r} resolves to {ip}, a non-public address: list the host in download_allow to fetch from it",
            field="url",
        )


def _check_peer(r: Any, url: str, allow: Sequence[str]) -> None:
    """Refuse an answer from a non-public address the host name did not resolve to when it was checked (DNS
    rebinding: a name that answers a public address first, then 127.0.0.1 or 169.254.169.254); nothing of that
    answer is read, not even its status."""
    host = urlparse(url).hostname or ""
    stream = r.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None and not _listed(host, allow) else None
    if peer and non_public([str(peer[0]).split("%")[0]]) is not None:
        raise Forbidden(
            f"{host!r} connected to {peer[0]}, a non-public address, after resolving to a public one: refused "
            "(list the host in download_allow to fetch from it)",
            field="url",
        )


def resolve(host: str) -> list[str]:
    """Every address `host` resolves to (OSError when it does not). Blocking: it asks the resolver."""
    return sorted({str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None)})


def non_public(addresses: list[str]) -> str | None:
    """The first loopback, link-local, private, reserved or multicast address among `addresses`, if any."""
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if not ip.is_global or ip.is_multicast:
            return a
    return None


def _no_room(url: str, size: int, room: int) -> InsufficientStorage:
    return InsufficientStorage(f"{url} is {size:,} bytes or more; the model dir's disk has {max(room, 0):,} bytes to "
                               "spare above min_free_mb: free space first")  # fmt: skip


def download(
    registry: ModelRegistry,
    url: str,
    progress: Progress,
    *,
    id: str | None = None,
    kind: str | None = None,
    license: str | None = None,
    allow: Sequence[str] = (),
    max_bytes: int = 64 * 2**30,
    keep_free: int = 0,
) -> ModelEntry:
    """Stream `url` to its own file in `<model_dir>/.partial/`, check it, move it in and register it (`source`
    is the URL). `progress` is called after each chunk; a job's progress raises `Cancelled` once it is cancelled,
    which stops the download there. The disk keeps `keep_free` bytes free: a download that would eat into them is
    refused (507) before it starts, or stopped when it gets there (its size may not be said)."""
    import httpx

    name = check_url(url)
    partial_dir = registry.dir / ".partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / f"{uuid.uuid4().hex}-{name}"
    final = registry.dir / name
    limit = f"{max_bytes:,} bytes (max_download_mb)"
    try:
        try:
            with httpx.Client(follow_redirects=False, timeout=30) as client:
                here = url
                for _ in range(MAX_REDIRECTS + 1):
                    check_host(here, allow)
                    with client.stream("GET", here) as r:
                        _check_peer(r, here, allow)
                        if r.is_redirect:
                            here = urljoin(here, r.headers.get("location", ""))
                            check_url(here)
                            continue
                        if r.status_code != 200:
                            raise Unavailable(f"cannot download {url}: the server answered HTTP {r.status_code}")
                        total = int(r.headers.get("content-length") or 0)
                        if total > max_bytes:
                            raise InvalidInput(f"{url} is {total:,} bytes; the limit is {limit}", field="url")
                        room = shutil.disk_usage(partial_dir).free - keep_free
                        if total > room:
                            raise _no_room(url, total, room)
                        done = 0
                        with partial.open("wb") as f:
                            for chunk in r.iter_bytes(1 << 20):
                                done += len(chunk)
                                if done > max_bytes:
                                    raise InvalidInput(f"{url} sent more than {limit}", field="url")
                                if done > room:
                                    raise _no_room(url, done, room)
                                f.write(chunk)
                                progress(done / total if total else 0.0, f"{done / 2**20:,.1f} MB")
                        break
                else:
                    raise Unavailable(f"cannot download {url}: more than {MAX_REDIRECTS} redirects", field="url")
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"cannot download {url}: {type(exc).__name__}: {exc}. This machine may have no network access; "
                "copy the file into the model dir and add it by path instead"
            ) from None
        if final.exists():
            raise InvalidInput(f"{final} already exists in the model dir", field="url")
        shutil.move(str(partial), final)
        try:
            return registry.add(final, id=slug(name) if id is None else id, kind=kind, license=license, source=url)
        except Exception:
            final.unlink(missing_ok=True)  # not what its kind says (or the id is taken): do not keep it
            raise
    finally:
        partial.unlink(missing_ok=True)


def sweep_partial(model_dir: Path, older_than_s: float = STALE_PARTIAL_S) -> list[str]:
    """Delete what downloads and imports left in `<model_dir>/.partial/` when their process died (untouched for
    `older_than_s`: a download going on, in this process or another sharing the model dir, writes to its file as it
    goes); return their names."""
    gone: list[str] = []
    cutoff = time.time() - older_than_s
    try:
        entries = list((Path(model_dir) / ".partial").iterdir())
    except OSError:
        return gone
    for p in entries:
        try:
            if p.is_symlink() or p.stat().st_mtime >= cutoff:
                continue
            if p.is_file():
                p.unlink()
            elif p.is_dir() and all(q.lstat().st_mtime < cutoff for q in p.iterdir()):  # `ModelRegistry.staged`
                shutil.rmtree(p)
            else:
                continue
            gone.append(p.name)
        except OSError:
            continue
    return gone
