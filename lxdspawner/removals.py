"""Deleting a server's container once LXD has torn it down, without the user waiting for it.

A container whose server has exited powers off by itself (see objects.server_unit). LXD then
runs its stop hooks, which release the container's network devices and storage; deleting it
before they end makes them fail and leaks its host-side veth pair. LXD reports the container
"Stopped" a moment before the hooks end, and says when they have ended with a lifecycle event
(``instance-shutdown``, or ``instance-stopped`` for a stop through the API), which the
instance cache follows. So the deletion waits for that event, here, in the background.

stop() returns once the server has exited, as JupyterHub's local-process spawner does once
the process is gone; a new start of the same server waits for the deletion. JupyterHub
cancels every task when it exits, so an exit handler finishes whatever is left: no container
is left behind.

A server's extra objects (see extraobjects.py) go once its container is deleted, here too,
the exit handler's deletions included: they are found by the server's keys.

A deletion waits ``delay`` seconds after the teardown, then while spawns are in flight on the
same daemon (see :meth:`Removals.spawning`), ``defer_max`` seconds at most in all, and
``parallel`` run at a time. Why (see benchmarks/changeover.py and README "Performance"): the
daemon's DELETE returns within a second, but on btrfs with quotas on (LXD's root disk sizes
need them) the kernel then drops the subvolume in the background (its ``btrfs-cleaner``
thread), accounting each extent to its quota groups: 0.5 to 0.7 s of CPU per container on
the development machine, 3.5 to 3.8 s of it inside the next burst when a class of ten
stopped 2 s before it. The deletions that come while a burst runs wait for its end, and
``delay`` (``removal_delay``, 0 by default) holds back those of the class that just stopped.
A stopped container costs nothing while it waits but its disk blocks, which the image
shares; a new start of the same server needs its name, so waiting for it
(:meth:`Removals.wait`) lets its deletion go at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager

from . import extraobjects
from .cache import InstanceCache
from .lxd import LxdClient, LxdError, NotFound, Remote
from .ownership import Owner

#: A server's extra objects to delete with its container: (its owner, their kinds).
Objects = tuple[Owner, tuple[str, ...]]


class Removals:
    """The deletions in progress on one daemon (``remote``), for all the spawners of a hub.

    ``delay``: how long after its teardown a deletion waits before anything else;
    ``defer_max``: the longest it waits (the delay included) while spawns are in flight (0:
    it does not wait for them); ``parallel``: how many deletions the daemon is asked for at
    once.
    """

    def __init__(
        self,
        remote: Remote,
        *,
        delay: float = 0.0,
        defer_max: float = 120.0,
        parallel: int = 2,
    ) -> None:
        self.remote = remote
        self.delay = delay
        self.defer_max = defer_max
        self.parallel = parallel
        self._tasks: dict[str, asyncio.Task] = {}
        self._spawns = 0
        self._urgent: set[str] = set()
        self._running = 0
        #: Set (and replaced) whenever a waiting deletion may go: a spawn ended, one is urgent,
        #: a deletion ended.
        self._wake = asyncio.Event()

    def _poke(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around a spawn's work on this daemon: deletions wait until no spawn is in flight
        (or for ``defer_max`` at most)."""
        self._spawns += 1
        try:
            yield
        finally:
            self._spawns -= 1
            if not self._spawns:
                self._poke()

    @property
    def spawns_in_flight(self) -> int:
        return self._spawns

    @contextlib.asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """Until ``name``'s deletion may be sent, then while it runs: ``delay`` passed and no
        spawn in flight (or ``defer_max`` passed, or a new start of the server waits for it),
        and fewer than ``parallel`` deletions running."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        settled = now + self.delay
        deadline = now + max(self.defer_max, self.delay)
        while True:
            wake = self._wake
            now = loop.time()
            if name in self._urgent or now >= deadline:
                free = True
            elif now < settled:
                free = False
            else:
                free = not self._spawns
            if free and self._running < max(1, self.parallel):
                break
            timeout = None if free else max(0.0, (settled if now < settled else deadline) - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._poke()

    def start(
        self,
        client: LxdClient,
        cache: InstanceCache,
        name: str,
        *,
        teardown_timeout: float,
        log: logging.Logger,
        objects: Objects | None = None,
    ) -> None:
        """``objects``: the server's extra objects, deleted once its container is."""
        if name not in self._tasks:
            self._tasks[name] = asyncio.ensure_future(
                self._run(client, cache, name, teardown_timeout, log, objects)
            )

    def pending(self, name: str) -> bool:
        return name in self._tasks

    async def wait(self, name: str) -> None:
        """Until the deletion of ``name`` has ended (whether it worked or not)."""
        task = self._tasks.get(name)
        if task is not None:
            self._urgent.add(name)
            self._poke()
            with contextlib.suppress(Exception):  # a container left over is deleted anyway
                await asyncio.shield(task)

    async def _run(
        self,
        client: LxdClient,
        cache: InstanceCache,
        name: str,
        teardown_timeout: float,
        log: logging.Logger,
        objects: Objects | None = None,
    ) -> None:
        key = (self.remote, name)
        _unfinished.add(key)
        if objects and objects[1]:
            _objects[key] = objects
        _finish_at_exit.register()
        try:
            await delete_once_torn_down(
                client, cache, name, teardown_timeout, log.info, turn=self._turn
            )
        except asyncio.CancelledError:
            raise  # left in _unfinished for the exit handler
        except LxdError as e:
            _unfinished.discard(key)
            _objects.pop(key, None)
            log.warning("deleting %s after its server stopped: %s", name, e.message)
        else:
            _unfinished.discard(key)
            objects = _objects.pop(key, None)
            if objects:
                await extraobjects.delete_owned(client, *objects)
        finally:
            self._urgent.discard(name)
            if self._tasks.get(name) is asyncio.current_task():
                del self._tasks[name]


