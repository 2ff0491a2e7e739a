"""The hub's one object per daemon: everything it keeps and does per LXD/Incus server.

A :class:`Daemon` per :class:`~lxdspawner.lxd.Remote`, shared by every spawner of the hub
(:meth:`Daemon.of` is the one registry). It owns the client (one connection pool), the
event-fed cache of our instances, what the hub knows of cluster members beyond LXD's answers,
the shared read-only directories, LXD 5.0's shifted bases, the deletions in progress and the
failed stops being retried, the bridges' gateways, the hardening read from the profiles and the
warm pool (warmpool.py).

It speaks of containers and owners, never of JupyterHub: its failures are :class:`DaemonError`
(with the reason and status a spawn page shows), which the spawner turns into its SpawnError;
it never imports the spawner.

The stop-and-remove protocol is here, whole: a server's unit is stopped, the container powers
off, and it is deleted once LXD reports it torn down (deleting earlier leaks its host veth),
in the background; a new start of the same server waits for that. A stop the daemon does not
answer is retried until it works. Containers whose cluster member is down are deleted once it
answers, by the daemon's own check of their keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import ClassVar

from . import (
    bases,
    capacity,
    commands,
    extraobjects,
    metrics,
    network,
    objects,
    ownership,
    patches,
    placement,
    recipes,
    sharing,
    volumes,
)
from .cache import InstanceCache
from .lxd import (
    FileHelperFailed,
    LxdClient,
    LxdError,
    NotFound,
    Remote,
    Unreachable,
    image_source,
    ipv4_addresses,
)
from .members import SUSPECT_FOR, MemberBook, Reservation
from .removals import PendingStops, Removals, remove_once_torn_down
from .warmpool import WarmPool

#: Instance statuses in which a server counts as running.
RUNNING_STATES = ("Running", "Starting", "Freezing", "Frozen", "Thawed")

log = logging.getLogger("lxdspawner.daemon")

Say = Callable[[str, int], None]


def _quiet(message: str, progress: int) -> None:
    pass


class DaemonError(Exception):
    """Something the daemon did or refused, said for the user's spawn page: ``reason`` and
    ``status`` are JupyterHub's (503: try again later)."""

    def __init__(self, message: str, *, reason: str = "lxd", status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status


class MemberFailed(DaemonError):
    """A cluster member failed during a spawn; it is left out of placement for a while."""

    def __init__(self, message: str, *, member: str) -> None:
        super().__init__(message, reason="member", status=503)
        self.member = member


@dataclasses.dataclass(frozen=True)
class Source:
    """What a new container is made from, beyond its spec: the image, where, and the speed-ups
    that apply (the shared read-only directories, LXD 5.0's shifted base)."""

    image: str
    member: str | None = None
    shared_directories: tuple[str, ...] = ()
    clone_shifted_base: bool | None = None
    base_prefix: str = "jupyter"
    profiles: tuple[str, ...] = ("default",)
    timeout: float = 120.0
    teardown_timeout: float = 30.0


class Daemon:
    """One LXD/Incus server or cluster, as this hub knows it. Get it with :meth:`of`."""

    _all: ClassVar[dict[Remote, Daemon]] = {}

    @classmethod
    def of(cls, remote: Remote, *, timeout: float = 30.0, resync_interval: float = 300.0) -> Daemon:
        """The hub's Daemon for ``remote``, made on first use (the settings of that first
        use stand)."""
        daemon = cls._all.get(remote)
        if daemon is None:
            daemon = cls._all[remote] = cls(
                remote, timeout=timeout, resync_interval=resync_interval
            )
            metrics.register_request_counts(
                lambda: [d._client for d in cls._all.values() if d._client is not None]
            )
        return daemon

    @classmethod
    async def close_all(cls) -> None:
        """Stop every cache and close every client (tests; a hub just exits)."""
        for daemon in list(cls._all.values()):
            await daemon.close()
        cls._all.clear()

    def __init__(
        self,
        remote: Remote,
        *,
        timeout: float = 30.0,
        resync_interval: float = 300.0,
        connect: Callable[[], Awaitable[LxdClient]] | None = None,
    ):
        """``connect``: how the client is made, instead of connecting to ``remote`` (the unit
        tier passes an in-memory daemon's; the hub uses :meth:`of`)."""
        self.remote = remote
        self.timeout = timeout
        self.resync_interval = resync_interval
        self._connect = connect or (lambda: remote.connect(timeout=timeout))
        self._client: LxdClient | None = None
        self._cache: InstanceCache | None = None
        self.members = MemberBook(log)
        self.shares = sharing.SharedDirectories(log)
        self.bases = bases.ShiftedBases()
        self.removals = Removals(remote)
        self.stops = PendingStops()
        self._gateways: dict[str, str] = {}
        #: (settings) -> (when read, instance config, system devices): see the spawner.
        self.hardenings: dict[tuple, tuple[float, dict, dict]] = {}
        self._root_pools: dict[tuple[str, ...], str | None] = {}
        self._pool_drivers: dict[str, str] = {}
        self.pool = WarmPool(self)

    def __repr__(self) -> str:
        return f"Daemon({self.remote})"

    async def close(self) -> None:
        self.pool.close()
        if self._cache is not None:
            await self._cache.stop()
        if self._client is not None:
            await self._client.close()

    # -- the connection and the cache --------------------------------------------------------

    async def client(self) -> LxdClient:
        """The hub's client for this daemon, connected (its dialect known)."""
        if self._client is None or self._client.dialect is None:
            self._client = await self._connect()
        return self._client

    async def cache(self) -> InstanceCache:
        """The event-fed view of our instances, following the daemon."""
        if self._cache is None:
            self._cache = InstanceCache(await self.client(), resync_interval=self.resync_interval)
        try:
            await self._cache.start(timeout=self.timeout)
        except asyncio.TimeoutError:
            raise Unreachable(
                f"{self.where} sent no event stream and list of instances within {self.timeout:g} s"
            ) from None
        return self._cache

    async def ready(self) -> tuple[LxdClient, InstanceCache]:
        """The client and the cache for a spawn. A daemon that stopped answering (a remote
        that is down: the cache's event stream has dropped) fails here at once, with one
        ``GET /1.0``, as Unreachable, rather than part way into the spawn."""
        client = await self.client()
        cache = await self.cache()
        if not cache.healthy:
            await client.server_info()
        return client, cache

    @property
    def clustered(self) -> bool:
        return bool(self._client and self._client.dialect and self._client.dialect.clustered)

    @property
    def product(self) -> str:
        dialect = self._client.dialect if self._client else None
        return dialect.product if dialect else "incus"

    @property
    def where(self) -> str:
        return self._client.where if self._client else str(self.remote)

    async def gateway(self, name: str) -> str:
        """The IPv4 address of a managed bridge: this host as its containers see it."""
        if name not in self._gateways:
            info = await (await self.client()).network(name)
            try:
                self._gateways[name] = network.gateway_of(info)
            except network.IsolationError:
                raise DaemonError(
                    f"network {name!r} has no IPv4 address: set c.LxdSpawner.hub_connect_url"
                ) from None
        return self._gateways[name]

    # -- placement ---------------------------------------------------------------------------

    async def place(
        self,
        request: placement.PlacementRequest,
        *,
        weights: dict[str, float],
        policy: Callable | None = None,
    ) -> str | None:
        """The cluster member for a new server (None on a standalone daemon). Counted as in
        flight until :meth:`landed`, so a burst spreads."""
        return (await self.reserve(request, weights=weights, policy=policy)).member

    async def reserve(
        self,
        request: placement.PlacementRequest,
        *,
        weights: dict[str, float],
        policy: Callable | None = None,
        instance: str = "",
    ) -> Reservation:
        """Place a new server (``instance``): the member (None on a standalone daemon) and,
        when the request needs capacity (``request.need``), its guarantees and the GPUs it
        gets there, held for it until :meth:`landed` (then its instance's keys hold them)."""
        client = await self.client()
        cache = await self.cache()
        if not self.clustered:
            if request.require:
                log.warning("target %r ignored: %s is not a cluster", request.require, self.where)
            return await self.reserve_on(None, request, instance)
        members = await client.cluster_members()
        self.members.mark_suspects(members)
        if request.need:
            names = [m["server_name"] for m in members]
            online = [m["server_name"] for m in members if m.get("status") == placement.ONLINE]
            have = await self.members.resources(client, online, every=names)
        # From here to placed() there is no await: concurrent spawns see each other.
        snapshot = placement.members_from_counts(
            members, cache.count_by_location(), self.members.in_flight, weights
        )
        if request.need:
            snapshot = placement.with_capacity(snapshot, have, self._usage(cache))
        try:
            chosen = (policy or placement.weighted_least_loaded)(snapshot, request)
        except placement.NoMemberAvailable as e:
            raise DaemonError(e.message, reason="placement", status=503) from e
        member = next((m for m in snapshot if m.name == chosen), None)
        if member is None:
            raise DaemonError(f"placement_policy chose {chosen!r}, which is not a cluster member")
        if request.data_member and chosen != request.data_member:
            raise DaemonError(
                f"placement_policy chose {chosen!r}, but {request.data_volume} of user "
                f"{request.user!r} is on {request.data_member}: the server must go there",
                reason="placement",
            )
        full = placement.why_full(member, request)
        if full is not None:
            raise DaemonError(
                f"placement_policy chose {chosen!r}, which has no room: {full}",
                reason="placement",
                status=503,
            )
        reservation = Reservation(chosen, instance, placement.held(member, request))
        self.members.placed(chosen, reservation)
        return reservation

    async def reserve_on(
        self, member: str | None, request: placement.PlacementRequest, instance: str
    ) -> Reservation:
        """Hold the request's guarantees and GPUs on ``member`` (None: a standalone daemon,
        one member), where a kept container (or the daemon) leaves no choice; DaemonError
        (503) when it has no room."""
        if not request.need:
            return Reservation(member)
        client = await self.client()
        cache = await self.cache()
        have = await self.members.resources(client, [member])
        usage = self._usage(cache)
        if member is None:  # standalone: every location is this daemon
            usage = {None: sum(usage.values(), capacity.NOTHING)}
        here = placement.Member(
            name=member or self.where, status=placement.ONLINE, groups=(), instances=0, in_flight=0
        )
        (here,) = placement.with_capacity(
            [here], {here.name: have[member]}, {here.name: usage.get(member, capacity.NOTHING)}
        )
        full = placement.why_full(here, request)
        if full is not None:
            what = f"server {request.server_name!r}" if request.server_name else "the server"
            where = f"cluster member {member}" if member else self.where
            kept = f" (where its kept container {instance} is)" if member and instance else ""
            raise DaemonError(
                f"{where}{kept} has no room for {what} of user {request.user!r}: {full}",
                reason="placement",
                status=503,
            )
        reservation = Reservation(member, instance, placement.held(here, request))
        self.members.placed(member, reservation)
        return reservation

    def _usage(self, cache: InstanceCache) -> dict[str | None, capacity.Usage]:
        """What our running servers and the spawns in flight hold, per member (each once)."""
        usage: dict[str | None, capacity.Usage] = dict(cache.usage_by_location())
        counted = {i.name for i in cache.instances() if i.status != "Stopped"}
        for member, held in self.members.reserved(counted).items():
            usage[member] = usage.get(member, capacity.NOTHING) + held
        return usage

    def landed(self, placed: str | Reservation | None) -> None:
        """The spawn placed on a member (or reserved: ``reserve``) has ended, well or not."""
        if isinstance(placed, Reservation):
            self.members.landed(placed.member, placed)
        else:
            self.members.landed(placed)

    def member_failed(self, member: str, name: str, error: BaseException) -> MemberFailed | None:
        """For a spawn on ``member`` that failed with ``error``: if the daemon's answer (an
        LxdError, or one our own error was raised from) is behind it, the member itself may
        be failing, which LXD notices only after a heartbeat or two. Then it is left out of
        placement for a while, so a retry goes elsewhere, and this is the error to show."""
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, LxdError):
            cause = cause.__cause__  # e.g. creating the home volume there: ours, from a VolumeError
        if cause is None:
            return None
        self.members.suspect(member)
        return MemberFailed(
            f"cluster member {member} failed during the spawn of {name}: {cause.message}. It "
            f"is left out of placement for {SUSPECT_FOR:.0f} s: start again.",
            member=member,
        )

    # -- a server's name -----------------------------------------------------------------------

    async def claim(
        self,
        candidates: Sequence[str],
        owner: ownership.Owner,
        *,
        recorded: str,
        keep: bool,
        teardown_timeout: float,
        say: Say = _quiet,
    ) -> tuple[str, dict | None]:
        """The first of ``candidates`` that is free or ``owner``'s, and its instance if it
        exists. ``recorded``: the name the hub's state names (a 0.1 instance without the hub
        key is adopted only under it). ``keep``: remove = False.

        A name held by an instance that is not ``owner``'s is left alone. On a cluster, a
        name whose instance cannot be read (its member is down) is skipped (and, unless kept,
        its instance is deleted once the member is back).
        """
        client = await self.client()
        for name in dict.fromkeys(candidates):
            if self.members.is_orphan(name):
                continue
            self.stops.cancel(name)  # this start takes over
            await self.wait_removed(name, say)
            try:
                existing = await _get(client, name)
            except LxdError as e:
                if name == recorded and keep:
                    raise DaemonError(
                        f"this server's kept container {name} cannot be read ({e.message}); "
                        "it is kept as it is (remove = False): start again once it can be "
                        "reached, or have an admin delete the server to start afresh"
                    ) from e
                if not self.clustered:
                    raise
                log.warning("%s is unavailable (%s): using another name", name, e.message)
                if not keep:
                    self.orphan(name, owner, teardown_timeout)
                continue
            if existing is None:
                return name, None
            config = existing.get("config")
            if owner.owns(config) or (name == recorded and owner.owns_recorded(config)):
                return name, existing
            log.warning(
                "%s: %s holds the name %s; leaving it alone and using another name",
                owner.label,
                ownership.describe(config),
                name,
            )
        raise DaemonError(
            f"no free container name for this server: {', '.join(dict.fromkeys(candidates))} "
            "are all held by instances that are not its own"
        )

    # -- making a container ---------------------------------------------------------------------

    async def create(self, spec: objects.ServerSpec, source: Source, say: Say = _quiet) -> None:
        """Create the container, with the shared directories whose copies are ready."""
        fingerprint, shared = await self.shared_devices(source)
        if shared:
            devices = {**spec.extra_devices, **shared}
            try:
                return await self._create(
                    dataclasses.replace(spec, extra_devices=devices), source, say
                )
            except DaemonError as e:
                # A volume may have been deleted by hand: go without, and look again later.
                log.warning("create with the shared directories failed (%s); without", e)
                self.shares.forget(fingerprint, source.member)
                await self.remove(spec.instance, source.teardown_timeout)
        return await self._create(spec, source, say)

    async def _create(self, spec: objects.ServerSpec, source: Source, say: Say) -> None:
        client = await self.client()

        def forward(metadata: dict) -> None:
            for key, value in metadata.items():
                if key.endswith("_progress") and isinstance(value, str):
                    say(f"Creating container: {value}", 15)

        try:
            request = objects.instance_request(spec)
        except patches.PatchError as e:
            raise DaemonError(e.message, reason="patch") from e
        try:
            await client.create_instance(
                spec.instance,
                source=await self._source(spec, source, say),
                profiles=request["profiles"],
                config=request["config"],
                devices=request["devices"],
                target=source.member,
                timeout=max(source.timeout, 60),
                on_progress=forward,
            )
        except LxdError as e:
            if await client.image_fingerprint(source.image) is None:
                product = client.dialect.product if client.dialect else "incus"
                command = recipes.ensure_image_command(
                    source.image, product, config=recipes.hub_config_file()
                )
                raise DaemonError(
                    f"the image {source.image!r} (c.LxdSpawner.image) does not exist on "
                    f"{client.where}: build and import it ({command}), or set "
                    "c.LxdSpawner.image to an existing alias"
                ) from e
            patched = patches.blame(spec.patches, e.message)
            raise DaemonError(
                f"could not create container {spec.instance}{patched}: {e.message}"
            ) from e

    async def shared_devices(self, source: Source) -> tuple[str, dict[str, dict[str, str]]]:
        """The image's fingerprint, and the disk devices of the ready shared directories."""
        if not source.shared_directories:
            return "", {}
        client = await self.client()
        if source.member is None and self.clustered:
            return "", {}  # the volumes are per member: only when we chose the member
        try:
            fingerprint = await client.image_fingerprint(source.image, max_age=30)
            if fingerprint is None:
                return "", {}
            return fingerprint, await self.shares.devices(
                client, fingerprint, source.member, source.shared_directories, source.profiles
            )
        except LxdError as e:
            log.warning("shared directories unavailable: %s", e.message)
            return "", {}

    async def _source(self, spec: objects.ServerSpec, source: Source, say: Say) -> dict:
        """Where the container comes from: the image, or a copy of the shifted base."""
        client = await self.client()
        if not bases.wanted(
            source.clone_shifted_base, client.dialect, spec.privileged, source.member
        ):
            return image_source(source.image)
        fingerprint = await client.image_fingerprint(source.image)
        if fingerprint is None:
            return image_source(source.image)  # let the create fail with the usual message
        copy = await self.bases.source(
            client,
            fingerprint=fingerprint,
            prefix=source.base_prefix,
            profiles=spec.profiles,
            timeout=max(source.timeout, 120),
            on_make=lambda: say("Preparing a base container for this image (once per image)", 12),
        )
        if copy is None:
            log.warning(
                "the name of the shifted base of %s is held by another instance: creating "
                "from the image",
                source.image,
            )
            return image_source(source.image)
        return copy

    async def make_reusable(
        self,
        spec: objects.ServerSpec,
        existing: dict,
        source: Source,
        *,
        stop_timeout: float,
        say: Say = _quiet,
    ) -> None:
        """A kept container (remove = False): stopped if it runs (never deleted), then given
        the current config and devices, so a changed setting or mount reaches it."""
        client = await self.client()
        cache = await self.cache()
        name = spec.instance
        if existing.get("status") != "Stopped":
            say(f"Stopping the kept container {name} (it was {existing.get('status')})", 8)
            try:
                if await client.shut_down(name, timeout=stop_timeout):
                    cache.note_torn_down(name)
            except NotFound:
                return
            await cache.wait_torn_down(name, stop_timeout + 10)
            existing = await client.get_instance(name)
        where = dataclasses.replace(source, member=existing.get("location") or None)
        _, shared = await self.shared_devices(where)
        try:
            request = objects.instance_request(
                dataclasses.replace(spec, extra_devices={**spec.extra_devices, **shared})
            )
        except patches.PatchError as e:
            raise DaemonError(e.message, reason="patch") from e
        # Keep LXD's own keys (volatile.*, image.*); ours and the operator's are set afresh.
        config = {
            k: v
            for k, v in (existing.get("config") or {}).items()
            if k.startswith(("volatile.", "image."))
        }
        config.update(request["config"])
        # The PUT is an operation: the daemon checks and applies the update in it, so wait
        # for its end (a refused update would otherwise start the container as it was).
        try:
            await client.run(
                "PUT",
                f"/1.0/instances/{name}",
                json_body={
                    "architecture": existing.get("architecture", ""),
                    "config": config,
                    "devices": request["devices"],
                    "profiles": request["profiles"],
                    "ephemeral": bool(existing.get("ephemeral")),
                    "stateful": bool(existing.get("stateful")),
                    "description": existing.get("description", ""),
                },
                timeout=max(stop_timeout, 60),
            )
        except LxdError as e:
            raise DaemonError(
                f"could not give the kept container {name} the current settings: {e.message}"
            ) from e

    async def push_server_files(
        self,
        spec: objects.ServerSpec,
        env: dict[str, str],
        files: Iterable[tuple[str, bytes, int]],
        *,
        enable_unit: bool,
    ) -> None:
        """The server's environment file and systemd unit (enabled at boot, or not when it
        is started after boot), and the operator's files_to_push."""
        client = await self.client()
        name = spec.instance
        await client.make_directory(name, objects.CONFIG_DIR, mode=0o755)
        # The token is in this file, never on a command line. systemd (PID 1, root) reads it
        # for the unit, whose ExecStartPre runs as root: so it is root's, 0600, and the user
        # cannot rewrite it for a later boot (a container can start again without the hub).
        try:
            content = objects.env_file(objects.server_environment(spec, env))
        except ValueError as e:
            raise DaemonError(f"the server's environment cannot be written: {e}") from e
        await client.push_file(name, objects.ENV_PATH, content, mode=0o600)
        await client.push_file(name, objects.UNIT_PATH, objects.server_unit(spec), mode=0o644)
        if enable_unit:
            # Enabled before boot: systemd starts the server itself, no exec round trip.
            await client.make_symlink(name, objects.UNIT_WANTS_LINK, f"../{objects.UNIT_NAME}")
        else:
            try:
                await client.request(
                    "DELETE",
                    f"/1.0/instances/{name}/files",
                    params={"path": objects.UNIT_WANTS_LINK},
                )
            except NotFound:
                pass
        for container_path, data, mode in files:
            try:
                await client.push_file(name, container_path, data, mode=mode)
            except FileHelperFailed:
                raise
            except LxdError as e:
                raise DaemonError(
                    f"files_to_push: cannot write {container_path!r} in the container: {e.message}"
                ) from e

    async def wait_ipv4(self, name: str, timeout: float) -> str:
        """The container's IPv4 address, once DHCP gave it one."""
        client = await self.client()
        delay = 0.05
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                state = await client.instance_state(name)
            except LxdError:
                # The state of a container that is powering off cannot always be read.
                state = {"status": (await client.get_instance(name)).get("status")}
            addresses = ipv4_addresses(state)
            if addresses:
                return addresses[0]
            if state.get("status") not in ("Running", None):
                raise DaemonError(
                    f"container {name} stopped while booting (status {state.get('status')}); "
                    + await self.server_log_tail(name)
                )
            if loop.time() > deadline:
                raise DaemonError(
                    f"container {name} got no IPv4 address within {timeout:g} s "
                    "(start_timeout): is DHCP running on its bridge?"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def run_as_user(
        self,
        spec: objects.ServerSpec,
        templates: Iterable[str],
        *,
        timeout: float,
    ) -> None:
        """commands_to_prepare: each through /bin/sh as the server's uid/gid, in its home
        (made first, by root, only where nothing is), ``{USERNAME}`` put in safely."""
        client = await self.client()
        name = spec.instance
        env = {
            "JUPYTERHUB_USER": spec.username,
            "JUPYTERHUB_SERVER_NAME": spec.server_name,
            "HOME": spec.home,
            "USER": spec.username,
        }
        # The unit would make the home directory; the commands run before it, so make it here.
        # The path is one argument of an argument vector: no shell sees it.
        made = await client.exec(name, objects.make_home_command(spec))
        if made.exit_code != 0:
            log.warning("could not create %s in %s: %s", spec.home, name, made.output)
        for command in templates:
            where = f"commands_to_prepare: {command!r}"
            try:
                line = commands.expand_username(
                    command, spec.username, setting="commands_to_prepare"
                )
                result = await client.exec(
                    name,
                    ["/bin/sh", "-c", line],
                    environment=env,
                    user=spec.uid,
                    group=spec.gid,
                    cwd=spec.home if made.exit_code == 0 else "/",
                    timeout=timeout,
                )
            except ValueError as e:
                raise DaemonError(str(e)) from e
            except LxdError as e:
                raise DaemonError(f"{where} could not be run: {e.message}") from e
            if result.exit_code != 0:
                raise DaemonError(
                    f"{where} failed with exit code {result.exit_code}: "
                    f"{result.output[-2000:] or '(no output)'}"
                )

    async def start_unit(self, name: str) -> None:
        """Start the server's unit in a booted container (when it was not enabled)."""
        result = await (await self.client()).exec(name, objects.wait_for_systemd_and_start_unit())
        if result.exit_code != 0:
            raise DaemonError(f"could not start the server's unit: {result.output}")

    async def status(self, name: str) -> str:
        return (await (await self.client()).get_instance(name)).get("status", "")

    async def server_log_tail(self, name: str, lines: int = 20) -> str:
        """The end of the server's log, for a failed spawn's message."""
        # The user's process writes this log, as much as it likes: read only its end.
        try:
            client = await self.client()
            tail = await client.read_file_tail(name, objects.SERVER_LOG_PATH, max_bytes=16384)
            text = tail.decode(errors="replace")
        except LxdError:
            text = ""
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"last lines of the server's log:\n{tail}" if tail else "the server wrote no log"

    # -- stopping and removing -------------------------------------------------------------------

    async def remove(self, name: str, timeout: float) -> None:
        """Stop by force, and delete once LXD has torn the container down."""
        await remove_once_torn_down(await self.client(), self._cache, name, timeout, log.info)

    async def cleanup_failed_start(
        self,
        name: str,
        owner: ownership.Owner,
        *,
        delete: bool,
        timeout: float,
        objects: Sequence[str] = (),
    ) -> None:
        """After a failed spawn: delete the container (or, if kept, stop it); with it, the
        server's extra objects of the kinds ``objects`` (those not kept)."""
        client = await self.client()
        try:
            if delete:
                await self.remove(name, timeout)
            else:
                await client.stop_instance(name, force=True)
        except NotFound:
            pass
        except LxdError as e:
            log.warning("cleanup after failed spawn of %s: %s", name, e.message)
            if delete and self.clustered:
                self.orphan(name, owner, timeout, objects)
            return
        if delete:
            await self.delete_objects(owner, objects)

    def orphan(
        self,
        name: str,
        owner: ownership.Owner,
        timeout: float = 30.0,
        objects: Sequence[str] = (),
    ) -> None:
        """Delete ``name`` once its cluster member answers again, if it is ``owner``'s (and
        then its extra objects of the kinds ``objects``)."""

        async def delete(name: str) -> None:
            if await self._delete_if_owned(name, owner, timeout):
                await self.delete_objects(owner, objects)

        self.members.orphan(name, delete)

    async def _delete_if_owned(self, name: str, owner: ownership.Owner, timeout: float) -> bool:
        """Stop and delete ``name`` (once LXD has torn it down) if it is ``owner``'s; leave
        anything else alone; whether it is gone. LxdError when the daemon cannot tell (the
        caller tries again)."""
        client = await self.client()
        try:
            instance = await client.get_instance(name)
        except NotFound:
            return True
        if not owner.owns(instance.get("config")):
            log.warning(
                "not deleting %s: it is %s", name, ownership.describe(instance.get("config"))
            )
            return False
        await self.remove(name, timeout)
        log.info("deleted %s, left behind when its cluster member failed", name)
        return True

    def remove_when_torn_down(
        self,
        name: str,
        timeout: float,
        owner: ownership.Owner | None = None,
        objects: Sequence[str] = (),
    ) -> None:
        """Delete ``name`` in the background once LXD has torn it down; then ``owner``'s
        extra objects of the kinds ``objects`` (see extraobjects.py)."""
        assert self._client is not None and self._cache is not None
        self.removals.start(
            self._client,
            self._cache,
            name,
            teardown_timeout=timeout,
            log=log,
            objects=(owner, tuple(objects)) if owner is not None and objects else None,
        )

    async def wait_removed(self, name: str, say: Say = _quiet) -> None:
        """Wait until a deletion of ``name`` that an earlier stop left running has ended."""
        if self.removals.pending(name):
            say("Waiting for the previous container to be deleted", 3)
            await self.removals.wait(name)

    async def stop(
        self,
        name: str,
        owner: ownership.Owner,
        *,
        remove: bool,
        now: bool = False,
        timeout: float,
        attempts: int = 3,
        objects: Sequence[str] = (),
    ) -> None:
        """Stop ``owner``'s server in ``name``; with ``remove`` the container is deleted
        once torn down (in the background). Returns once the server has exited.

        When the daemon keeps failing, raise DaemonError after ``attempts`` (1 s, then 2 s
        apart), and keep stopping it in the background until it works (or a new start of
        the server takes over): no server the hub let go of keeps running.
        """
        error: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(attempt)
            try:
                await self._stop_once(
                    name, owner, remove=remove, now=now, timeout=timeout, objects=objects
                )
            except (LxdError, asyncio.TimeoutError) as e:
                error = e
                log.warning(
                    "%s: stopping %s failed: %s", owner.label, name, getattr(e, "message", e)
                )
                continue
            return
        self.stops.retry(
            name,
            lambda: self._stop_once(
                name, owner, remove=remove, now=False, timeout=timeout, objects=objects
            ),
            log,
        )
        raise DaemonError(
            f"could not stop {name} ({getattr(error, 'message', error)}): it stays recorded "
            "and is stopped as soon as the daemon answers"
        )

    async def _stop_once(
        self,
        name: str,
        owner: ownership.Owner,
        *,
        remove: bool,
        now: bool,
        timeout: float,
        objects: Sequence[str] = (),
    ) -> None:
        client = await self.client()
        cache = await self.cache()
        cached = cache.get(name) if cache.healthy else None
        if cached is None or not owner.owns_recorded(cached.config):
            try:
                instance = await client.get_instance(name)
            except NotFound:
                cache.note(name, deleted=True)
                if remove:
                    await self.delete_objects(owner, objects)
                return
            if _not_ours(owner, name, instance, "stopping"):
                return
            status = instance.get("status")
        else:
            status = cached.status
        stopped = False
        if remove and not now and status == "Running":
            cache.expect_teardown(name)
            stopped = await self._stop_unit(name, timeout)
        if not stopped:
            try:
                if await client.shut_down(name, timeout=timeout, force=now):
                    cache.note_torn_down(name)
            except NotFound:
                cache.note(name, deleted=True)
                return
        cache.note(name, status="Stopped")
        if remove:
            self.remove_when_torn_down(name, timeout + 10, owner, objects)

    async def _stop_unit(self, name: str, timeout: float) -> bool:
        """Stop the server's unit, and with it the container; False if that failed."""
        try:
            result = await (await self.client()).exec(
                name,
                ["systemctl", "stop", objects.UNIT_NAME],
                timeout=timeout + 10,
                record_output=False,
            )
        except LxdError as e:
            log.debug("stopping the server in %s through its unit: %s", name, e.message)
            return False
        return result.exit_code == 0

    async def poll(
        self,
        name: str,
        owner: ownership.Owner,
        *,
        remove: bool,
        may_remove: bool,
        member_grace: float,
        timeout: float,
        objects: Sequence[str] = (),
    ) -> int | None:
        """None while ``owner``'s server in ``name`` runs, else 0. Reads the cache: no
        request for a running server; one direct request only when the cache says it is not
        running. ``may_remove``: a container found stopped is deleted (with ``remove``),
        unless a spawn of it is pending."""
        try:
            cache = await self.cache()
            cached = cache.get(name) if cache.healthy else None
            if (
                cached is not None
                and cached.status in RUNNING_STATES
                and owner.owns_recorded(cached.config)
            ):
                down_for = cache.member_down_for(cached.location)
                if not down_for or down_for < member_grace:  # 0: its member is up
                    return None
                if await self._member_answers(cached.location):
                    # Back (the cache reads the members' status every few seconds only):
                    # a server started there since must not be dropped.
                    cache.note_member_up(cached.location)
                    return None
                # Its member stays offline: nobody can reach the server. Report it stopped,
                # so the user can start again elsewhere; the container goes once it is back,
                # unless it is kept (remove = False): then it waits there for its user.
                log.warning(
                    "%s: cluster member %s has been offline for %.0f s; reporting the server "
                    "stopped%s",
                    owner.label,
                    cached.location,
                    down_for,
                    "" if remove else f" (its container {name} is kept)",
                )
                if remove:
                    self.orphan(name, owner, timeout, objects)
                return 0
            instance = await (await self.client()).get_instance(name)
        except NotFound:
            if may_remove and objects:  # its container went while the hub was away
                await self.delete_objects(owner, objects)
            return 0
        except (LxdError, asyncio.TimeoutError) as e:
            # We cannot tell: report running rather than have the hub drop a live server.
            log.warning("poll of %s: %s", owner.label, getattr(e, "message", e))
            return None
        cache.note_instance(instance)
        if _not_ours(owner, name, instance, "reporting the server running from"):
            return 0
        if instance.get("status") in RUNNING_STATES:
            return None
        # The server ended by itself (its container powered off). JupyterHub will not call
        # stop() for a server that is not running, so the container is removed here.
        if remove and may_remove:
            self.remove_when_torn_down(name, timeout, owner, objects)
        return 0

    async def _member_answers(self, member: str) -> bool:
        """Whether ``member`` is back: the daemon reports it Online (one request)."""
        try:
            members = await (await self.client()).cluster_members()
        except LxdError:
            return False
        return any(
            m.get("server_name") == member and m.get("status") == placement.ONLINE for m in members
        )

    async def delete_forever(
        self, name: str, owner: ownership.Owner, timeout: float, objects: Sequence[str] = ()
    ) -> bool:
        """Delete ``owner``'s container ``name``, kept or not (an admin deleted the server),
        and its extra objects that are not kept. False if it is not ``owner``'s (left alone)
        or already gone."""
        client = await self.client()
        try:
            instance = await client.get_instance(name)
        except NotFound:
            await self.delete_objects(owner, objects)
            return False
        if _not_ours(owner, name, instance, "deleting"):
            return False
        await self.cache()
        await self.remove(name, timeout)
        await self.delete_objects(owner, objects)
        return True

    # -- a server's extra objects (see extraobjects.py) ----------------------------------------

    async def make_objects(
        self, wanted: Sequence[patches.ExtraObject], owner: ownership.Owner, member: str | None
    ) -> list[str]:
        """Make the server's extra objects that are missing (reusing its own)."""
        client = await self.client()
        try:
            return await extraobjects.ensure(
                client, wanted, owner, member if self.clustered else None
            )
        except extraobjects.ObjectError as e:
            raise DaemonError(e.message, reason="object") from e

    async def delete_objects(self, owner: ownership.Owner, kinds: Sequence[str]) -> list[str]:
        """Delete ``owner``'s extra objects of ``kinds`` not marked keep, found by their keys."""
        if not kinds:
            return []
        return await extraobjects.delete_owned(await self.client(), owner, kinds)

    # -- users' volumes (see volumes.py) --------------------------------------------------------

    async def find_volumes(
        self, plans: list[volumes.Plan], profiles: tuple[str, ...]
    ) -> volumes.Prepared:
        """A server's volumes in their pools, the existing ones looked up and checked, and
        the member the user's data pins the server to (on a pool local to each member)."""
        if not plans:
            return volumes.Prepared(plans=[])
        client = await self.client()
        try:
            if profiles not in self._root_pools:
                read = [await client.profile(p) for p in profiles]
                self._root_pools[profiles] = sharing.root_pool(read)
            keeper = volumes.Volumes(client, self._pool_drivers)
            plans = await keeper.resolve_pools(plans, self._root_pools[profiles])
            prepared = await keeper.prepare(plans, shifted=sharing.shifted(client))
        except volumes.VolumeError as e:
            raise DaemonError(e.message, reason="volume", status=e.status) from e
        if prepared.member and prepared.unreadable:
            # Its member does not answer for it, whatever the cluster says of it yet (it calls
            # a member offline only after missed heartbeats): placement, pinned there, fails
            # at once naming the member and the volume.
            log.warning(
                "%s on %s cannot be read: %s",
                prepared.pinned_by,
                prepared.member,
                prepared.unreadable,
            )
            self.members.suspect(prepared.member, f"reading {prepared.pinned_by} on it failed")
        return prepared

    async def make_volumes(
        self, prepared: volumes.Prepared, member: str | None, say: Say = _quiet
    ) -> None:
        """Create the missing ones on ``member`` (a failed start undoes it: discard_volumes)."""
        if not prepared.plans:
            return
        client = await self.client()
        member = member if self.clustered else None
        try:
            await volumes.Volumes(client).create(prepared, member, say)
        except volumes.VolumeError as e:
            raise DaemonError(e.message, reason="volume", status=e.status) from e

    async def discard_volumes(self, prepared: volumes.Prepared, member: str | None) -> None:
        if prepared.created:
            names_ = [p.name for p in prepared.created]
            log.info("deleting the volumes this failed spawn created, unused: %s", names_)
            client = await self.client()
            await volumes.Volumes(client).discard(prepared, member if self.clustered else None)

    async def delete_volumes(self, owner: ownership.Owner, *, delete: bool) -> list[str]:
        """``owner``'s volumes (a default server's: the user's too): deleted when ``delete``,
        else only listed. Only those whose keys match: a name is not enough."""
        keeper = volumes.Volumes(await self.client())
        found = await keeper.owned_by(owner.hub, owner.user, owner.server)
        if not delete:
            return [v["name"] for v in found]
        return await keeper.delete(found)


def _not_ours(owner: ownership.Owner, name: str, instance: dict, doing: str) -> bool:
    """Whether ``instance`` is not ``owner``'s (a 0.1 one the state names counts as its
    own); the log says so, and what is not done."""
    config = instance.get("config")
    if owner.owns_recorded(config):
        return False
    log.warning("%s: not %s %s: it is %s", owner.label, doing, name, ownership.describe(config))
    return True


async def _get(client: LxdClient, name: str) -> dict | None:
    try:
        return await client.get_instance(name)
    except NotFound:
        return None


__all__ = ["RUNNING_STATES", "Daemon", "DaemonError", "MemberFailed", "Reservation", "Source"]
