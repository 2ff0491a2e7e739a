"""What the hub knows about cluster members that LXD does not tell it (yet), per daemon.

- Spawns placed on a member and not finished: LXD counts a container only once it exists,
  so without them every spawn of a burst would pick the same least-loaded member.
- Members a spawn just failed on: LXD reports a member offline only after it missed
  heartbeats, so a retry would go straight back to the failing member.
- Containers that could not be deleted because their member was down: they are deleted
  once it answers again.
- What the spawns in flight are guaranteed and the GPUs they took (capacity.py), until
  their instance is in the cache with its keys, or the spawn has ended.
- Each member's memory, CPUs and GPUs (``/1.0/resources``), read only for spawns that ask
  for guarantees or GPUs, and kept: they change with the hardware.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass

from . import capacity, placement
from .lxd import LxdClient, LxdError

#: Seconds a member a spawn failed on is left out of placement.
SUSPECT_FOR = 30.0
#: Seconds a member's ``/1.0/resources`` answer is used (a change of the cluster's
#: membership reads them all again at once).
RESOURCES_FOR = 600.0
#: Seconds a member whose resources could not be read is left out before they are read again.
RESOURCES_RETRY = 10.0


@dataclass(frozen=True)
class Reservation:
    """Where a spawn was placed (None: a standalone daemon) and what it took there."""

    member: str | None
    instance: str = ""
    usage: capacity.Usage = capacity.NOTHING

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(sorted(self.usage.gpus))


class MemberBook:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.in_flight: Counter = Counter()
        self._suspects: dict[str, tuple[float, str]] = {}
        self._orphans: dict[str, Callable[[str], Awaitable[None]]] = {}
        self._reaper: asyncio.Task | None = None
        self._reserved: list[Reservation] = []
        #: member (None: standalone) -> (read again after, its resources or why unreadable)
        self._resources: dict[str | None, tuple[float, capacity.Resources | str]] = {}
        self._resources_of: frozenset[str] = frozenset()

    def placed(self, member: str | None, reservation: Reservation | None = None) -> None:
        if member:
            self.in_flight[member] += 1
        if reservation is not None and reservation.usage != capacity.NOTHING:
            self._reserved.append(reservation)

    def landed(self, member: str | None, reservation: Reservation | None = None) -> None:
        if member:
            self.in_flight[member] -= 1
            if self.in_flight[member] <= 0:
                del self.in_flight[member]
        if reservation is not None and reservation in self._reserved:
            self._reserved.remove(reservation)

    def reserved(self, counted: Container[str] = ()) -> dict[str | None, capacity.Usage]:
        """What the spawns in flight took, per member; those whose instance is in
        ``counted`` (the cache counts it from its keys already) are left out."""
        usage: dict[str | None, capacity.Usage] = {}
        for r in self._reserved:
            if r.instance not in counted:
                usage[r.member] = usage.get(r.member, capacity.NOTHING) + r.usage
        return usage

    async def resources(
        self, client: LxdClient, members: Sequence[str | None], every: Sequence[str] = ()
    ) -> dict[str | None, capacity.Resources | str]:
        """``/1.0/resources`` of ``members`` (None: a standalone daemon's), or why it could
        not be read. Kept for RESOURCES_FOR seconds (an error for RESOURCES_RETRY) and read
        again when the cluster's membership (``every``) changes; the stale ones are read
        concurrently, one request each."""
        if frozenset(every) != self._resources_of:
            self._resources.clear()
            self._resources_of = frozenset(every)
        now = time.monotonic()
        stale = [m for m in members if self._resources.get(m, (0.0, ""))[0] <= now]

        async def read(member: str | None) -> capacity.Resources | str:
            try:
                return capacity.resources_from_api(await client.resources(member))
            except (LxdError, asyncio.TimeoutError) as e:
                self.log.warning("resources of %s: %s", member or client.where, e)
                return getattr(e, "message", None) or str(e) or type(e).__name__

        answers = await asyncio.gather(*(read(m) for m in stale))
        now = time.monotonic()
        for member, answer in zip(stale, answers, strict=True):
            keep = RESOURCES_FOR if isinstance(answer, capacity.Resources) else RESOURCES_RETRY
            self._resources[member] = (now + keep, answer)
        return {m: self._resources[m][1] for m in members}

    def suspect(self, member: str, why: str = "a spawn on it failed") -> None:
        self._suspects[member] = (time.monotonic() + SUSPECT_FOR, why)

    def mark_suspects(self, members: list[dict]) -> None:
        """Report Online members a spawn just failed on (or a volume on them could not be
        read) as unreachable (in place)."""
        now = time.monotonic()
        for m in members:
            until, why = self._suspects.get(m.get("server_name"), (0.0, ""))
            if until > now and m.get("status") == placement.ONLINE:
                ago = SUSPECT_FOR - (until - now)
                m["status"] = f"Unreachable ({why} {ago:.0f} s ago)"

    def is_orphan(self, name: str) -> bool:
        return name in self._orphans

    def orphan(self, name: str, delete: Callable[[str], Awaitable[None]]) -> None:
        """Call ``delete(name)`` as soon as its member answers again (``delete`` checks whose
        the instance is: each orphan brings its own)."""
        self._orphans[name] = delete
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self, interval: float = 5.0):
        while self._orphans:
            await asyncio.sleep(interval)
            for name, delete in list(self._orphans.items()):
                try:
                    await delete(name)
                except LxdError:
                    continue  # still unreachable: next round
                self._orphans.pop(name, None)
