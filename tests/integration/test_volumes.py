"""Users keep their work: home volumes, quotas, snapshots, named servers, shared volumes and
what an admin's deletion does, through a real JupyterHub on real Incus and LXD daemons."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

import pytest

from lxdspawner import hostcheck
from lxdspawner.lxd import LxdClient, NotFound
from testbench.hubtools import LXD_HUB_IP, REPO, SpawnFailed, q, running_hub

from .conftest import SOCKETS, test_daemons

_demo = importlib.util.spec_from_file_location("demo_config", REPO / "scripts" / "demo_config.py")
_demo_config = importlib.util.module_from_spec(_demo)
_demo.loader.exec_module(_demo_config)
RUN_CULLER_WITH_SIGINT = _demo_config.RUN_CULLER_WITH_SIGINT

POOL = "lxdspawner"

# The demo's idle culler (scripts/demo_config.py), culling after 2 s without activity.
CULLER = """
c.JupyterHub.services.append({{
    "name": "idle-culler",
    "command": [{python!r}, "-c", {run!r}, "--timeout=2", "--cull-every=2"],
}})
c.JupyterHub.load_roles.append({{
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["idle-culler"],
}})
"""

CONFIG = """
c.JupyterHub.spawner_class = "lxd"
c.JupyterHub.allow_named_servers = True
c.Spawner.poll_interval = 2
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = {endpoint!r}
c.LxdSpawner.image = "jupyter-base"
c.Spawner.start_timeout = 90
"""


def config(prefix: str, daemon: str = "incus", **settings) -> str:
    text = CONFIG.format(prefix=prefix, endpoint=f"unix://{SOCKETS[daemon]}")
    return text + "".join(f"c.LxdSpawner.{k} = {v!r}\n" for k, v in settings.items())


async def sh(client: LxdClient, name: str, script: str, *, uid: int = 0) -> tuple[int, str]:
    result = await client.exec(name, ["/bin/sh", "-c", script], user=uid, group=uid)
    return result.exit_code, (result.stdout + result.stderr).strip()


async def ok(client: LxdClient, name: str, script: str, *, uid: int = 0) -> str:
    code, out = await sh(client, name, script, uid=uid)
    assert code == 0, f"{script!r} failed ({code}): {out}"
    return out


async def server_uid(client: LxdClient, name: str) -> int:
    pid = await ok(client, name, "systemctl show -p MainPID --value jupyterhub-singleuser")
    return int(await ok(client, name, f"stat -c %u /proc/{pid}"))


async def wait_gone(client: LxdClient, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.get_instance(name)
        except NotFound:
            return
        assert time.monotonic() < deadline, f"{name} still there {timeout} s after its stop"
        await asyncio.sleep(0.3)


async def volume(client: LxdClient, name: str) -> dict | None:
    try:
        return await client.get_volume(POOL, name)
    except NotFound:
        return None


@pytest.mark.parametrize("daemon", test_daemons())
async def test_the_home_outlives_its_server_holds_its_quota_and_is_snapshotted(
    daemon, tmp_path, prefix, leftovers
):
    """A user's files survive a hub restart, the idle culler's stop (the container is
    deleted) and the next start; the home is theirs (uid, mode 0700); writing past
    home_volume_size fails inside for that user only, and the next spawn works; the daemon
    snapshots the home on schedule."""
    settings = {
        "home_volume_size": "64MiB",
        "home_volume_snapshots": {"schedule": "* * * * *", "expiry": "1H"},
    }
    # The culler, the hub restart and the daemon's scheduler are not the daemon's business
    # beyond the snapshot: on LXD 5.0 the volume's own behaviour (ownership without
    # initial.uid, the quota, a stop and a start) is what differs, and what is tested.
    whole = daemon == "incus"
    hub_ip = LXD_HUB_IP if daemon == "lxd" else None
    kwargs = {"hub_ip": hub_ip} if hub_ip else {}
    async with (
        LxdClient(f"unix://{SOCKETS[daemon]}") as client,
        running_hub(tmp_path, config(prefix, daemon, **settings), **kwargs) as hub,
    ):
        await hub.start_server("alice")
        name, home = f"{prefix}-alice", f"{prefix}-home-alice"
        created = await volume(client, home)
        assert created is not None, "no home volume"
        assert created["config"]["size"] == str(64 * 1024**2)
        assert created["config"]["user.jupyterhub.user"] == "alice"
        assert created["config"]["user.jupyterhub.volume"] == "home"
        assert created["config"]["snapshots.schedule"] == "* * * * *"
        uid = await server_uid(client, name)
        assert await ok(client, name, "stat -c '%u %a' /home/alice") == f"{uid} 700"
        await ok(client, name, "echo kept > /home/alice/notes.txt", uid=uid)

        # The quota: writing past it fails, for this user only, and nothing else breaks.
        code, out = await sh(
            client, name, "dd if=/dev/urandom of=/home/alice/big bs=1M count=100", uid=uid
        )
        pools = Path(SOCKETS[daemon]).parent / "storage-pools" / POOL
        assert code != 0, f"{out}\nbtrfs quotas: {hostcheck.btrfs_quota_state(str(pools))}"
        assert "Disk quota exceeded" in out or "No space left on device" in out, out
        await ok(client, name, "echo root-fs-still-writable > /tmp/x", uid=uid)
        await ok(client, name, "rm -f /home/alice/big", uid=uid)

        if whole:
            # The hub restarts (its server keeps running), and then its idle culler stops the
            # server: the container is deleted...
            hub.set_cleanup_servers(False)
            hub.add_config(CULLER.format(python=sys.executable, run=RUN_CULLER_WITH_SIGINT))
            await hub.restart()
            deadline = time.monotonic() + 60
            while await hub.server_model("alice") is not None:
                assert time.monotonic() < deadline, "the culler did not stop the idle server"
                await asyncio.sleep(1)
        else:
            await hub.stop_server("alice")
        await wait_gone(client, name)
        assert await volume(client, home) is not None  # ...not the home
        assert hub.log().count("Creating your home volume (64 MiB)") == 1
        await hub.start_server("alice")
        assert hub.log().count("Creating your home volume") == 1, "made again"
        assert await ok(client, name, "cat /home/alice/notes.txt", uid=uid) == "kept"

        if not whole:
            return
        # The daemon's scheduled snapshot (every minute here).
        deadline = time.monotonic() + 75
        while True:
            snapshots = await client.request(
                "GET", f"/1.0/storage-pools/{POOL}/volumes/custom/{q(home)}/snapshots"
            )
            if snapshots or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        assert snapshots, "no scheduled snapshot of the home volume within 75 s"


async def test_named_servers_share_the_home_or_not_and_a_shared_volume_is_read_only(
    tmp_path, prefix, incus, leftovers
):
    course = f"{prefix}-course"
    await incus.create_volume(POOL, course)
    try:
        settings = {"volumes": {course: {"path": "/data", "read_only": True, "shared": True}}}
        async with running_hub(tmp_path, config(prefix, **settings)) as hub:
            await hub.start_server("alice")
            await hub.start_server("alice", "lab")
            await hub.start_server("bob")
            default = f"{prefix}-alice"
            lab = next(
                i["name"]
                for i in await incus.list_instances()
                if i["config"].get("user.jupyterhub.server") == "lab"
                and i["name"].startswith(prefix)
            )
            uid = await server_uid(incus, default)
            await ok(incus, default, "echo from-default > /home/alice/shared.txt", uid=uid)
            assert await ok(incus, lab, "cat /home/alice/shared.txt") == "from-default"
            for name in (default, f"{prefix}-bob"):
                assert await ok(incus, name, "test -d /data && echo yes") == "yes"
                code, out = await sh(incus, name, "touch /data/mine", uid=uid)
                assert code != 0 and "Read-only file system" in out, out
            await hub.stop_server("alice", "lab")

            # Each named server its own home: a new volume for the lab, the default's stays.
            await hub.stop_hub()
            hub.add_config("c.LxdSpawner.home_volume_per_server = True")
            await hub.start()
            await hub.start_server("alice", "lab")
            lab_volumes = [
                v
                for v in await incus.list_volumes(POOL)
                if v["config"].get("user.jupyterhub.server") == "lab"
                and v["name"].startswith(prefix)
            ]
            assert len(lab_volumes) == 1, lab_volumes
            assert await ok(incus, lab, "ls /home/alice") == ""
    finally:
        # The operator's shared volume: theirs to delete (here, the test's).
        await _delete_when_unused(incus, course)


async def _delete_when_unused(client: LxdClient, name: str) -> None:
    for _ in range(60):
        try:
            await client.delete_volume(POOL, name)
            return
        except NotFound:
            return
        except Exception:
            await asyncio.sleep(1)


async def test_an_admin_deleting_a_user_keeps_their_volumes_unless_told(
    tmp_path, prefix, incus, leftovers
):
    async with running_hub(tmp_path, config(prefix)) as hub:
        for user in ("carol", "dave"):
            await hub.start_server(user)
            await hub.stop_server(user)
        status, _ = await hub.api("DELETE", f"/users/{q('carol')}")
        assert status == 204
        assert await volume(incus, f"{prefix}-home-carol") is not None
        assert "kept (delete_volumes_with_user)" in hub.log()

        await hub.stop_hub()
        hub.add_config("c.LxdSpawner.delete_volumes_with_user = True")
        await hub.start()
        status, _ = await hub.api("DELETE", f"/users/{q('dave')}")
        assert status == 204
        assert await volume(incus, f"{prefix}-home-dave") is None
        assert await volume(incus, f"{prefix}-home-carol") is not None  # not dave's


async def test_a_foreign_volume_holding_a_users_name_is_left_untouched(
    tmp_path, prefix, incus, leftovers
):
    """A volume under the name the user's home would get, not made by this hub for this
    user: the spawn fails naming it, and the volume is as it was."""
    foreign = f"{prefix}-home-eve"
    await incus.create_volume(POOL, foreign, config={"user.note": "someone else's"})
    try:
        async with running_hub(tmp_path, config(prefix)) as hub:
            with pytest.raises(SpawnFailed) as failed:
                await hub.start_server("eve")
            assert foreign in str(failed.value) and "left untouched" in str(failed.value)
        after = await volume(incus, foreign)
        assert after is not None and after["config"] == {"user.note": "someone else's"}
    finally:
        await incus.delete_volume(POOL, foreign)
