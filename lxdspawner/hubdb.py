"""The hub's users and servers, read from its database (read-only) for ``lxdspawner doctor``.

Which of our volumes and containers belong to no server is a question only the hub's
database answers: a container's keys say whose it was, the database whether that user and
that server still exist. Doctor reads two tables of JupyterHub's schema, ``users`` (``id``,
``name``) and ``spawners`` (``user_id``, ``name``: "" for the default server), with plain
SELECTs through SQLAlchemy, which JupyterHub already depends on. It never writes: an SQLite
file is opened read-only (``mode=ro``), so a running hub is not disturbed; a server database
(PostgreSQL, MySQL) is read with the URL's own credentials.

A relative SQLite path (JupyterHub's default is ``sqlite:///jupyterhub.sqlite``, relative to
the hub's working directory) is taken relative to the config file's directory: doctor cannot
know where the hub runs, and that is where most hubs start (``--db-url`` says otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HubServers:
    """The users and the servers ((user, server name)) the hub's database holds."""

    users: frozenset[str]
    servers: frozenset[tuple[str, str]]

    def has_server(self, user: str, server: str) -> bool:
        """A default server belongs to its user while the user exists (JupyterHub makes its
        row when it first needs it); a named server only while its row exists."""
        if not server:
            return user in self.users
        return (user, server) in self.servers


def absolute(db_url: str, base: Path) -> str:
    """``db_url`` with a relative SQLite path made absolute against ``base``."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return db_url
    if database.startswith("file:") or os.path.isabs(database):
        return db_url
    return url.set(database=str((base / database).resolve())).render_as_string(hide_password=False)


def read(db_url: str) -> HubServers:
    """The hub's users and servers. Raises ValueError naming the database when it cannot be
    read (no such file, not a hub's database, refused)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    url = make_url(db_url)
    shown = url.render_as_string(hide_password=True)
    connect_args = {}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or not Path(database).is_file():
            raise ValueError(f"db_url {shown}: no such database file")
        url = url.set(database=f"file:{database}?mode=ro", query={"uri": "true"})
        connect_args = {"uri": True}
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            users = {row[0]: row[1] for row in conn.execute(text("SELECT id, name FROM users"))}
            servers = {
                (users[row[0]], row[1] or "")
                for row in conn.execute(text("SELECT user_id, name FROM spawners"))
                if row[0] in users
            }
    except SQLAlchemyError as e:
        raise ValueError(
            f"db_url {shown}: cannot read the hub's users: {e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    finally:
        engine.dispose()
    return HubServers(frozenset(users.values()), frozenset(servers))
