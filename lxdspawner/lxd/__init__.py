"""Async client for the LXD and Incus REST API (no JupyterHub imports)."""

from .client import ExecResult, LxdClient, image_source, ipv4_addresses
from .dialect import Dialect, local_socket_candidates
from .errors import (
    Conflict,
    FileHelperFailed,
    LxdError,
    NotFound,
    OperationFailed,
    Unreachable,
)
from .remote import Remote

__all__ = [
    "Conflict",
    "Dialect",
    "ExecResult",
    "FileHelperFailed",
    "LxdClient",
    "LxdError",
    "NotFound",
    "OperationFailed",
    "Remote",
    "Unreachable",
    "image_source",
    "ipv4_addresses",
    "local_socket_candidates",
]
