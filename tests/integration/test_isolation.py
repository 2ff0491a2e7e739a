"""Isolation by default, seen from inside a user's container started through a real hub, on
Incus and on LXD 5.0: what one user can no longer do to another, to the host, or to the
daemon. (What the daemons cannot enforce on this kernel is in SECURITY.md and the README.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from lxdspawner.lxd import LxdClient
from lxdspawner.network import network_acl_name
from testbench.hubtools import INCUS_HUB_IP, LXD_HUB_IP, forget_network_acls, running_hub

from .conftest import BRIDGES, SOCKETS, remove_instances_named
from .test_spawner import server_pid

# From inside a container, as the user: connect to host:port within 2 s; print "open" or why not.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""

# Start children until the kernel refuses (EAGAIN at the container's process limit), say how
# many, then end them all.
FORK_BOMB = """
import os, signal, time
children = []
try:
    while len(children) < 100000:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        children.append(pid)
except OSError as e:
    print(len(children), e.errno)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
"""


FILL_THE_DISK = (
    "out=$(dd if=/dev/zero of=/tmp/big bs=1M count=1500 conv=fsync 2>&1); rc=$?; "
    'rm -f /tmp/big; echo "$out"; echo rc=$rc'
)


async def as_user(client: LxdClient, name: str, command: list[str]) -> str:
    result = await client.exec(name, command, user=1000, group=1000, cwd="/tmp", timeout=120)
    return (result.stdout + result.stderr).strip()


async def ipv4(client: LxdClient, name: str) -> str:
    state = await client.instance_state(name)
    return next(
        a["address"] for a in state["network"]["eth0"]["addresses"] if a["family"] == "inet"
    )


@contextlib.asynccontextmanager
async def listening(address: str) -> AsyncIterator[int]:
    """A TCP service of the host on ``address``, which answers and hangs up. Its port is
    below the ephemeral range, where earlier test hubs' ports (still allowed by their ACLs
    on the bridge) are not."""

    async def answer(reader, writer):
        writer.close()

    for port in random.sample(range(20000, 30000), 50):
        try:
            server = await asyncio.start_server(answer, address, port)
            break
        except OSError:
            continue
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def metadata_address(bridge: str) -> Iterator[str]:
    """169.254.169.254 on the test bridge, as a cloud's metadata service would be reached:
    through the host. Only a bridge our setup script made, and only for the test."""
    address = "169.254.169.254"
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", bridge], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", bridge], check=False)


async def host_connects(address: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 2)
    except OSError:
        return False
    writer.close()
    return True


@pytest.mark.exclusive
async def test_users_are_isolated_from_each_other_the_host_and_the_daemon(tmp_path, prefix, daemon):
    endpoint = f"unix://{SOCKETS[daemon]}"
    hub_ip = INCUS_HUB_IP if daemon == "incus" else LXD_HUB_IP
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = {endpoint!r}
c.LxdSpawner.process_limit = 300
c.LxdSpawner.disk_limit = "1GiB"
c.Spawner.start_timeout = 120
"""
    # Earlier test hubs' ACLs stay on the bridge: this hub's is to be the only one, so that
    # set to "ports" it takes it off (with others there, it keeps its servers' hub allowed).
    await forget_network_acls(None)
    async with LxdClient(endpoint) as client:
        try:
            async with running_hub(tmp_path, config, hub_ip=hub_ip) as hub:
                await asyncio.gather(
                    hub.start_server("ann", timeout=150), hub.start_server("ben", timeout=150)
                )
                ann, ben = f"{prefix}-ann", f"{prefix}-ben"
                ben_ip = await ipv4(client, ben)
                port = hub.hub_url.rsplit(":", 1)[1]
                probe = ["/usr/bin/python3", "-c", CONNECT]

                # Another user's server: not reachable (port isolation on the bridge).
                assert await as_user(client, ann, [*probe, ben_ip, "8888"]) != "open"
                # The hub's API is (the server needs it), and the proxy reaches the servers.
                assert await as_user(client, ann, [*probe, hub_ip, port]) == "open"
                for user in ("ann", "ben"):
                    model = await hub.server_model(user)
                    status, _ = await hub.get_via_proxy(model["url"] + "api/status")
                    assert status == 200, user

                # The hub's ACL is on the whole (dedicated) bridge, on both daemons: no other
                # service of the host (the daemon's API, ssh, ... here a listener of this
                # test on the bridge's address), and no cloud metadata address.
                bridge = BRIDGES[daemon]
                acls = (await client.network(bridge))["config"].get("security.acls", "")
                assert network_acl_name(hub.hub_id, bridge) in acls.split(","), acls
                async with listening(hub_ip) as other_port:
                    assert await host_connects(hub_ip, other_port)
                    said = await as_user(client, ann, [*probe, hub_ip, str(other_port)])
                    assert said != "open", said
                with metadata_address(bridge) as metadata:
                    async with listening(metadata) as metadata_port:
                        assert await host_connects(metadata, metadata_port)
                        said = await as_user(client, ann, [*probe, metadata, str(metadata_port)])
                        assert said != "open", said

                # No guest API socket for a user to talk to the daemon through.
                for path in ("/dev/incus", "/dev/lxd"):
                    found = await client.exec(ann, ["test", "-e", f"{path}/sock"])
                    assert found.exit_code != 0, path

                # Each user's container has its own range of host uids (Incus; LXD 5.0
                # shares one, see isolated_idmap).
                maps = [
                    json.loads((await client.get_instance(n))["config"]["volatile.idmap.current"])
                    for n in (ann, ben)
                ]
                if daemon == "incus":
                    assert maps[0] != maps[1], maps

                # A fork bomb stops at the process limit; the other user's server answers.
                bomb = await as_user(client, ann, ["/usr/bin/python3", "-c", FORK_BOMB])
                children, errno = (int(x) for x in bomb.split())
                assert errno == 11 and children < 300, bomb  # EAGAIN, within the limit
                model = await hub.server_model("ben")
                status, _ = await hub.get_via_proxy(model["url"] + "api/status")
                assert status == 200

                # Writing past the root disk's size fails for that user only. (The file goes
                # before the shell answers: Incus records an exec's output inside the
                # container's own directory, which a full disk leaves no room for.)
                filled = await as_user(client, ann, ["/bin/sh", "-c", FILL_THE_DISK])
                assert "rc=1" in filled, filled
                assert "No space left" in filled or "quota exceeded" in filled, filled
                wrote = await as_user(
                    client,
                    ben,
                    ["/bin/sh", "-c", "dd if=/dev/zero of=/tmp/some bs=1M count=100 && echo ok"],
                )
                assert "ok" in wrote.splitlines(), wrote
                # The server keeps running as the user in either container.
                pid = await server_pid(client, ann)
                assert pid not in ("", "0")
                await hub.stop_all_servers()

                # Set to "ports", the hub takes its ACL off the bridge at the next spawn.
                hub.add_config('c.LxdSpawner.network_isolation = "ports"')
                await hub.restart()
                await hub.start_server("ann", timeout=150)
                acls = (await client.network(bridge))["config"].get("security.acls", "")
                assert network_acl_name(hub.hub_id, bridge) not in acls.split(","), acls
                await hub.stop_all_servers()
        finally:
            await remove_instances_named(client, prefix + "-")


@pytest.mark.parametrize("mode", ["bogus"])
async def test_a_wrong_network_isolation_setting_is_named(tmp_path, prefix, mode):
    from testbench.hubtools import SpawnFailed

    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.network_isolation = {mode!r}
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("val", timeout=60)
        said = str(failed.value) + hub.log()
        assert "network_isolation" in said and "'ports'" in said
