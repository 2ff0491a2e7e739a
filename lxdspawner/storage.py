"""The users' volume settings of LxdSpawner (see volumes.py and README "Storage"): a mixin,
so that ``c.LxdSpawner.home_volume_size`` and the rest are LxdSpawner's own settings."""

from __future__ import annotations

from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Unicode
from traitlets.config import Configurable

from . import volumes as user_volumes


class StorageSettings(Configurable):
    """The settings; :meth:`_volume_settings` checks them (ValueError naming one)."""

    home_volume_size = AnyTrait(
        "10GiB",
        config=True,
        help="""Each user's persistent home: a custom storage volume of this size (a quota),
        mounted at `home_dir`, owned by the server's uid/gid (mode 0700), created at the first
        spawn and kept afterwards: stops, culls, hub restarts and deleted containers leave it.
        "" turns persistent homes off (the home is then in the container's root disk).""",
    )
    home_volume_pool = Unicode(
        "", config=True, help="Storage pool of the home volumes (default: the root disk's)."
    )
    home_volume_per_server = Bool(
        False,
        config=True,
        help="Give each named server a home volume of its own (default: they share the user's).",
    )
    home_volume_snapshots = Dict(
        config=True,
        help="""The daemon's scheduled snapshots of every home volume, e.g.
        `{"schedule": "@daily", "expiry": "1w"}` (`snapshots.schedule`, `.expiry`, `.pattern`
        of the volume); `lxdspawner volumes restore` gives one back.""",
    )
    volumes = Dict(
        config=True,
        help="""More volumes, keyed by a name template with `{username}` and `{servername}`:
        `{"scratch-{username}": {"path": "/scratch", "size": "50GiB"},
        "course-data": {"path": "/data", "read_only": True, "shared": True}}`. A `shared`
        volume is one volume for every server; it is created when missing only if it has a
        `size`. Keys: path, size, read_only, shared, pool.""",
    )
    delete_volumes_with_user = Bool(
        False,
        config=True,
        help="""Delete a user's volumes (or a named server's own) when an admin deletes the
        user (or the server with its storage). Off: they stay, and `lxdspawner volumes list`
        shows them as belonging to no user.""",
    )

    #: The hub's id on the daemon (LxdSpawner's hub_id), written on the volumes it makes.
    hub_id: str

    def _volume_settings(self) -> user_volumes.Settings:
        return user_volumes.settings(
            hub=self.hub_id,
            home_volume_size=self.home_volume_size,
            home_volume_pool=self.home_volume_pool,
            home_volume_per_server=self.home_volume_per_server,
            home_volume_snapshots=self.home_volume_snapshots,
            volumes=self.volumes,
        )
