"""LxdSpawner: each user's notebook server in its own Incus or LXD system container.

Orchestration only: the daemon a server lives on is a :class:`~lxdspawner.daemon.Daemon`
(one per :class:`~lxdspawner.lxd.Remote`, recorded in the server's state), which owns what the
hub keeps per daemon and does the work there; names come from :mod:`names`, request bodies
and in-container files from :mod:`objects`, the isolation from :mod:`hardening`. The server
runs as a systemd unit of the container, so it survives hub restarts; when it exits the
container powers off, so the container's state in LXD is the server's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from jupyterhub.spawner import Spawner
from traitlets import (
    Any as AnyTrait,
)
from traitlets import (
    Bool,
    Dict,
    Float,
    Int,
    List,
    TraitError,
    Unicode,
    default,
    observe,
    validate,
)

from . import (
    accounts,
    commands,
    hardening,
    hostfiles,
    metrics,
    names,
    network,
    objects,
    ownership,
    readiness,
    servercerts,
)
from . import volumes as user_volumes
from .daemon import Daemon, DaemonError, Source
from .failures import SpawnError, attach_logs, spawn_error
from .guarantees import CapacitySettings
from .lxd import FileHelperFailed, LxdError, Remote, Unreachable
from .overrides import OverrideSettings
from .pool import ClaimFailed, PoolSettings
from .profiles import ProfileSettings
from .progress import Progress
from .remotes import RemoteSettings
from .removalsettings import RemovalSettings
from .storage import StorageSettings

#: 2: the whole remote is recorded (1: its endpoint and project only).
STATE_VERSION = 2


@contextlib.contextmanager
def _as_trait_error():
    """Our pure checks raise ValueError; traitlets reports TraitError with the setting's name."""
    try:
        yield
    except ValueError as e:
        raise TraitError(str(e)) from e


