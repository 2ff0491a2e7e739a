"""The client and placement against a real three-member cluster, over HTTPS as the hub uses it.

What the spawner relies on: members and their status, an explicit target is obeyed, a
container on any member is reachable from the hub and reaches the hub, and a group target
works. A stopped member (reported offline, skipped, its containers still running, creating on
it failing quickly) is in test_cluster_spawner.py's offline-member test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

from lxdspawner import names, sharing
from lxdspawner.lxd import LxdClient, LxdError, image_source
from lxdspawner.objects import KEY_MANAGED, KEY_USER, MANAGED_BY
from lxdspawner.placement import PlacementRequest, members_from_api, weighted_least_loaded
from testbench import topology

from .conftest import TINY_IMAGE, wait_for_ipv4

TINY = image_source(TINY_IMAGE)


async def test_three_members_online_each_at_its_address(cl, cluster):
    members = await cl.cluster_members()
    assert {m["server_name"]: m["status"] for m in members} == {
        name: "Online" for name in cluster.members
    }
    assert {m["server_name"]: m["url"] for m in members} == cluster.member_urls
    assert cl.dialect.product == "incus"


async def test_explicit_target_is_obeyed(cl, cluster, cluster_instances):
    names = {member: cluster_instances(member) for member in cluster.members}
    await asyncio.gather(
        *(cl.create_instance(n, source=TINY, target=m, start=True) for m, n in names.items())
    )
    for member, name in names.items():
        instance = await cl.get_instance(name)
        assert instance["location"] == member
        assert instance["status"] == "Running"


async def test_hub_and_containers_reach_each_other_on_every_member(cl, cluster, cluster_instances):
    # A stand-in for the hub's API, on the hub's address.
    async def hello(request):
        return web.Response(text=f"hub answers {request.remote}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, cluster.hub_ip, 0)
    await site.start()
    hub_port = site._server.sockets[0].getsockname()[1]
    try:
        names = {member: cluster_instances(member) for member in cluster.members}
        await asyncio.gather(
            *(cl.create_instance(n, source=TINY, target=m, start=True) for m, n in names.items())
        )
        async with aiohttp.ClientSession(trust_env=False) as http:
            for member, name in names.items():
                address = await wait_for_ipv4(cl, name)
                assert ipaddress.ip_address(address) in ipaddress.ip_network(cluster.subnet)
                # hub -> container: busybox httpd in the container, fetched from the host.
                await cl.make_directory(name, "/www")
                await cl.push_file(name, "/www/index.html", f"served on {member}\n")
                result = await cl.exec(name, ["httpd", "-p", "8080", "-h", "/www"])
                assert result.exit_code == 0, result.output
                async with http.get(
                    f"http://{address}:8080/", timeout=aiohttp.ClientTimeout(total=10)
                ) as r:
                    assert r.status == 200
                    assert await r.text() == f"served on {member}\n"
                # container -> hub, from the address the hub sees.
                result = await cl.exec(
                    name, ["wget", "-qO-", f"http://{cluster.hub_ip}:{hub_port}/"]
                )
                assert result.exit_code == 0, result.output
                assert result.stdout == f"hub answers {address}"
    finally:
        await runner.cleanup()


async def test_containers_reach_nothing_beyond_the_segment(cl, cluster, cluster_instances):
    name = cluster_instances("isolated")
    await cl.create_instance(name, source=TINY, target="member2", start=True)
    await wait_for_ipv4(cl, name)
    result = await cl.exec(name, ["ip", "route"])
    assert "default" not in result.stdout, result.stdout
    result = await cl.exec(name, ["ping", "-c", "1", "-W", "1", "192.0.2.1"])
    assert result.exit_code != 0


async def test_placement_from_the_real_answers(cl, cluster, cluster_instances):
    async def snapshot():
        return members_from_api(await cl.cluster_members(), await cl.list_instances(), {}, {})

    before = {m.name: m.instances for m in await snapshot()}
    ours = [cluster_instances("ours"), cluster_instances("ours")]
    foreign = cluster_instances("foreign")
    managed = {KEY_MANAGED: MANAGED_BY, KEY_USER: "alice"}
    await asyncio.gather(
        *(cl.create_instance(n, source=TINY, target="member1", config=managed) for n in ours),
        cl.create_instance(foreign, source=TINY, target="member2"),
    )
    members = await snapshot()
    after = {m.name: m.instances for m in members}
    assert after == {
        "member1": before["member1"] + 2,
        "member2": before["member2"],
        "member3": before["member3"],
    }
    assert all(m.status == "Online" and m.groups == ("default",) for m in members)
    # A burst of 6 on top of that snapshot goes where the load is lowest.
    chosen = weighted_least_loaded(members, PlacementRequest("bob", ""))
    assert chosen == min(after, key=lambda name: (after[name], name))


async def test_group_target(cl, cluster, cluster_instances):
    group = "lxdsp-pair"
    try:
        await cl.request(
            "POST",
            "/1.0/cluster/groups",
            json_body={"name": group, "description": "", "members": ["member2", "member3"]},
        )
        members = members_from_api(await cl.cluster_members(), await cl.list_instances(), {}, {})
        assert {m.name for m in members if group in m.groups} == {"member2", "member3"}
        chosen = weighted_least_loaded(members, PlacementRequest("u", "", require=f"@{group}"))
        assert chosen in ("member2", "member3")
        # LXD itself accepts the "@group" target the spawner passes through.
        name = cluster_instances("group")
        await cl.create_instance(name, source=TINY, target=f"@{group}")
        assert (await cl.get_instance(name))["location"] in ("member2", "member3")
    finally:
        for attempt in range(2):
            try:
                await cl.request("PUT", f"/1.0/cluster/groups/{group}", json_body={"members": []})
                await cl.request("DELETE", f"/1.0/cluster/groups/{group}")
                break
            except LxdError:
                if attempt:
                    raise


async def test_the_standalone_incus_keeps_working(cluster):
    """The members share the host with the standalone Incus of the other tests: its socket,
    containers and bridge (scripts/topology.env) must be unaffected. Nothing is started on
    that bridge: the other tiers run meanwhile (scripts/run-tests.sh), and their tests count
    the bridge's host interfaces."""
    async with LxdClient(topology.INCUS.endpoint) as local:
        assert await local.cluster_members() == []
        state = await local.request("GET", f"/1.0/networks/{topology.INCUS.bridge}/state")
        assert state["state"] == "up", state
        addresses = [a["address"] for a in state["addresses"] if a["family"] == "inet"]
        assert any(
            ipaddress.ip_address(a) in ipaddress.ip_network(topology.INCUS.subnet)
            for a in addresses
        ), addresses
        name = f"lxdsp-clu-standalone-{uuid.uuid4().hex[:8]}"
        await local.create_instance(name, source=TINY, start=False)
        await local.delete_instance(name)


