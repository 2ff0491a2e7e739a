"""What ``lxdspawner doctor`` checks on the daemon's own host, when the daemon is local (its
unix socket): root's subordinate uid and gid ranges, and the bridge's ports that no
container owns. Pure functions over the files' text and the names listed, so the unit tier
tests them; the readers take the root directory (``/`` on the host, a temporary one in tests).

Subordinate ids. An unprivileged container's uids 0-65535 are host uids taken from root's
range in ``/etc/subuid`` (``/etc/subgid`` for groups). With ``security.idmap.isolated``
(``isolated_idmap``: on by default for Incus) every container gets a block of its own
(``security.idmap.size``, 65536 by default) after the first block, which is the one the
non-isolated containers share; so a range of N ids holds N // 65536 - 1 isolated containers,
running or kept stopped, and a spawn past that fails ("Not enough uid/gid available"). Two
ranges for root (installing Debian's lxd package beside Incus appends one) make the daemons
write an id map the kernel refuses ("newuidmap: write to uid_map failed"): no unprivileged
container starts at all (measured on the bench; ``scripts/setup-lxd.sh`` keeps one).

Bridge ports. A container deleted before its stop hooks end leaks its host-side veth (see
:mod:`lxdspawner.removals`): it stays a port of the bridge, owned by no instance. The
instances name their host-side interfaces in ``volatile.<nic>.host_name``; a ``veth`` port of
the bridge that none names is such a leak (an instance starting at that very moment may not
have written it yet: run the check again before deleting). Ports that are not veths (an
uplink the operator added) are not ours to judge.

Btrfs quotas. On a btrfs pool, root disk sizes (``disk_limit``) and home volume sizes
(``home_volume_size``) are quota groups. When the file system marks its quota accounting
inconsistent (quotas enabled on a pool that already held data; some subvolume deletions on
recent kernels, see ``qgroups/drop_subtree_threshold``), btrfs enforces none of those limits
until ``btrfs quota rescan`` ends: a user writes past their quota and nothing says so. The flag
is ``/sys/fs/btrfs/<uuid>/qgroups/inconsistent``; the pool's file system is found through
its mount point (``<daemon's directory>/storage-pools/<pool>``) in ``/proc/self/mountinfo``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: The ids a container's own uid map spans (``security.idmap.size``'s default).
BLOCK = 65536


@dataclass(frozen=True)
class IdRange:
    start: int
    count: int


def root_ranges(text: str) -> list[IdRange]:
    """root's ranges in a subuid/subgid file's text (by name or by uid 0)."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in ("root", "0"):
            continue
        try:
            found.append(IdRange(int(parts[1]), int(parts[2])))
        except ValueError:
            continue
    return found


@dataclass(frozen=True)
class IdFinding:
    """``ok`` False: a problem; ``what`` says it, ``fix`` the command."""

    ok: bool
    what: str
    fix: str = ""
    warning: bool = False


def check_ids(
    path: str, text: str | None, *, isolated: bool, needed: int, existing: int
) -> IdFinding:
    """root's range in the file at ``path`` (``text`` None: no such file) for ``needed``
    isolated containers (``existing`` of them are there already)."""
    append = f"echo root:1000000:1000000000 >> {path}, then restart the daemon"
    ranges = root_ranges(text or "")
    if not ranges:
        return IdFinding(
            False,
            f"{path} has no range for root: the daemon falls back to its built-in map only "
            "while shadow's newuidmap is absent",
            append,
            warning=True,
        )
    if len(ranges) > 1:
        keep = max(ranges, key=lambda r: r.count)
        return IdFinding(
            False,
            f"{path} has {len(ranges)} ranges for root: the daemon writes an id map the "
            "kernel refuses, and no unprivileged container starts",
            f"keep one line for root in {path} (e.g. root:{keep.start}:{keep.count}), "
            "then restart the daemon",
        )
    size = ranges[0].count
    if not isolated:
        if size < BLOCK:
            return IdFinding(
                False,
                f"{path}: root's range holds {size} ids, fewer than a container's {BLOCK}",
                f"give root at least {BLOCK} ids in {path} (e.g. root:1000000:1000000000), "
                "then restart the daemon",
            )
        return IdFinding(True, f"{path}: root has {size} ids (containers share one map)")
    capacity = max(size // BLOCK - 1, 0)
    what = (
        f"{path}: root's range of {size} ids holds {capacity} containers with their own "
        f"uid range (isolated_idmap)"
    )
    fix = (
        f"give root a larger range in {path} (root:1000000:1000000000 holds about 15000), then "
        "restart the daemon"
    )
    if capacity < existing:
        return IdFinding(False, f"{what}, and {existing} are there already", fix)
    if capacity < needed:
        return IdFinding(False, f"{what}; {needed} are wanted", fix, warning=True)
    return IdFinding(True, what)


def read_ids(root: Path = Path("/")) -> dict[str, str | None]:
    """The text of ``/etc/subuid`` and ``/etc/subgid`` under ``root`` (None when absent)."""
    found: dict[str, str | None] = {}
    for name in ("etc/subuid", "etc/subgid"):
        try:
            found["/" + name] = (root / name).read_text()
        except OSError:
            found["/" + name] = None
    return found


def bridge_ports(bridge: str, root: Path = Path("/")) -> list[str] | None:
    """The interfaces attached to ``bridge`` on this host (None: no such bridge here)."""
    directory = root / "sys/class/net" / bridge / "brif"
    try:
        return sorted(p.name for p in directory.iterdir())
    except OSError:
        return None


def owned_interfaces(instances: Iterable[Mapping]) -> set[str]:
    """Every host-side interface the instances name (``volatile.<nic>.host_name``)."""
    names = set()
    for instance in instances:
        for key, value in (instance.get("config") or {}).items():
            if key.startswith("volatile.") and key.endswith(".host_name") and value:
                names.add(value)
    return names


def stray_ports(ports: Iterable[str], owned: set[str]) -> list[str]:
    """The veth ports no instance owns."""
    return sorted(p for p in ports if p.startswith("veth") and p not in owned)


def mount_source(mountinfo: str, mount: str) -> tuple[str, str] | None:
    """(file system type, source device) mounted at ``mount``, from ``/proc/self/mountinfo``
    text (the last mount there wins, as the kernel shows it)."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or " - " not in line or fields[4] != mount:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) >= 2:
            found = (after[0], after[1])
    return found


def btrfs_quota_state(mount: str, root: Path = Path("/")) -> str | None:
    """``"inconsistent"``, ``"consistent"`` or ``"off"`` for the btrfs file system mounted
    at ``mount`` on this host; None when it is not a btrfs mount here (another mount
    namespace, as a snap's, or another driver)."""
    try:
        mountinfo = (root / "proc/self/mountinfo").read_text()
    except OSError:
        return None
    found = mount_source(mountinfo, mount)
    if found is None or found[0] != "btrfs":
        return None
    device = Path(found[1]).name
    for fs in (root / "sys/fs/btrfs").glob("*/devices/" + device):
        flag = fs.parent.parent / "qgroups" / "inconsistent"
        try:
            return "inconsistent" if flag.read_text().strip() == "1" else "consistent"
        except OSError:
            return "off"
    return None