class LxdSpawner(
    ProfileSettings,
    Spawner,
    StorageSettings,
    RemoteSettings,
    CapacitySettings,
    OverrideSettings,
    PoolSettings,
    RemovalSettings,
):
    """Spawn single-user servers in Incus or LXD containers, through the REST API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        attach_logs(self.log)
        self._warm_ahead()

    # -- where: the daemon --------------------------------------------------------------------

    endpoint = Unicode(
        "",
        config=True,
        help="""The Incus/LXD daemon to use (the default remote; see also `remotes`).

        Empty (the default): the local unix socket, found automatically (INCUS_DIR, LXD_DIR,
        /var/lib/incus, /run/incus, /var/lib/lxd, the snap's path). Otherwise
        `unix:///path/to/unix.socket`, or `https://host:8443` for a remote server or cluster
        (then set `client_cert`, `client_key` and `server_cert`), or the name of a remote of
        the `incus`/`lxc` command line (`"campus"`: its address and certificates are read
        from the tool's configuration, see README "Remotes").
        """,
    )
    client_cert = Unicode("", config=True, help="Client certificate (PEM) for an https endpoint.")
    client_key = Unicode("", config=True, help="Client key (PEM) for an https endpoint.")
    server_cert = Unicode(
        "",
        config=True,
        help="The server's certificate (PEM), pinned: only that certificate is trusted.",
    )
    project = Unicode("", config=True, help="LXD project for the instances (default: default).")
    api_timeout = Float(30.0, config=True, help="Seconds to wait for one API request.")
    hub_id = Unicode(
        config=True,
        help="""This hub's name on the daemon, written on every instance it creates
        (`user.jupyterhub.hub`): the hub touches no instance that carries another. Default:
        derived from the hub's database (its URL, and this host's name for an SQLite file),
        so it stays the same across restarts and differs between two hubs on one daemon.
        Set it when the hub moves to another host or database, keeping the old value:
        `c.LxdSpawner.hub_id = "physics-hub"`.
        """,
    )

    @default("hub_id")
    def _default_hub_id(self) -> str:
        from jupyterhub.app import JupyterHub

        app = JupyterHub.instance() if JupyterHub.initialized() else None
        return ownership.default_hub_id(app.db_url if app is not None else None)

    # -- the container ------------------------------------------------------------------------

    image = Unicode(
        "jupyter-base",
        config=True,
        help="""Image alias or fingerprint the containers are created from.

        The image needs systemd and `jupyterhub-singleuser` (the package's images/ has a recipe).
        Example: `c.LxdSpawner.image = "jupyter-base"`.
        """,
    )
    profiles = List(
        Unicode(),
        ["default"],
        config=True,
        help="LXD profiles applied to each container, in order (default: ['default']).",
    )
    name_prefix = Unicode(
        names.DEFAULT_PREFIX,
        config=True,
        help="Prefix of container names: `jupyter` gives `jupyter-alice`.",
    )
    files_to_push = List(
        config=True,
        help="""Files copied from the hub host into the container before the server starts,
        keeping their mode: `[[host_path, container_path], ...]`.

        Example: `[['/etc/passwd', '/etc/passwd'], ['/etc/group', '/etc/group']]`.
        """,
    )
    filesystems_to_mount = List(
        config=True,
        help="""Host directories mounted into the container: `[[name, host_dir, path], ...]`.

        `{USERNAME}` (or `{username}`) in the paths is replaced by the username. The host
        directory must exist. Example: `[['home', '/srv/home/{USERNAME}', '/home/jupyter']]`.
        """,
    )
    commands_to_prepare = List(
        Unicode(),
        config=True,
        help="""Shell commands run in the container, as the user's uid/gid, after it starts and
        before the server. `{USERNAME}` follows the rules of `post_hub_commands` (also in
        $JUPYTERHUB_USER). A failing command fails the spawn, showing its exit code and output.
        """,
    )
    remove = Bool(
        True,
        config=True,
        help="""Delete the container when the server stops (default). With False the stopped
        container is kept and started again next time: faster, and keeps what the user
        installed; its name stays the same.
        """,
    )
    stop_timeout = Float(
        20.0, config=True, help="Seconds for a graceful stop before the container is killed."
    )
    extra_instance_config = Dict(
        config=True,
        help="Extra LXD config keys for every container, e.g. {'boot.autostart': 'false'}.",
    )
    extra_devices = Dict(
        config=True, help="Extra LXD devices for every container: {name: {type: ..., ...}}."
    )

    # -- isolation and limits (see SECURITY.md) -----------------------------------------------

    privileged_containers = Bool(
        False, config=True, help="Run the containers privileged (security.privileged)."
    )
    privileged_container = Bool(
        False, config=True, help="Alias of `privileged_containers`, as in the original spawner."
    )
    process_limit = Int(
        2000,
        config=True,
        help="""Most processes and threads a container may hold (`limits.processes`), so a
        fork bomb stops there and spares the host and the other users. Default 2000 (a
        JupyterLab with a few kernels uses about 100); 0: no limit.""",
    )
    disk_limit = Unicode(
        "10GiB",
        config=True,
        help="""Size of each container's root disk (the `size` of the profiles' root disk
        device): writes past it fail for that user only. Default "10GiB"; "" for no limit
        (the pool's). Needs a pool driver with quotas (btrfs, zfs, lvm).""",
    )
    isolated_idmap = Bool(
        None,
        allow_none=True,
        config=True,
        help="""Give each unprivileged container its own range of host uids/gids
        (`security.idmap.isolated`): per-uid kernel limits are not shared between users,
        and a process breaking out of one container owns no other's files. None (default):
        on for Incus; off for LXD 5.0, where every container of its own range would be
        remapped at its first start (about 3 s, which clone_shifted_base saves) and could
        not mount the shared read-only directories.""",
    )
    network_isolation = Unicode(
        "internet",
        config=True,
        help="""What a container may reach, and be reached by (see SECURITY.md).

        "internet" (default) or "hub-only": a container reaches the hub's API, its bridge's
        DHCP and DNS and ("internet") public addresses, nothing else: no other container, no
        other port of the host, no private range, not 169.254.169.254; it is reached only
        by the proxy, on the server port. A network ACL does this: on the whole bridge when
        the bridge is dedicated to lxdspawner (`user.jupyterhub.managed-by=lxdspawner` in
        its config; both daemons), else on the NIC (Incus; the kernel needs
        nf_conntrack_bridge and nft_reject_bridge). LXD on a bridge not dedicated gets no
        ACL: the hub log says what that leaves open.
        "ports": only port isolation (containers cannot reach each other) and MAC/IPv4
        filtering (nobody takes another's address), which all the modes above add.
        "open": the profile's NIC as it is.
        Except with "open", the NIC must be on a managed bridge, else the spawn fails
        saying so.""",
    )
    guest_api = Bool(
        False,
        config=True,
        help="""Keep the guest API socket (/dev/incus, /dev/lxd) in the containers. Default
        False: a user has no use for it (security.guestapi / security.devlxd = false).""",
    )

    # -- the server inside it -----------------------------------------------------------------

    get_uid_gid = AnyTrait(
        accounts.default_get_uid_gid,
        config=True,
        help="""Callable (may be async) taking the spawner and returning (uid, gid) for the
        server's process. The default looks the user up in the hub host's passwd database and
        falls back to (`default_uid`, `default_gid`) for users that are not system users.
        """,
    )
    default_uid = Int(1000, config=True, help="uid for users unknown to the hub host.")
    default_gid = Int(1000, config=True, help="gid for users unknown to the hub host.")
    min_uid = Int(
        1000,
        config=True,
        help="""The lowest uid a server may run as (default 1000: no root, no system account).

        The default `get_uid_gid` takes hub-host accounts below it (root, daemon, www-data)
        for users the host does not know; a uid below it from your own `get_uid_gid` fails
        the spawn naming this setting. Lower it only if your own `get_uid_gid` means it;
        0 allows root. Example: `c.LxdSpawner.min_uid = 500`.
        """,
    )
    min_gid = Int(
        100,
        config=True,
        help="""The lowest gid a server may run with (default 100, Debian's `users`: not root's
        group, nor sudo, adm, disk or shadow). Like `min_uid`; 0 allows group root.""",
    )
    home_dir = Unicode(
        "/home/{username}",
        config=True,
        help="""Home directory of the server's process (created if missing). `{username}` is the
        raw username. The server's root directory is `notebook_dir` if set, else this.
        """,
    )
    server_port = Int(8888, config=True, help="Port of the server inside the container.")
    post_hub_commands = List(
        Unicode(),
        config=True,
        help="""Shell commands run on the hub host once the server has started, with a minimal
        environment (PATH, LANG, HOME, $JUPYTERHUB_USER, $JUPYTERHUB_SERVER_NAME: none of the
        hub's secrets), at most `post_hub_command_timeout` seconds each; their output goes to
        the hub's log. `{USERNAME}` stands for the username as one literal piece of the word
        it is in: unquoted or inside '...' or "..." (not in backquotes, $(...), ${...}, a
        here-document or a comment: such a command is refused). "$JUPYTERHUB_USER" works
        anywhere. Example: `["logger 'server started for {USERNAME}'"]`.
        """,
    )
    post_hub_command_timeout = Float(
        60.0,
        config=True,
        help="Seconds a post_hub_commands command may run before it is killed (default 60).",
    )

    # -- on a cluster -------------------------------------------------------------------------

    target = Unicode(
        "",
        config=True,
        help="""On a cluster: where servers may go. A member name (`"node2"`) or a cluster
        group (`"@gpu"`). Empty: any Online member. Ignored on a standalone daemon.
        """,
    )
    host_weights = Dict(
        config=True,
        help="""On a cluster, relative weight of each member for placement:
        `{"node1": 2, "node2": 1}`; 0 means never. Ignored on a standalone daemon.
        """,
    )
    placement_policy = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""On a cluster: the function choosing the member for a new server, replacing the
        default `lxdspawner.placement.weighted_least_loaded` (highest weight / (instances +
        spawns in flight + 1), Online members only). Signature:
        `policy(members: Sequence[Member], request: PlacementRequest) -> str` (a member name);
        raise `lxdspawner.placement.NoMemberAvailable` to refuse. It runs in the hub's event
        loop: it must be fast and must not block. Ignored on a standalone daemon.
        """,
    )
    member_offline_grace = Float(
        60.0,
        config=True,
        help="""On a cluster: seconds a member must stay reported offline before the servers
        on it are reported stopped (so their users can start again elsewhere; the stranded
        containers are deleted once the member is back). A busy member can miss heartbeats
        for a few seconds: this keeps such a blip from stopping anybody's server.""",
    )

    # -- speed-ups ----------------------------------------------------------------------------

    shared_directories = List(
        Unicode(),
        ["/usr", "/opt/jupyterhub"],
        config=True,
        help="""Directories of the image mounted read-only into every container from one
        copy per image and host (a custom volume each, `lxdspawner-shared-<fingerprint>-<hash>`),
        so the servers share their page cache as plain processes share their virtualenv's.
        Without it every container reads its own copy of Python, its libraries and JupyterLab
        into memory (about 110 MiB each); with it, only the first server of an image does.
        Each copy is made in the background on first use of an image (or by `lxdspawner
        prepull`); servers started before it is ready go without. Nothing can be written
        there from inside the containers (files_to_push may not point there): empty this
        list for images whose servers install into them. Not used for privileged
        containers.""",
    )
    clone_shifted_base = Bool(
        None,
        allow_none=True,
        config=True,
        help="""Create servers as copies of a stopped base container that was started once.

        LXD 5.0 shifts the uid/gid of a new unprivileged container's whole file system at its
        first start (about 3 s); a copy of an already-shifted container starts at once. The
        base (`<name_prefix>-base-<image fingerprint>`, one per image) is made on first use
        and replaced when the image changes. None (default): on for LXD with unprivileged
        containers on a standalone daemon; off for Incus, which uses idmapped mounts.
        """,
    )
    cache_resync_interval = Float(
        300.0,
        config=True,
        help="""Seconds between full relists of our instances by the shared cache, which
        otherwise follows the daemon's events (poll() reads it: no API request per user).""",
    )

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        return ["jupyterhub-singleuser"]

    @observe("privileged_container")
    def _alias_privileged(self, change: dict) -> None:
        self.privileged_containers = change["new"]

    @validate("files_to_push")
    def _check_files_to_push(self, proposal: dict) -> list:
        with _as_trait_error():
            return [list(r) for r in objects.as_pairs(proposal["value"], "files_to_push", 2)]

    @validate("filesystems_to_mount")
    def _check_filesystems(self, proposal: dict) -> list:
        with _as_trait_error():
            return [list(r) for r in objects.as_pairs(proposal["value"], "filesystems_to_mount", 3)]

    @validate("host_weights")
    def _check_weights(self, proposal: dict) -> dict:
        for member, weight in proposal["value"].items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise TraitError(f"host_weights[{member!r}] = {weight!r}: must be a number >= 0")
        return proposal["value"]

    @validate("commands_to_prepare", "post_hub_commands")
    def _check_commands(self, proposal: dict) -> list:
        with _as_trait_error():
            for command in proposal["value"]:
                commands.check_template(command, setting=proposal["trait"].name)
        return proposal["value"]

    @validate("network_isolation")
    def _check_network_isolation(self, proposal: dict) -> str:
        allowed = ("ports", *network.EGRESS_SETTINGS)
        if proposal["value"] not in allowed:
            raise TraitError(
                f"network_isolation = {proposal['value']!r}: must be one of "
                + ", ".join(repr(a) for a in allowed)
            )
        return proposal["value"]

    @validate("get_uid_gid")
    def _check_get_uid_gid(self, proposal: dict) -> Callable:
        if not callable(proposal["value"]):
            raise TraitError(f"get_uid_gid = {proposal['value']!r}: must be a callable")
        return proposal["value"]

    @validate("placement_policy")
    def _check_policy(self, proposal: dict) -> Callable | None:
        if proposal["value"] is not None and not callable(proposal["value"]):
            raise TraitError(f"placement_policy = {proposal['value']!r}: must be a callable")
        return proposal["value"]

    @validate("name_prefix")
    def _check_prefix(self, proposal: dict) -> str:
        with _as_trait_error():
            return names.validate_prefix(proposal["value"])

    # -- state ------------------------------------------------------------------------------

    instance_name = Unicode("")
    member = Unicode("")
    #: The daemon the recorded container lives on, from the state (None: the configured one).
    recorded_remote: Remote | None = None
    #: The name of that remote when the server started ("": the default), for display.
    recorded_remote_name: str = ""

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if state.get("lxd_state_version"):
            self.instance_name = state.get("instance", "")
            self.member = state.get("member", "")
            self.object_kinds = list(state.get("objects") or [])
            recorded = Remote.from_state(state)
            if not any(state.get(k) for k in ("client_cert", "client_key", "server_cert")):
                # Version 1 recorded the endpoint and project only: the certificates are
                # the configured ones (the server's own only for the same endpoint).
                same = recorded.endpoint == self.endpoint
                recorded = dataclasses.replace(
                    recorded,
                    client_cert=self.client_cert,
                    client_key=self.client_key,
                    server_cert=self.server_cert if same else "",
                )
            self.recorded_remote = recorded
            self.recorded_remote_name = str(state.get("remote_name") or "")

    def get_state(self) -> dict:
        state = super().get_state()
        if self.instance_name:
            state.update(
                lxd_state_version=STATE_VERSION,
                instance=self.instance_name,
                member=self.member,
                **({"objects": self.object_kinds} if self.object_kinds else {}),
                **(self.recorded_remote or self.configured_remote).to_state(),
            )
            name = self.recorded_remote_name if self.recorded_remote else self.remote
            if name:
                state["remote_name"] = name
        return state

    def clear_state(self) -> None:
        """The container's name (and its daemon) stay recorded: a kept container (remove =
        False) is found again, and a removed one's name is used again. JupyterHub also calls
        this at the start of every spawn, before any per-user setting (a pre_spawn_hook, a
        profile) has set `remove`: so nothing here may depend on it. The previous profile's
        overrides are undone here, before group_overrides and the pre_spawn_hook run."""
        super().clear_state()
        self.restore_profile_overrides()

    # -- the daemon ---------------------------------------------------------------------------

    def daemon(self, remote: Remote | None = None) -> Daemon:
        """The hub's Daemon for ``remote``: by default the one holding this server's
        container (recorded in its state), else the configured one."""
        daemon = Daemon.of(
            remote or self.recorded_remote or self.configured_remote,
            timeout=self.api_timeout,
            resync_interval=self.cache_resync_interval,
        )
        self.schedule_removals(daemon.removals)
        return daemon

    def _daemon_to_start_on(self) -> Daemon:
        """The configured daemon (`remote`); a kept container (remove = False) stays where it
        is. An unknown remote fails the spawn (400), naming the known ones."""
        configured = self.remote_to_start_on()
        recorded = self.recorded_remote
        if recorded and recorded != configured and self.instance_name and not self.remove:
            self.log.info(
                "%s: its kept container %s is on %s, not the configured %s: starting it there",
                self._log_name,
                self.instance_name,
                recorded,
                configured,
            )
            return self.daemon(recorded)
        self.recorded_remote_name = self.remote
        return self.daemon(configured)

    # -- progress ---------------------------------------------------------------------------

    _progress: Progress | None = None

    def _emit(self, message: str, progress: int | None = None) -> None:
        self.log.info("%s: %s", self._log_name, message)
        if self._progress is not None:
            self._progress.emit(message, progress)

    async def progress(self):
        if self._progress is not None:
            async for event in self._progress.stream():
                yield event

    # -- what the server is -------------------------------------------------------------------

    @property
    def _log_name(self) -> str:
        return self.owner.label

    @property
    def owner(self) -> ownership.Owner:
        """The keys that mark this server's instance as its own."""
        return ownership.Owner(self.hub_id, self.user.name, self.name or "")

    async def _resolve_uid_gid(self) -> tuple[int, int]:
        try:
            return await accounts.resolve(self)
        except ValueError as e:
            raise SpawnError(str(e)) from e

    def _spec(
        self, uid: int, gid: int, home: str, mounts: tuple[objects.Mount, ...]
    ) -> objects.ServerSpec:
        return objects.ServerSpec(
            instance=self.instance_name,
            username=self.user.name,
            server_name=self.name or "",
            hub=self.hub_id,
            uid=uid,
            gid=gid,
            home=home,
            cmd=tuple(self.cmd) + tuple(self.get_args()),
            port=self.server_port,
            profiles=tuple(self.profiles),
            mounts=mounts,
            mem_limit=self.mem_limit,
            cpu_limit=self.cpu_limit,
            process_limit=self.process_limit or None,
            privileged=self.privileged_containers,
            extra_config=dict(self.extra_instance_config),
            extra_devices=dict(self.extra_devices),
        )

    def _hardening(self, daemon: Daemon) -> hardening.Settings:
        parts = urlsplit(self.hub_connect_url or self.hub.api_url)
        return hardening.Settings(
            hub_id=self.hub_id,
            profiles=tuple(self.profiles),
            disk_limit=self.disk_limit,
            network_isolation=self.network_isolation,
            isolated_idmap=self._idmap_isolated(daemon),
            guest_api=self.guest_api,
            hub_url=self.hub_connect_url or self.hub.api_url,
            hub_port=parts.port or self.hub.port,
            server_port=self.server_port,
        )

    def _idmap_isolated(self, daemon: Daemon) -> bool:
        if self.privileged_containers:
            return False
        if self.isolated_idmap is not None:
            return self.isolated_idmap
        return daemon.product == "incus"

    def _source(self, member: str | None) -> Source:
        return Source(
            image=self.image,
            member=member,
            shared_directories=() if self.privileged_containers else tuple(self.shared_directories),
            clone_shifted_base=self.clone_shifted_base,
            base_prefix=self.name_prefix,
            profiles=tuple(self.profiles),
            timeout=self.start_timeout,
            teardown_timeout=self.stop_timeout + 10,
        )

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._progress = Progress()
        started = time.monotonic()
        self.timings: dict[str, float] = {}
        try:
            self._selection = await self.apply_profile()  # the user's choice, before anything
            with contextlib.ExitStack() as self._while_spawning:
                return await self._start()
        except (SpawnError, DaemonError, LxdError) as e:
            error = spawn_error(e)
            self.log.error("Spawn of %s failed: %s", self._log_name, error.message)
            if error is e:
                raise
            raise error from e
        finally:
            self.timings["total"] = time.monotonic() - started
            metrics.observe_spawn(self.timings)
            self._progress.finish()

    async def _step(self, name: str, coro):
        t0 = time.monotonic()
        try:
            return await coro
        finally:
            self.timings[name] = time.monotonic() - t0

    #: How many of a server's names (the usual one, then numbered alternatives) are tried.
    NAME_ATTEMPTS = 8

    async def _start(self) -> tuple[str, int]:
        self.port = self.server_port
        self.ip = "0.0.0.0"  # noqa: S104 - inside the container; only the bridge reaches it
        uid, gid = await self._resolve_uid_gid()
        try:
            shared = () if self.privileged_containers else tuple(self.shared_directories)
            files = await hostfiles.files_to_push(self.files_to_push, shared)
            mounts = hostfiles.mounts(self.filesystems_to_mount, self.user.name)
            home = names.home_path(self.home_dir, self.user.name)
            plans = user_volumes.plans(
                self._volume_settings(),
                username=self.user.name,
                server_name=self.name or "",
                home=home,
                prefix=self.name_prefix,
                host_mounts=[m.path for m in mounts],
            )
            need = self._need()
        except ValueError as e:
            raise SpawnError(str(e), status_code=400) from e
        daemon = self._daemon_to_start_on()
        # The daemon's deletions of stopped servers wait for this spawn (see removals.py).
        self._while_spawning.enter_context(daemon.removals.spawning())
        try:
            client, cache = await daemon.ready()
        except Unreachable as e:
            if not self.recorded_remote_name:
                raise
            raise SpawnError(
                f"remote {self.recorded_remote_name!r}: the container daemon is not reachable: "
                f"{e.message}",
                status_code=503,
            ) from e
        # A claimed pool member's name is not this server's: never made again (warmpool.py).
        recorded = self.instance_name and not names.is_pool_member_name(self.instance_name)
        candidates = [self.instance_name] if recorded else []
        candidates += [
            names.instance_name(self.user.name, self.name or "", self.name_prefix, attempt)
            for attempt in range(self.NAME_ATTEMPTS)
        ]
        name, existing = await daemon.claim(
            candidates,
            self.owner,
            recorded=self.instance_name,
            keep=not self.remove,
            teardown_timeout=self.stop_timeout + 10,
            say=self._emit,
        )
        self.instance_name = name
        self.recorded_remote = daemon.remote
        spec = await hardening.harden(
            daemon, self._hardening(daemon), self._spec(uid, gid, home, mounts)
        )
        data = await daemon.find_volumes(plans, tuple(self.profiles))
        spec = dataclasses.replace(
            spec,
            volume_devices=data.devices(),
            home_on_volume=any(p.kind == user_volumes.HOME for p in plans),
        )

        reservation = None
        if existing and self.remove:
            self._emit("Removing a leftover container of an earlier server", 8)
            await daemon.remove(name, self.stop_timeout + 10)
            existing = None
        elif existing:
            # Its guarantees and GPUs are held afresh, on the member it is on.
            reservation = await self._reserve(daemon, name, data, need, kept=existing)
            spec = self._with_capacity(spec, need, reservation)
            try:
                await daemon.make_volumes(data, existing.get("location") or None, self._emit)
                spec = await self._render_overrides(daemon, spec, existing.get("location") or "")
                await daemon.make_reusable(
                    spec,
                    existing,
                    self._source(None),
                    stop_timeout=self.stop_timeout,
                    say=self._emit,
                )
            except BaseException:
                daemon.landed(reservation)
                raise

        if existing is None and (warm := await self._take_warm(daemon, spec, need)):
            try:
                return self._started(warm, await self._start_warm(daemon, warm, spec, data, files))
            except ClaimFailed:
                self.instance_name = name

        created = started = False
        member = None
        try:
            if existing is None:
                reservation = await self._reserve(daemon, name, data, need)
                member = reservation.member
                spec = self._with_capacity(spec, need, reservation)
                where = f" on {member}" if member else ""
                self._emit(f"Placing server {name}{where}", 5)
                await daemon.make_volumes(data, member, self._emit)
                spec = await self._render_overrides(daemon, spec, member or "")
                self._emit(f"Creating container {name} from image {self.image}{where}", 10)
                await self._step("create", daemon.create(spec, self._source(member), self._emit))
                created = True
            instance = await client.get_instance(name)
            self.member = instance.get("location") or ""
            env = await self._server_env(daemon, instance)
            self._emit("Pushing configuration and files", 30)
            enable = not self._starts_after_boot
            try:
                await self._step(
                    "push", daemon.push_server_files(spec, env, files, enable_unit=enable)
                )
            except FileHelperFailed as e:
                if not created:
                    raise
                # Incus 6.0.4's file helper of this one instance is stuck: a new instance
                # gets a new helper. Once: a second failure is the daemon's, and reported.
                self.log.warning("%s: %s; creating %s again", self._log_name, e.message, name)
                self._emit("The daemon's file helper failed; creating the container again", 32)
                await daemon.remove(name, self.stop_timeout + 10)
                await self._step("create", daemon.create(spec, self._source(member), self._emit))
                await self._step(
                    "push", daemon.push_server_files(spec, env, files, enable_unit=enable)
                )
            self._emit("Starting container", 40)
            try:
                await self._step("start", client.start_instance(name, timeout=self.start_timeout))
            except LxdError as e:
                failure = network.start_failure(e.message, product=daemon.product)
                if failure is None:
                    raise
                raise SpawnError(str(failure)) from e
            started = True
            cache.note_instance({**instance, "status": "Running"})
            self._emit("Waiting for the container's network address", 50)
            ip = await self._step("ipv4", daemon.wait_ipv4(name, self.start_timeout))
            if self.commands_to_prepare:
                self._emit("Running preparation commands", 60)
                await self._step(
                    "prepare",
                    daemon.run_as_user(spec, self.commands_to_prepare, timeout=self.start_timeout),
                )
            if self.internal_ssl:
                self._emit("Installing the server's TLS certificate", 70)
                await self._step("certs", servercerts.install(self, client, name, spec.gid, ip))
            if self._starts_after_boot:
                await daemon.start_unit(name)
            self._emit(f"Waiting for the server at {ip}:{self.port}", 80)
            await self._step("server", self._wait_http(daemon, name, ip))
        except BaseException as e:
            await daemon.cleanup_failed_start(
                name,
                self.owner,
                delete=self.remove or created,
                timeout=self.stop_timeout + 10,
                objects=self._object_kinds(),
            )
            if not started:  # nothing can have been written to a volume made just now
                await daemon.discard_volumes(data, member)
            failed = daemon.member_failed(member, name, e) if member else None
            if failed is not None:
                raise failed from e
            raise
        finally:
            daemon.landed(reservation)
        return self._started(name, ip)

    def _started(self, name: str, ip: str) -> tuple[str, int]:
        """The server answers: the post_hub_commands, the log line, start()'s answer."""
        if self.post_hub_commands:
            asyncio.ensure_future(
                commands.run_post_hub_commands(
                    self.post_hub_commands,
                    self.user.name,
                    self.name or "",
                    timeout=self.post_hub_command_timeout,
                    log=self.log,
                    label=self._log_name,
                )
            )
        self.log.info(
            "%s: container %s running at %s:%s (timings %s)",
            self._log_name,
            name,
            ip,
            self.port,
            {k: round(v, 3) for k, v in self.timings.items()},
        )
        return ip, self.port

    async def _server_env(self, daemon: Daemon, instance: dict) -> dict[str, str]:
        """JupyterHub's environment for the server, with the hub's API where the container
        reaches it (see hardening.hub_api_url)."""
        env = self.get_env()
        api_url = None
        if not self.hub_connect_url:
            parts = urlsplit(self.hub.api_url)
            api_url = await hardening.hub_api_url(
                daemon, self.hub.api_url, parts.port or self.hub.port, self.hub.ip or "", instance
            )
        if api_url:
            env["JUPYTERHUB_API_URL"] = api_url
            env["JUPYTERHUB_ACTIVITY_URL"] = api_url.rstrip("/") + (
                f"/users/{self.user.escaped_name}/activity"
            )
        env.setdefault("JUPYTERHUB_USER", self.user.name)
        return env

    @property
    def _starts_after_boot(self) -> bool:
        """Whether the server's unit is started by us once the container has booted (after
        commands_to_prepare, or once its certificate names its address), not by systemd."""
        return bool(self.commands_to_prepare or self.internal_ssl)

    async def _wait_http(self, daemon: Daemon, name: str, ip: str) -> None:
        base_url = self.server.base_url if self.server else "/"
        scheme = "https" if self.internal_ssl else "http"
        url = f"{scheme}://{ip}:{self.port}{base_url}api"
        tls = readiness.hub_client_ssl() if self.internal_ssl else True
        await readiness.wait_http(daemon, name, url, tls=tls, timeout=self.http_timeout)

    # -- internal_ssl: the hub's CA, a certificate for the container's own address --------------

    #: Where the server's certificate, key and the hub's CA bundle are in the container.
    SSL_DIR = f"{objects.CONFIG_DIR}/ssl"

    async def move_certs(self, paths: dict) -> dict:
        """The container's paths of the server's key, certificate and CA bundle.

        JupyterHub made them before start() for names it knows; the hub checks the server's
        certificate against the address start() returns, which DHCP gives only after the
        container boots: so the files are made again with that address and pushed then (see
        servercerts.install). The paths go into the server's environment.
        """
        return {
            "keyfile": f"{self.SSL_DIR}/server.key",
            "certfile": f"{self.SSL_DIR}/server.crt",
            "cafile": f"{self.SSL_DIR}/ca.crt",
        }

    # -- poll, stop, delete ---------------------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the server runs. Reads the shared cache: no request for a running
        server; one direct request only when the cache says it is not running."""
        if not self.instance_name:
            return 0
        return await self.daemon().poll(
            self.instance_name,
            self.owner,
            remove=self.remove,
            may_remove=not self._spawn_pending,
            member_grace=self.member_offline_grace,
            timeout=self.stop_timeout + 10,
            objects=self._object_kinds(),
        )

    async def stop(self, now: bool = False) -> None:
        """Stop the server; with `remove`, its container is deleted.

        As for a local process, stop() returns once the server has exited: its unit is
        stopped (SIGTERM, then SIGKILL after the unit's timeout) and the container then
        powers off by itself. Its deletion, once LXD has torn it down, goes on in the
        background (see daemon.py); a new start of the same server waits for it.

        When the daemon keeps failing, stop() raises after a few attempts, and the container
        stays recorded in the server's state (JupyterHub forgets the server, not us): it is
        stopped in the background as soon as the daemon answers, or at the next start.
        """
        if not self.instance_name:
            return
        try:
            await self.daemon().stop(
                self.instance_name,
                self.owner,
                remove=self.remove,
                now=now,
                timeout=self.stop_timeout,
                objects=self._object_kinds(),
            )
        except DaemonError as e:
            self.log.error("%s: %s", self._log_name, e.message)
            raise SpawnError(e.message) from e

    async def delete_forever(self) -> None:
        """The admin deleted the user or this named server: its kept container (remove =
        False) goes too, and, with `delete_volumes_with_user`, its volumes (the user's own
        when this is the default server: JupyterHub deletes a user's servers one by one).
        The one place lxdspawner deletes a kept container or a volume by itself."""
        name = self.instance_name
        try:
            daemon = self.daemon()
        except (ValueError, LxdError) as e:  # no recorded remote, and `remote` is unusable
            self.log.error("%s: not deleted: %s", self._log_name, e)
            return
        kinds = self._object_kinds()
        if name and await daemon.delete_forever(name, self.owner, self.stop_timeout + 10, kinds):
            self.log.info(
                "%s: the server was deleted; deleted its container %s", self._log_name, name
            )
        self.instance_name = ""
        try:
            done = await daemon.delete_volumes(self.owner, delete=self.delete_volumes_with_user)
        except (DaemonError, LxdError) as e:
            self.log.error("%s: its volumes were not deleted: %s", self._log_name, e)
            return
        verb = "deleted" if self.delete_volumes_with_user else "kept (delete_volumes_with_user)"
        if done:
            self.log.info("%s: volumes %s: %s", self._log_name, verb, ", ".join(done))