async def test_prepull_unpacks_the_image_on_every_member(cl, cluster):
    """`lxdspawner prepull`: every member then holds the image in its own pool."""
    cli = Path(sys.executable).parent / "lxdspawner"
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "prepull",
        "--image",
        "lxdspawner-tiny",
        "--endpoint",
        cluster.endpoint,
        "--cert",
        cluster.client_cert,
        "--key",
        cluster.client_key,
        "--server-cert",
        cluster.server_cert,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    for member in cluster.members:
        assert f"{member}: lxdspawner-tiny ready" in out, out
        # Its shared read-only copies: /usr is made on each member; this image has no
        # /opt/jupyterhub, which is skipped, not an error.
        assert f"{member}: shared /usr ready" in out, out
        assert f"{member}: shared /opt/jupyterhub: not in the image, skipped" in out, out
        volume = await cl.get_volume(
            "lxdspawner",
            names.shared_volume_name(await cl.image_fingerprint("lxdspawner-tiny"), "/usr"),
            target=member,
        )
        assert volume["config"][sharing.KEY_READY] == "true"
    fingerprint = (await cl.image_alias("lxdspawner-tiny"))["target"]
    for member in cluster.members:
        volumes = await cl.request(
            "GET", "/1.0/storage-pools/lxdspawner/volumes/image", params={"target": member}
        )
        assert any(v.split("?")[0].endswith(fingerprint) for v in volumes), (member, volumes)
    leftovers = [i for i in await cl.list_instances(recursion=0) if "prepull" in i]
    assert leftovers == []
