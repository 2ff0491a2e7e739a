"""Which daemon: a ``Remote`` names one LXD/Incus server or cluster and how to reach it.

A value (frozen, hashable), like Incus' own ``ConnectionArgs``: the hub keys everything it
keeps per daemon by it (see :mod:`lxdspawner.daemon`), and a server's state records the one
its container lives on, so a hub restarted with another ``endpoint`` still asks the daemon
that holds each running server (``to_state``/``from_state``).

The certificates are paths on the hub host, not their contents: the state names where they
are, never a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .client import LxdClient


@dataclass(frozen=True)
class Remote:
    """``endpoint``: ``""`` (the local unix socket, found automatically), ``unix:///path``
    or ``https://host:8443``; ``project``: ``""`` for the default; the certificates: PEM
    file paths for an https endpoint (``server_cert`` pinned exactly, see :mod:`.tls`)."""

    endpoint: str = ""
    project: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_cert: str = ""

    def __str__(self) -> str:
        where = self.endpoint or "the local daemon"
        return f"{where} (project {self.project})" if self.project else where

    def to_state(self) -> dict[str, str]:
        """What a server's state records of the remote (empty values left out)."""
        return {key: value for key, value in asdict(self).items() if value}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Remote:
        """The remote a state recorded (missing keys: the defaults, as 0.1 wrote them)."""
        return cls(**{f.name: str(state.get(f.name) or "") for f in fields(cls)})

    def _options(self, timeout: float) -> dict[str, Any]:
        return {
            "project": self.project,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "server_cert": self.server_cert,
            "timeout": timeout,
        }

    def client(self, *, timeout: float = 30.0) -> LxdClient:
        """A client for this remote, not yet connected (``async with`` connects it)."""
        return LxdClient(self.endpoint, **self._options(timeout))

    async def connect(self, *, timeout: float = 30.0) -> LxdClient:
        """A connected client (its dialect known); what it opened is closed if that fails."""
        return await LxdClient.connect(self.endpoint, **self._options(timeout))


__all__ = ["Remote"]
