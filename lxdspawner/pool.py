"""The warm pool: its settings (a mixin of LxdSpawner) and its pure rules.

A single spawn costs about 0.9 s of container work and 2.4 s of the server's own start
(Python importing JupyterHub's single-user code, Jupyter Server and JupyterLab): the second
part is most of a user's wait, and a local process pays it too. A system container can pay it
before anybody asks: a pool member is a container booted from the same definition as a user's
server, whose unit runs :mod:`lxdspawner.preload` as root; it imports the server's code, then
waits for a claim. A spawn whose definition matches takes one (see :mod:`warmpool`): its
ownership keys are written, the user's volumes hot-plugged, the environment (token included,
never present before) pushed, the claim written; the preloader switches to the user's uid and
gid, reads the environment and runs the server in the process that already holds its modules.

Here: the key of a definition (:func:`definition`, :func:`key_of`), the lineage that says
which members a new key replaces (:func:`lineage_of`), when a spawn may use the pool
(:func:`why_not`), and what is pushed into a member (its unit, the preloader, the claim).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Int, TraitError, validate
from traitlets.config import Configurable

from . import objects, volumes
from .lxd import LxdError
from .ownership import KEY_HUB, KEY_LINEAGE, KEY_MANAGED, KEY_POOL, KEY_SERVER, KEY_USER

if TYPE_CHECKING:
    from .daemon import Daemon

daemon_log = logging.getLogger("lxdspawner.pool")

#: Where the preloader, the claim and the user's environment are in a member. The claim's
#: directory is root's (0700); the environment file is the user's (0600), read after the switch.
PRELOADER_PATH = f"{objects.CONFIG_DIR}/preload.py"
CLAIM_DIR = f"{objects.CONFIG_DIR}/claim"
CLAIM_PATH = f"{CLAIM_DIR}/claim.json"
ENV_JSON_PATH = f"{objects.CONFIG_DIR}/pool-env.json"


def preloader_source() -> bytes:
    """The program a member runs (package data: :mod:`lxdspawner.preload`)."""
    return resources.files("lxdspawner").joinpath("preload.py").read_bytes()


def member_unit() -> str:
    """A member's ``jupyterhub-singleuser.service``: the preloader, as root (it switches to
    the user's ids itself, once claimed). The unit's name is the server's, so stopping a
    claimed server (daemon.py stops this unit) and the container's power-off when the server
    exits are those of every server."""
    return f"""\
# Written by lxdspawner: a warm pool member's server, waiting for its user.
[Unit]
Description=Jupyter single-user server, preloaded (lxdspawner warm pool)
After=network.target systemd-networkd.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=simple
Environment=PATH={objects.DEFAULT_PATH}
ExecStart=/usr/bin/env python3 -I {PRELOADER_PATH}
StandardOutput=append:{objects.SERVER_LOG_PATH}
StandardError=append:{objects.SERVER_LOG_PATH}
Restart=no
KillMode=mixed
TimeoutStopSec=20
OOMPolicy=continue

