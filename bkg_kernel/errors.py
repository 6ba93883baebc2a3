"""One error root for bkg: every error carries an HTTP status, a code and, where it applies, a field."""

from __future__ import annotations

from typing import Any


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
        return {"error": body}

    def __str__(self) -> str:
        return (
            f"{self.field}: {self.message}" if self.field and not self.message.startswith(self.field) else self.message
        )


class InvalidInput(BkgError):
    """A request names a bad value: the field says which, the message says what was wrong."""

    status = 422
    code = "invalid_input"


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
    """The database was written by a newer bkg than this one."""

    status = 409
    code = "schema_too_new"


class CorruptData(BkgError):
    """A file bkg wrote (snapshot, index) fails its integrity check."""

    status = 422
    code = "corrupt"


class MissingDependency(BkgError):
    """An optional dependency is not installed; the message names the extra to install."""

    status = 501
    code = "missing_dependency"

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'bkg-kernel[{extra}]'")
        self.module = module
        self.extra = extra


class Unauthorized(BkgError):
    """No valid credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(BkgError):
    """Valid credentials without the scope the route needs."""

    status = 403
    code = "forbidden"


class TooManyRequests(BkgError):
    """A rate limit or a full queue; `retry_after` says when to try again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float = 1.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Unavailable(BkgError):
    """A plugin is not running, or its worker died under the request."""

    status = 503
    code = "unavailable"


class Timeout(BkgError):
    """A plugin took longer than its request timeout."""

    status = 504
    code = "timeout"
