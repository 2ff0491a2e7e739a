"""What the hub host gives a server: its files_to_push, read there, and the host directories of
filesystems_to_mount. The paths are the operator's; ``{USERNAME}`` in them is attacker input
and stays one path component (see objects.expand_username_in_path). Errors are ValueErrors
naming the setting and the entry, for the spawn page."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterable, Sequence

from . import objects, sharing


def mounts(entries: Iterable[Sequence[str]], username: str) -> tuple[objects.Mount, ...]:
    """filesystems_to_mount as disk devices; each host directory must exist."""
    found = []
    for name, source, path in entries:
        try:
            source = objects.expand_username_in_path(source, username)
            path = objects.expand_username_in_path(path, username)
        except ValueError as e:
            raise ValueError(f"filesystems_to_mount entry {name!r}: {e}") from None
        if not os.path.isdir(source):
            raise ValueError(
                f"filesystems_to_mount entry {name!r}: host directory {source!r} does not "
                "exist on the hub host"
            )
        found.append(objects.Mount(name=name, source=source, path=path))
    return tuple(found)


def _read(host_path: str) -> tuple[bytes, int]:
    with open(host_path, "rb") as f:
        return f.read(), stat.S_IMODE(os.fstat(f.fileno()).st_mode)


async def files_to_push(
    entries: Iterable[Sequence[str]], shared_directories: Sequence[str]
) -> list[tuple[str, bytes, int]]:
    """(container path, content, mode) of each file, read off the loop. A path inside a
    directory every container shares read-only (``shared_directories``) is refused."""
    found = []
    for host_path, container_path in entries:
        shared = sharing.containing(shared_directories, container_path)
        if shared:
            raise ValueError(
                f"files_to_push: {container_path!r} is inside {shared!r}, which every "
                f"container shares read-only (c.LxdSpawner.shared_directories = "
                f"{list(shared_directories)!r}): push it elsewhere, or take "
                f"{shared!r} out of shared_directories"
            )
        try:
            data, mode = await asyncio.to_thread(_read, host_path)
        except OSError as e:
            raise ValueError(
                f"files_to_push: cannot read {host_path!r} on the hub host: {e.strerror}"
            ) from None
        found.append((container_path, data, mode))
    return found
