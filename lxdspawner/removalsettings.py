"""When the containers of stopped servers are deleted (see removals.py): a mixin, so that
``c.LxdSpawner.removal_defer_max`` and ``removals_at_once`` are LxdSpawner's own settings."""

from __future__ import annotations

from traitlets import Float, Int
from traitlets.config import Configurable

from .removals import Removals


class RemovalSettings(Configurable):
    removal_defer_max = Float(
        120.0,
        config=True,
        help="""Seconds the deletion of a stopped server's container may wait while other
        servers are being spawned on the same daemon (default 120; 0: delete at once).

        On btrfs with quotas (the pools LXD sizes root disks on), deleting containers slows
        the creates and file pushes of the spawns running beside them: a class stopping
        its servers and the next class starting 2 s later waited half again as long. The
        deletions go once no spawn is in flight, or after this long. A new start of the
        same server never waits for this: its old container is deleted at once.""",
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
        removals.defer_max = max(0.0, self.removal_defer_max)
        removals.parallel = max(1, self.removals_at_once)
