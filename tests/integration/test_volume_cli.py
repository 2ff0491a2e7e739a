"""`lxdspawner volumes` against the real daemon: volumes carrying lxdspawner's keys, made
directly through the API (no hub), listed, snapshotted, restored, resized and deleted by the
command, as an operator runs it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

import pytest

from lxdspawner import cli, volumecli
from lxdspawner.lxd import LxdError
from lxdspawner.ownership import Owner
from lxdspawner.volumes import KEY_VOLUME

from .conftest import endpoint_for

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2


@pytest.fixture
async def pool(lxd):
    return (await lxd.profile("default"))["devices"]["root"]["pool"]


@pytest.fixture
async def made(lxd, pool, prefix):
    """Volume names to create, every one (and its snapshots) deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            for snap in await lxd.volume_snapshots(pool, name):
                snap_name = str(snap["name"]).rsplit("/", 1)[-1]
                await lxd.run(
                    "DELETE",
                    f"/1.0/storage-pools/{pool}/volumes/custom/{name}/snapshots/{snap_name}",
                )
            await lxd.delete_volume(pool, name)
        except LxdError:
            pass  # deleted by the test


async def volumes(client, *argv: str) -> tuple[int, str, str]:
    args = cli.build_parser().parse_args(["volumes", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await volumecli.run(client, args, out=out, err=err, environ={})
    return code, out.getvalue(), err.getvalue()


async def test_list_snapshot_restore_resize_delete(lxd, daemon, pool, made, prefix):
    hub, user = f"{prefix}-hub", f"{prefix} ana"  # a username no name rule keeps as it is
    home, scratch, stranger = f"{prefix}-home", f"{prefix}-scratch", f"{prefix}-noKeys".lower()
    made += [home, scratch, stranger]
    keys = Owner(hub, user).keys()
    await lxd.create_volume(pool, home, config={**keys, KEY_VOLUME: "home"})
    await lxd.create_volume(pool, scratch, config={**keys, KEY_VOLUME: "scratch-{username}"})
    await lxd.create_volume(pool, stranger, config={"user.jupyterhub.user": user})

    # list, through the command line as an operator runs it
    command = [sys.executable, "-m", "lxdspawner.cli", "volumes", "list", "--hub-id", hub]
    command += ["--format", "json", "--endpoint", endpoint_for(daemon)]
    listed = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    stdout, stderr = await asyncio.wait_for(listed.communicate(), 60)
    assert listed.returncode == 0, stderr.decode()
    rows = {r["volume"]: r for r in json.loads(stdout)}
    assert set(rows) == {home, scratch}  # the one without the keys is not ours
    assert rows[home]["user"] == user and rows[home]["kind"] == "home"
    assert rows[home]["pool"] == pool and rows[home]["snapshots"] == 0

    # snapshot, then restore it
    code, out, err = await volumes(lxd, "snapshot", user, "--hub-id", hub, "--name", "before")
    assert (code, err) == (0, "")
    assert [s["name"].rsplit("/", 1)[-1] for s in await lxd.volume_snapshots(pool, home)] == [
        "before"
    ]
    code, out, err = await volumes(lxd, "list", "--hub-id", hub, "--user", user)
    assert code == 0
    assert [line.split() for line in out.splitlines() if home in line][0][-4] == "1"
    code, out, err = await volumes(lxd, "restore", user, "before", "--hub-id", hub)
    assert (code, err) == (0, ""), err
    code, _, err = await volumes(lxd, "restore", user, "nonesuch", "--hub-id", hub)
    assert code == 2 and "its snapshots: before" in err

    # resize: the daemon's quota, or its one-line refusal where the driver has none
    code, out, err = await volumes(lxd, "resize", user, "64MiB", "--hub-id", hub)
    if code == 0:
        assert (await lxd.get_volume(pool, home))["config"]["size"] == str(64 * MiB)
    else:
        assert code == 1 and err.count("\n") == 1 and "resizing" in err, err

    # delete: refused without --yes, then only the user's, by their keys
    code, _, err = await volumes(lxd, "delete", user, "--hub-id", hub)
    assert code == 2 and "run again with --yes" in err
    code, out, err = await volumes(lxd, "delete", user, "--hub-id", hub, "--yes")
    assert (code, err) == (0, "")
    left = {v["name"] for v in await lxd.list_volumes(pool)}
    assert home not in left and scratch not in left
    assert stranger in left

    # move: this daemon is no cluster
    code, _, err = await volumes(lxd, "move", user, "--to", "member2", "--hub-id", hub)
    assert code == 2 and "needs a cluster" in err