[Install]
WantedBy=multi-user.target
"""


def user_free(spec: objects.ServerSpec) -> objects.ServerSpec:
    """``spec`` without anything of its user: what a pool member is made from."""
    return dataclasses.replace(
        spec,
        instance="",
        username="",
        server_name="",
        uid=0,
        gid=0,
        home="/",
        cmd=(),
        mounts=(),
        volume_devices={},
        home_on_volume=False,
    )


def definition(
    spec: objects.ServerSpec,
    *,
    fingerprint: str,
    shared_directories: Sequence[str],
    clone_shifted_base: bool | None,
) -> dict:
    """What makes two members interchangeable: the create request of the user-free ``spec``
    (profiles, limits, hardening, the operator's config and devices), the image's
    fingerprint (not its alias: an alias moved is a new definition), the speed-ups, and the
    preloader and its unit (a new lxdspawner replaces the members of the old one)."""
    request = objects.instance_request(user_free(spec))
    for key in (KEY_MANAGED, KEY_HUB, KEY_USER, KEY_SERVER, KEY_POOL, KEY_LINEAGE):
        request["config"].pop(key, None)
    program = hashlib.sha256(preloader_source() + member_unit().encode()).hexdigest()
    return {
        "request": request,
        "hub": spec.hub,
        "image": fingerprint,
        "shared_directories": list(shared_directories),
        "clone_shifted_base": clone_shifted_base,
        "program": program[:16],
    }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def key_of(definition: Mapping) -> str:
    """16 hex digits of the definition: members of one key are interchangeable."""
    return _digest(definition)


def lineage_of(image: str, profile: str, choices: Mapping[str, str]) -> str:
    """Which members a definition replaces: those made for the same image setting (the
    alias, not what it points at) and the same choice of profile and options. When the alias
    moves, or the operator changes a setting of that profile, the key changes and the
    lineage does not: the old members are deleted and new ones made. Two lineages never
    replace each other's members, so two profiles each keep their own pool."""
    return _digest({"image": image, "profile": profile, "choices": dict(sorted(choices.items()))})


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A definition the pool keeps members of: made from ``spec`` (user-free, hardened)."""

    key: str
    lineage: str
    spec: objects.ServerSpec
    size: int


def why_not(
    *,
    size: int,
    kept: bool,
    remove: bool,
    patched: bool,
    prepare: bool,
    internal_ssl: bool,
    guarantees: bool,
    free_value: bool,
    clustered: bool,
) -> str | None:
    """Why a spawn takes today's path rather than the pool (None: it may use the pool)."""
    reasons = (
        (size <= 0, "warm_pool_size is 0"),
        (kept, "its kept container is started again"),
        (not remove, "remove = False keeps containers: a pool member is used once"),
        (patched, "instance_patches or extra_objects are rendered per server"),
        (prepare, "commands_to_prepare run before the server"),
        (internal_ssl, "internal_ssl needs the container's address in its certificate"),
        (guarantees, "guarantees and GPUs are placed per server"),
        (free_value, "a free value in the options defines a container of its own"),
        (clustered, "not on a cluster yet (members are not placed)"),
    )
    return next((why for yes, why in reasons if yes), None)


def claim_document(
    spec: objects.ServerSpec, *, allow_uid0: bool, allow_gid0: bool, env_path: str = ENV_JSON_PATH
) -> bytes:
    """What the preloader is told: whose it is now (ids, home), what to run, where the
    environment is. No secret: the token is in the environment file, which only the user's
    uid reads."""
    if not spec.home.startswith("/"):
        raise ValueError(f"home directory {spec.home!r} must be an absolute path")
    return json.dumps(
        {
            "uid": spec.uid,
            "gid": spec.gid,
            "home": spec.home,
            "argv": list(spec.cmd),
            "env": env_path,
            "allow_uid0": allow_uid0,
            "allow_gid0": allow_gid0,
            "make_home": objects.make_home_command(spec),
            "path": objects.DEFAULT_PATH,
        }
    ).encode()


def env_document(spec: objects.ServerSpec, env: Mapping[str, str]) -> bytes:
    """The server's environment as JSON (the preloader loads it into os.environ as it is)."""
    full = objects.server_environment(spec, env)
    for key, value in full.items():
        if "\0" in key or "=" in key or "\0" in str(value):
            raise ValueError(f"environment variable {key!r} cannot be passed")
    return json.dumps({k: str(v) for k, v in full.items()}).encode()


def member_devices(spec: objects.ServerSpec) -> dict[str, dict[str, str]]:
    """The devices a claim hot-plugs: the user's volumes and host mounts."""
    devices = {m.name: {"type": "disk", "source": m.source, "path": m.path} for m in spec.mounts}
    devices.update({k: dict(v) for k, v in spec.volume_devices.items()})
    return devices


class PoolSettings(Configurable):
    """The warm pool's settings (README "Warm pool")."""

    warm_pool_size = Int(
        0,
        config=True,
        help="""Containers kept booted per container definition (image, profiles, limits, the
        profile and options chosen), their server's code already imported, waiting for a
        user. A spawn that matches takes one: the user's volumes are attached, the
        environment pushed, and the server switches to the user's uid and gid and starts
        serving, without the 2 to 3 s of Python start-up. The pool is filled in the
        background when the hub starts (if servers are running) or at a user's first page,
        and refilled after each claim; with profile_list, a choice's pool is made at its
        first spawn. A container is used by one server only, then deleted. 0 (default): no
        pool. Not used with remove = False, commands_to_prepare, internal_ssl, instance_patches,
        extra_objects, guarantees or GPUs, nor on a cluster (yet): those spawns take the
        usual path. Each member holds the memory of an idle server (about 80 MiB).
        Example: `c.LxdSpawner.warm_pool_size = 2`.""",
    )
    warm_pool_remove_on_exit = Bool(
        False,
        config=True,
        help="""Delete the pool's containers when the hub exits. Default False: like servers,
        they stay across a hub restart, and the restarted hub uses them.""",
    )
    warm_pool_check_interval = Float(
        60.0,
        config=True,
        help="""Seconds between the pool's checks that its images have not moved (an alias
        pointing at a new image replaces the members) and that it is full.""",
    )

    @validate("warm_pool_size")
    def _check_pool_size(self, proposal: dict) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"warm_pool_size = {proposal['value']!r}: must be 0 or more")
        return proposal["value"]

    # -- the spawn's part (LxdSpawner's start() calls these) ----------------------------------

    #: What the user chose (profiles.Selection), set by start(): part of the lineage.
    _selection: Any = None

    def _why_not_warm(self, daemon: Daemon, need: Any, *, free_value: bool) -> str | None:
        """Why this spawner's spawns on ``daemon`` take the usual path (see :func:`why_not`)."""
        return why_not(
            size=self.warm_pool_size,
            kept=False,
            remove=self.remove,
            patched=bool(self.instance_patches or self.extra_objects),
            prepare=bool(self.commands_to_prepare),
            internal_ssl=bool(self.internal_ssl),
            guarantees=bool(need),
            free_value=free_value,
            clustered=daemon.clustered,
        )

    async def _want(self, daemon: Daemon, spec: objects.ServerSpec, lineage: str) -> Wanted | None:
        """Register ``spec``'s definition with the daemon's pool (see WarmPool.want)."""
        wanted = await daemon.pool.want(
            spec,
            self._source(None),
            lineage=lineage,
            size=self.warm_pool_size,
            prefix=self.name_prefix,
            check_interval=self.warm_pool_check_interval,
        )
        if wanted is not None and self.warm_pool_remove_on_exit:
            _remove_on_exit(daemon, spec.hub)
        return wanted

    async def _take_warm(self, daemon: Daemon, spec: objects.ServerSpec, need: Any) -> str | None:
        """A pool member for this spawn (None: today's path), the pool registered and refilled."""
        selection = self._selection
        why = self._why_not_warm(
            daemon, need, free_value=bool(selection is not None and selection.uses_free_value)
        )
        if why is not None:
            if self.warm_pool_size:
                self.log.info("%s: not from the warm pool: %s", self._log_name, why)
            return None
        lineage = lineage_of(
            self.image,
            selection.profile.slug if selection is not None else "",
            selection.choices if selection is not None else {},
        )
        wanted = await self._want(daemon, spec, lineage)
        if wanted is None:
            return None
        taken = daemon.pool.take(wanted, spec.hub)
        if taken is None:
            self.log.info("%s: the warm pool is empty (it is being filled)", self._log_name)
        return taken

    def _warm_ahead(self) -> None:
        """Fill the pool of this spawner's definition now, in the background, rather than at
        the definition's first spawn: called when JupyterHub makes the spawner, which is at
        the hub's start for the servers running, and at a user's first page (home, spawn) for
        the others. So a class that logs in at nine finds the pool full, and a restarted hub
        refills and checks its pool at once. Only without profile_list: there the definition
        is the user's choice, known at the spawn (and applying a profile changes the
        spawner's settings, which a spawn may be using). Once per definition and daemon per
        process, whatever the number of users."""
        if self.warm_pool_size <= 0 or self.profile_list:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # made outside the hub's loop (a script, a test): nothing to do
            return
        task = loop.create_task(self._prewarm())
        _prewarms.add(task)
        task.add_done_callback(_prewarms.discard)

    async def _prewarm(self) -> None:
        lineage = lineage_of(self.image, "", {})
        try:
            daemon = self.daemon(self.remote_to_start_on())
            if lineage in daemon.pool.warmed:
                return
            daemon.pool.warmed.add(lineage)
            # Without profile_list this is the one definition the hub can want: members of
            # another lineage (an image setting since changed) are no one's, and go.
            daemon.pool.only_lineages[self.hub_id] = {lineage}
            await daemon.ready()
            if self._why_not_warm(daemon, self._need(), free_value=False) is not None:
                return  # the spawn says why, in its user's log line
            from . import hardening

            spec = await hardening.harden(
                daemon, self._hardening(daemon), self._spec(0, 0, "/", ())
            )
            wanted = await self._want(daemon, spec, lineage)
            if wanted is None:
                return
            daemon.pool.refill(spec.hub)
            daemon_log.info("warm pool: filling %d of %s ahead of spawns", wanted.size, lineage)
        except Exception as e:  # the first spawn takes today's path, and says why
            daemon_log.warning(
                "warm pool: not filled ahead of the first spawn: %s", getattr(e, "message", e)
            )

    async def _start_warm(
        self,
        daemon: Daemon,
        name: str,
        spec: objects.ServerSpec,
        data: volumes.Prepared,
        files: Iterable[tuple[str, bytes, int]],
    ) -> str:
        """Claim the pool member ``name`` for this server; its address once it answers."""
        self.instance_name = name
        spec = dataclasses.replace(spec, instance=name)
        client = await daemon.client()
        self._emit(f"Taking the preloaded container {name} from the warm pool", 10)
        claimed = False
        try:
            await daemon.make_volumes(data, None, self._emit)
            instance = await client.get_instance(name)
            self.member = instance.get("location") or ""
            env = await self._server_env(daemon, instance)
            self._emit("Handing it to you: volumes, configuration, your identity", 30)
            await self._step(
                "claim",
                daemon.pool.claim(
                    name,
                    spec,
                    env,
                    files,
                    allow_uid0=self.min_uid <= 0,
                    allow_gid0=self.min_gid <= 0,
                    timeout=self.start_timeout,
                ),
            )
            claimed = True
            ip = await self._step("ipv4", daemon.wait_ipv4(name, self.start_timeout))
            self._emit(f"Waiting for the server at {ip}:{self.port}", 80)
            await self._step("server", self._wait_http(daemon, name, ip))
        except BaseException as e:
            await daemon.cleanup_failed_start(
                name,
                self.owner,
                delete=True,
                timeout=self.stop_timeout + 10,
                objects=self._object_kinds(),
            )
            if not claimed and isinstance(e, LxdError):  # the member failed, not the user
                # The volumes made now stay for the usual path (which discards them if it fails).
                self.log.warning(
                    "%s: claiming %s failed (%s): the usual path", self._log_name, name, e.message
                )
                raise ClaimFailed(name) from e
            if not claimed:  # the server never ran: nothing can be on a volume made now
                await daemon.discard_volumes(data, None)
            raise
        return ip


#: The background fills started by spawners being made (kept referenced while they run).
_prewarms: set[asyncio.Task] = set()


class ClaimFailed(Exception):
    """A pool member could not be claimed (and is deleted); nothing of the server ran: the
    spawn goes on by the usual path."""


_exit_hooks: set[tuple[int, str]] = set()


def _remove_on_exit(daemon: Daemon, hub: str) -> None:
    """warm_pool_remove_on_exit: delete the pool's members as the hub's process ends (its
    event loop has stopped then: a loop of its own, and a client of its own)."""
    if (id(daemon), hub) in _exit_hooks:
        return
    _exit_hooks.add((id(daemon), hub))
    import atexit

    from .daemon import Daemon as DaemonClass

    def remove() -> None:
        async def run() -> None:
            fresh = DaemonClass(daemon.remote, timeout=daemon.timeout)
            try:
                gone = await fresh.pool.remove_all(hub)
                if gone:
                    daemon_log.info("warm pool: deleted %s at exit", ", ".join(gone))
            finally:
                await fresh.close()

        try:
            asyncio.run(run())
        except Exception as e:
            daemon_log.warning("warm pool: not deleted at exit: %s", e)

    atexit.register(remove)
