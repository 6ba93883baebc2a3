"""One error root for bkg: every error carries an HTTP status, a code and, where it applies, a field."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class BkgError(Exception):
    """Root of every error bkg raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """Return the one JSON error shape the gateway sends."""
        body: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        retry = getattr(self, "retry_after", None)
        if retry is not None:  # crosses a worker's pipe with the error: an upstream's Retry-After is kept
            body["retry_after"] = retry
        return {"error": body}

    def __str__(self) -> str:
        return (
            f"{self.field}: {self.message}" if self.field and not self.message.startswith(self.field) else self.message
        )


class InvalidInput(BkgError):
    """A request names a bad value: the field says which, the message says what was wrong."""

    status = 422
    code = "invalid_input"


class ContextTooLong(InvalidInput):
    """A prompt that leaves a model no room to answer (OpenAI's `context_length_exceeded`)."""

    code = "context_length_exceeded"


class BadRequest(BkgError):
    """A request that is well formed but cannot be served as asked (400, like OpenAI's invalid_request_error)."""

    status = 400
    code = "bad_request"


class NotFound(BkgError):
    """The thing asked for does not exist."""

    status = 404
    code = "not_found"


class AlreadyExists(BkgError):
    """A create would overwrite something that exists."""

    status = 409
    code = "already_exists"


class Conflict(BkgError):
    """The thing is in a state that does not allow the request (a job that already ended)."""

    status = 409
    code = "conflict"


class DataDirLocked(BkgError):
    """Another process owns the data dir."""

    status = 409
    code = "data_dir_locked"


class SchemaTooNew(BkgError):
    """What bkg reads (the database, a snapshot archive, the models manifest) was written by a newer bkg."""

    status = 409
    code = "schema_too_new"


class CorruptData(BkgError):
    """A file bkg wrote (snapshot, index, a registered model) fails its integrity check: a fault on the server's
    side, not in the request."""

    status = 500
    code = "corrupt_data"


class InvalidFile(CorruptData):
    """A file the caller hands in (a model to register) is not what it claims: the caller's 422."""

    status = 422
    code = "invalid_file"


class Cancelled(BkgError):
    """The work was cancelled by its caller (a job's cancel)."""

    status = 409
    code = "cancelled"


class ClientGone(BkgError):
    """The client left before its answer was ready (nobody reads this: nginx's 499)."""

    status = 499
    code = "client_closed_request"


class ModelLoadFailed(BkgError):
    """A registered model that its runtime cannot load (damaged, or a format it does not support)."""

    status = 500
    code = "model_load_failed"


class MissingDependency(BkgError):
    """An optional dependency is not installed; the message names the extra to install."""

    status = 501
    code = "missing_dependency"

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'bkg-kernel[{extra}]'")
        self.module = module
        self.extra = extra


class InsufficientStorage(BkgError):
    """The data dir's disk is nearly full: nothing more is written, so what is stored stays readable."""

    status = 507
    code = "insufficient_storage"


class Unauthorized(BkgError):
    """No valid credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(BkgError):
    """Valid credentials without the scope the route needs."""

    status = 403
    code = "forbidden"


class PayloadTooLarge(BkgError):
    """A body larger than what it is sent to takes."""

    status = 413
    code = "body_too_large"


class Misdirected(BkgError):
    """A call sent the wrong way: a background job's capability sent to the call port goes over HTTP."""

    status = 421
    code = "misdirected"


class TooManyRequests(BkgError):
    """A rate limit or a full queue; `retry_after` says when to try again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float = 1.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Unavailable(BkgError):
    """A plugin is not running, or its worker died under the request; `retry_after`, when the wait is a passing one
    (a plugin starting), says when to try again (a Retry-After header)."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Timeout(BkgError):
    """A plugin took longer than its request timeout."""

    status = 504
    code = "timeout"


class UpstreamError(BkgError):
    """An upstream service (an OpenAI-compatible server) refused or failed a request; `status` is kept."""

    code = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status if 400 <= status < 600 else 502


