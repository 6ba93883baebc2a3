"""The call a plugin is running: who asked for it, and (in a worker) the grant its store requests carry.

The host sets it around every capability call, inline or in a worker thread; `PluginContext.caller` and the
store handle read it. A job's thread copies it, so long work acts for the same caller to the end. When the caller
stops waiting (the request timed out, or its stream was cancelled) the call ends: work that runs on can no longer
act for them (a worker's grant is dropped by the gateway; an inline call is marked ended here).
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

from bkg_kernel.auth.principal import Principal
from bkg_kernel.errors import Unavailable


@dataclass
class Call:
    """One capability call: its caller, and the grant that lets a worker act for them while the call runs."""

    caller: Principal
    grant: str | None = None
    ended: bool = False

    def end(self) -> None:
        """The caller stopped waiting: from now on the call's store requests are refused."""
        self.ended = True


_current: ContextVar[Call | None] = ContextVar("bkg_call", default=None)


def current() -> Call | None:
    """Return the call running in this thread (None outside one)."""
    return _current.get()


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
