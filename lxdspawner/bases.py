"""Servers as copies of a base container that was started once: LXD 5.0 without the remap.

LXD 5.0 shifts the uid/gid of a new unprivileged container's whole file system at its first
start (about 3 s for the single-user image), although it reports idmapped-mount support. A
copy of a container that was already shifted starts at once (about 0.3 s). So on LXD 5.0 a
stopped base per image (``<name_prefix>-base-<fingerprint>``) is made on first use, and every
server is a copy of it; Incus uses idmapped mounts and needs none of this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import names
from .lxd import Dialect, LxdClient, NotFound

KEY_BASE_OF = "user.jupyterhub.base-of"


def wanted(
    setting: bool | None, dialect: Dialect | None, privileged: bool, member: str | None
) -> bool:
    """Whether servers should be copies of a base: ``setting`` when given, else on LXD 5.0's
    standalone daemons with unprivileged containers."""
    if setting is not None:
        return setting
    return (
        dialect is not None
        and dialect.product == "lxd"
        and not dialect.clustered
        and not privileged
        and member is None
    )


class ShiftedBases:
    """The bases of one daemon: one per image, made once even when a burst asks at once."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    async def source(
        self,
        client: LxdClient,
        *,
        fingerprint: str,
        prefix: str,
        profiles: tuple[str, ...],
        timeout: float,
        on_make: Callable[[], None] = lambda: None,
    ) -> dict | None:
        """The source of a copy of the base, which is made first when missing or broken;
        None when the base's name is held by an instance that is not a base."""
        base = names.base_name(prefix, fingerprint)
        async with self._locks.setdefault(base, asyncio.Lock()):
            try:
                existing = await client.get_instance(base)
            except NotFound:
                existing = None
            if existing is not None and not is_base(existing, fingerprint):
                # A user's server may hold the name (a username "base-<hex>" is kept as it
                # is), or anybody's instance: never touch it; go without a base.
                return None
            if existing is None or existing.get("status") != "Stopped":
                if existing is not None:
                    await client.remove_instance(base)
                on_make()
                await _make(client, base, fingerprint, profiles, timeout)
        return {"type": "copy", "source": base, "instance_only": True}


def is_base(instance: dict, fingerprint: str) -> bool:
    """Whether ``instance`` is lxdspawner's base of that image (its key says so)."""
    return (instance.get("config") or {}).get(KEY_BASE_OF) == fingerprint


async def _make(
    client: LxdClient, base: str, fingerprint: str, profiles: tuple[str, ...], timeout: float
) -> None:
    await client.create_instance(
        base,
        source={"type": "image", "fingerprint": fingerprint},
        profiles=list(profiles),
        config={KEY_BASE_OF: fingerprint},
        timeout=timeout,
    )
    try:
        await client.start_instance(base, timeout=timeout)
        await client.stop_instance(base, force=True)
        # Its first boot wrote a machine-id; copies must make their own (DHCP client ids and
        # the journal derive from it).
        await client.push_file(base, "/etc/machine-id", b"", mode=0o444)
    except BaseException:
        await client.remove_instance(base)
        raise
