"""The shared instance cache against the real daemon: events, relists, a daemon restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from lxdspawner.cache import InstanceCache
from lxdspawner.lxd import LxdClient, LxdError, NotFound, image_source
from lxdspawner.objects import KEY_MANAGED, KEY_USER, MANAGED_BY

from .conftest import SOCKETS, TINY_IMAGE, bridge_ports, leaked_interfaces

OURS = {KEY_MANAGED: MANAGED_BY, KEY_USER: "cache-test"}


async def eventually(predicate, timeout=20.0, what="condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def cache(lxd):
    cache = InstanceCache(lxd)
    await cache.start()
    yield cache
    await cache.stop()


async def test_follows_our_instances_and_ignores_others(lxd, cache, instances):
    ours, other = instances("ours"), instances("other")
    await lxd.create_instance(ours, source=image_source(TINY_IMAGE), config=OURS)
    await lxd.create_instance(other, source=image_source(TINY_IMAGE))
    await eventually(lambda: cache.get(ours) is not None, what="created event")
    assert cache.get(ours).status == "Stopped"
    assert cache.get(ours).user == "cache-test"
    assert cache.get(other) is None

    await lxd.start_instance(ours)
    await eventually(lambda: cache.get(ours).status == "Running", what="started event")
    before = lxd.request_count
    for _ in range(100):
        assert cache.get(ours).status == "Running"
    assert lxd.request_count == before  # reading costs nothing

    await lxd.stop_instance(ours, force=True)
    await eventually(lambda: cache.get(ours).status == "Stopped", what="stopped event")
    await lxd.delete_instance(ours)
    await eventually(lambda: cache.get(ours) is None, what="deleted event")
    assert cache.healthy


async def test_a_container_that_powers_off_is_torn_down_when_the_cache_says_so(
    lxd, cache, instances
):
    """What removals.py relies on: once the cache has seen the teardown of a container that
    powered off by itself, its host-side interface is gone and it can be deleted."""
    name = instances("off")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), config=OURS, start=True)
    await eventually(lambda: cache.get(name) and cache.get(name).status == "Running")
    interface = (await lxd.instance_state(name))["network"]["eth0"]["host_name"]
    assert _interface_exists(interface)
    cache.expect_teardown(name)
    assert not await cache.wait_torn_down(name, 0.2)  # it runs
    with contextlib.suppress(LxdError):  # the exec may end with the container
        await lxd.exec(name, ["poweroff"], record_output=False)
    assert await cache.wait_torn_down(name, 30)
    assert cache.get(name).status == "Stopped"
    assert not _interface_exists(interface)
    await lxd.delete_instance(name)  # at the first try


def _interface_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


async def test_starts_from_a_list_of_what_exists(lxd, instances):
    name = instances("pre")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), config=OURS, start=True)
    cache = InstanceCache(lxd)
    await cache.start()
    try:
        assert cache.get(name).status == "Running"
        assert cache.count_by_location()[cache.get(name).location] >= 1
    finally:
        await cache.stop()


@pytest.mark.exclusive
async def test_a_daemon_restart_does_not_confuse_it():
    """Kill the daemon; while it is down, a container dies; the cache must catch up.

    Incus only: LXD's restart is the same code path in the cache."""
    ports = bridge_ports()
    async with LxdClient(f"unix://{SOCKETS['incus']}") as lxd:
        cache = InstanceCache(lxd, quiet_timeout=30)
        await cache.start()
        alive, dying = (f"lxdsp-test-{stem}-{uuid.uuid4().hex[:8]}" for stem in ("alive", "dying"))
        try:
            for name in (alive, dying):
                # Incus starts again, when it starts, what was running when it died, unless
                # boot.autostart is false: the dead container must stay dead to be seen so.
                await lxd.create_instance(
                    name,
                    source=image_source(TINY_IMAGE),
                    config={**OURS, "boot.autostart": "false"},
                    start=True,
                )
            await eventually(
                lambda: all(
                    cache.get(n) and cache.get(n).status == "Running" for n in (alive, dying)
                ),
                what="both running",
            )
            init_pid = (await lxd.instance_state(dying))["pid"]

            _kill_incusd()
            await eventually(
                lambda: not cache.healthy, what="the cache to notice the stream is gone"
            )
            os.kill(init_pid, signal.SIGKILL)  # the container dies while nobody watches
            _start_incus()

            await eventually(lambda: cache.healthy, timeout=60, what="the cache to reconnect")
            await eventually(
                lambda: cache.get(dying) is not None and cache.get(dying).status == "Stopped",
                timeout=30,
                what="the relist to show the dead container stopped",
            )
            assert cache.get(alive).status == "Running"
            # And events flow again after the restart.
            await lxd.stop_instance(alive, force=True)
            await eventually(
                lambda: cache.get(alive).status == "Stopped", what="events after restart"
            )
        finally:
            await cache.stop()
            # A fresh client: this one's pooled connections died with the daemon.
            async with LxdClient(f"unix://{SOCKETS['incus']}") as fresh:
                for name in (alive, dying):
                    with contextlib.suppress(LxdError):
                        await fresh.stop_instance(name, force=True)
                    with contextlib.suppress(NotFound):
                        await fresh.delete_instance(name)
                # The stop hooks of the container that died meanwhile could not reach the
                # daemon, so its host-side interface stays (Incus does not clean it up later).
                for interface in await leaked_interfaces(fresh, ports):
                    ip = await asyncio.create_subprocess_exec("ip", "link", "delete", interface)
                    await ip.wait()


def _kill_incusd() -> None:
    """Kill the standalone daemon that scripts/setup-lxd.sh started (not a cluster member's)."""
    found = subprocess.run(
        ["pgrep", "-f", "incusd --logfile /var/log/lxdspawner-incus.log"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert found, "the standalone incusd started by scripts/setup-lxd.sh is not running"
    for pid in found:
        os.kill(int(pid), signal.SIGKILL)


def _start_incus() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "setup-lxd.sh"
    subprocess.run([str(script), "incus"], check=True, capture_output=True)