class JobFailed(BkgError):
    """A background job ended without a result (failed or cancelled); `state` says which."""

    status = 409

    def __init__(self, message: str, *, state: str = "failed", field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.state = state
        self.code = f"job_{state}"


class RemoteError(BkgError):
    """An error another bkg process sent as JSON, whose code names no class here: status and code are kept."""

    def __init__(self, message: str, *, status: int = 500, code: str = "remote_error", field: str | None = None):
        super().__init__(message, field=field)
        self.status, self.code = status, code


def _codes() -> dict[str, type[BkgError]]:
    found: dict[str, type[BkgError]] = {}
    stack: list[type[BkgError]] = [BkgError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "code" in cls.__dict__ and cls.__init__ is BkgError.__init__:
            found.setdefault(cls.code, cls)
    return found


def error_data(exc: BaseException, code: str = "plugin_error") -> dict[str, Any]:
    """The JSON error body (inner dict) of an exception raised across a process boundary: a `BkgError`'s own,
    anything else a 500 with `code` and the exception's type and message."""
    if isinstance(exc, BkgError):
        return exc.to_dict()["error"]
    return {"status": 500, "code": code, "message": f"{type(exc).__name__}: {exc}"}


def from_dict(data: dict[str, Any], *, status: int = 500) -> BkgError:
    """Rebuild the error of a JSON error body (`{"error": {...}}` or its inner dict): the class its code names,
    or a `RemoteError` that keeps the status and code; `status` is the fallback (the HTTP status)."""
    err = data.get("error", data) if isinstance(data, dict) else {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = str(err.get("message") or err.get("detail") or "error")
    field, code = err.get("field"), str(err.get("code") or "")
    st = int(err.get("status") or status)
    cls = _codes().get(code)
    if code == "too_many_requests":
        return TooManyRequests(message, retry_after=float(err.get("retry_after") or 1.0), field=field)
    if code == "model_not_found":  # OpenAI's words on /v1 for bkg's 404 naming the model
        return NotFound(message, field=field)
    if code == "unavailable" and st == 503:
        wait = err.get("retry_after")
        return Unavailable(message, retry_after=float(wait) if wait is not None else None, field=field)
    if code == "upstream_error":
        return UpstreamError(message, status=st, field=field)
    if code.startswith("job_"):
        return JobFailed(message, state=code[4:], field=field)
    if cls is not None and cls.status == st:
        return cls(message, field=field)
    return RemoteError(message, status=st, code=code or "remote_error", field=field)


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
                429: "rate_limit_error"}  # fmt: skip


def openai_shaped(err: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """An error body's inner dict as OpenAI's API answers it (the HTTP status, `{"error": {...}}`), for the `/v1`
    routes, whose clients (the openai SDK, LangChain, LiteLLM) read `type`, `param` and `code` and go by the status:
    an input refused is a 400 `invalid_request_error`, a prompt past the context `context_length_exceeded`, an
    unknown model `model_not_found`. bkg's own keys stay beside them (`status` keeps bkg's status), so bkg's client
    reads the same error either way."""
    status = int(err.get("status") or 500)
    http = 400 if status == 422 else status
    kind = OPENAI_TYPES.get(http, "server_error" if http >= 500 else "invalid_request_error")
    code = err.get("code")
    if code == "not_found" and err.get("field") == "model":
        code = "model_not_found"
    return http, {"error": {**err, "type": kind, "param": err.get("field"), "code": code}}


def invalid_from_pydantic(exc: ValidationError, root: str) -> InvalidInput:
    """Turn the first pydantic error into an `InvalidInput` that names the field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{root}.{loc}" if loc else root
    return InvalidInput(f"{field}: {err.get('msg', 'invalid value')}", field=field)


def user_message(exc: BaseException) -> str:
    """Return what a user is told about `exc`: a bkg error's message, else the exception's type and text."""
    return exc.message if isinstance(exc, BkgError) else f"{type(exc).__name__}: {exc}"


def check_path_text(path: str, field: str, max_name: int = 255) -> None:
    """Refuse, as the caller's 422 naming `field`, a path no filesystem call could take: a NUL, text that is not
    valid Unicode (a lone surrogate), a name over `max_name` bytes or a path over 4096 (the OS raises ValueError,
    UnicodeEncodeError or OSError for them, a 500 wherever the path is first looked at)."""
    if "\x00" in path:
        raise InvalidInput("a path cannot contain NUL", field=field)
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidInput("a path must be valid Unicode (it holds a lone surrogate)", field=field) from None
    if len(raw) > 4096 or any(len(part) > max_name for part in raw.split(b"/")):
        raise InvalidInput(
            f"path too long: {path[:60]!r}... (a name is at most {max_name} bytes, a path 4096)", field=field
        )


def is_utf8(name: str) -> bool:
    """Whether a name read from the disk was UTF-8: one that was not holds lone surrogates (Python's
    surrogateescape), which no JSON body, stored text or answer can carry (a 500 wherever it is first encoded)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(name: str) -> str:
    """A name read from the disk, printable: the bytes that are not UTF-8 escaped (`odd\\xff.py`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def expand_home(path: str, field: str) -> Path:
    """A path given in a request, checked (`check_path_text`) and with its `~` expanded; `~someone/...` for a user
    this machine does not have is the caller's 404 naming `field` (pathlib raises RuntimeError for it)."""
    check_path_text(path, field)
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise NotFound(f"no home directory for {path!r}", field=field) from None


def closest(name: str, names: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The one of `names` a misspelt `name` most likely meant (difflib's ratio at least `cutoff`), or None."""
    found = difflib.get_close_matches(name, sorted(names), n=1, cutoff=cutoff)
    return found[0] if found else None


def name_hint(name: str, names: Iterable[str]) -> str:
    """`did you mean 'x'?` for a name close to one of `names`, else `it takes a, b, c` (or `it takes none`)."""
    names = sorted(names)
    near = closest(name, names)
    return f"did you mean {near!r}?" if near else f"it takes {', '.join(names) or 'none'}"


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (`an array`, `null`), for messages to whoever sent it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(type(value), "a value")
