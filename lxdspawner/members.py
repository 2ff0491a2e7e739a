"""What the hub knows about cluster members that LXD does not tell it (yet), per daemon.

- Spawns placed on a member and not finished: LXD counts a container only once it exists,
  so without them every spawn of a burst would pick the same least-loaded member.
- Members a spawn just failed on: LXD reports a member offline only after it missed
  heartbeats, so a retry would go straight back to the failing member.
- Containers that could not be deleted because their member was down: they are deleted
  once it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from . import placement
from .lxd import LxdError

#: Seconds a member a spawn failed on is left out of placement.
SUSPECT_FOR = 30.0


class MemberBook:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.in_flight: Counter = Counter()
        self._suspects: dict[str, tuple[float, str]] = {}
        self._orphans: dict[str, Callable[[str], Awaitable[None]]] = {}
        self._reaper: asyncio.Task | None = None

    def placed(self, member: str) -> None:
        self.in_flight[member] += 1

    def landed(self, member: str | None) -> None:
        if member:
            self.in_flight[member] -= 1

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
