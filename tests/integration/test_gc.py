"""`lxdspawner gc` against the real daemons: it lists, then deletes, only the shared copies and
bases of images that no alias names, and never one that an instance uses."""

from __future__ import annotations

import contextlib
import io
import secrets

import pytest

from lxdspawner import cli
from lxdspawner.bases import KEY_BASE_OF
from lxdspawner.lxd import LxdError, NotFound, image_source
from lxdspawner.names import shared_volume_name as volume_name

from .conftest import BASE_IMAGE, TINY_IMAGE

POOL = "lxdspawner"  # made by scripts/setup-lxd.sh


async def test_gc_lists_then_deletes_only_what_no_alias_and_no_instance_needs(lxd, instances):
    gone, kept_by_use = secrets.token_hex(32), secrets.token_hex(32)
    stale_volume, used_volume = volume_name(gone, "/usr"), volume_name(kept_by_use, "/usr")
    # The shared copy of the image the tests spawn from (made by `lxdspawner prepull`).
    current = volume_name(await lxd.image_fingerprint(BASE_IMAGE), "/usr")
    base, user = instances("gcbase"), instances("gcuser")
    try:
        await lxd.create_volume(POOL, stale_volume)
        await lxd.create_volume(POOL, used_volume)
        await lxd.create_instance(base, source=image_source(TINY_IMAGE), config={KEY_BASE_OF: gone})
        await lxd.create_instance(
            user,
            source=image_source(TINY_IMAGE),
            devices={
                "shared": {"type": "disk", "pool": POOL, "source": used_volume, "path": "/mnt"}
            },
        )

        listed = io.StringIO()
        assert await cli.gc(lxd, out=listed) == 0
        text = listed.getvalue()
        assert f"would delete volume {stale_volume} (pool {POOL})" in text, text
        assert f"would delete base {base}" in text, text
        assert used_volume not in text and current not in text and user not in text, text
        await lxd.get_volume(POOL, stale_volume)  # listing deleted nothing

        deleted = io.StringIO()
        assert await cli.gc(lxd, delete=True, out=deleted) == 0
        assert f"deleted volume {stale_volume}" in deleted.getvalue(), deleted.getvalue()
        with pytest.raises(NotFound):
            await lxd.get_volume(POOL, stale_volume)
        with pytest.raises(NotFound):
            await lxd.get_instance(base)
        await lxd.get_volume(POOL, used_volume)
        await lxd.get_volume(POOL, current)
        await lxd.get_instance(user)
    finally:
        with contextlib.suppress(LxdError):
            await lxd.delete_instance(user)
        for volume in (stale_volume, used_volume):
            with contextlib.suppress(LxdError):
                await lxd.delete_volume(POOL, volume)