async def remove_once_torn_down(
    client: LxdClient,
    cache: InstanceCache | None,
    name: str,
    timeout: float,
    say: Callable[..., None] = lambda *a: None,
) -> None:
    """Stop by force through the API, and delete once LXD has torn the container down (at
    once if this stop did it: its operation ends after the teardown). Without a cache (none
    started for this daemon yet), the stop's own end is the only teardown there is to wait for.
    """
    if cache is None:
        return await client.remove_instance(name)
    try:
        if await client.shut_down(name, timeout=0, force=True):
            cache.note_torn_down(name)
    except NotFound:
        cache.note(name, deleted=True)
        return
    await delete_once_torn_down(client, cache, name, timeout, say)


async def delete_once_torn_down(
    client: LxdClient,
    cache: InstanceCache,
    name: str,
    timeout: float,
    say: Callable[..., None] = lambda *a: None,
    *,
    turn: Callable[[str], AbstractAsyncContextManager] | None = None,
) -> None:
    """Delete ``name`` once LXD has torn it down; inside ``turn(name)`` if given (a
    :class:`Removals`' schedule)."""
    if not await cache.wait_torn_down(name, timeout):
        # Not seen (the event stream was down, or the container hangs in its shutdown): a
        # stop through the API, whose operation ends after the teardown, and by now by force.
        say("no teardown of %s seen within %.0f s; stopping it through the API", name, timeout)
        try:
            await client.shut_down(name, timeout=0, force=True)
        except NotFound:
            return
    async with turn(name) if turn is not None else contextlib.nullcontext():
        await client.delete_stopped_instance(name)
    cache.note(name, deleted=True)


class PendingStops:
    """Stops that failed (the daemon did not answer): tried again in the background until
    one works, so no server the hub let go of keeps running. A new start of the same server
    takes over (it stops or deletes the container itself)."""

    def __init__(self, first_delay: float = 5.0, max_delay: float = 60.0) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._tasks: dict[str, asyncio.Task] = {}

    def retry(self, name: str, stop: Callable[[], Awaitable[None]], log: logging.Logger) -> None:
        if name not in self._tasks:
            self._tasks[name] = asyncio.ensure_future(self._run(name, stop, log))

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def _run(
        self, name: str, stop: Callable[[], Awaitable[None]], log: logging.Logger
    ) -> None:
        delay = self.first_delay
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await stop()
                except (LxdError, asyncio.TimeoutError) as e:
                    log.warning("stopping %s again: %s", name, getattr(e, "message", e))
                    delay = min(delay * 2, self.max_delay)
                    continue
                log.info("stopped %s, whose stop had failed", name)
                return
        finally:
            if self._tasks.get(name) is asyncio.current_task():
                del self._tasks[name]


#: (daemon, instance name) of deletions that have not finished yet.
_unfinished: set[tuple[Remote, str]] = set()
#: The extra objects to delete after those of them that have them.
_objects: dict[tuple[Remote, str], Objects] = {}


class _FinishAtExit:
    registered = False

    def register(self) -> None:
        if not self.registered:
            atexit.register(self)
            self.registered = True

    def __call__(self, timeout: float = 60.0) -> None:
        pending = sorted(_unfinished, key=lambda p: (str(p[0]), p[1]))
        if pending:
            with contextlib.suppress(Exception):
                asyncio.run(asyncio.wait_for(_finish(pending), timeout))


# At exit the teardown event of a container may have come before the new stream connected:
# wait that long for it, then delete (the hooks take well under a second).
_EXIT_TEARDOWN_WAIT = 3.0


async def _finish(pending: list[tuple[Remote, str]]) -> None:
    """Each daemon's deletions, all daemons at once: one that does not answer (a remote
    that is down) neither delays nor stops the others'."""
    results = await asyncio.gather(
        *(_finish_on(r, pending) for r in dict.fromkeys(r for r, _ in pending)),
        return_exceptions=True,
    )
    for remote, result in zip(dict.fromkeys(r for r, _ in pending), results, strict=True):
        if isinstance(result, BaseException):
            print(f"lxdspawner: could not delete on {remote} on exit: {result}", file=sys.stderr)


async def _finish_on(remote: Remote, pending: list[tuple[Remote, str]]) -> None:
    async with remote.client() as client:
        names = [name for r, name in pending if r == remote]
        cache = InstanceCache(client)
        await cache.start()
        for name in names:  # a fresh list takes those that read "Stopped" as torn down
            cache.expect_teardown(name)
        results = await asyncio.gather(
            *(delete_once_torn_down(client, cache, n, _EXIT_TEARDOWN_WAIT) for n in names),
            return_exceptions=True,
        )
        await cache.stop()
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                # The hub's log is closed by now: say it where its output goes.
                print(f"lxdspawner: could not delete {name} on exit: {result}", file=sys.stderr)
            elif (remote, name) in _objects:
                with contextlib.suppress(Exception):
                    await extraobjects.delete_owned(client, *_objects.pop((remote, name)))


_finish_at_exit = _FinishAtExit()
