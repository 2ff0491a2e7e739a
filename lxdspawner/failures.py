"""What a failed spawn shows: :class:`SpawnError` (the user's spawn page, the hub's log,
never a traceback), the translation of the daemon's errors into it, and lxdspawner's own log
lines sent to the hub's log."""

from __future__ import annotations

import logging

from tornado import web

from .daemon import DaemonError
from .lxd import LxdError, Unreachable

try:
    from jupyterhub.spawner import SpawnException as _SpawnFailure  # JupyterHub >= 6
except ImportError:  # JupyterHub 5
    _SpawnFailure = None


class SpawnError(_SpawnFailure or web.HTTPError):
    """A spawn failed for a reason we can explain.

    JupyterHub shows the message on the user's spawn page (and in the progress stream, via
    ``jupyterhub_message``) and logs it without a traceback.
    """

    def __init__(self, message: str, *, reason: str = "lxd", status_code: int = 500):
        if _SpawnFailure is not None:
            super().__init__(message, reason=reason, status_code=status_code)
        else:
            super().__init__(status_code, reason=reason)
            self.message = message
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return self.message


def spawn_error(e: SpawnError | DaemonError | LxdError) -> SpawnError:
    """What the user's spawn page says for a failure (their own message, never a traceback)."""
    if isinstance(e, SpawnError):
        return e
    if isinstance(e, DaemonError):
        return SpawnError(e.message, reason=e.reason, status_code=e.status)
    if isinstance(e, Unreachable):
        return SpawnError(f"the container daemon is not reachable: {e.message}")
    return SpawnError(e.message)


def attach_logs(hub_log: logging.Logger) -> None:
    """Send the messages of lxdspawner's modules (its client, cache, removals) to the hub's
    log, in its format and at its level. Without this they go to Python's root logger, which
    JupyterHub leaves without a handler: INFO lines vanish, warnings print bare."""
    ours = logging.getLogger("lxdspawner")
    # A spawner made outside a hub logs to traitlets' logger, which has a NullHandler only:
    # taking that would silence lxdspawner's messages for the whole process.
    handlers = [h for h in hub_log.handlers if not isinstance(h, logging.NullHandler)]
    if hub_log is ours or not handlers:
        return
    for handler in handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(hub_log.getEffectiveLevel())
    ours.propagate = False
