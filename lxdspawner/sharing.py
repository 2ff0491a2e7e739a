"""One read-only copy of the image's software per image and host, shared by every container.

Each container is a copy-on-write clone of its image: the disk blocks are shared, but the
kernel's page cache is not. Every clone has inodes of its own, so every server reads its own
copy of the Python environment into memory (about 110 MiB for JupyterLab), which is charged to
its container. Mounting that directory instead from one custom volume per (image, member),
read-only, gives all containers the same inodes and so one cached copy, as plain processes
on a host share their virtualenv's: a server's memory is then what its processes allocate.

The volume is filled once, in the background, by a short-lived helper container started from
the image (``cp -a``, which reflinks on btrfs). Spawns made before it is ready go without it,
so the first spawns of a new image never wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from collections.abc import Iterable

from . import names
from .lxd import LxdClient, LxdError, NotFound

#: Volume config key set once the copy is complete: a half-made volume is never mounted.
KEY_READY = "user.lxdspawner.shared-ready"
#: The copy is mounted into containers with different uid ranges (security.idmap.isolated):
#: the daemon then keeps its files unshifted and maps them per container (idmapped mounts).
SHIFTED = "security.shifted"
#: Config key of the helper container (not a server: the cache ignores it).
KEY_HELPER = "user.lxdspawner.share-of"
DEVICE = names.SHARED_DEVICE
HELPER_MOUNT = "/mnt/lxdspawner-share"
#: After a failed preparation, how long spawns go without before it is tried again.
RETRY_AFTER = 300.0


def writable_device(pool: str, volume: str, path: str) -> dict[str, str]:
    return {"type": "disk", "pool": pool, "source": volume, "path": path}


def shared_device(pool: str, volume: str, path: str) -> dict[str, str]:
    return {**writable_device(pool, volume, path), "readonly": "true"}


def containing(directories: Iterable[str], path: str) -> str | None:
    """The shared directory that ``path`` (in the container) is in or is, if any."""
    normal = posixpath.normpath("/" + path)
    for directory in directories:
        top = posixpath.normpath("/" + directory)
        if normal == top or normal.startswith(top.rstrip("/") + "/"):
            return directory
    return None


def root_pool(profiles: Iterable[dict]) -> str | None:
    """The storage pool of the root disk the profiles give (later profiles win, as in LXD)."""
    pool = None
    for profile in profiles:
        for device in (profile.get("devices") or {}).values():
            if device.get("type") == "disk" and device.get("path") == "/" and device.get("pool"):
                pool = device["pool"]
    return pool


class SharedDirectory:
    """The shared copy of one directory of the images on one daemon or cluster."""

    def __init__(self, path: str, log: logging.Logger) -> None:
        self.path = path.rstrip("/") or "/"
        self.log = log
        self._ready: set[tuple[str | None, str]] = set()
        self._checks: dict[tuple[str | None, str], asyncio.Task] = {}
        self._fills: dict[tuple[str | None, str], asyncio.Task] = {}
        self._absent: set[tuple[str | None, str]] = set()
        self._pools: dict[tuple[str, ...], str | None] = {}
        self._pool_reads: dict[tuple[str, ...], asyncio.Task] = {}

    async def device(
        self,
        client: LxdClient,
        fingerprint: str,
        member: str | None,
        profiles: tuple[str, ...],
    ) -> dict[str, str] | None:
        """The disk device to add to a new container, or None while there is no copy yet.

        The first call for an image and member looks the volume up (one request) and, when it
        is missing, starts filling it in the background; later calls cost no request.
        """
        pool = await self._pool(client, profiles)
        if pool is None:
            return None
        key = (member, fingerprint)
        if key not in self._ready:
            check = self._checks.get(key)
            if check is None:
                check = self._checks[key] = asyncio.ensure_future(
                    self._check(client, key, pool, profiles)
                )
            await asyncio.shield(check)
        if key not in self._ready:
            return None
        return shared_device(pool, names.shared_volume_name(fingerprint, self.path), self.path)

    async def ensure(
        self,
        client: LxdClient,
        fingerprint: str,
        member: str | None,
        profiles: tuple[str, ...],
    ) -> str:
        """Make the copy now (for a prepull before a class starts): "ready", "absent" (the
        image has no such directory) or "failed" (the reason is logged)."""
        key = (member, fingerprint)
        await self.device(client, fingerprint, member, profiles)
        fill = self._fills.get(key)
        if fill is not None:
            await fill
        if key in self._ready:
            return "ready"
        return "absent" if key in self._absent else "failed"

    def forget(self, fingerprint: str, member: str | None) -> None:
        """The volume turned out unusable (deleted by hand?): look again next time. An image
        known to lack the directory had no volume to mount: nothing to look at again (that
        would start a helper container to find it lacking again)."""
        key = (member, fingerprint)
        if key in self._absent:
            return
        self._ready.discard(key)
        self._checks.pop(key, None)

    async def _pool(self, client: LxdClient, profiles: tuple[str, ...]) -> str | None:
        if profiles not in self._pools:
            # One read for a burst of spawns, as for the volume's lookup.
            read = self._pool_reads.get(profiles)
            if read is None:
                read = self._pool_reads[profiles] = asyncio.ensure_future(
                    _read_profiles(client, profiles)
                )
            try:
                found = await asyncio.shield(read)
            except LxdError as e:
                self.log.warning("shared %s: cannot read the profiles: %s", self.path, e.message)
                return None
            finally:
                if self._pool_reads.get(profiles) is read:
                    del self._pool_reads[profiles]  # a failed read is tried again next time
            self._pools[profiles] = root_pool(found)
        return self._pools[profiles]

    async def _check(
        self, client: LxdClient, key: tuple[str | None, str], pool: str, profiles: tuple[str, ...]
    ) -> None:
        member, fingerprint = key
        volume = names.shared_volume_name(fingerprint, self.path)
        try:
            existing = await client.get_volume(pool, volume, target=member)
        except NotFound:
            existing = None
        except LxdError as e:
            self.log.warning("shared %s: cannot look up %s: %s", self.path, volume, e.message)
            self._retry_later(key)
            return
        config = (existing or {}).get("config") or {}
        if config.get(KEY_READY) == "true" and config.get(SHIFTED, "") == shifted(client):
            self._ready.add(key)
            return
        # A copy made before containers had their own uid ranges (not shifted) is made again.
        self._fills[key] = asyncio.ensure_future(
            self._fill(client, key, pool, profiles, half_made=bool(existing))
        )

    def _retry_later(self, key: tuple[str | None, str]) -> None:
        asyncio.get_running_loop().call_later(RETRY_AFTER, self._checks.pop, key, None)

    async def _fill(
        self,
        client: LxdClient,
        key: tuple[str | None, str],
        pool: str,
        profiles: tuple[str, ...],
        half_made: bool,
    ) -> None:
        member, fingerprint = key
        volume = names.shared_volume_name(fingerprint, self.path)
        helper = names.fill_helper_name(fingerprint, self.path, member)
        where = f" on {member}" if member else ""
        started = time.monotonic()
        self.log.info("shared %s: filling volume %s%s from the image", self.path, volume, where)
        try:
            await _remove_helper(client, helper, fingerprint)
            if half_made:
                await client.delete_volume(pool, volume, target=member)
            shift = {SHIFTED: "true"} if shifted(client) else {}
            await client.create_volume(pool, volume, config=shift, target=member)
            await client.create_instance(
                helper,
                source={"type": "image", "fingerprint": fingerprint},
                profiles=list(profiles),
                config={KEY_HELPER: fingerprint},
                devices={DEVICE: writable_device(pool, volume, HELPER_MOUNT)},
                target=member,
                start=True,
                timeout=600,
            )
            try:
                copy = await client.exec(helper, _copy_command(self.path), timeout=600)
            finally:
                await client.remove_instance(helper)
            if copy.exit_code == NO_SUCH_DIRECTORY:
                self.log.info(
                    "shared %s: image %s has no such directory; its servers go without",
                    self.path,
                    fingerprint[:12],
                )
                await client.delete_volume(pool, volume, target=member)
                self._absent.add(key)
                return  # the check stays done: no new try for this image
            if copy.exit_code != 0:
                raise LxdError(f"copying {self.path} failed ({copy.exit_code}): {copy.output}")
            await client.update_volume_config(pool, volume, {KEY_READY: "true"}, target=member)
        except LxdError as e:
            self.log.warning(
                "shared %s: could not fill volume %s%s (servers go without it, next try in "
                "%.0f s): %s",
                self.path,
                volume,
                where,
                RETRY_AFTER,
                e.message,
            )
            self._retry_later(key)
            return
        self._ready.add(key)
        self.log.info(
            "shared %s: volume %s%s ready in %.1f s; new servers mount it read-only",
            self.path,
            volume,
            where,
            time.monotonic() - started,
        )


NO_SUCH_DIRECTORY = 3


async def _read_profiles(client: LxdClient, profiles: tuple[str, ...]) -> list[dict]:
    return [await client.profile(name) for name in profiles]


def shifted(client: LxdClient) -> str:
    """ "true" where the copies are shifted: Incus, whose containers each have their own uid
    range (security.idmap.isolated) and mount them through idmapped mounts. LXD 5.0.2 refuses
    a shifted volume here ("idmapping abilities are required but aren't supported on system")
    and its containers share one range: there a copy is shifted to that range once."""
    return "true" if client.dialect is not None and client.dialect.product == "incus" else ""


async def _remove_helper(client: LxdClient, helper: str, fingerprint: str) -> None:
    """Remove a helper left by an earlier fill; refuse to touch an instance that is not one
    (with ``name_prefix = "lxdspawner"`` a username could give a server that name)."""
    try:
        existing = await client.get_instance(helper)
    except NotFound:
        return
    if (existing.get("config") or {}).get(KEY_HELPER) != fingerprint:
        raise LxdError(f"{helper} exists and is not a fill helper of this image: left alone")
    await client.remove_instance(helper)


def _copy_command(path: str) -> list[str]:
    # Paths as arguments, not in the script: nothing is parsed by the shell.
    script = 'test -d "$1" || exit 3; cp -a "$1/." "$2/"'
    return ["sh", "-c", script, "sh", path, HELPER_MOUNT]


class SharedDirectories:
    """Every shared directory of one daemon or cluster, for the spawners of a hub."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._directories: dict[str, SharedDirectory] = {}

    def _directory(self, path: str) -> SharedDirectory:
        if path not in self._directories:
            self._directories[path] = SharedDirectory(path, self.log)
        return self._directories[path]

    async def devices(
        self,
        client: LxdClient,
        fingerprint: str,
        member: str | None,
        paths: Iterable[str],
        profiles: tuple[str, ...],
    ) -> dict[str, dict[str, str]]:
        """{device name: disk device} of the directories whose copies are ready."""
        paths = list(paths)
        found = await asyncio.gather(
            *(self._directory(p).device(client, fingerprint, member, profiles) for p in paths)
        )
        return {
            names.shared_device_name(path): device
            for path, device in zip(paths, found, strict=True)
            if device is not None
        }

    def forget(self, fingerprint: str, member: str | None) -> None:
        for directory in self._directories.values():
            directory.forget(fingerprint, member)
