"""The warm pool of one daemon (see pool.py for what it is and its rules): which members it
keeps, taking one for a spawn, refilling in the background, replacing members whose definition
is no longer wanted, and the claim itself.

Members are known by their keys, never by name: our hub key, the pool's key and lineage
(:data:`pool.KEY_POOL`, :data:`pool.KEY_LINEAGE`) and no user key. They are read from the
daemon's event-fed cache, so a restarted hub finds the members its predecessor made and uses
them (their key is the definition's hash: the same settings give the same key). A member is
handed to one spawn only (:meth:`WarmPool.take` has no await between choosing and marking),
and once claimed it carries its user's keys: from then on it is that server's container,
stopped and deleted as every server's is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import names, objects, pool
from .lxd import LxdError, NotFound
from .ownership import KEY_HUB, KEY_USER

if TYPE_CHECKING:
    from .cache import CachedInstance
    from .daemon import Daemon, Source

log = logging.getLogger("lxdspawner.pool")


@dataclasses.dataclass
class _Entry:
    wanted: pool.Wanted
    source: Source
    prefix: str


class WarmPool:
    """The members of one daemon's pool, per definition (its key)."""

    #: Members made at once, for all definitions: a refill must not slow the spawns.
    CONCURRENCY = 2
    #: After a member of a definition failed to be made, seconds before the next try,
    #: doubled at each failure in a row up to the last: a definition that cannot work (an
    #: image without systemd, a full pool) must not keep the daemon busy.
    RETRY_DELAYS = (15.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        #: lineage -> what it wants now.
        self._wanted: dict[str, _Entry] = {}
        #: Members handed to a spawn (their keys may not say so yet).
        self._taken: set[str] = set()
        #: Members being made, per key.
        self._making: Counter[str] = Counter()
        #: The names of those (stopped until their start: not stale).
        self._creating: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._limit = asyncio.Semaphore(self.CONCURRENCY)
        self._checker: asyncio.Task | None = None
        #: key -> (failures in a row, loop time before which no member is made).
        self._failed: dict[str, tuple[int, float]] = {}
        #: Lineages a spawner has filled ahead of their first spawn (PoolSettings._warm_ahead).
        self.warmed: set[str] = set()
        #: hub -> the only lineages its configuration can want (known without profile_list:
        #: one), so members of any other lineage are no one's and go; None: not known.
        self.only_lineages: dict[str, set[str]] = {}

    # -- what there is ------------------------------------------------------------------------

    def members(self, hub: str, key: str | None = None) -> list[CachedInstance]:
        """This hub's pool members (of ``key``), from the cache, not yet taken."""
        cache = self.daemon._cache
        if cache is None:
            return []
        found = []
        for i in cache.instances():
            config = i.config
            if config.get(KEY_HUB) != hub or not config.get(pool.KEY_POOL):
                continue
            if config.get(KEY_USER) or i.name in self._taken:
                continue
            if key is None or config.get(pool.KEY_POOL) == key:
                found.append(i)
        return sorted(found, key=lambda i: i.name)

    # -- what is wanted -------------------------------------------------------------------------

    async def want(
        self,
        spec: objects.ServerSpec,
        source: Source,
        *,
        lineage: str,
        size: int,
        prefix: str,
        check_interval: float = 60.0,
        max_age: float = 30.0,
    ) -> pool.Wanted | None:
        """The pool's definition for a spawn of ``spec`` (hardened, its user's parts are
        left out); registers it, so it is kept full, and replaces members of the same lineage
        made from another definition. None when the image cannot be resolved (the spawn's
        own create then says why)."""
        client = await self.daemon.client()
        await self.daemon.cache()
        try:
            fingerprint = await client.image_fingerprint(source.image, max_age=max_age)
        except LxdError as e:
            log.warning("warm pool: image %r: %s", source.image, e.message)
            return None
        if fingerprint is None:
            return None
        definition = pool.definition(
            spec,
            fingerprint=fingerprint,
            shared_directories=source.shared_directories,
            clone_shifted_base=source.clone_shifted_base,
        )
        key = pool.key_of(definition)
        member_spec = dataclasses.replace(
            pool.user_free(spec),
            extra_config={
                **spec.extra_config,
                pool.KEY_POOL: key,
                pool.KEY_LINEAGE: lineage,
            },
        )
        wanted = pool.Wanted(key=key, lineage=lineage, spec=member_spec, size=size)
        previous = self._wanted.get(lineage)
        if previous is not None and previous.wanted == wanted:
            return previous.wanted  # as it was: the members being made go on
        self._wanted[lineage] = _Entry(wanted, dataclasses.replace(source, member=None), prefix)
        if previous is None or previous.wanted.key != key:
            self._replace_stale(spec.hub)
        if self._checker is None or self._checker.done():
            self._checker = asyncio.ensure_future(self._check_every(spec.hub, check_interval))
        return wanted

    def take(self, wanted: pool.Wanted, hub: str) -> str | None:
        """A running member of ``wanted``'s definition, now this spawn's (None: none ready);
        the pool is refilled in the background either way."""
        ready = [m for m in self.members(hub, wanted.key) if m.status == "Running"]
        name = ready[0].name if ready else None
        if name is not None:
            self._taken.add(name)
        self.refill(hub)
        return name

    def refill(self, hub: str) -> None:
        """Start making what each wanted definition lacks (in the background)."""
        now = asyncio.get_running_loop().time()
        for entry in list(self._wanted.values()):
            key = entry.wanted.key
            if self._failed.get(key, (0, 0.0))[1] > now:
                continue
            have = len(self.members(hub, key)) + self._making[key]
            for _ in range(max(0, entry.wanted.size - have)):
                self._making[key] += 1
                self._spawn_task(self._make(entry))

    def _spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _make(self, entry: _Entry) -> None:
        key = entry.wanted.key
        name = names.pool_member_name(entry.prefix, key, secrets.token_hex(4))
        self._creating.add(name)
        try:
            async with self._limit:
                now = self._wanted.get(entry.wanted.lineage)
                if now is None or now.wanted.key != key:
                    return  # replaced meanwhile
                await self._create(name, entry)
            self._failed.pop(key, None)
            log.info("warm pool: %s is ready (definition %s)", name, key)
        except Exception as e:  # a later claim or check tries again
            failures = self._failed.get(key, (0, 0.0))[0]
            delay = self.RETRY_DELAYS[min(failures, len(self.RETRY_DELAYS) - 1)]
            self._failed[key] = (failures + 1, asyncio.get_running_loop().time() + delay)
            log.warning(
                "warm pool: making %s failed: %s; the next try in %.0f s",
                name,
                getattr(e, "message", e),
                delay,
            )
            with contextlib.suppress(Exception):
                await self.daemon.remove(name, entry.source.teardown_timeout)
        finally:
            self._making[key] -= 1
            self._creating.discard(name)

    async def _create(self, name: str, entry: _Entry) -> None:
        client = await self.daemon.client()
        cache = await self.daemon.cache()
        spec = dataclasses.replace(entry.wanted.spec, instance=name)
        await self.daemon.create(spec, entry.source)
        await client.make_directory(name, objects.CONFIG_DIR, mode=0o755)
        await client.make_directory(name, pool.CLAIM_DIR, mode=0o700)
        await client.push_file(name, pool.PRELOADER_PATH, pool.preloader_source(), mode=0o644)
        await client.push_file(name, objects.UNIT_PATH, pool.member_unit(), mode=0o644)
        await client.make_symlink(name, objects.UNIT_WANTS_LINK, f"../{objects.UNIT_NAME}")
        await client.start_instance(name, timeout=entry.source.timeout)
        cache.note_instance(await client.get_instance(name))

    # -- replacing -----------------------------------------------------------------------------

    def _replace_stale(self, hub: str) -> None:
        """Delete this hub's members that no wanted definition of their lineage has (an
        image moved, a setting changed), those of a lineage the hub's settings can no longer
        want (:attr:`only_lineages`: the image setting changed, profile_list removed) and
        those that stopped (their preloader ended)."""
        keys = {e.wanted.lineage: e.wanted.key for e in self._wanted.values()}
        timeout = max((e.source.teardown_timeout for e in self._wanted.values()), default=30.0)
        for member in self.members(hub):
            if member.name in self._creating:
                continue
            lineage = member.config.get(pool.KEY_LINEAGE, "")
            stale = lineage in keys and member.config.get(pool.KEY_POOL) != keys[lineage]
            only = self.only_lineages.get(hub)
            unwanted = only is not None and lineage not in only
            if stale or unwanted or member.status == "Stopped":
                self._taken.add(member.name)  # nobody takes it meanwhile
                log.info(
                    "warm pool: deleting %s (%s)",
                    member.name,
                    "its definition is replaced"
                    if stale
                    else "no setting of this hub wants its definition any more"
                    if unwanted
                    else "stopped",
                )
                self._spawn_task(self._delete(member.name, hub, timeout))

    async def _delete(self, name: str, hub: str, timeout: float) -> None:
        """Delete the member ``name`` if it still is one of this hub's (read afresh)."""
        try:
            client = await self.daemon.client()
            config = (await client.get_instance(name)).get("config") or {}
            if config.get(KEY_HUB) != hub or config.get(KEY_USER) or not config.get(pool.KEY_POOL):
                return
            await self.daemon.remove(name, timeout)
        except NotFound:
            pass
        except LxdError as e:
            log.warning("warm pool: deleting %s failed: %s", name, e.message)
            self._taken.discard(name)

    async def _check_every(self, hub: str, interval: float) -> None:
        """Every ``interval``: read the images' fingerprints again (an alias moved gives a
        new key: the old members are replaced), and fill the pool."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(hub)
            except Exception as e:  # the next round tries again
                log.warning("warm pool check: %s", getattr(e, "message", e))

    async def check(self, hub: str) -> None:
        """One round of :meth:`_check_every`."""
        for lineage, entry in list(self._wanted.items()):
            await self.want(
                _original(entry),
                entry.source,
                lineage=lineage,
                size=entry.wanted.size,
                prefix=entry.prefix,
                max_age=0,
            )
        self._replace_stale(hub)
        self.refill(hub)

    # -- the claim ----------------------------------------------------------------------------

    async def claim(
        self,
        name: str,
        spec: objects.ServerSpec,
        env: dict[str, str],
        files: Iterable[tuple[str, bytes, int]],
        *,
        allow_uid0: bool,
        allow_gid0: bool,
        timeout: float,
    ) -> None:
        """Make the member ``name`` the server of ``spec``: its user's keys and devices (hot-
        plugged), the environment file (the user's, 0600), the operator's files, then the
        claim that tells the preloader to go on."""
        client = await self.daemon.client()
        cache = await self.daemon.cache()
        try:
            claim = pool.claim_document(spec, allow_uid0=allow_uid0, allow_gid0=allow_gid0)
            environment = pool.env_document(spec, env)
        except ValueError as e:
            from .daemon import DaemonError

            raise DaemonError(f"the server's environment cannot be written: {e}") from e
        # Live: user keys and disk devices are applied to a running container. Incus answers
        # at once; an answer that is an operation is waited for.
        answer = await client.request(
            "PATCH",
            f"/1.0/instances/{name}",
            json_body={
                "config": objects.owner(spec).keys(),
                "devices": pool.member_devices(spec),
            },
        )
        if isinstance(answer, dict) and answer.get("id") and "status_code" in answer:
            await client.wait(answer, timeout=timeout)
        cache.note_instance(await client.get_instance(name))
        await client.push_file(
            name, pool.ENV_JSON_PATH, environment, uid=spec.uid, gid=spec.gid, mode=0o600
        )
        for container_path, data, mode in files:
            await client.push_file(name, container_path, data, mode=mode)
        await client.push_file(name, pool.CLAIM_PATH, claim, mode=0o600)

    def close(self) -> None:
        """Stop the checks and the members being made (the daemon's close)."""
        if self._checker is not None:
            self._checker.cancel()
        for task in list(self._tasks):
            task.cancel()

    # -- the hub's exit -------------------------------------------------------------------------

    async def remove_all(self, hub: str, timeout: float = 30.0) -> list[str]:
        """Delete every member of this hub's pool (warm_pool_remove_on_exit)."""
        self.close()
        await self.daemon.cache()
        doomed = [m.name for m in self.members(hub)]
        await asyncio.gather(*(self._delete(n, hub, timeout) for n in doomed))
        return doomed


def _original(entry: _Entry) -> objects.ServerSpec:
    """The spec ``want`` takes, from a wanted definition: its member spec without the pool's
    own keys (``want`` adds them again, with the key it computes)."""
    spec = entry.wanted.spec
    config = {
        k: v for k, v in spec.extra_config.items() if k not in (pool.KEY_POOL, pool.KEY_LINEAGE)
    }
    return dataclasses.replace(spec, extra_config=config)
