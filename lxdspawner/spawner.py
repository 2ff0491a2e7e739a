"""LxdSpawner: each user's notebook server in its own Incus or LXD system container.

Orchestration only: names come from :mod:`names`, request bodies and in-container files from
:mod:`objects`, the daemon is spoken to through :mod:`lxd`. The server runs as a systemd unit
of the container, so it survives hub restarts; when it exits the container powers off, so the
container's state in LXD is the server's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import ipaddress
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from jupyterhub.spawner import Spawner
from tornado import web
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
    bases,
    commands,
    metrics,
    names,
    network,
    objects,
    ownership,
    placement,
    sharing,
)
from .cache import InstanceCache
from .lxd import (
    FileHelperFailed,
    LxdClient,
    LxdError,
    NotFound,
    Unreachable,
    image_source,
    ipv4_addresses,
)
from .members import SUSPECT_FOR, MemberBook
from .removals import PendingStops, Removals, remove_once_torn_down

STATE_VERSION = 1
RUNNING_STATES = ("Running", "Starting", "Freezing", "Frozen", "Thawed")


try:
    from jupyterhub.spawner import SpawnException as _SpawnFailure  # JupyterHub >= 6
except ImportError:  # JupyterHub 5
    _SpawnFailure = None


class SpawnError(_SpawnFailure or web.HTTPError):
    """A spawn failed for a reason we can explain.

    JupyterHub shows the message on the user's spawn page (and in the progress stream, via
    ``jupyterhub_message``) and logs it without a traceback.
    """

    def __init__(self, message: str, *, reason: str = "lxd", status_code: int = 500):
        if _SpawnFailure is not None:
            super().__init__(message, reason=reason, status_code=status_code)
        else:
            super().__init__(status_code, reason=reason)
            self.message = message
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return self.message


def _default_get_uid_gid(spawner: LxdSpawner) -> tuple[int, int]:
    """The hub host's passwd entry for the user, else the configured default.

    Only an account of a person: one with a uid of at least `min_uid` (never 0). A username
    such as ``root``, ``daemon`` or ``www-data`` is taken for a user the host does not know.
    A primary group below `min_gid` gives way to `default_gid`.
    """
    try:
        entry = pwd.getpwnam(spawner.user.name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return spawner.default_uid, spawner.default_gid
    if entry.pw_uid == 0 or entry.pw_uid < spawner.min_uid:
        spawner.log.info(
            "%s: the hub host's account %r has uid %d, below min_uid = %d: not a person's; "
            "using default_uid/default_gid",
            spawner._log_name,
            entry.pw_name,
            entry.pw_uid,
            spawner.min_uid,
        )
        return spawner.default_uid, spawner.default_gid
    gid = entry.pw_gid if entry.pw_gid and entry.pw_gid >= spawner.min_gid else spawner.default_gid
    return entry.pw_uid, gid


@contextlib.contextmanager
def _as_trait_error():
    """Our pure checks raise ValueError; traitlets reports TraitError with the setting's name."""
    try:
        yield
    except ValueError as e:
        raise TraitError(str(e)) from e


async def _delete_if_owned(
    client: LxdClient,
    cache: InstanceCache | None,
    owner: ownership.Owner,
    timeout: float,
    log: logging.Logger,
    name: str,
) -> None:
    """Stop and delete ``name`` (once LXD has torn it down) if it is ``owner``'s; leave
    anything else alone. LxdError when the daemon cannot tell (the caller tries again)."""
    try:
        instance = await client.get_instance(name)
    except NotFound:
        return
    if not owner.owns(instance.get("config")):
        log.warning("not deleting %s: it is %s", name, ownership.describe(instance.get("config")))
        return
    await remove_once_torn_down(client, cache, name, timeout, log.info)
    log.info("deleted %s, left behind when its cluster member failed", name)


def _attach_logs(hub_log: logging.Logger) -> None:
    """Send the messages of lxdspawner's modules (its client, cache, removals) to the hub's
    log, in its format and at its level. Without this they go to Python's root logger, which
    JupyterHub leaves without a handler: INFO lines vanish, warnings print bare."""
    ours = logging.getLogger("lxdspawner")
    if hub_log is ours or not hub_log.handlers:
        return
    for handler in hub_log.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(hub_log.getEffectiveLevel())
    ours.propagate = False


