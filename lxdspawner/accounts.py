"""Which uid and gid a user's server runs as: the hub host's accounts, and the floor.

A username is attacker input (``root``, ``daemon`` and ``www-data`` are valid JupyterHub
usernames): it never becomes a system account's uid. The spawner's ``get_uid_gid`` may be the
operator's own; whatever it answers is checked against ``min_uid`` and ``min_gid``.
"""

from __future__ import annotations

import inspect
import pwd
from typing import Any


def default_get_uid_gid(spawner: Any) -> tuple[int, int]:
    """The hub host's passwd entry for the user, else the configured default.

    Only an account of a person: one with a uid of at least `min_uid` (never 0). A username
    such as ``root``, ``daemon`` or ``www-data`` is taken for a user the host does not know.
    A primary group below `min_gid` gives way to `default_gid`.
    """
    try:
        entry = pwd.getpwnam(spawner.user.name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return spawner.default_uid, spawner.default_gid
    if entry.pw_uid == 0 or entry.pw_uid < spawner.min_uid:
        spawner.log.info(
            "%s: the hub host's account %r has uid %d, below min_uid = %d: not a person's; "
            "using default_uid/default_gid",
            spawner.user.name,
            entry.pw_name,
            entry.pw_uid,
            spawner.min_uid,
        )
        return spawner.default_uid, spawner.default_gid
    gid = entry.pw_gid if entry.pw_gid and entry.pw_gid >= spawner.min_gid else spawner.default_gid
    return entry.pw_uid, gid


async def resolve(spawner: Any) -> tuple[int, int]:
    """(uid, gid) from the spawner's ``get_uid_gid`` (may be async), checked: ValueError
    naming the setting when it is not a pair of numbers or below ``min_uid``/``min_gid``."""
    result = spawner.get_uid_gid(spawner)
    if inspect.isawaitable(result):
        result = await result
    try:
        uid, gid = (int(x) for x in result)
    except (TypeError, ValueError):
        raise ValueError(f"get_uid_gid returned {result!r}; expected (uid, gid)") from None
    for what, value, least in (("uid", uid, spawner.min_uid), ("gid", gid, spawner.min_gid)):
        if value < least or value < 0:
            raise ValueError(
                f"get_uid_gid gave {what} {value} for {spawner.user.name!r}, below "
                f"c.LxdSpawner.min_{what} = {least}: a server never runs as root, group "
                f"root or a system account unless min_{what} is lowered for it"
            )
    return uid, gid
