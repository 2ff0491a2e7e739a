"""One shared, event-fed view of our instances per daemon (the idea of KubeSpawner's reflector).

Every spawner of the hub reads it, so ``poll()`` of hundreds of users costs no API request:
the cache lists our instances once (those carrying ``user.jupyterhub.managed-by``), then
follows the ``/1.0/events`` websocket. It relists periodically, after every reconnect (a
daemon restart drops the stream: what happened meanwhile is only in a fresh list) and after
any error, and restarts a stream that has gone quiet for too long. On a cluster it also reads
the members' status every ``member_interval`` seconds (one request for the whole hub), so
servers on a member that went offline are known.

It is a view, not the truth: callers that see something other than what they expect (a
server they believe running shown as stopped or missing) confirm with one direct request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from . import capacity
from .lxd import LxdClient, LxdError, NotFound
from .lxd.client import CONNECTED
from .ownership import (
    KEY_HUB,
    KEY_LINEAGE,
    KEY_MANAGED,
    KEY_POOL,
    KEY_SERVER,
    KEY_USER,
    MANAGED_BY,
)

# With the warm pool's keys: a member is known from the cache (warmpool.py).
_OWNERSHIP_KEYS = (KEY_MANAGED, KEY_HUB, KEY_USER, KEY_SERVER, KEY_POOL, KEY_LINEAGE)

log = logging.getLogger(__name__)

# Lifecycle actions whose outcome we know without asking the daemon.
_STATUS_AFTER = {
    "instance-started": "Running",
    "instance-restarted": "Running",
    "instance-resumed": "Running",
    "instance-paused": "Frozen",
    "instance-stopped": "Stopped",
    "instance-shutdown": "Stopped",
}

# Sent only once LXD has torn a stopped container down (its stop hooks have released its
# network devices and storage), or deleted it. Deleting a container before that makes the
# hooks fail and leaks its host-side veth pair, as a container that powers off by itself reads
# "Stopped" a moment before.
_TORN_DOWN = ("instance-stopped", "instance-shutdown", "instance-deleted")
_STARTED = ("instance-started", "instance-restarted")


def _next_event(iterator) -> asyncio.Future:
    pending = asyncio.ensure_future(iterator.__anext__())
    # When the stream closes under a wait (a reconnect, the hub's exit), nobody reads its
    # outcome: read it here, or asyncio logs "Task exception was never retrieved".
    pending.add_done_callback(lambda f: f.cancelled() or f.exception())
    return pending


@dataclass(frozen=True)
class CachedInstance:
    name: str
    status: str
    location: str
    user: str
    server: str
    #: Its ownership keys as LXD has them (see ownership.Owner.owns).
    keys: tuple[tuple[str, str], ...] = ()
    #: The guarantees and GPUs its keys record (capacity.py).
    usage: capacity.Usage = capacity.NOTHING

    @property
    def config(self) -> dict[str, str]:
        return dict(self.keys)


def _from_api(instance: dict) -> CachedInstance:
    config = instance.get("config") or {}
    return CachedInstance(
        name=instance["name"],
        status=instance.get("status", ""),
        location=instance.get("location") or "",
        user=config.get(KEY_USER, ""),
        server=config.get(KEY_SERVER, ""),
        keys=tuple((k, config[k]) for k in _OWNERSHIP_KEYS if k in config),
        usage=capacity.usage_of(config),
    )


def _is_ours(instance: dict) -> bool:
    return (instance.get("config") or {}).get(KEY_MANAGED) == MANAGED_BY


class InstanceCache:
    """Our instances on one daemon, kept current by its events."""

    def __init__(
        self,
        client: LxdClient,
        *,
        resync_interval: float = 300.0,
        quiet_timeout: float = 600.0,
        member_interval: float = 10.0,
    ):
        self.client = client
        self.resync_interval = resync_interval
        self.quiet_timeout = quiet_timeout
        self.member_interval = member_interval
        self._member_down_since: dict[str, float] = {}
        self._instances: dict[str, CachedInstance] = {}
        # Kept with every change so placement reads it in O(members), not O(instances).
        self._counts: Counter = Counter()
        self._healthy = False
        self._last_message = 0.0
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        # Names of containers that LXD has started and not yet reported torn down.
        self._up: set[str] = set()

    # -- reading ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while the view is complete and the event stream is connected."""
        return self._healthy and self._task is not None and not self._task.done()

    def get(self, name: str) -> CachedInstance | None:
        return self._instances.get(name)

    def instances(self) -> list[CachedInstance]:
        return list(self._instances.values())

    def count_by_location(self) -> Counter:
        """Our instances per cluster member (a copy)."""
        return +self._counts

    def usage_by_location(self) -> dict[str, capacity.Usage]:
        """What our servers are guaranteed and hold, per member: those not Stopped (a kept,
        stopped container holds no memory, CPU or GPU). One pass over our instances, made
        only for a spawn that asks for guarantees or GPUs."""
        usage: dict[str, capacity.Usage] = {}
        for i in self._instances.values():
            if i.status != "Stopped" and i.usage != capacity.NOTHING:
                usage[i.location] = usage.get(i.location, capacity.NOTHING) + i.usage
        return usage

    def _put(self, entry: CachedInstance) -> None:
        self._drop(entry.name)
        self._instances[entry.name] = entry
        self._counts[entry.location] += 1

    def _drop(self, name: str) -> None:
        old = self._instances.pop(name, None)
        if old is not None:
            self._counts[old.location] -= 1

    def member_down_for(self, member: str) -> float:
        """Seconds ``member`` has been seen neither Online nor Evacuated without a break
        (0 when it is up). A busy member can miss heartbeats for a few seconds and look
        Offline: callers act only on a member that stays down."""
        since = self._member_down_since.get(member)
        return time.monotonic() - since if since is not None else 0.0

    def note_member_up(self, member: str) -> None:
        """``member`` answered (between two reads of the members' status)."""
        self._member_down_since.pop(member, None)

    async def refresh_members(self) -> None:
        """Cluster members' status: one request for the whole hub, every member_interval."""
        members = await self.client.cluster_members()
        now = time.monotonic()
        for m in members:
            name = m.get("server_name", "")
            if m.get("status") in ("Online", "Evacuated"):
                self._member_down_since.pop(name, None)
            else:
                self._member_down_since.setdefault(name, now)

    # -- writing (what a spawner just did, before its event arrives) --------------------------

    def note(self, name: str, *, status: str | None = None, deleted: bool = False) -> None:
        if deleted:
            self._drop(name)
            self._up.discard(name)
        elif status and name in self._instances:
            self._put(replace(self._instances[name], status=status))

    def expect_teardown(self, name: str) -> None:
        """``name`` runs and is about to stop (its start event may not be here yet)."""
        self._up.add(name)

    def note_torn_down(self, name: str) -> None:
        """A stop through the API has ended: its operation ends after the teardown."""
        self._up.discard(name)

    async def wait_torn_down(self, name: str, timeout: float) -> bool:
        """Wait until LXD has torn ``name`` down after its stop (or it is gone); False if
        that was not seen within ``timeout`` (the event stream may have been down)."""

        def done() -> bool:
            return name not in self._up

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(done), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def note_instance(self, instance: dict) -> None:
        if not _is_ours(instance):
            # Its keys were changed (or it never was ours): a stop or a delete that read
            # this view would otherwise trust keys it no longer has.
            self._drop(instance["name"])
            return
        self._put(_from_api(instance))
        if instance.get("status") == "Running":
            self._up.add(instance["name"])

    # -- running ----------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Start following the daemon, and wait for the first complete list."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        if not self._synced.is_set():
            # Not through wait_for once synced: before Python 3.12 it swallows a cancellation
            # that comes as the wait ends, and the caller's task (a stop being retried, which
            # a new start of the server cancels) would go on.
            await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._healthy = False

    async def resync(self) -> None:
        """Replace the view with a fresh list of our instances (one request)."""
        listed = await self.client.list_instances(recursion=1)
        self._instances = {i["name"]: _from_api(i) for i in listed if _is_ours(i)}
        # One listed as stopped is taken as torn down: a list falls into the half second
        # before the event only by a rare chance (it comes every resync_interval, and after a
        # reconnect, when the event may be lost).
        self._up = {name for name, i in self._instances.items() if i.status != "Stopped"}
        self._counts = Counter(i.location for i in self._instances.values())
        self._synced.set()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, name: str, predicate, timeout: float) -> CachedInstance | None:
        """Wait until ``predicate(self.get(name))`` holds; return that entry (or None)."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: predicate(self._instances.get(name))), timeout
            )
        return self._instances.get(name)

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep following whatever happens; relist on the way back
                log.warning("instance cache for %s: %s; relisting", self.client.where, e)
            self._healthy = False
            await asyncio.sleep(1)

    async def _follow(self) -> None:
        events = self.client.events(types=("lifecycle",), reconnect=False)
        iterator = events.__aiter__()
        pending: asyncio.Future | None = None
        try:
            # Connected first, then listed: nothing that happens in between is missed.
            connected = await asyncio.wait_for(iterator.__anext__(), self.client.timeout)
            if connected.get("type") != CONNECTED:
                raise LxdError(f"unexpected first event {connected!r}")
            await self.resync()
            log.info(
                "instance cache for %s: following its events (%d instances of lxdspawner)",
                self.client.where,
                len(self._instances),
            )
            self._healthy = True
            self._last_message = time.monotonic()
            last_resync = time.monotonic()
            pending = _next_event(iterator)
            clustered = self.client.dialect is not None and self.client.dialect.clustered
            last_members = 0.0
            while True:
                now = time.monotonic()
                if clustered and now - last_members >= self.member_interval:
                    await self.refresh_members()
                    last_members = now
                timeout = min(self.resync_interval, self.quiet_timeout)
                if clustered:
                    timeout = min(timeout, self.member_interval)
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                now = time.monotonic()
                if done:
                    try:
                        event = pending.result()
                    except StopAsyncIteration:
                        raise LxdError("the event stream closed") from None
                    self._last_message = now
                    await self._apply(event)
                    pending = _next_event(iterator)
                elif now - self._last_message > self.quiet_timeout:
                    pending.cancel()
                    raise LxdError(f"no event for {self.quiet_timeout:g} s")
                if now - last_resync > self.resync_interval:
                    await self.resync()
                    last_resync = now
        finally:
            # A read in flight holds the stream: aclose() cannot end it ("already running"),
            # so the stream would stay open, read by nobody. Cancelling the read ends it.
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()

    async def _apply(self, event: dict) -> None:
        meta = event.get("metadata") or {}
        action = meta.get("action", "")
        source = urlsplit(meta.get("source", "")).path
        if not action.startswith("instance-") or not source.startswith("/1.0/instances/"):
            return
        if self.client.project and event.get("project", "default") != self.client.project:
            return
        name = source.rsplit("/", 1)[-1]
        if action in _TORN_DOWN:
            self._up.discard(name)
        elif action in _STARTED:
            self._up.add(name)
        if action == "instance-deleted":
            self._drop(name)
        elif action in _STATUS_AFTER and name in self._instances:
            self._put(replace(self._instances[name], status=_STATUS_AFTER[action]))
        elif action in ("instance-created", "instance-updated", "instance-renamed") or (
            action in _STATUS_AFTER and name not in self._instances
        ):
            # Only these need the instance itself: is it ours, where is it?
            try:
                self.note_instance(await self.client.get_instance(name))
            except NotFound:
                self._drop(name)
            if action == "instance-renamed":
                old = (meta.get("context") or {}).get("old_name")
                if old:
                    self._drop(old)
        else:
            return
        async with self._changed:
            self._changed.notify_all()