class LxdSpawner(Spawner):
    """Spawn single-user servers in Incus or LXD containers, through the REST API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _attach_logs(self.log)

    # -- where: the daemon ------------------------------------------------------------------

    endpoint = Unicode(
        "",
        config=True,
        help="""The Incus/LXD daemon to use.

        Empty (the default): the local unix socket, found automatically (INCUS_DIR, LXD_DIR,
        /var/lib/incus, /run/incus, /var/lib/lxd, the snap's path). Otherwise
        `unix:///path/to/unix.socket`, or `https://host:8443` for a remote server or cluster
        (then set `client_cert`, `client_key` and `server_cert`).
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

    # -- what: the container ----------------------------------------------------------------

    image = Unicode(
        "jupyter-base",
        config=True,
        help="""Image alias or fingerprint the containers are created from.

        The image needs systemd and `jupyterhub-singleuser` (see images/ in the repository).
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
    target = Unicode(
        "",
        config=True,
        help="""On a cluster: where servers may go. A member name (`"node2"`) or a cluster
        group (`"@gpu"`). Empty: any Online member. Ignored on a standalone daemon.
        """,
    )
    get_uid_gid = AnyTrait(
        _default_get_uid_gid,
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
    home_dir = Unicode(
        "/home/{username}",
        config=True,
        help="""Home directory of the server's process (created if missing). `{username}` is the
        raw username. The server's root directory is `notebook_dir` if set, else this.
        """,
    )
    server_port = Int(8888, config=True, help="Port of the server inside the container.")
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
    member_offline_grace = Float(
        60.0,
        config=True,
        help="""On a cluster: seconds a member must stay reported offline before the servers
        on it are reported stopped (so their users can start again elsewhere; the stranded
        containers are deleted once the member is back). A busy member can miss heartbeats
        for a few seconds: this keeps such a blip from stopping anybody's server.""",
    )
    cache_resync_interval = Float(
        300.0,
        config=True,
        help="""Seconds between full relists of our instances by the shared cache, which
        otherwise follows the daemon's events (poll() reads it: no API request per user).""",
    )
    extra_instance_config = Dict(
        config=True,
        help="Extra LXD config keys for every container, e.g. {'boot.autostart': 'false'}.",
    )
    extra_devices = Dict(
        config=True, help="Extra LXD devices for every container: {name: {type: ..., ...}}."
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

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if state.get("lxd_state_version"):
            self.instance_name = state.get("instance", "")
            self.member = state.get("member", "")

    def get_state(self) -> dict:
        state = super().get_state()
        if self.instance_name:
            state.update(
                lxd_state_version=STATE_VERSION,
                instance=self.instance_name,
                member=self.member,
                endpoint=self.endpoint,
                project=self.project,
            )
        return state

    def clear_state(self) -> None:
        """The container's name stays recorded: a kept container (remove = False) is found
        again, and a removed one's name is used again. JupyterHub also calls this at the
        start of every spawn, before any per-user setting (a pre_spawn_hook, a profile) has
        set `remove`: so nothing here may depend on it."""
        super().clear_state()

    # -- the shared client ------------------------------------------------------------------

    _clients: dict[tuple, LxdClient] = {}
    _gateways: dict[tuple, str] = {}

    _caches: dict[tuple, InstanceCache] = {}

    def _endpoint_key(self) -> tuple:
        return (self.endpoint, self.project, self.client_cert, self.client_key, self.server_cert)

    async def cache(self) -> InstanceCache:
        """The shared view of our instances on this daemon, fed by its events."""
        key = self._endpoint_key()
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = InstanceCache(
                await self.client(), resync_interval=self.cache_resync_interval
            )
        await cache.start(timeout=self.api_timeout)
        return cache

    async def client(self) -> LxdClient:
        """One client per endpoint, shared by every spawner of the hub (one connection pool)."""
        key = self._endpoint_key()
        client = self._clients.get(key)
        if client is None or client.dialect is None:
            client = LxdClient(
                self.endpoint,
                client_cert=self.client_cert,
                client_key=self.client_key,
                server_cert=self.server_cert,
                project=self.project,
                timeout=self.api_timeout,
            )
            await client.open()
            self._clients[key] = client
            metrics.register_request_counts(lambda: list(LxdSpawner._clients.values()))
        return client

    # -- progress ---------------------------------------------------------------------------

    def _emit(self, message: str, progress: int | None = None) -> None:
        self.log.info("%s: %s", self._log_name, message)
        event: dict[str, Any] = {"message": message}
        if progress is not None:
            event["progress"] = progress
        self._progress_events.append(event)
        self._progress_changed.set()

    def _reset_progress(self) -> None:
        self._progress_events: list[dict] = []
        self._progress_changed = asyncio.Event()
        self._progress_done = False

    async def progress(self):
        if not hasattr(self, "_progress_events"):
            return
        sent = 0
        while True:
            while sent < len(self._progress_events):
                yield self._progress_events[sent]
                sent += 1
            if self._progress_done:
                return
            self._progress_changed.clear()
            try:
                await asyncio.wait_for(self._progress_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass

    # -- spawn ------------------------------------------------------------------------------

    @property
    def _log_name(self) -> str:
        return f"{self.user.name}:{self.name}" if self.name else self.user.name

    _books: dict[tuple, MemberBook] = {}

    def _book(self) -> MemberBook:
        """What this hub knows of the cluster's members beyond LXD's answers (per daemon)."""
        key = self._endpoint_key()
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = MemberBook(self.log)
        return book

    async def _place(self, client: LxdClient, cache: InstanceCache) -> str | None:
        """The cluster member for this server (None on a standalone daemon)."""
        if client.dialect is None or not client.dialect.clustered:
            if self.target:
                self.log.warning(
                    "target %r ignored: %s is not a cluster", self.target, client.where
                )
            return None
        members = await client.cluster_members()
        book = self._book()
        book.mark_suspects(members)
        # From here to placed() there is no await: concurrent spawns see each other.
        snapshot = placement.members_from_counts(
            members, cache.count_by_location(), book.in_flight, self.host_weights
        )
        request = placement.PlacementRequest(
            user=self.user.name, server_name=self.name or "", require=self.target or None
        )
        policy = self.placement_policy or placement.weighted_least_loaded
        try:
            chosen = policy(snapshot, request)
        except placement.NoMemberAvailable as e:
            raise SpawnError(e.message, reason="placement", status_code=503) from e
        if chosen not in {m.name for m in snapshot}:
            raise SpawnError(f"placement_policy chose {chosen!r}, which is not a cluster member")
        book.placed(chosen)
        return chosen

    async def _resolve_uid_gid(self) -> tuple[int, int]:
        result = self.get_uid_gid(self)
        if inspect.isawaitable(result):
            result = await result
        try:
            uid, gid = (int(x) for x in result)
        except (TypeError, ValueError) as e:
            raise SpawnError(f"get_uid_gid returned {result!r}; expected (uid, gid)") from e
        if uid < self.min_uid or uid < 0:
            raise SpawnError(
                f"get_uid_gid gave uid {uid} for {self.user.name!r}, below "
                f"c.LxdSpawner.min_uid = {self.min_uid}: a server never runs as root or a "
                "system account unless min_uid is lowered for it"
            )
        if gid < self.min_gid or gid < 0:
            raise SpawnError(
                f"get_uid_gid gave gid {gid} for {self.user.name!r}, below "
                f"c.LxdSpawner.min_gid = {self.min_gid}: a server never runs with group root "
                "or a system group unless min_gid is lowered for it"
            )
        return uid, gid

    def _mounts(self) -> tuple[objects.Mount, ...]:
        mounts = []
        for name, source, path in self.filesystems_to_mount:
            try:
                source = objects.expand_username_in_path(source, self.user.name)
                path = objects.expand_username_in_path(path, self.user.name)
            except ValueError as e:
                raise SpawnError(f"filesystems_to_mount entry {name!r}: {e}") from e
            if not os.path.isdir(source):
                raise SpawnError(
                    f"filesystems_to_mount entry {name!r}: host directory {source!r} does not "
                    "exist on the hub host"
                )
            mounts.append(objects.Mount(name=name, source=source, path=path))
        return tuple(mounts)

    async def _read_files_to_push(self) -> list[tuple[str, bytes, int]]:
        def read(host_path: str) -> tuple[bytes, int]:
            with open(host_path, "rb") as f:
                return f.read(), stat.S_IMODE(os.fstat(f.fileno()).st_mode)

        found = []
        for host_path, container_path in self.files_to_push:
            shared = sharing.containing(self.shared_directories, container_path)
            if shared and not self.privileged_containers:
                raise SpawnError(
                    f"files_to_push: {container_path!r} is inside {shared!r}, which every "
                    f"container shares read-only (c.LxdSpawner.shared_directories = "
                    f"{list(self.shared_directories)!r}): push it elsewhere, or take "
                    f"{shared!r} out of shared_directories"
                )
            try:
                data, mode = await asyncio.to_thread(read, host_path)
            except OSError as e:
                raise SpawnError(
                    f"files_to_push: cannot read {host_path!r} on the hub host: {e.strerror}"
                ) from e
            found.append((container_path, data, mode))
        return found

    def _home(self) -> str:
        """home_dir with the username as one safe directory name (see names.home_component)."""
        component = names.home_component(self.user.name)
        home = self.home_dir.replace("{username}", component).replace("{USERNAME}", component)
        home = os.path.normpath(home) if home.startswith("/") else home
        if not home.startswith("/") or home == "/":
            raise SpawnError(
                f"home_dir = {self.home_dir!r} gives {home!r} for this user: it must be an "
                "absolute path below /"
            )
        return home

    @property
    def owner(self) -> ownership.Owner:
        """The keys that mark this server's instance as its own."""
        return ownership.Owner(self.hub_id, self.user.name, self.name or "")

    def _spec(self, uid: int, gid: int) -> objects.ServerSpec:
        home = self._home()
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
            mounts=self._mounts(),
            mem_limit=self.mem_limit,
            cpu_limit=self.cpu_limit,
            process_limit=self.process_limit or None,
            privileged=self.privileged_containers,
            extra_config=dict(self.extra_instance_config),
            extra_devices=dict(self.extra_devices),
        )

    #: (endpoint, profiles, settings) -> (when read, hardening config, system devices).
    _hardenings: dict[tuple, tuple[float, dict, dict]] = {}
    #: Seconds the profiles and networks read for _harden are taken as current.
    HARDENING_TTL = 60.0

    async def _harden(self, client: LxdClient, spec: objects.ServerSpec) -> objects.ServerSpec:
        """The isolation of the container (see SECURITY.md): its own uid range, no guest API,
        the root disk's size, the NIC's isolation. Read from the profiles and their network,
        once a minute per daemon and settings."""
        key = (
            self._endpoint_key(),
            tuple(self.profiles),
            self.disk_limit,
            self.network_isolation,
            self._idmap_isolated(client),
            self.guest_api,
            self.privileged_containers,
        )
        cached = self._hardenings.get(key)
        if cached is None or time.monotonic() - cached[0] > self.HARDENING_TTL:
            config, devices = await self._read_hardening(client)
            cached = self._hardenings[key] = (time.monotonic(), config, devices)
        return dataclasses.replace(spec, hardening=cached[1], system_devices=cached[2])

    def _idmap_isolated(self, client: LxdClient) -> bool:
        if self.privileged_containers:
            return False
        if self.isolated_idmap is not None:
            return self.isolated_idmap
        return client.dialect is not None and client.dialect.product == "incus"

    async def _read_hardening(self, client: LxdClient) -> tuple[dict, dict]:
        assert client.dialect is not None
        caps = network.supported(client.dialect)
        config: dict[str, str] = {}
        devices: dict[str, dict[str, str]] = {}
        if not self.guest_api:
            config.update(network.guest_api_config(caps))
        if self._idmap_isolated(client):
            config["security.idmap.isolated"] = "true"
        profile_devices: dict[str, dict[str, str]] = {}
        for name in self.profiles:
            try:
                profile = await client.profile(name)
            except NotFound as e:
                raise SpawnError(
                    f"the profile {name!r} (c.LxdSpawner.profiles) does not exist on {client.where}"
                ) from e
            profile_devices.update(profile.get("devices") or {})
        if self.disk_limit:
            try:
                root, device = objects.root_disk(profile_devices)
            except ValueError as e:
                raise SpawnError(f"disk_limit = {self.disk_limit!r}: {e}") from e
            devices[root] = {**device, "size": self.disk_limit}
        nic = await self._isolated_nic(client, caps, profile_devices.get("eth0"))
        if self.network_isolation != "open":
            devices["eth0"] = nic
        return config, devices

    async def _isolated_nic(
        self, client: LxdClient, caps: network.Capabilities, nic: dict | None
    ) -> dict[str, str]:
        on = network.nic_network(nic or {})
        try:
            info = await client.network(on) if on else None
        except NotFound:
            info = None
        if self.network_isolation in ("ports", "open") and network.is_dedicated(info):
            # This hub's ACL, from an earlier setting, would still hold on the whole network.
            try:
                if await network.release_network(client, self.hub_id, on):
                    self.log.info(
                        "network_isolation = %r: took this hub's ACL off network %s on %s",
                        self.network_isolation,
                        on,
                        client.where,
                    )
            except LxdError as e:
                self.log.warning(
                    "network_isolation = %r: could not take this hub's ACL off network %s on "
                    "%s, so it still applies there: %s",
                    self.network_isolation,
                    on,
                    client.where,
                    e.message,
                )
        if self.network_isolation == "open":
            return dict(nic or {})
        try:
            network.check_nic(nic, info, caps)
            assert nic is not None and info is not None
            if self.network_isolation == "ports":
                return network.nic_device(nic, None, port_isolation=caps.port_isolation)
            gateway = network.gateway_of(info)
            parts = urlsplit(self.hub_connect_url or self.hub.api_url)
            hub_host = parts.hostname or ""
            hub_ip = (
                await self._address_of(hub_host) if self._is_reachable_host(hub_host) else gateway
            )
            isolation = network.Isolation(
                hub_ip=hub_ip,
                hub_port=parts.port or self.hub.port,
                # The proxy on this host connects from the bridge's address; a hub host
                # elsewhere (routed to the bridge) from the address the servers reach it at.
                proxy_ips=(gateway, hub_ip),
                server_port=self.server_port,
                gateway=gateway,
                egress=self.network_isolation,
            )
            prepared = await network.prepare_nic(client, caps, self.hub_id, isolation, nic)
        except network.IsolationError as e:
            raise SpawnError(str(e)) from e
        for gap in prepared.gaps:
            self.log.warning("network isolation on %s: %s", client.where, gap)
        return prepared.device

    async def _address_of(self, host: str) -> str:
        """The IP address a firewall rule can name for the hub's host (a name is resolved
        here, on the hub host, IPv4 first)."""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
        except OSError as e:
            raise network.IsolationError(
                f"network isolation: the hub's address {host!r} (hub_connect_url) does not "
                f"resolve here ({e}), so no rule can let the servers reach it; give an IP "
                f'address there, or set c.LxdSpawner.network_isolation = "ports"'
            ) from e
        addresses = sorted({a[4][0] for a in found}, key=lambda a: (":" in a, a))
        return addresses[0]

    async def _hub_api_url(self, client: LxdClient, instance: dict) -> str | None:
        """Where the container reaches the hub's API, when JupyterHub's own default won't do.

        With `c.Spawner.hub_connect_url` set, or an address chosen with JupyterHub's
        `hub_connect_url`/`hub_bind_url`, that choice stands. A loopback or wildcard address is
        replaced by the gateway of the container's bridge: this host as the container sees it.
        """
        if self.hub_connect_url:
            return None
        parts = urlsplit(self.hub.api_url)
        host = parts.hostname or ""
        if self._is_reachable_host(host):
            return None
        bind_ip = self.hub.ip or ""
        if bind_ip and bind_ip not in ("0.0.0.0", "::") and self._is_loopback(bind_ip):  # noqa: S104
            raise SpawnError(
                f"the hub listens on {bind_ip}, which containers cannot reach: set "
                "c.JupyterHub.hub_bind_url to the address of the containers' bridge (e.g. "
                "'http://10.117.40.1:8081') or 0.0.0.0, or set c.LxdSpawner.hub_connect_url"
            )
        gateway = await self._bridge_gateway(client, instance)
        port = parts.port or self.hub.port
        return urlunsplit(parts._replace(netloc=f"{gateway}:{port}"))

    @staticmethod
    def _is_loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def _is_reachable_host(self, host: str) -> bool:
        """False for what JupyterHub puts there when the hub binds loopback or a wildcard:
        a loopback address, or this machine's own host name (rarely resolvable in a
        container). Any other name or address was chosen by the operator: keep it."""
        if host in (socket.gethostname(), socket.getfqdn()):
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host != "localhost"
        return not (address.is_loopback or address.is_unspecified)

    async def _bridge_gateway(self, client: LxdClient, instance: dict) -> str:
        nic = (instance.get("expanded_devices") or {}).get("eth0") or {}
        network = nic.get("network") or nic.get("parent") or ""
        key = (client.where, network)
        if key not in self._gateways:
            if not network:
                raise SpawnError(
                    f"container {instance.get('name')} has no eth0 on a managed bridge, so the "
                    "hub's address cannot be worked out: set c.LxdSpawner.hub_connect_url"
                )
            info = await client.network(network)
            address = (info.get("config") or {}).get("ipv4.address", "")
            if not address or address == "none":
                raise SpawnError(
                    f"network {network!r} has no IPv4 address: set c.LxdSpawner.hub_connect_url"
                )
            self._gateways[key] = address.split("/")[0]
        return self._gateways[key]

    async def start(self) -> tuple[str, int]:
        self._reset_progress()
        started = time.monotonic()
        self.timings: dict[str, float] = {}
        try:
            return await self._start()
        except SpawnError as e:
            self.log.error("Spawn of %s failed: %s", self._log_name, e.message)
            raise
        except Unreachable as e:
            message = f"the container daemon is not reachable: {e.message}"
            self.log.error("Spawn of %s failed: %s", self._log_name, message)
            raise SpawnError(message) from e
        except LxdError as e:
            self.log.error("Spawn of %s failed: %s", self._log_name, e.message)
            raise SpawnError(e.message) from e
        finally:
            self.timings["total"] = time.monotonic() - started
            metrics.observe_spawn(self.timings)
            self._progress_done = True
            self._progress_changed.set()

    async def _step(self, name: str, coro):
        t0 = time.monotonic()
        try:
            return await coro
        finally:
            self.timings[name] = time.monotonic() - t0

    async def _start(self) -> tuple[str, int]:
        self.port = self.server_port
        self.ip = "0.0.0.0"  # noqa: S104 - inside the container; only the bridge reaches it
        uid, gid = await self._resolve_uid_gid()
        files = await self._read_files_to_push()
        client = await self.client()
        cache = await self.cache()
        name, existing = await self._claim_name(client)
        self.instance_name = name
        spec = await self._harden(client, self._spec(uid, gid))

        if existing and self.remove:
            self._emit("Removing a leftover container of an earlier server", 8)
            await self._force_delete(client, name)
            existing = None
        elif existing:
            await self._make_reusable(client, cache, spec, existing)

        created = False
        member = None
        try:
            if existing is None:
                member = await self._place(client, cache)
                where = f" on {member}" if member else ""
                self._emit(f"Placing server {name}{where}", 5)
                self._emit(f"Creating container {name} from image {self.image}{where}", 10)
                await self._step("create", self._create_sharing(client, spec, member))
                created = True
            instance = await client.get_instance(name)
            self.member = instance.get("location") or ""
            env = self.get_env()
            api_url = await self._hub_api_url(client, instance)
            if api_url:
                env["JUPYTERHUB_API_URL"] = api_url
                env["JUPYTERHUB_ACTIVITY_URL"] = api_url.rstrip("/") + (
                    f"/users/{self.user.escaped_name}/activity"
                )
            env.setdefault("JUPYTERHUB_USER", self.user.name)
            self._emit("Pushing configuration and files", 30)
            try:
                await self._step("push", self._push_files(client, spec, env, files))
            except FileHelperFailed as e:
                if not created:
                    raise
                # Incus 6.0.4's file helper of this one instance is stuck: a new instance
                # gets a new helper. Once: a second failure is the daemon's, and reported.
                self.log.warning("%s: %s; creating %s again", self._log_name, e.message, name)
                self._emit("The daemon's file helper failed; creating the container again", 32)
                await self._force_delete(client, name)
                await self._step("create", self._create_sharing(client, spec, member))
                await self._step("push", self._push_files(client, spec, env, files))
            self._emit("Starting container", 40)
            try:
                await self._step("start", client.start_instance(name, timeout=self.start_timeout))
            except LxdError as e:
                product = client.dialect.product if client.dialect else "incus"
                failure = network.start_failure(e.message, product=product)
                if failure is None:
                    raise
                raise SpawnError(str(failure)) from e
            cache.note_instance({**instance, "status": "Running"})
            ip = await self._step("ipv4", self._wait_ipv4(client, name))
            if self.commands_to_prepare:
                self._emit("Running preparation commands", 60)
                await self._step("prepare", self._prepare(client, name, spec))
            if self.internal_ssl:
                self._emit("Installing the server's TLS certificate", 70)
                await self._step("certs", self._install_certs(client, name, spec, ip))
            if self._starts_after_boot:
                result = await client.exec(name, objects.wait_for_systemd_and_start_unit())
                if result.exit_code != 0:
                    raise SpawnError(f"could not start the server's unit: {result.output}")
            self._emit(f"Waiting for the server at {ip}:{self.port}", 80)
            await self._step("server", self._wait_http(client, name, ip))
        except BaseException as e:
            await self._cleanup_failed_start(client, name, created)
            cause = e if isinstance(e, LxdError) else e.__cause__
            if member and isinstance(cause, LxdError):
                # The member itself may be failing (LXD notices only after a heartbeat or
                # two): leave it out of placement for a while, so a retry goes elsewhere.
                self._book().suspect(member)
                raise SpawnError(
                    f"cluster member {member} failed during the spawn of {name}: "
                    f"{cause.message}. It is left out of placement for "
                    f"{SUSPECT_FOR:.0f} s: start again.",
                    reason="member",
                    status_code=503,
                ) from e
            raise
        finally:
            self._book().landed(member)
        if self.post_hub_commands:
            asyncio.ensure_future(self._run_post_hub_commands())
        self.log.info(
            "%s: container %s running at %s:%s (timings %s)",
            self._log_name,
            name,
            ip,
            self.port,
            {k: round(v, 3) for k, v in self.timings.items()},
        )
        return ip, self.port

    async def _existing(self, client: LxdClient, name: str) -> dict | None:
        try:
            return await client.get_instance(name)
        except NotFound:
            return None

    #: How many of a server's names (the usual one, then numbered alternatives) are tried.
    NAME_ATTEMPTS = 8

    async def _claim_name(self, client: LxdClient) -> tuple[str, dict | None]:
        """The container's name, and the container if this server's exists already.

        The name recorded in the hub's state comes first (a kept container, or one from
        before an upgrade changed the naming rules), then the usual name, then numbered
        alternatives. A name held by an instance whose keys are not this server's (another
        user's whose name hashed alike, another hub's, one made by hand) is left alone. On a
        cluster, a name whose instance cannot be read (its member is down) is skipped too.
        """
        candidates = [self.instance_name] if self.instance_name else []
        candidates += [
            names.instance_name(self.user.name, self.name or "", self.name_prefix, attempt)
            for attempt in range(self.NAME_ATTEMPTS)
        ]
        owner = self.owner
        clustered = client.dialect is not None and client.dialect.clustered
        for name in dict.fromkeys(candidates):
            if self._book().is_orphan(name):
                continue
            self._stops_left.cancel(self._endpoint_key(), name)  # this start takes over
            await self._removed(name)
            try:
                existing = await self._existing(client, name)
            except LxdError as e:
                if name == self.instance_name and not self.remove:
                    raise SpawnError(
                        f"this server's kept container {name} cannot be read ({e.message}); it "
                        "is kept as it is (remove = False): start again once it can be "
                        "reached, or have an admin delete the server to start afresh"
                    ) from e
                if not clustered:
                    raise
                self.log.warning("%s is unavailable (%s): using another name", name, e.message)
                if self.remove:
                    self._remember_orphan(client, name)
                continue
            if existing is None:
                return name, None
            config = existing.get("config")
            if owner.owns(config) or (name == self.instance_name and owner.owns_recorded(config)):
                return name, existing
            self.log.warning(
                "%s: %s holds the name %s; leaving it alone and using another name",
                self._log_name,
                ownership.describe(config),
                name,
            )
        raise SpawnError(
            f"no free container name for this server: {', '.join(dict.fromkeys(candidates))} "
            "are all held by instances that are not its own"
        )

    async def _make_reusable(
        self,
        client: LxdClient,
        cache: InstanceCache,
        spec: objects.ServerSpec,
        existing: dict,
    ) -> None:
        """A kept container (remove = False): stopped if it runs (never deleted), then given
        the current config and devices, so a changed setting or mount reaches it."""
        name = spec.instance
        if existing.get("status") != "Stopped":
            self._emit(f"Stopping the kept container {name} (it was {existing.get('status')})", 8)
            try:
                if await client.shut_down(name, timeout=self.stop_timeout):
                    cache.note_torn_down(name)
            except NotFound:
                return
            await cache.wait_torn_down(name, self.stop_timeout + 10)
            existing = await client.get_instance(name)
        _, shared = await self._shared_devices(client, existing.get("location") or None)
        devices = {**objects.instance_devices(spec), **shared}
        # Keep LXD's own keys (volatile.*, image.*); ours and the operator's are set afresh.
        config = {
            k: v
            for k, v in (existing.get("config") or {}).items()
            if k.startswith(("volatile.", "image."))
        }
        config.update(objects.instance_config(spec))
        await client.request(
            "PUT",
            f"/1.0/instances/{name}",
            json_body={
                "architecture": existing.get("architecture", ""),
                "config": config,
                "devices": devices,
                "profiles": list(spec.profiles),
                "ephemeral": bool(existing.get("ephemeral")),
                "stateful": bool(existing.get("stateful")),
                "description": existing.get("description", ""),
            },
        )

    def _remember_orphan(self, client: LxdClient, name: str) -> None:
        """Delete ``name`` once its cluster member answers again, if it is this server's."""
        delete = functools.partial(
            _delete_if_owned,
            client,
            self._caches.get(self._endpoint_key()),
            self.owner,
            self.stop_timeout + 10,
            self.log,
        )
        self._book().orphan(name, delete)

    async def _create(
        self, client: LxdClient, spec: objects.ServerSpec, member: str | None = None
    ) -> None:
        def forward(metadata: dict) -> None:
            for key, value in metadata.items():
                if key.endswith("_progress") and isinstance(value, str):
                    self._emit(f"Creating container: {value}", 15)

        try:
            await client.create_instance(
                spec.instance,
                source=await self._source(client, member),
                profiles=spec.profiles,
                config=objects.instance_config(spec),
                devices=objects.instance_devices(spec),
                target=member,
                timeout=max(self.start_timeout, 60),
                on_progress=forward,
            )
        except LxdError as e:
            if await client.image_fingerprint(self.image) is None:
                raise SpawnError(
                    f"the image {self.image!r} (c.LxdSpawner.image) does not exist on "
                    f"{client.where}: build or import it (e.g. images/ensure-image.sh "
                    f"{self.image}), or set c.LxdSpawner.image to an existing alias"
                ) from e
            raise SpawnError(f"could not create container {spec.instance}: {e.message}") from e

    async def _create_sharing(
        self, client: LxdClient, spec: objects.ServerSpec, member: str | None
    ) -> None:
        """Create the container, with the shared directories whose copies are ready."""
        fingerprint, shared = await self._shared_devices(client, member)
        if not shared:
            return await self._create(client, spec, member)
        devices = {**spec.extra_devices, **shared}
        try:
            return await self._create(
                client, dataclasses.replace(spec, extra_devices=devices), member
            )
        except SpawnError as e:
            # A volume may have been deleted by hand: go without, and look again next time.
            self.log.warning("create with the shared directories failed (%s); without", e)
            self._shares[self._endpoint_key()].forget(fingerprint, member)
            await self._force_delete(client, spec.instance)
        return await self._create(client, spec, member)

    _shares: dict[tuple, sharing.SharedDirectories] = {}

    async def _shared_devices(
        self, client: LxdClient, member: str | None
    ) -> tuple[str, dict[str, dict[str, str]]]:
        """The image's fingerprint, and the disk devices of the ready shared directories."""
        if not self.shared_directories or self.privileged_containers:
            return "", {}
        if member is None and client.dialect is not None and client.dialect.clustered:
            return "", {}  # the volumes are per member: only when we chose the member
        shares = self._shares.setdefault(self._endpoint_key(), sharing.SharedDirectories(self.log))
        try:
            fingerprint = await client.image_fingerprint(self.image, max_age=30)
            if fingerprint is None:
                return "", {}
            return fingerprint, await shares.devices(
                client, fingerprint, member, self.shared_directories, tuple(self.profiles)
            )
        except LxdError as e:
            self.log.warning("shared directories unavailable: %s", e.message)
            return "", {}

    _bases: dict[tuple, bases.ShiftedBases] = {}

    async def _source(self, client: LxdClient, member: str | None) -> dict:
        """Where the container comes from: the image, or a copy of the shifted base."""
        dialect = client.dialect
        if not bases.wanted(self.clone_shifted_base, dialect, self.privileged_containers, member):
            return image_source(self.image)
        fingerprint = await client.image_fingerprint(self.image)
        if fingerprint is None:
            return image_source(self.image)  # let the create fail with the usual message
        shifted = self._bases.setdefault(self._endpoint_key(), bases.ShiftedBases())
        source = await shifted.source(
            client,
            fingerprint=fingerprint,
            prefix=self.name_prefix,
            profiles=tuple(self.profiles),
            timeout=max(self.start_timeout, 120),
            on_make=lambda: self._emit(
                "Preparing a base container for this image (once per image)", 12
            ),
        )
        if source is None:
            self.log.warning(
                "the name of the shifted base of %s is held by another instance: creating "
                "from the image",
                self.image,
            )
            return image_source(self.image)
        return source

    async def _push_files(
        self,
        client: LxdClient,
        spec: objects.ServerSpec,
        env: dict[str, str],
        files: list[tuple[str, bytes, int]],
    ) -> None:
        name = spec.instance
        await client.make_directory(name, objects.CONFIG_DIR, mode=0o755)
        # The token is in this file, never on a command line. systemd (PID 1, root) reads it
        # for the unit, whose ExecStartPre runs as root: so it is root's, 0600, and the user
        # cannot rewrite it for a later boot (a container can start again without the hub).
        try:
            content = objects.env_file(objects.server_environment(spec, env))
        except ValueError as e:
            raise SpawnError(f"the server's environment cannot be written: {e}") from e
        await client.push_file(name, objects.ENV_PATH, content, mode=0o600)
        await client.push_file(name, objects.UNIT_PATH, objects.server_unit(spec), mode=0o644)
        if not self._starts_after_boot:
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
                raise SpawnError(
                    f"files_to_push: cannot write {container_path!r} in the container: {e.message}"
                ) from e

    async def _wait_ipv4(self, client: LxdClient, name: str) -> str:
        self._emit("Waiting for the container's network address", 50)
        delay = 0.05
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
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
                raise SpawnError(
                    f"container {name} stopped while booting (status {state.get('status')}); "
                    + await self._server_log_tail(client, name)
                )
            if loop.time() > deadline:
                raise SpawnError(
                    f"container {name} got no IPv4 address within {self.start_timeout:g} s "
                    "(start_timeout): is DHCP running on its bridge?"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    _http: aiohttp.ClientSession | None = None

    @property
    def _starts_after_boot(self) -> bool:
        """Whether the server's unit is started by us once the container has booted (after
        commands_to_prepare, or once its certificate names its address), not by systemd."""
        return bool(self.commands_to_prepare or self.internal_ssl)

    # -- internal_ssl: the hub's CA, a certificate for the container's own address --------------

    #: Where the server's certificate, key and the hub's CA bundle are in the container.
    SSL_DIR = f"{objects.CONFIG_DIR}/ssl"

    async def move_certs(self, paths: dict) -> dict:
        """The container's paths of the server's key, certificate and CA bundle.

        JupyterHub made them before start() for names it knows; the hub checks the server's
        certificate against the address start() returns, which DHCP gives only after the
        container boots: so the files are made again with that address and pushed then (see
        _install_certs). The paths go into the server's environment.
        """
        return {
            "keyfile": f"{self.SSL_DIR}/server.key",
            "certfile": f"{self.SSL_DIR}/server.crt",
            "cafile": f"{self.SSL_DIR}/ca.crt",
        }

    async def _install_certs(
        self, client: LxdClient, name: str, spec: objects.ServerSpec, ip: str
    ) -> None:
        """Sign a certificate for the container's address with the hub's CA, and push it:
        root's, readable by the server's group (the key: 0640; nobody else)."""
        names = self.ssl_alt_names
        if callable(names):
            names = names(self)
            if inspect.isawaitable(names):
                names = await names
        self.ssl_alt_names = [*names, f"IP:{ip}"]
        try:
            made = await self.create_certs()
        finally:
            self.ssl_alt_names = list(names)

        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        targets = await self.move_certs(made)
        await client.make_directory(name, self.SSL_DIR, uid=0, gid=spec.gid, mode=0o750)
        for key, mode in (("keyfile", 0o640), ("certfile", 0o644), ("cafile", 0o644)):
            data = await asyncio.to_thread(read, made[key])
            await client.push_file(name, targets[key], data, uid=0, gid=spec.gid, mode=mode)

    def _readiness_ssl(self) -> Any:
        """TLS for our readiness check under internal_ssl: the hub's own client certificate
        and CA, as JupyterHub's check uses (the server asks for a client certificate)."""
        from jupyterhub.app import JupyterHub
        from jupyterhub.utils import make_ssl_context

        app = JupyterHub.instance() if JupyterHub.initialized() else None
        if app is None or not app.internal_ssl:
            return False
        return make_ssl_context(
            app.internal_ssl_key, app.internal_ssl_cert, cafile=app.internal_ssl_ca
        )

    async def _wait_http(self, client: LxdClient, name: str, ip: str) -> None:
        """Return once the server answers HTTP, or fail with its log.

        JupyterHub checks the server's URL itself after start() with a growing back-off; when
        we know the moment it answers, that check succeeds at once. And a server that dies on
        start is reported with its own last words instead of a bare timeout.
        """
        if LxdSpawner._http is None or LxdSpawner._http.closed:
            LxdSpawner._http = aiohttp.ClientSession()
        base_url = self.server.base_url if self.server else "/"
        scheme = "https" if self.internal_ssl else "http"
        url = f"{scheme}://{ip}:{self.port}{base_url}api"
        tls = self._readiness_ssl() if self.internal_ssl else True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.http_timeout
        next_check = loop.time() + 1
        delay = 0.05
        while True:
            try:
                async with LxdSpawner._http.get(
                    url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2), ssl=tls
                ) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            now = loop.time()
            if now >= next_check:
                next_check = now + 1
                status = (await client.get_instance(name)).get("status")
                if status != "Running":
                    raise SpawnError(
                        f"the server in {name} exited while starting; "
                        + await self._server_log_tail(client, name)
                    )
            if now > deadline:
                raise SpawnError(
                    f"the server in {name} did not answer at {url} within "
                    f"{self.http_timeout:g} s (http_timeout); "
                    + await self._server_log_tail(client, name)
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def _prepare(self, client: LxdClient, name: str, spec: objects.ServerSpec) -> None:
        env = {
            "JUPYTERHUB_USER": self.user.name,
            "JUPYTERHUB_SERVER_NAME": self.name or "",
            "HOME": spec.home,
            "USER": self.user.name,
        }
        # The unit would make the home directory; the commands run before it, so make it here.
        # The path is one argument of an argument vector: no shell sees it.
        made = await client.exec(name, objects.make_home_command(spec))
        if made.exit_code != 0:
            self.log.warning("could not create %s in %s: %s", spec.home, name, made.output)
        for command in self.commands_to_prepare:
            where = f"commands_to_prepare: {command!r}"
            try:
                line = commands.expand_username(
                    command, self.user.name, setting="commands_to_prepare"
                )
                result = await client.exec(
                    name,
                    ["/bin/sh", "-c", line],
                    environment=env,
                    user=spec.uid,
                    group=spec.gid,
                    cwd=spec.home if made.exit_code == 0 else "/",
                    timeout=self.start_timeout,
                )
            except ValueError as e:
                raise SpawnError(str(e)) from e
            except LxdError as e:
                raise SpawnError(f"{where} could not be run: {e.message}") from e
            if result.exit_code != 0:
                raise SpawnError(
                    f"{where} failed with exit code {result.exit_code}: "
                    f"{result.output[-2000:] or '(no output)'}"
                )

    async def _run_post_hub_commands(self) -> None:
        env = commands.minimal_environment(self.user.name, self.name or "")
        for command in self.post_hub_commands:
            try:
                line = commands.expand_username(
                    command, self.user.name, setting="post_hub_commands"
                )
            except ValueError as e:
                self.log.error("%s", e)
                continue
            code, output = await commands.run_on_hub(
                line, env=env, timeout=self.post_hub_command_timeout
            )
            output = output[-2000:].strip() or "(no output)"
            if code is None:
                self.log.error(
                    "post_hub_commands for %s: %r killed after %g s (post_hub_command_timeout): %s",
                    self._log_name,
                    command,
                    self.post_hub_command_timeout,
                    output,
                )
            elif code:
                self.log.error(
                    "post_hub_commands for %s: %r failed with exit code %s: %s",
                    self._log_name,
                    command,
                    code,
                    output,
                )
            else:
                self.log.info("post_hub_commands for %s: %r: %s", self._log_name, command, output)

    async def _server_log_tail(self, client: LxdClient, name: str, lines: int = 20) -> str:
        # The user's process writes this log, as much as it likes: read only its end.
        try:
            tail = await client.read_file_tail(name, objects.SERVER_LOG_PATH, max_bytes=16384)
            text = tail.decode(errors="replace")
        except LxdError:
            text = ""
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"last lines of the server's log:\n{tail}" if tail else "the server wrote no log"

    async def _cleanup_failed_start(self, client: LxdClient, name: str, created: bool) -> None:
        try:
            if self.remove or created:
                await self._force_delete(client, name)
            else:
                await client.stop_instance(name, force=True)
        except NotFound:
            return
        except LxdError as e:
            self.log.warning("cleanup after failed spawn of %s: %s", name, e.message)
            if (self.remove or created) and client.dialect and client.dialect.clustered:
                self._remember_orphan(client, name)

    async def _force_delete(self, client: LxdClient, name: str) -> None:
        """Stop by force, and delete once LXD has torn the container down."""
        cache = self._caches.get(self._endpoint_key())
        await remove_once_torn_down(client, cache, name, self.stop_timeout + 10, self.log.info)

    # -- poll and stop ----------------------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the server runs. Reads the shared cache: no request for a running
        server; one direct request only when the cache says it is not running."""
        name = self.instance_name
        if not name:
            return 0
        owner = self.owner
        try:
            cache = await self.cache()
            cached = cache.get(name) if cache.healthy else None
            if (
                cached is not None
                and cached.status in RUNNING_STATES
                and owner.owns_recorded(cached.config)
            ):
                down_for = cache.member_down_for(cached.location)
                if down_for < self.member_offline_grace:
                    return None
                # Its member stays offline: nobody can reach the server. Report it stopped,
                # so the user can start again elsewhere; the container goes once it is back,
                # unless it is kept (remove = False): then it waits there for its user.
                self.log.warning(
                    "%s: cluster member %s has been offline for %.0f s; reporting the server "
                    "stopped%s",
                    self._log_name,
                    cached.location,
                    down_for,
                    "" if self.remove else f" (its container {name} is kept)",
                )
                if self.remove:
                    self._remember_orphan(await self.client(), name)
                return 0
            client = await self.client()
            instance = await client.get_instance(name)
        except NotFound:
            return 0
        except (LxdError, asyncio.TimeoutError) as e:
            # We cannot tell: report running rather than have the hub drop a live server.
            self.log.warning("poll of %s: %s", self._log_name, getattr(e, "message", e))
            return None
        cache.note_instance(instance)
        if not owner.owns_recorded(instance.get("config")):
            self.log.warning(
                "%s: %s is %s, not this server's: reporting the server stopped",
                self._log_name,
                name,
                ownership.describe(instance.get("config")),
            )
            return 0
        if instance.get("status") in RUNNING_STATES:
            return None
        # The server ended by itself (its container powered off). JupyterHub will not call
        # stop() for a server that is not running, so the container is removed here.
        if self.remove and not self._spawn_pending:
            self._remove_when_torn_down(client, cache, name)
        return 0

    #: Attempts of stop() before it reports the failure (1 s, then 2 s apart).
    STOP_ATTEMPTS = 3

    async def stop(self, now: bool = False) -> None:
        """Stop the server; with `remove`, its container is deleted.

        As for a local process, stop() returns once the server has exited: its unit is
        stopped (SIGTERM, then SIGKILL after the unit's timeout) and the container then
        powers off by itself. Its deletion, once LXD has torn it down, goes on in the
        background (see removals.py); a new start of the same server waits for it.

        When the daemon keeps failing, stop() raises after a few attempts, and the container
        stays recorded in the server's state (JupyterHub forgets the server, not us): it is
        stopped in the background as soon as the daemon answers, or at the next start.
        """
        name = self.instance_name
        if not name:
            return
        error: Exception | None = None
        for attempt in range(self.STOP_ATTEMPTS):
            if attempt:
                await asyncio.sleep(attempt)
            try:
                await self._stop_once(name, now)
            except (LxdError, asyncio.TimeoutError) as e:
                error = e
                self.log.warning(
                    "%s: stopping %s failed: %s", self._log_name, name, getattr(e, "message", e)
                )
                continue
            return
        self._stops_left.retry(
            self._endpoint_key(), name, lambda: self._stop_once(name, False), self.log
        )
        message = (
            f"could not stop {name} ({getattr(error, 'message', error)}): it stays recorded "
            "and is stopped as soon as the daemon answers"
        )
        self.log.error("%s: %s", self._log_name, message)
        raise SpawnError(message)

    async def _stop_once(self, name: str, now: bool) -> None:
        client = await self.client()
        cache = await self.cache()
        cached = cache.get(name) if cache.healthy else None
        if cached is None or not self.owner.owns_recorded(cached.config):
            try:
                instance = await client.get_instance(name)
            except NotFound:
                cache.note(name, deleted=True)
                return
            if not self.owner.owns_recorded(instance.get("config")):
                self.log.warning(
                    "%s: not stopping %s: it is %s",
                    self._log_name,
                    name,
                    ownership.describe(instance.get("config")),
                )
                return
            status = instance.get("status")
        else:
            status = cached.status
        stopped = False
        if self.remove and not now and status == "Running":
            cache.expect_teardown(name)
            stopped = await self._stop_server(client, name)
        if not stopped:
            try:
                if await client.shut_down(name, timeout=self.stop_timeout, force=now):
                    cache.note_torn_down(name)
            except NotFound:
                cache.note(name, deleted=True)
                return
        cache.note(name, status="Stopped")
        if self.remove:
            self._remove_when_torn_down(client, cache, name)

    async def delete_forever(self) -> None:
        """The admin deleted the user or this named server: its kept container (remove =
        False) goes too. The one place lxdspawner deletes a kept container."""
        name = self.instance_name
        if not name:
            return
        client = await self.client()
        try:
            instance = await client.get_instance(name)
        except NotFound:
            return
        if not self.owner.owns_recorded(instance.get("config")):
            self.log.warning(
                "%s: not deleting %s: it is %s",
                self._log_name,
                name,
                ownership.describe(instance.get("config")),
            )
            return
        self.log.info("%s: the server was deleted; deleting its container %s", self._log_name, name)
        await self.cache()
        await self._force_delete(client, name)
        self.instance_name = ""

    #: Containers being deleted after their server stopped, for the whole hub.
    _removals = Removals()
    #: Containers whose stop failed, stopped again in the background, for the whole hub.
    _stops_left = PendingStops()

    def _remove_when_torn_down(self, client: LxdClient, cache: InstanceCache, name: str) -> None:
        self._removals.start(
            client,
            cache,
            self._endpoint_key(),
            name,
            teardown_timeout=self.stop_timeout + 10,
            log=self.log,
        )

    async def _stop_server(self, client: LxdClient, name: str) -> bool:
        """Stop the server's unit, and with it the container; False if that failed."""
        try:
            result = await client.exec(
                name,
                ["systemctl", "stop", objects.UNIT_NAME],
                timeout=self.stop_timeout + 10,
                record_output=False,
            )
        except LxdError as e:
            self.log.debug("stopping the server in %s through its unit: %s", name, e.message)
            return False
        return result.exit_code == 0

    async def _removed(self, name: str) -> None:
        """Wait until a deletion of ``name`` that an earlier stop left running has ended."""
        if self._removals.pending(self._endpoint_key(), name):
            self._emit("Waiting for the previous container to be deleted", 3)
            await self._removals.wait(self._endpoint_key(), name)
