"""When the containers of stopped servers are deleted (see removals.py): a mixin, so that
``c.LxdSpawner.removal_delay`` and the rest are LxdSpawner's own settings."""

from __future__ import annotations

from traitlets import Float, Int
from traitlets.config import Configurable

from .removals import Removals


class RemovalSettings(Configurable):
    """The settings; :meth:`schedule_removals` hands them to a daemon's :class:`Removals`."""

    removal_delay = Float(
        0.0,
        config=True,
        help="""Seconds the deletion of a stopped server's container waits before it may go
        (default 0), then while other servers are being spawned on the same daemon (see
        `removal_defer_max`).

        On btrfs with quotas (the pools LXD sizes root disks on), the kernel accounts a
        deleted container's blocks in the background after the deletion returns, 0.5 to
        0.7 s of CPU each on a 2-core host: a class stopping its servers and the next class
        starting a few seconds later pays for it during its spawns. `10` keeps that out of
        such a changeover (see README "Performance"). A new start of the same server never
        waits for this: its old container is deleted at once.""",
    )
    removal_defer_max = Float(
        120.0,
        config=True,
        help="""The longest the deletion of a stopped server's container waits, in all, while
        other servers are being spawned on the same daemon (default 120; 0: it does not wait
        for them). Deletions go once `removal_delay` has passed and no spawn is in flight,
        or after this long.""",
    )
    removals_at_once = Int(
        2,
        config=True,
        help="""How many container deletions are sent to a daemon at once (default 2; the
        others wait their turn). At least 1.""",
    )

    def schedule_removals(self, removals: Removals) -> None:
        """The settings onto the daemon's deletions (the hub's one for that daemon: the
        last spawner's settings stand, as they are one hub's)."""
        removals.delay = max(0.0, self.removal_delay)
        removals.defer_max = max(0.0, self.removal_defer_max)
        removals.parallel = max(1, self.removals_at_once)
