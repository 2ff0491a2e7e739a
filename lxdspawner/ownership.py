"""Whose an instance is: the keys lxdspawner writes on what it creates, and the one check.

Users choose their names (and their named servers' names), other hubs may share the daemon,
and people create instances by hand: a name is never proof of ownership. Every instance the
spawner creates carries four config keys (this module's ``KEY_*``): that lxdspawner made it,
for which hub, which user and which server, the last two raw, as JupyterHub knows them. The
spawner reuses, stops, polls, deletes or reaps an instance only when all of them match
(:meth:`Owner.owns`); anything else holding a name it computed is left alone.

Instances made before the hub key existed (lxdspawner 0.1) carry the other three: one is
adopted only when the hub's own state names it (:meth:`Owner.owns_recorded`), as only this
hub could have written that.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

KEY_MANAGED = "user.jupyterhub.managed-by"
MANAGED_BY = "lxdspawner"
KEY_HUB = "user.jupyterhub.hub"
KEY_USER = "user.jupyterhub.user"
KEY_SERVER = "user.jupyterhub.server"
#: A warm pool member's definition (see pool.py): with the hub key and no user key, the
#: member waits for a user; after its claim it stays, a record of where the server came from.
KEY_POOL = "user.jupyterhub.pool"
#: Which pool members a new definition replaces (pool.lineage_of).
KEY_LINEAGE = "user.jupyterhub.pool-lineage"


@dataclass(frozen=True)
class Owner:
    """One server of one hub: (hub id, raw username, raw server name; "" for the default)."""

    hub: str
    user: str
    server: str = ""

    @property
    def label(self) -> str:
        """``user`` or ``user:server``, for log lines."""
        return f"{self.user}:{self.server}" if self.server else self.user

    def keys(self) -> dict[str, str]:
        """The config keys that mark an instance as this server's."""
        return {
            KEY_MANAGED: MANAGED_BY,
            KEY_HUB: self.hub,
            KEY_USER: self.user,
            KEY_SERVER: self.server,
        }

    def owns(self, config: Mapping[str, str] | None) -> bool:
        """Whether an instance with this ``config`` is this server's."""
        return self._same_server(config) and (config or {}).get(KEY_HUB) == self.hub

    def owns_recorded(self, config: Mapping[str, str] | None) -> bool:
        """:meth:`owns`, or a server of lxdspawner 0.1 (no hub key) that the hub's state names."""
        return self._same_server(config) and (config or {}).get(KEY_HUB, self.hub) == self.hub

    def _same_server(self, config: Mapping[str, str] | None) -> bool:
        config = config or {}
        # LXD drops empty config values: no server key is the default server.
        return (
            config.get(KEY_MANAGED) == MANAGED_BY
            and config.get(KEY_USER) == self.user
            and config.get(KEY_SERVER, "") == self.server
        )


def describe(config: Mapping[str, str] | None) -> str:
    """Whose an instance is, for a log line: ``user 'bob', server '' of hub 'h1'``, or what
    it is when it is none of ours."""
    config = config or {}
    if config.get(KEY_MANAGED) != MANAGED_BY:
        return "an instance lxdspawner did not make"
    return (
        f"user {config.get(KEY_USER, '')!r}, server {config.get(KEY_SERVER, '')!r} "
        f"of hub {config.get(KEY_HUB, '(none)')!r}"
    )


def default_hub_id(db_url: str | None) -> str:
    """A name for the hub that stays across its restarts: from its database.

    The database is the hub (its users, their servers, their tokens). A server database is
    named by its URL without the password; an SQLite file by its absolute path and this
    host's name (a file lives on one host). Without a URL (a spawner outside a running hub),
    the host's name.
    """
    from sqlalchemy.engine import make_url

    host = socket.gethostname()
    if not db_url:
        return host
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            database = os.path.abspath(database)
        source, label = f"sqlite:{host}:{database}", host
    else:
        where = f"{url.username or ''}@{url.host or ''}:{url.port or ''}/{url.database or ''}"
        source, label = f"{url.get_backend_name()}://{where}", "hub"
    return f"{label}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
