"""What ``lxdspawner list`` shows: the hub's servers as the daemon has them (pure).

The daemon, not the hub's database, is asked: so an operator sees also what a hub lost track
of (a container left stopped with ``remove = False``, one on a member that was offline).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .lxd import ipv4_addresses
from .ownership import KEY_HUB, KEY_MANAGED, KEY_POOL, KEY_SERVER, KEY_USER, MANAGED_BY

#: The user column of a warm pool member waiting for a user (see pool.py). A user may be
#: named "(pool)" too: the label is for people; ``Server.pool`` and the keys tell them apart.
POOL_USER = "(pool)"

HEADER = ("USER", "SERVER", "CONTAINER", "STATUS", "MEMBER", "IPV4", "HUB")


@dataclass(frozen=True)
class Server:
    user: str
    server: str  # "" for the default server
    instance: str
    status: str
    member: str  # "" on a standalone daemon
    ipv4: str  # "" when it has none
    hub: str = ""  # the hub_id of the hub that made it ("" before lxdspawner 0.2)
    pool: bool = False  # a warm pool member, waiting for a user


def servers(instances: Iterable[dict]) -> list[Server]:
    """Our instances (from a list with recursion=2), by user then server name."""
    found = []
    for instance in instances:
        config = instance.get("config") or {}
        if config.get(KEY_MANAGED) != MANAGED_BY:
            continue
        location = instance.get("location") or ""
        waiting = not config.get(KEY_USER) and bool(config.get(KEY_POOL))
        found.append(
            Server(
                user=POOL_USER if waiting else config.get(KEY_USER, ""),
                server=config.get(KEY_SERVER, ""),
                instance=instance["name"],
                status=instance.get("status", ""),
                member="" if location == "none" else location,
                ipv4=", ".join(ipv4_addresses(instance.get("state") or {})),
                hub=config.get(KEY_HUB, ""),
                pool=waiting,
            )
        )
    return sorted(found, key=lambda s: (s.user, s.server, s.instance))


def table(rows: Iterable[Server]) -> str:
    """Columns padded to their widest cell; "-" for an empty one."""
    cells = [HEADER] + [
        tuple(_cell(v) for v in (s.user, s.server, s.instance, s.status, s.member, s.ipv4, s.hub))
        for s in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _cell(value: str) -> str:
    if not value:
        return "-"
    # A username may hold a tab or a newline: keep the table's rows one line each.
    return value if value.isprintable() else value.encode("unicode_escape").decode()
