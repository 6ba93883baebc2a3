"""The call a plugin is running: who asked for it, and (in a worker) the grant its store requests carry.

The host sets it around every capability call, inline or in a worker thread; `PluginContext.caller` and the
store handle read it. A job's thread copies it, so long work acts for the same caller to the end. When the caller
stops waiting (the request timed out, its client went away, or its stream was cancelled) the call ends: work that
runs on can no longer act for them (a worker's grant is dropped by the gateway; an inline call is marked ended
here), and work that looks at the call's `stop` ends early (the gateway tells a worker to set it).
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import Unavailable


@dataclass
class Call:
    """One capability call: its caller, the grant that lets a worker act for them while the call runs, and `stop`,
    set once nobody waits for its answer any more."""

    caller: Principal
    grant: str | None = None
    ended: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def end(self) -> None:
        """The caller stopped waiting: from now on the call's store requests are refused, and work that looks at
        `stop` (a generation, between two tokens) ends early."""
        self.ended = True
        self.stop.set()


_current: ContextVar[Call | None] = ContextVar("bkg_call", default=None)


def current() -> Call | None:
    """Return the call running in this thread (None outside one)."""
    return _current.get()


def stop_event() -> threading.Event:
    """The running call's `stop` (set once its caller stopped waiting: work that can end early should); outside a
    call, an event nothing sets."""
    call = _current.get()
    return call.stop if call is not None else threading.Event()


def for_store() -> Call:
    """Return the running call a store request acts for; outside a call there is no one to act for (503)."""
    call = _current.get()
    if call is None:
        raise Unavailable("the store is reachable only while a capability call runs (it acts as its caller)")
    if call.ended:
        raise Unavailable(
            f"the call of {call.caller.username!r} has ended (it timed out or was cancelled): "
            "work that runs on can no longer act for them in the store"
        )
    return call


class running:  # noqa: N801 - used as `with calls.running(call):`, like a contextlib function
    """Run the block as `call` (None: as no one). A class, not a generator: every capability call enters one."""

    __slots__ = ("call", "token")
    token: Token[Call | None]

    def __init__(self, call: Call | None) -> None:
        self.call = call

    def __enter__(self) -> None:
        self.token = _current.set(self.call)

    def __exit__(self, *exc: object) -> None:
        _current.reset(self.token)
