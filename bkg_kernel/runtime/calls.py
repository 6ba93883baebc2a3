"""The call a plugin is running: who asked for it, and (in a worker) the grant its store requests carry.

The host sets it around every capability call, inline or in a worker thread; `PluginContext.caller` and the
store handle read it. A job's thread copies it, so long work acts for the same caller to the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import Unavailable


@dataclass(frozen=True)
class Call:
    """One capability call: its caller, and the grant that lets a worker act for them while the call runs."""

    caller: Principal
    grant: str | None = None


_current: ContextVar[Call | None] = ContextVar("bkg_call", default=None)


def current() -> Call | None:
    """Return the call running in this thread (None outside one)."""
    return _current.get()


def for_store() -> Call:
    """Return the running call a store request acts for; outside a call there is no one to act for (503)."""
    call = _current.get()
    if call is None:
        raise Unavailable("the store is reachable only while a capability call runs (it acts as its caller)")
    return call


@contextlib.contextmanager
def running(call: Call | None) -> Iterator[None]:
    """Run the block as `call` (None: as no one)."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)
