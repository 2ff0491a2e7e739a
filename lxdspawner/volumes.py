"""Users' volumes: the home volume, extra and shared volumes; names, bodies and rules.

Every user gets a custom storage volume mounted at their home (``home_volume_size``; named
servers share it unless ``home_volume_per_server``), plus any ``volumes`` the operator lists,
DockerSpawner-style, keyed by a name template. A volume lxdspawner creates carries the keys
of :mod:`ownership` (hub, user, server; no user for a ``shared`` one) and ``KEY_VOLUME``
(what it is for): one holding a computed name without them is never used or deleted.

Rules kept here, apart from the daemon's I/O (:class:`Volumes`, below):
- nothing is deleted implicitly: only ``delete_forever`` with ``delete_volumes_with_user``,
  the operator's ``lxdspawner volumes delete``, and a volume this very spawn created while
  the server never started (nothing can have been written to it);
- on a pool local to each cluster member, a user's volume lives on one member, and the
  user's servers go there (:func:`data_member`, used by placement); on a remote pool (Ceph)
  nothing is pinned. A volume whose member does not answer is found in its pool's list
  (:func:`locate`), so the spawn fails naming the member and the volume, never making a
  fresh empty home elsewhere; :meth:`Volumes.move` moves one to another member
  (:func:`move_source` says whether it can).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from . import names
from .lxd import Conflict, LxdClient, LxdError, NotFound
from .ownership import KEY_HUB, KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY, Owner, describe

#: What a volume is for: "home", or the ``volumes`` template it was made from.
KEY_VOLUME = "user.jupyterhub.volume"
HOME = "home"
#: Storage drivers whose volumes every member reaches (nothing to pin).
REMOTE_DRIVERS = frozenset({"ceph", "cephfs", "cephobject"})
#: The API extension of a volume's copy from one cluster member to another in one call.
MEMBER_COPY = "cluster_internal_custom_volume_copy"
#: The keys a ``volumes`` entry may have.
VOLUME_KEYS = frozenset({"path", "size", "read_only", "shared", "pool"})
SNAPSHOT_KEYS = frozenset({"schedule", "expiry", "pattern"})

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKMGTPE]?i?B?)?\s*")
_UNITS = {
    "": 1,
    "B": 1,
    **{f"{p}B": 1000 ** (i + 1) for i, p in enumerate("kMGTPE")},
    **{f"{p}iB": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")},
    **{p: 1000 ** (i + 1) for i, p in enumerate("kMGTPE")},
}
_UNITS["KB"] = 1000
_UNITS["K"] = 1000


class VolumeError(Exception):
    """A volume cannot be used: the message names the setting, the value and the volume."""

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def parse_size(value: object, setting: str) -> int:
    """Bytes from ``"10GiB"``, ``"500MB"``, ``"1.5G"`` or a number of bytes; ValueError
    naming ``setting`` otherwise (LXD's own units: k/M/G... are powers of 1000, Ki/Mi/Gi...
    powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{setting} = {value!r} is not a size")
    if isinstance(value, int | float) and value > 0:
        return int(value)
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    unit = (match[2] or "") if match else ""
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ValueError(
            f"{setting} = {value!r} is not a size: write it as 10GiB, 500MiB or 2GB (or a "
            "number of bytes)"
        )
    return int(float(match[1]) * _UNITS[unit])


def human(size: int) -> str:
    """``10737418240`` → ``10 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _path(path: object, setting: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise ValueError(f"{setting} = {path!r}: the mount path must be an absolute path below /")
    normal = posixpath.normpath(path)
    if not all(names.is_safe_path_component(p) for p in normal.strip("/").split("/")):
        raise ValueError(f"{setting} = {path!r}: the mount path must be plain directory names")
    return normal


@dataclass(frozen=True)
class Settings:
    """The spawner's volume settings, checked (see :func:`settings`)."""

    hub: str
    home_size: int | None = None
    home_pool: str = ""
    per_server: bool = False
    snapshots: Mapping[str, str] = field(default_factory=dict)
    #: ``volumes``, checked: template → (path, size, read_only, shared, pool).
    volumes: Mapping[str, tuple[str, int | None, bool, bool, str]] = field(default_factory=dict)


def settings(
    *,
    hub: str,
    home_volume_size: object,
    home_volume_pool: str = "",
    home_volume_per_server: bool = False,
    home_volume_snapshots: Mapping | None = None,
    volumes: Mapping | None = None,
) -> Settings:
    """Check the settings, raising ValueError naming the setting and the value."""
    home_size = (
        parse_size(home_volume_size, "home_volume_size")
        if home_volume_size not in ("", None, 0)
        else None
    )
    snapshots = dict(home_volume_snapshots or {})
    unknown = set(snapshots) - SNAPSHOT_KEYS
    if unknown:
        raise ValueError(
            f"home_volume_snapshots has unknown keys {sorted(unknown)}: use "
            f"{sorted(SNAPSHOT_KEYS)} (e.g. {{'schedule': '@daily', 'expiry': '1w'}})"
        )
    checked: dict[str, tuple[str, int | None, bool, bool, str]] = {}
    for template, entry in (volumes or {}).items():
        setting = f"volumes[{template!r}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, Mapping):
            raise ValueError(f"{setting} = {entry!r}: give a dict with at least 'path'")
        unknown = set(entry) - VOLUME_KEYS
        if unknown:
            raise ValueError(
                f"{setting} has unknown keys {sorted(unknown)}: use {sorted(VOLUME_KEYS)}"
            )
        shared = bool(entry.get("shared", False))
        if shared and any(p in template for p in names.VOLUME_PLACEHOLDERS):
            raise ValueError(f"{setting}: a shared volume's name cannot hold {{username}}")
        names.volume_name(template, "user", "server")  # the template's own check
        size = entry.get("size")
        checked[template] = (
            _path(entry.get("path"), f"{setting}['path']"),
            parse_size(size, f"{setting}['size']") if size not in (None, "") else None,
            bool(entry.get("read_only", False)),
            shared,
            str(entry.get("pool") or ""),
        )
    return Settings(
        hub=hub,
        home_size=home_size,
        home_pool=home_volume_pool or "",
        per_server=bool(home_volume_per_server),
        snapshots={f"snapshots.{k}": str(v) for k, v in snapshots.items()},
        volumes=checked,
    )


@dataclass(frozen=True)
class Plan:
    """One volume a server mounts."""

    name: str
    kind: str  # HOME or the ``volumes`` template
    path: str
    pool: str  # "" until resolved: the root disk's pool
    size: int | None = None
    read_only: bool = False
    shared: bool = False
    #: Whose it is (None for a shared volume, which is nobody's).
    owner: Owner | None = None
    snapshots: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "your home volume" if self.kind == HOME else f"volume {self.name}"

    @property
    def setting(self) -> str:
        return "home_volume_size" if self.kind == HOME else f"volumes[{self.kind!r}]"

    @property
    def pool_setting(self) -> str:
        return "home_volume_pool" if self.kind == HOME else f"{self.setting}['pool']"

    def describe_settings(self) -> str:
        """The settings that made this volume, for an error message."""
        size = repr(human(self.size)) if self.size else "none"
        if self.kind != HOME:
            return f"{self.setting}: size {size}, pool {self.pool!r}"
        snapshots = {k.removeprefix("snapshots."): v for k, v in self.snapshots.items()}
        return (
            f"home_volume_size = {size}, home_volume_pool = {self.pool!r}, "
            f"home_volume_snapshots = {snapshots!r}"
        )

    def config(self, shifted: str = "") -> dict[str, str]:
        """The body's config: size, snapshots, shifting, and the keys last."""
        config: dict[str, str] = {}
        if self.size:
            config["size"] = str(self.size)
        config.update(self.snapshots)
        if shifted:
            config["security.shifted"] = shifted
        if self.owner is not None:
            config.update(self.owner.keys())
        else:
            config.update({KEY_MANAGED: MANAGED_BY, KEY_HUB: ""})
        config[KEY_VOLUME] = self.kind
        return {k: v for k, v in config.items() if v != ""}

    def device(self) -> dict[str, str]:
        device = {"type": "disk", "pool": self.pool, "source": self.name, "path": self.path}
        if self.read_only:
            device["readonly"] = "true"
        return device


def plans(
    s: Settings,
    *,
    username: str,
    server_name: str,
    home: str,
    prefix: str,
    host_mounts: Iterable[str] = (),
) -> list[Plan]:
    """The volumes of one server, home first. A home that ``filesystems_to_mount`` already
    mounts from the host (``host_mounts``: their paths; the original spawner's way of
    keeping homes) gets no volume. Raises ValueError naming the setting."""
    out: list[Plan] = []
    if s.home_size and home not in {posixpath.normpath(p) for p in host_mounts}:
        own = s.per_server and server_name
        out.append(
            Plan(
                name=names.home_volume_name(username, server_name, prefix, s.per_server),
                kind=HOME,
                path=home,
                pool=s.home_pool,
                size=s.home_size,
                owner=Owner(s.hub, username, server_name if own else ""),
                snapshots=s.snapshots,
            )
        )
    for template, (path, size, read_only, shared, pool) in s.volumes.items():
        per_server = "{servername}" in template
        out.append(
            Plan(
                name=names.volume_name(template, username, server_name),
                kind=template,
                path=path,
                pool=pool,
                size=size,
                read_only=read_only,
                shared=shared,
                owner=None if shared else Owner(s.hub, username, server_name if per_server else ""),
            )
        )
    paths = [p.path for p in out] + [posixpath.normpath(p) for p in host_mounts]
    if len(set(paths)) != len(paths):
        raise ValueError(
            f"two volumes (or a volume and filesystems_to_mount) are mounted at one path: {paths}"
        )
    return out


def owned(plan: Plan, config: Mapping[str, str] | None) -> bool:
    """Whether an existing volume is the one ``plan`` means: its keys match (a shared
    volume is the operator's: any will do)."""
    if plan.owner is None:
        return True
    config = config or {}
    return plan.owner.owns(config) and config.get(KEY_VOLUME) == plan.kind


def data_member(volume: Mapping, driver: str) -> str | None:
    """The member a user's existing volume pins their servers to: its ``location`` on a
    pool local to each member; None on a remote pool (Ceph) or a standalone daemon."""
    return None if driver in REMOTE_DRIVERS else target_of(volume)


def locate(name: str, listing: Iterable[Mapping]) -> dict | None:
    """Volume ``name`` in its pool's list (``GET .../volumes/custom?recursion=1``, which gives
    each one's ``location``): for when the volume itself cannot be read. A clustered daemon
    forwards a read of a volume on a local pool to the member holding it, and while that member
    is down the answer says only "Server isn't ready yet" (Incus 6.0); the list comes from the
    cluster's database and still says where it is. None: not there. Snapshots, listed as
    ``name/snapshot``, are not it. Several members holding one of that name (an interrupted
    move) is an error naming them: which one holds the user's files is an admin's call."""
    held = [dict(v) for v in listing if v.get("name") == name]
    if len(held) > 1:
        where = ", ".join(sorted(str(v.get("location") or "?") for v in held))
        raise VolumeError(
            f"members {where} each hold a volume named {name}: an admin must keep one and "
            "delete the others before its server can start",
            status=409,
        )
    return held[0] if held else None


def instances_using(volume: Mapping) -> list[str]:
    """The instance names in a volume's ``used_by`` (``/1.0/instances/NAME?project=P``)."""
    out = []
    for url in volume.get("used_by") or ():
        path = str(url).split("?", 1)[0]
        if path.startswith("/1.0/instances/"):
            out.append(path.removeprefix("/1.0/instances/"))
        else:
            out.append(path)
    return out


def move_source(
    volume: Mapping, *, pool: str, driver: str, to: str, members: Iterable[Mapping]
) -> str | None:
    """The member to move ``volume`` (on ``pool``, whose driver is ``driver``) from, to cluster
    member ``to``; None if it is there already. VolumeError saying why it cannot be moved: a
    remote pool (every member reaches it), no cluster, no such member, an instance using it
    (even a stopped one: its disk device would name a volume no longer on its member), or
    either member not Online (the copy is pulled from the source member)."""
    name = volume.get("name", "?")
    if driver in REMOTE_DRIVERS:
        raise VolumeError(
            f"{name} is on pool {pool}, a {driver} pool every member reaches: nothing to move",
            status=400,
        )
    status = {m.get("server_name"): m.get("status") or "Unknown" for m in members}
    if not status:
        raise VolumeError(f"the daemon is not a cluster: {name} cannot be moved", status=400)
    if to not in status:
        raise VolumeError(
            f"no cluster member {to!r} (members: {', '.join(sorted(status))})", status=404
        )
    source = data_member(volume, driver)
    if source is None:
        raise VolumeError(f"{name} on pool {pool} has no member location: nothing to move")
    if source == to:
        return None
    users = instances_using(volume)
    if users:
        raise VolumeError(
            f"{name} is used by {', '.join(users)}: stop the server first (a kept container "
            "holding it must be deleted: its disk would name a volume no longer on its member)",
            status=409,
        )
    for member, what in ((to, "the member to move it to"), (source, "the member holding it")):
        if status.get(member) != "Online":
            raise VolumeError(
                f"{name} cannot be moved from {source} to {to}: {member} ({what}) is "
                f"{status.get(member, 'not in the cluster')}, not Online",
                status=503,
            )
    return source


def belongs_to(config: Mapping[str, str], hub: str, user: str, server: str | None) -> bool:
    """Whether a volume is one of ``user``'s on ``hub`` (``server``: only that server's own;
    None: any of the user's). For ``delete_forever``."""
    return (
        config.get(KEY_MANAGED) == MANAGED_BY
        and config.get(KEY_HUB) == hub
        and config.get(KEY_USER) == user
        and KEY_VOLUME in config
        and (server is None or config.get(KEY_SERVER, "") == server)
    )


# -- the daemon's side ------------------------------------------------------------------------


@dataclass
class Prepared:
    """What :meth:`Volumes.prepare` found and made for one spawn."""

    plans: list[Plan]
    #: The existing volumes by name (None: missing).
    found: dict[str, dict | None] = field(default_factory=dict)
    #: The member holding the home (or another pinned) volume, if any.
    member: str | None = None
    pinned_by: str = ""
    #: Why the volume pinning the server could not be read directly (its member does not
    #: answer; it was found in the pool's list): "" when it could.
    unreadable: str = ""
    #: ``security.shifted`` for new volumes (see sharing.shifted).
    shifted: str = ""
    created: list[Plan] = field(default_factory=list)

    def devices(self) -> dict[str, dict[str, str]]:
        return {names.volume_device_name(p.path): p.device() for p in self.plans}


class Volumes:
    """One daemon's volume work: look up, check, create, and undo a failed first spawn."""

    def __init__(self, client: LxdClient, drivers: dict[str, str] | None = None) -> None:
        self.client = client
        #: Storage pool → driver, kept by the caller across spawns (pools do not change
        #: driver; one that is gone makes the volume requests fail, naming it).
        self.drivers = drivers if drivers is not None else {}

    async def pool_driver(self, pool: str, setting: str = "the volume's pool") -> str:
        """The pool's storage driver; a missing pool is named with ``setting``."""
        if pool not in self.drivers:
            try:
                found = await self.client.request("GET", f"/1.0/storage-pools/{quote(pool)}")
            except NotFound:
                raise VolumeError(
                    f"storage pool {pool!r} ({setting}) does not exist on this daemon",
                    status=400,
                ) from None
            self.drivers[pool] = found.get("driver", "")
        return self.drivers[pool]

    async def resolve_pools(self, plans: list[Plan], root_pool: str | None) -> list[Plan]:
        out = []
        for p in plans:
            pool = p.pool or root_pool
            if not pool:
                raise VolumeError(
                    f"{p.setting}: no storage pool for {p.name}: the profiles give no root "
                    "disk pool; set home_volume_pool (or the volume's 'pool')"
                )
            out.append(Plan(**{**p.__dict__, "pool": pool}))
        return out

    async def _listed(self, pool: str, name: str, error: LxdError, what: str) -> dict | None:
        """``name`` from its pool's list, after reading it failed with ``error``."""
        try:
            listing = await self.client.list_volumes(pool)
        except LxdError as e:
            raise VolumeError(
                f"{what} {name} on pool {pool} cannot be read: {error.message} (nor the pool's "
                f"volumes: {e.message})"
            ) from error
        return locate(name, listing)

    async def find(
        self, plans: list[Plan], unreadable: dict[str, str] | None = None
    ) -> dict[str, dict | None]:
        """The existing volumes of ``plans`` (None: missing), checked to be theirs. One that
        cannot be read is looked up in its pool's list, which says where it is; the reason is
        put in ``unreadable`` (its member does not answer: see :func:`locate`)."""
        found: dict[str, dict | None] = {}
        for p in plans:
            try:
                volume = await self.client.get_volume(p.pool, p.name)
            except NotFound:
                found[p.name] = None
                continue
            except LxdError as e:
                volume = await self._listed(p.pool, p.name, e, p.label)
                if volume is None:
                    found[p.name] = None
                    continue
                if unreadable is not None:
                    unreadable[p.name] = e.message
            if not owned(p, volume.get("config")):
                raise VolumeError(
                    f"the volume name {p.name} (pool {p.pool}) is held by a volume that is "
                    f"not this server's ({describe(volume.get('config'))}); it is left "
                    "untouched: an admin must rename or delete it",
                    status=409,
                )
            found[p.name] = volume
        return found

    async def prepare(self, plans: list[Plan], *, shifted: str) -> Prepared:
        """Look the volumes up; the pinned member comes from the first existing one on a
        local pool. Nothing is created yet (that waits for placement: :meth:`create`)."""
        drivers = {p.pool: await self.pool_driver(p.pool, p.pool_setting) for p in plans}
        unreadable: dict[str, str] = {}
        found = await self.find(plans, unreadable)
        prepared = Prepared(plans=plans, found=found, shifted=shifted)
        for p in plans:
            volume = found[p.name]
            if volume is not None and p.shared and shifted:
                await self._shift_shared(p, volume)
            if volume is None:
                if p.shared and not p.size:
                    raise VolumeError(
                        f"{p.setting}: the shared volume {p.name} does not exist on pool "
                        f"{p.pool}; create it, or give it a 'size' so that it is created",
                        status=400,
                    )
                continue
            member = data_member(volume, drivers[p.pool])
            if member and prepared.member is None:
                prepared.member, prepared.pinned_by = member, p.name
                prepared.unreadable = unreadable.get(p.name, "")
            elif member and member != prepared.member:
                raise VolumeError(
                    f"{p.label} {p.name} is on member {member} but {prepared.pinned_by} is "
                    f"on {prepared.member}: move one with `lxdspawner volumes move`"
                )
        return prepared

    async def create(self, prepared: Prepared, member: str | None, say=lambda *a: None) -> None:
        """Create the missing volumes on ``member``; bring existing ones' snapshot schedule
        in line with the settings."""
        for p in prepared.plans:
            volume = prepared.found.get(p.name)
            if volume is not None:
                await self._update_schedule(p, volume)
                continue
            size = f" ({human(p.size)})" if p.size else ""
            say(f"Creating {p.label}{size}", 12)
            try:
                await self.client.create_volume(
                    p.pool, p.name, config=p.config(prepared.shifted), target=member
                )
            except LxdError as e:
                raise VolumeError(
                    f"creating {p.label} {p.name} on pool {p.pool}"
                    f"{f' on {member}' if member else ''} failed: {e.message} (settings: "
                    f"{p.describe_settings()})"
                ) from e
            prepared.created.append(p)
            prepared.found[p.name] = {"name": p.name, "config": p.config(prepared.shifted)}

    async def _shift_shared(self, p: Plan, volume: dict) -> None:
        """A shared volume is mounted in containers that each have their own uid range: on
        Incus it must be shifted (idmapped mounts). One the operator made without is set so
        while nothing uses it; in use, the spawn fails saying what to run."""
        config = volume.get("config") or {}
        if config.get("security.shifted") == "true":
            return
        if volume.get("used_by"):
            raise VolumeError(
                f"{p.setting}: the shared volume {p.name} is mounted in containers with "
                "different uid ranges and must be shifted: stop the servers using it and run "
                f"`incus storage volume set {p.pool} {p.name} security.shifted=true`",
                status=409,
            )
        await self.client.update_volume_config(
            p.pool, p.name, {"security.shifted": "true"}, target=target_of(volume)
        )
        volume["config"] = {**config, "security.shifted": "true"}

    async def _update_schedule(self, p: Plan, volume: Mapping) -> None:
        config = volume.get("config") or {}
        wanted = {k: v for k, v in p.snapshots.items()}
        stale = {k: "" for k in config if k.startswith("snapshots.") and k not in wanted}
        change = {k: v for k, v in {**stale, **wanted}.items() if config.get(k, "") != v}
        if change and p.owner is not None:
            await self.client.update_volume_config(p.pool, p.name, change, target=target_of(volume))

    async def discard(self, prepared: Prepared, member: str | None) -> None:
        """Delete what this spawn created (the server never started: nothing is in them)."""
        for p in prepared.created:
            try:
                await self.client.delete_volume(p.pool, p.name, target=member)
            except LxdError:
                pass  # left behind, empty: `lxdspawner volumes list` shows it
        prepared.created.clear()

    async def move(self, pool: str, name: str, to: str) -> None:
        """Move custom volume ``name`` of ``pool`` to cluster member ``to`` (same pool, same
        name), snapshots and config with it, as ``incus storage volume move pool/name
        pool/name --target SRC --destination-target DST`` does: the daemon copies it from
        its member (``cluster_internal_custom_volume_copy``), then the original is deleted.
        Nothing to do if it is there already. Refused while an instance uses it, and when
        either member is not Online (see :func:`move_source`); VolumeError otherwise too,
        saying what is left where."""
        try:
            volume = await self.client.get_volume(pool, name)
        except NotFound:
            await self.pool_driver(pool)  # the pool's own error if it is the pool that is missing
            raise VolumeError(f"no volume {name} on pool {pool}", status=404) from None
        except LxdError as e:
            volume = await self._listed(pool, name, e, "volume")
            if volume is None:
                raise VolumeError(f"no volume {name} on pool {pool}", status=404) from e
        driver = await self.pool_driver(pool)
        source = move_source(
            volume, pool=pool, driver=driver, to=to, members=await self.client.cluster_members()
        )
        if source is None:
            return
        dialect = self.client.dialect
        if dialect is not None and not dialect.has(MEMBER_COPY):
            raise VolumeError(
                f"{self.client.where} lacks API extension {MEMBER_COPY} (LXD 5.0 lacks it):"
                f" move {name} with `lxc storage volume move {pool}/{name} "
                f"{pool}/{name} --target {source} --destination-target {to}`",
                status=501,
            )
        try:
            await self.client.get_volume(pool, name, target=to)
        except NotFound:
            pass
        else:
            raise VolumeError(
                f"{to} already holds a volume named {name} (pool {pool}) besides the one on "
                f"{source}: an admin must keep one and delete the other",
                status=409,
            )
        try:
            await self.client.copy_volume_to_member(
                pool,
                name,
                source_member=source,
                target=to,
                config=volume.get("config") or {},
                description=volume.get("description") or "",
                content_type=volume.get("content_type") or "filesystem",
            )
        except LxdError as e:
            if not isinstance(e, Conflict):  # (one made there meanwhile is not ours to delete)
                try:  # a partial copy: the original stays the one
                    await self.client.delete_volume(pool, name, target=to)
                except LxdError:
                    pass
            raise VolumeError(
                f"copying {name} (pool {pool}) from {source} to {to} failed: {e.message}; "
                f"it stays on {source}"
            ) from e
        try:
            await self.client.delete_volume(pool, name, target=source)
        except LxdError as e:
            raise VolumeError(
                f"{name} (pool {pool}) was copied to {to}, but the original on {source} could "
                f"not be deleted ({e.message}): the server cannot start while both exist; "
                f"delete the one on {source} (`incus storage volume delete {pool} {name} "
                f"--target {source}`) once the copy is checked"
            ) from e

    async def owned_by(self, hub: str, user: str, server: str | None) -> list[dict]:
        """Every custom volume of ``user`` on ``hub`` (``server``: that server's own), in
        every pool, each with its ``pool``."""
        ours = await self.ours()
        return [v for v in ours if belongs_to(v.get("config") or {}, hub, user, server)]

    async def delete(self, volumes: Iterable[Mapping]) -> list[str]:
        deleted = []
        for v in volumes:
            await self.client.delete_volume(v["pool"], v["name"], target=target_of(v))
            deleted.append(v["name"])
        return deleted

    # -- the operator's work (``lxdspawner volumes``, see volumecli.py) ----------------------

    async def ours(self) -> list[dict]:
        """Every custom volume lxdspawner made (``KEY_VOLUME`` and managed-by lxdspawner), in
        every pool, each with its ``pool``; a name alone never makes one ours."""
        out = []
        for pool in await self.client.storage_pools():
            for volume in await self.client.list_volumes(pool):
                config = volume.get("config") or {}
                if (
                    is_volume(volume)
                    and config.get(KEY_MANAGED) == MANAGED_BY
                    and KEY_VOLUME in config
                ):
                    out.append({**volume, "pool": pool})
        return out

    async def instances_using(self, volume: Mapping) -> list[dict]:
        """The instances the daemon says use ``volume`` (its ``used_by``), each as
        ``GET /1.0/instances/<name>`` answers (status, location); one deleted meanwhile is
        left out."""
        found = []
        for url in volume.get("used_by") or []:
            path = urlsplit(url).path
            if not path.startswith("/1.0/instances/"):
                continue  # a profile naming it: it is in use only through an instance
            name = unquote(path.removeprefix("/1.0/instances/").split("/")[0])
            try:
                found.append(await self.client.get_instance(name))
            except NotFound:
                continue
        return found

    async def snapshot(self, volume: Mapping, snapshot: str) -> None:
        await self.client.create_volume_snapshot(
            volume["pool"], volume["name"], snapshot, target=target_of(volume)
        )

    async def snapshots(self, volume: Mapping) -> list[dict]:
        return await self.client.volume_snapshots(
            volume["pool"], volume["name"], target=target_of(volume)
        )

    async def restore(self, volume: Mapping, snapshot: str) -> None:
        await self.client.restore_volume(
            volume["pool"], volume["name"], snapshot, target=target_of(volume)
        )

    async def resize(self, volume: Mapping, size: int) -> None:
        await self.client.update_volume_config(
            volume["pool"], volume["name"], {"size": str(size)}, target=target_of(volume)
        )


def is_volume(volume: Mapping) -> bool:
    """Whether an entry of a pool's volume list is a custom volume itself: the list holds its
    snapshots too (``home/snap0``, of type custom, with the volume's config and keys)."""
    return volume.get("type", "custom") == "custom" and "/" not in str(volume.get("name", ""))


def target_of(volume: Mapping) -> str | None:
    """The member to ask about ``volume``: its location; None on a standalone daemon."""
    location = volume.get("location") or ""
    return None if location in ("", "none") else location
