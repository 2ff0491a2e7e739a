"""A server's ``extra_objects`` on the daemon: made before its container, gone after it.

The bodies come from :mod:`patches` (rendered, with our keys). An object is made before the
container is created, so the container may name it (a NIC's ``security.acls``, a disk
device of the volume). One that exists already is reused when its keys say it is this
server's, from the same entry (a restart); anything else of that name fails the spawn,
naming it: we never take over or change what is not ours.

They go when the container goes (a stop with ``remove``, a failed first spawn, an admin's
delete), found by their keys, not by the names the current settings would give: a server
that stopped while the hub was down, or whose settings changed since, still loses its own.
An object marked ``keep`` (``user.jupyterhub.keep=true``) is never deleted by lxdspawner: a
volume marked so is user data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import quote

from . import ownership, patches
from .lxd import LxdClient, LxdError, NotFound
from .volumes import target_of

log = logging.getLogger("lxdspawner.extraobjects")


class ObjectError(Exception):
    """An extra object that could not be made; the message names its entry."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _acl_path(name: str) -> str:
    return f"/1.0/network-acls/{quote(name, safe='')}"


async def _existing(client: LxdClient, obj: patches.ExtraObject, member: str | None) -> dict | None:
    try:
        if obj.kind == patches.NETWORK_ACL:
            return await client.request("GET", _acl_path(obj.name))
        return await client.get_volume(obj.pool, obj.name, target=member)
    except NotFound:
        return None


async def _create(client: LxdClient, obj: patches.ExtraObject, member: str | None) -> None:
    if obj.kind == patches.NETWORK_ACL:
        await client.request("POST", "/1.0/network-acls", json_body=dict(obj.body))
        return
    fields = {k: v for k, v in obj.body.items() if k not in ("name", "config")}
    await client.create_volume(
        obj.pool, obj.name, config=obj.body.get("config"), target=member, **fields
    )


async def ensure(
    client: LxdClient,
    objects: Iterable[patches.ExtraObject],
    owner: ownership.Owner,
    member: str | None,
) -> list[str]:
    """Make the missing ``objects`` (on ``member`` for a volume on a cluster), reuse this
    server's own; the labels of those made. ObjectError naming the entry otherwise."""
    made = []
    for obj in objects:
        try:
            existing = await _existing(client, obj, member)
            if existing is not None:
                if patches.is_reusable(existing.get("config"), obj, owner):
                    continue
                config = existing.get("config") or {}
                raise ObjectError(
                    f"{obj.label} exists and is not this server's "
                    f"({ownership.describe(config)}, "
                    f"{patches.KEY_OBJECT}={config.get(patches.KEY_OBJECT)!r}):"
                    " lxdspawner does not take it over; rename the object in extra_objects or "
                    "delete the one on the daemon"
                )
            await _create(client, obj, member)
        except LxdError as e:
            raise ObjectError(f"{obj.label}: the daemon refused it: {e.message}") from e
        made.append(obj.label)
    return made


async def delete_owned(
    client: LxdClient, owner: ownership.Owner, kinds: Iterable[str]
) -> list[str]:
    """Delete ``owner``'s extra objects of ``kinds`` that are not kept, found by their keys;
    what was deleted. A failure is logged, not raised: the container is gone already, and
    the objects are looked for again when it goes next time."""
    done = []
    kinds = set(kinds)
    if patches.NETWORK_ACL in kinds:
        try:
            acls = await client.request("GET", "/1.0/network-acls", params={"recursion": 1})
        except LxdError as e:
            log.warning("%s: cannot list network ACLs: %s", owner.label, e.message)
            acls = []
        for acl in acls or []:
            if patches.goes_with_server(acl.get("config"), owner):
                try:
                    await client.request("DELETE", _acl_path(acl["name"]))
                    done.append(f"network ACL {acl['name']}")
                except LxdError as e:
                    log.warning("%s: network ACL %s: %s", owner.label, acl["name"], e.message)
    if patches.VOLUME in kinds:
        try:
            pools = await client.storage_pools()
        except LxdError as e:
            log.warning("%s: cannot list storage pools: %s", owner.label, e.message)
            pools = []
        for pool in pools:
            try:
                volumes = await client.list_volumes(pool)
            except LxdError as e:
                log.warning("%s: cannot list pool %s: %s", owner.label, pool, e.message)
                continue
            for volume in volumes or []:
                if patches.goes_with_server(volume.get("config"), owner):
                    try:
                        await client.delete_volume(pool, volume["name"], target=target_of(volume))
                        done.append(f"volume {pool}/{volume['name']}")
                    except LxdError as e:
                        log.warning(
                            "%s: volume %s/%s: %s", owner.label, pool, volume["name"], e.message
                        )
    if done:
        log.info("%s: deleted with its container: %s", owner.label, ", ".join(done))
    return done
