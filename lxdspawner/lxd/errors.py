"""Typed errors of the LXD/Incus REST API, each with a message an operator can act on."""

from __future__ import annotations


class LxdError(Exception):
    """An error answered by the daemon (or about talking to it).

    ``status`` is the HTTP status (or ``None`` when there was no answer), ``code`` LXD's own
    error code from the response body when it gave one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class NotFound(LxdError):
    """The instance, image, volume or operation does not exist (HTTP 404)."""


class Conflict(LxdError):
    """It already exists, or is in a state that forbids the request (HTTP 409)."""


class Unreachable(LxdError):
    """No answer from the daemon: socket missing, connection refused, TLS failure, timeout."""


class FileHelperFailed(LxdError):
    """The daemon's file helper for an instance kept failing (Incus 6.0.4's forkfile race):
    a fresh instance gets a fresh helper."""


class OperationFailed(LxdError):
    """A background operation (create, start, exec, ...) ended in failure."""


def error_for_status(status: int, message: str, code: int | None = None) -> LxdError:
    cls = {404: NotFound, 409: Conflict}.get(status, LxdError)
    return cls(message, status=status, code=code)
