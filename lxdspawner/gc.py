"""What ``lxdspawner gc`` may delete: copies made for images that no alias names any more.

lxdspawner makes two kinds of things per image, never per user: the read-only copies of the
image's shared directories (custom volumes ``lxdspawner-shared-<fingerprint>-<path>``, see
:mod:`lxdspawner.sharing`) and, on LXD 5.0, a stopped base container (``user.jupyterhub.
base-of``, see :mod:`lxdspawner.bases`). When an image is replaced (its alias moved to a new
build), the old ones stay: nothing deletes implicitly. Both are caches, made again on demand,
so deleting one that is still wanted costs a refill, never data. Still, a volume that any
instance uses (a running server, or one kept stopped with ``remove = False``) is kept, and
so is everything of an image that an alias names. User data is never in either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import names
from .bases import KEY_BASE_OF


@dataclass(frozen=True)
class Stale:
    kind: str  # "volume" or "base"
    name: str
    why: str
    pool: str = ""
    member: str = ""  # cluster member holding it ("" on a standalone daemon)


def named_fingerprints(images: Iterable[dict]) -> set[str]:
    """Fingerprints of the images an alias names: what hubs spawn from."""
    return {i["fingerprint"] for i in images if i.get("aliases")}


def stale(
    images: Iterable[dict], instances: Iterable[dict], volumes: Iterable[tuple[str, dict]]
) -> list[Stale]:
    """What may go, from the daemon's answers: images and instances (recursion=1), and
    (pool, custom volume) pairs."""
    named = named_fingerprints(images)
    named_short = {f[:12] for f in named}
    found = []
    for instance in instances:
        of = (instance.get("config") or {}).get(KEY_BASE_OF)
        if of and of not in named and instance.get("status") == "Stopped":
            found.append(
                Stale(
                    "base",
                    instance["name"],
                    f"the base of image {of[:12]}, which no alias names",
                    member=_member(instance),
                )
            )
    for pool, volume in volumes:
        fingerprint = names.shared_volume_fingerprint(volume.get("name", ""))
        if not fingerprint or fingerprint in named_short or volume.get("used_by"):
            continue
        found.append(
            Stale(
                "volume",
                volume["name"],
                f"a shared copy of image {fingerprint}, which no alias names; no instance uses it",
                pool=pool,
                member=_member(volume),
            )
        )
    return found


def _member(thing: dict) -> str:
    location = thing.get("location") or ""
    return "" if location == "none" else location  # "none": a standalone daemon
