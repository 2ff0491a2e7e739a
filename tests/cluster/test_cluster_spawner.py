"""The spawner on a real three-member cluster, through a real JupyterHub and proxy.

The hub runs on the host, binds its API on the cluster segment's host address
(``cluster.hub_ip``) and talks to the cluster over HTTPS (member1's address, pinned certificate),
as a production hub would. Servers land where the placement policy says; a burst of
concurrent spawns spreads; weights hold; an offline member is skipped; a member lost just
before a spawn gives a clean failure and a working retry; a hub restart finds the servers on
every member.

Time: each jupyter-base server costs a few CPU seconds to start, and this machine has two
cores: thirty JupyterLabs starting at once would take it more than a minute. Placement is what
these tests are about, so most of them run a light HTTP server (LIGHT_SERVER) in the same
image, through the same container, unit and readiness path; the real server runs on the
cluster in the member-lost test, and everywhere in the standalone and browser tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp
import pytest

from lxdspawner.lxd import LxdError, NotFound, image_source
from lxdspawner.objects import KEY_MANAGED, KEY_USER, MANAGED_BY
from testbench.hubtools import SpawnFailed, instance_diagnostics, running_hub

from .conftest import (
    BASE_IMAGE,
    start_member,
    stop_member,
    wait_for_ipv4,
    wait_for_status,
)

BURST = int(os.environ.get("LXDSPAWNER_CLUSTER_BURST", "30"))
WEIGHTED_BURST = int(os.environ.get("LXDSPAWNER_CLUSTER_WEIGHTED_BURST", "12"))


#: Answers 200 to every GET (so api/status through the proxy works), in a tenth of a second.
LIGHT_SERVER = (
    "import http.server as s;"
    "h=type('H',(s.BaseHTTPRequestHandler,),{'do_GET':lambda r:"
    "(r.send_response(200),r.end_headers(),r.wfile.write(b'{}'))});"
    "s.ThreadingHTTPServer(('',8888),h).serve_forever()"
)


def hub_config(cluster, extra: str = "", light: bool = True) -> str:
    server = f"c.Spawner.cmd = ['/usr/bin/python3', '-c', {LIGHT_SERVER!r}]\n" if light else ""
    return (
        'c.JupyterHub.spawner_class = "lxd"\n'
        f"c.LxdSpawner.image = {BASE_IMAGE!r}\n"
        + server
        + cluster.spawner_config()
        # Two cores for thirty servers: give each plenty of time.
        + "c.Spawner.start_timeout = 300\n"
        "c.Spawner.http_timeout = 300\n"
        "c.JupyterHub.concurrent_spawn_limit = 100\n"
        "c.Spawner.poll_interval = 5\n" + extra
    )


async def locations(cl, users) -> dict[str, str]:
    """user -> member of their instance, as the cluster reports it."""
    wanted = set(users)
    where: dict[str, str] = {}
    for inst in await cl.list_instances():
        config = inst.get("config") or {}
        if config.get(KEY_MANAGED) == MANAGED_BY and config.get(KEY_USER) in wanted:
            assert config[KEY_USER] not in where, f"two instances for {config[KEY_USER]}"
            where[config[KEY_USER]] = inst["location"]
    return where


def address_of(cluster, member: str) -> str:
    """The address a member answers on (in messages about it)."""
    return urlsplit(cluster.member_urls[member]).hostname


def with_diagnostics(hub, cluster, prefix: str) -> None:
    hub.diagnostics = lambda: instance_diagnostics(prefix, cli=cluster.cli)


async def start_all(hub, users, timeout=420) -> float:
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(hub.start_server(u, timeout=timeout) for u in users), return_exceptions=True
    )
    failures = {u: r for u, r in zip(users, results, strict=True) if isinstance(r, BaseException)}
    assert not failures, f"{len(failures)} of {len(users)} spawns failed: {failures}"
    return time.monotonic() - t0


async def test_burst_spreads_evenly_and_a_hub_restart_finds_every_server(cluster, cl, tmp_path):
    users = [f"cb{i:02d}" for i in range(BURST)]
    async with running_hub(
        tmp_path, config=hub_config(cluster), hub_ip=cluster.hub_ip, cleanup_servers=False
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-cb")
        took = await start_all(hub, users)
        where = await locations(cl, users)
        counts = Counter(where.values())
        spread = dict(sorted(counts.items()))
        print(f"{BURST} concurrent spawns ready in {took:.1f} s; spread {spread}")
        assert set(where) == set(users)
        assert set(counts) == set(cluster.members)
        assert max(counts.values()) - min(counts.values()) <= 2  # 10/10/10 +-1
        assert all(abs(n - BURST / 3) <= 1 for n in counts.values()), counts

        # The spawner's state records the member (the hub shows state to admins).
        for user in users:
            server = await hub.server_model(user)
            assert server["ready"]
            if "state" in server:
                assert server["state"].get("member") == where[user], server["state"]

        # A hub restart finds every server again, on every member, and they stay reachable.
        t0 = time.monotonic()
        await hub.restart()
        print(f"hub restart with {BURST} servers: {time.monotonic() - t0:.1f} s")
        for user in users:
            server = await hub.server_model(user)
            assert server is not None and server["ready"], (user, server)
        for member in cluster.members:
            user = next(u for u in users if where[u] == member)
            server = await hub.server_model(user)
            status, body = await hub.get_via_proxy(server["url"] + "api/status")
            assert status == 200, (member, user, status, body[:300])
        t0 = time.monotonic()
        await hub.stop_all_servers(timeout=300)
        print(f"stopping {BURST} servers: {time.monotonic() - t0:.1f} s")
        deadline = time.monotonic() + 60
        while left := await locations(cl, users):
            assert time.monotonic() < deadline, f"containers left: {left}"
            await asyncio.sleep(1)


async def test_weights_2_1_1(cluster, cl, tmp_path):
    users = [f"cw{i:02d}" for i in range(WEIGHTED_BURST)]
    extra = 'c.LxdSpawner.host_weights = {"member1": 2, "member2": 1, "member3": 1}\n'
    async with running_hub(
        tmp_path, config=hub_config(cluster, extra), hub_ip=cluster.hub_ip
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-cw")
        took = await start_all(hub, users)
        counts = Counter((await locations(cl, users)).values())
        print(f"{WEIGHTED_BURST} spawns with weights 2:1:1 in {took:.1f} s: {dict(counts)}")
        n = WEIGHTED_BURST
        assert abs(counts["member1"] - n / 2) <= 1, counts
        assert abs(counts["member2"] - n / 4) <= 1, counts
        assert abs(counts["member3"] - n / 4) <= 1, counts


async def test_weight_zero_and_target_group(cluster, cl, tmp_path):
    """host_weights 0 keeps a member empty; target "@group" keeps servers in the group."""
    group = "lxdsp-spawn"
    await cl.request(
        "POST",
        "/1.0/cluster/groups",
        json_body={"name": group, "description": "", "members": ["member1", "member2"]},
    )
    try:
        extra = f'c.LxdSpawner.host_weights = {{"member1": 0}}\nc.LxdSpawner.target = "@{group}"\n'
        users = ["cg0", "cg1", "cg2"]
        async with running_hub(
            tmp_path, config=hub_config(cluster, extra), hub_ip=cluster.hub_ip
        ) as hub:
            with_diagnostics(hub, cluster, "jupyter-cg")
            await start_all(hub, users)
            assert set((await locations(cl, users)).values()) == {"member2"}
    finally:
        await cl.request("PUT", f"/1.0/cluster/groups/{group}", json_body={"members": []})
        await cl.request("DELETE", f"/1.0/cluster/groups/{group}")


#: Servers without a persistent home volume (home in the container's root disk).
NO_HOME_VOLUMES = 'c.LxdSpawner.home_volume_size = ""\n'

#: "ck0" keeps its container (remove = False), on member3.
KEEP_CK0 = """
def _keep(spawner):
    if spawner.user.name == "ck0":
        spawner.remove = False
        spawner.target = "member3"

c.Spawner.pre_spawn_hook = _keep
"""


async def test_offline_member_is_skipped_and_the_hub_keeps_serving(cluster, cl, tmp_path):
    """...and a kept container (remove = False) on the offline member stays, for its user."""
    loop = asyncio.get_running_loop()
    first = ["co0", "co1", "co2"]
    more = ["co3", "co4", "co5", "co6"]
    # A short grace and poll interval keep the test short; the default grace is 60 s. No home
    # volumes: the stranded user starts again elsewhere, which a home on member3 forbids (see
    # test_a_users_servers_follow_their_home_volume).
    grace = (
        "c.LxdSpawner.member_offline_grace = 5\nc.Spawner.poll_interval = 2\n"
        + NO_HOME_VOLUMES
        + KEEP_CK0
    )
    async with running_hub(
        tmp_path, config=hub_config(cluster, grace), hub_ip=cluster.hub_ip
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-co")
        await start_all(hub, first)
        where = await locations(cl, first)
        assert sorted(where.values()) == list(cluster.members)  # one each
        on_member3 = next(u for u in first if where[u] == "member3")
        stranded = await wait_for_ipv4(cl, f"jupyter-{on_member3}")
        await hub.start_server("ck0", timeout=300)
        kept = "jupyter-ck0"
        assert (await cl.get_instance(kept))["location"] == "member3"
        made = await cl.exec(kept, ["/bin/sh", "-c", "echo mine > /root/kept.txt"])
        assert made.exit_code == 0, made.output

        await loop.run_in_executor(None, stop_member, 3)
        try:
            took = await wait_for_status(cl, "member3", want_online=False)
            print(f"member3 offline after {took:.1f} s")
            # Creating on it anyway fails, quickly and saying so.
            t0 = time.monotonic()
            with pytest.raises(LxdError):
                await cl.create_instance(
                    "lxdsp-test-nowhere", source=image_source(BASE_IMAGE), target="member3"
                )
            assert time.monotonic() - t0 < 30
            # Its containers keep running: the daemon is gone, not the machine.
            async with aiohttp.ClientSession(trust_env=False) as http:
                async with http.get(
                    f"http://{stranded}:8888/", timeout=aiohttp.ClientTimeout(total=10)
                ) as r:
                    assert r.status == 200
            await start_all(hub, more)
            placed = await locations(cl, more)
            print(f"spawns while member3 is offline: {placed}")
            assert "member3" not in placed.values()
            # The other users' servers keep answering through the hub's proxy.
            for user in first + more:
                if user == on_member3:
                    continue
                server = await hub.server_model(user)
                status, _ = await hub.get_via_proxy(server["url"] + "api/status")
                assert status == 200, user
            # The server on the offline member cannot be reached: once the member has stayed
            # offline for the grace period, poll() reports it stopped, and the user can start
            # again at once, elsewhere.
            deadline = time.monotonic() + 90
            while await hub.server_model(on_member3) is not None:
                assert time.monotonic() < deadline, "the hub still lists the unreachable server"
                await asyncio.sleep(1)
            await hub.start_server(on_member3, timeout=300)
            assert (await locations(cl, [on_member3]))[on_member3] != "member3"
            # The kept server is reported stopped too; its container stays where it is, and
            # starting it meanwhile fails saying so, rather than making another elsewhere.
            while await hub.server_model("ck0") is not None:
                assert time.monotonic() < deadline + 30, "the hub still lists ck0's server"
                await asyncio.sleep(1)
            assert f"its container {kept} is kept" in hub.log()
            with pytest.raises(SpawnFailed) as failed:
                await hub.start_server("ck0", timeout=120)
            assert "kept" in str(failed.value), str(failed.value)
        finally:
            await loop.run_in_executor(None, start_member, 3)
            with contextlib.suppress(NotFound):  # in case the failed create left a record
                await cl.delete_instance("lxdsp-test-nowhere")
        # Back online, member3 loses the stranded container (it was reported stopped).
        deadline = time.monotonic() + 60
        while any(
            i["location"] == "member3" and (i.get("config") or {}).get(KEY_USER) == on_member3
            for i in await cl.list_instances()
        ):
            assert time.monotonic() < deadline, "the stranded container was not removed"
            await asyncio.sleep(1)
        # ...while the kept one is still there, with what its user put in it.
        server = await hub.start_server("ck0", timeout=300)
        status, _ = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200
        assert (await cl.get_instance(kept))["location"] == "member3"
        assert (await cl.read_file(kept, "/root/kept.txt")) == b"mine\n"
        await hub.stop_server("ck0")
        assert (await cl.get_instance(kept))["status"] == "Stopped"
        status, body = await hub.api("DELETE", "/users/ck0")
        assert status == 204, body
        deadline = time.monotonic() + 60
        while not await _gone(cl, kept):
            assert time.monotonic() < deadline, f"{kept} stayed after its user was deleted"
            await asyncio.sleep(1)


async def _gone(cl, name: str) -> bool:
    try:
        await cl.get_instance(name)
    except NotFound:
        return True
    return False


POLICY = """
from lxdspawner.placement import weighted_least_loaded

def prefer_member3(members, request):
    # An operator's policy: member3 while the cluster says it is Online, else the default.
    if any(m.name == "member3" and m.status == "Online" for m in members):
        return "member3"
    return weighted_least_loaded(members, request)

c.LxdSpawner.placement_policy = prefer_member3
"""


async def test_member_lost_before_the_spawn_reaches_it(cluster, cl, tmp_path):
    """member3 crashes; the cluster still calls it Online for a few seconds, the policy picks
    it: the spawn must fail quickly with a message naming it, leave nothing behind, and a
    retry must work."""
    loop = asyncio.get_running_loop()
    config = hub_config(cluster, POLICY, light=False)  # here the real server, on the cluster
    async with running_hub(tmp_path, config=config, hub_ip=cluster.hub_ip) as hub:
        with_diagnostics(hub, cluster, "jupyter-cm")
        server = await hub.start_server("cm0")
        assert await locations(cl, ["cm0"]) == {"cm0": "member3"}  # the policy is used
        status, body = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200 and "last_activity" in body, (status, body[:300])

        await loop.run_in_executor(None, lambda: stop_member(3, kill=True))
        try:
            t0 = time.monotonic()
            with pytest.raises(SpawnFailed) as e:
                await hub.start_server("cm1", timeout=120)
            took = time.monotonic() - t0
            print(f"spawn on the lost member failed in {took:.1f} s: {e.value.message}")
            assert took < 60
            assert "member3" in e.value.message or address_of(cluster, "member3") in e.value.message
            # Retry at once: it must not stay stuck on the lost member.
            t0 = time.monotonic()
            await hub.start_server("cm1", timeout=300)
            print(f"retry succeeded in {time.monotonic() - t0:.1f} s")
            assert (await locations(cl, ["cm1"]))["cm1"] != "member3"
        finally:
            await loop.run_in_executor(None, start_member, 3)
        # Nothing half-created on member3 now that it is back: cm1 has one instance, elsewhere.
        where = await locations(cl, ["cm0", "cm1"])
        assert where["cm0"] == "member3"
        assert where["cm1"] != "member3"


async def test_member_lost_during_a_spawn(cluster, cl, tmp_path):
    """member3 crashes while a spawn on it is preparing (the container exists and runs there):
    the spawn must fail within a bounded time, a retry must work, and once member3 is back
    nothing of the failed spawn may remain on it."""
    loop = asyncio.get_running_loop()
    # A preparation step long enough to kill the member in the middle of it. No home volumes:
    # the one this spawn made on member3 would stay there (its container had started) and
    # pin the retry to member3 (see test_a_users_servers_follow_their_home_volume).
    extra = POLICY + 'c.LxdSpawner.commands_to_prepare = ["sleep 8"]\n' + NO_HOME_VOLUMES
    async with running_hub(
        tmp_path, config=hub_config(cluster, extra), hub_ip=cluster.hub_ip
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-cd")
        spawn = asyncio.create_task(hub.start_server("cd0", timeout=180))
        deadline = time.monotonic() + 120
        while True:  # until the container runs on member3
            running = [
                i
                for i in await cl.list_instances()
                if (i.get("config") or {}).get(KEY_USER) == "cd0" and i["status"] == "Running"
            ]
            if running:
                break
            if spawn.done():
                await spawn  # raises the spawn's own failure
                raise AssertionError("the spawn finished before its container was seen running")
            assert time.monotonic() < deadline, "cd0's container never ran"
            await asyncio.sleep(0.2)
        assert running[0]["location"] == "member3"
        await asyncio.sleep(1)
        await loop.run_in_executor(None, lambda: stop_member(3, kill=True))
        t0 = time.monotonic()
        try:
            with pytest.raises(SpawnFailed) as e:
                await spawn
            took = time.monotonic() - t0
            print(f"spawn failed {took:.1f} s after its member died: {e.value.message}")
            assert took < 90
            assert "member3" in e.value.message or address_of(cluster, "member3") in e.value.message
            t0 = time.monotonic()
            await hub.start_server("cd0", timeout=300)
            print(f"retry succeeded in {time.monotonic() - t0:.1f} s")
            assert (await locations(cl, ["cd0"]))["cd0"] != "member3"
        finally:
            await loop.run_in_executor(None, start_member, 3)
        # Once member3 is back, the half-made container there goes (within a minute).
        deadline = time.monotonic() + 60
        while True:
            on_member3 = [
                i["name"]
                for i in await cl.list_instances()
                if (i.get("config") or {}).get(KEY_USER) == "cd0" and i["location"] == "member3"
            ]
            if not on_member3:
                break
            assert time.monotonic() < deadline, f"left on member3: {on_member3}"
            await asyncio.sleep(1)


async def test_a_nic_the_daemon_cannot_isolate_is_refused_naming_the_setting(cluster, cl, tmp_path):
    """The test cluster's containers have macvlan NICs (docs/cluster.md): with the default
    network_isolation the spawn fails saying what to change, and leaves nothing behind."""
    config = hub_config(cluster, 'c.LxdSpawner.network_isolation = "ports"\n')
    async with running_hub(tmp_path, config=config, hub_ip=cluster.hub_ip) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("cmac", timeout=120)
        message = str(failed.value)
        assert "macvlan" in message and "network_isolation" in message, message
        assert "cmac" not in await locations(cl, ["cmac"])


#: host_weights read at each spawn from a file the test writes (the hub keeps running).
WEIGHTS_FROM_FILE = """
import json

def _weights(spawner):
    with open({path!r}) as f:
        spawner.host_weights = json.load(f)

c.Spawner.pre_spawn_hook = _weights
"""


async def test_a_users_servers_follow_their_home_volume(cluster, cl, tmp_path):
    """(a) The second spawn goes to the member holding the user's home volume, though the
    weights say another; (b) that member stopped, the spawn fails at once naming the member
    and the volume (and makes no empty home elsewhere), both before the cluster notices and
    once it calls the member offline; (c) moved with Volumes.move, the home comes along and
    the next server lands where it is now."""
    from lxdspawner import volumes

    loop = asyncio.get_running_loop()
    user, home, pool = "cv0", "jupyter-home-cv0", "lxdspawner"
    weights = tmp_path / "weights.json"
    weights.write_text('{"member1": 0.01, "member2": 0.01, "member3": 1}')
    extra = WEIGHTS_FROM_FILE.format(path=str(weights))
    async with running_hub(
        tmp_path, config=hub_config(cluster, extra), hub_ip=cluster.hub_ip
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-cv")
        await hub.start_server(user, timeout=300)
        assert await locations(cl, [user]) == {user: "member3"}
        volume = await cl.get_volume(pool, home)
        assert volume["location"] == "member3" and volume["config"]["size"] == str(10 * 2**30)
        container = f"jupyter-{user}"
        wrote = await cl.exec(container, ["/bin/sh", "-c", f"echo mine > /home/{user}/notes.txt"])
        assert wrote.exit_code == 0, wrote.output
        await hub.stop_server(user)

        # (a) The weights now say member1; the home says member3.
        weights.write_text('{"member1": 1, "member2": 0.01, "member3": 0.01}')
        await hub.start_server(user, timeout=300)
        assert await locations(cl, [user]) == {user: "member3"}
        await hub.stop_server(user)
        deadline = time.monotonic() + 60
        while await locations(cl, [user]):  # its container goes in the background
            assert time.monotonic() < deadline, "the stopped server's container stayed"
            await asyncio.sleep(0.5)

        # (b) member3 stops: the cluster calls it Online for a while yet, then Offline.
        await loop.run_in_executor(None, stop_member, 3)
        try:
            for when in ("at once", "once the cluster calls it offline"):
                if when != "at once":
                    took = await wait_for_status(cl, "member3", want_online=False)
                    print(f"member3 offline after {took:.1f} s")
                t0 = time.monotonic()
                with pytest.raises(SpawnFailed) as failed:
                    await hub.start_server(user, timeout=120)
                took = time.monotonic() - t0
                message = failed.value.message
                print(f"spawn with member3 down ({when}) failed in {took:.1f} s: {message}")
                assert took < 15, took
                assert "member3" in message and home in message, message
                assert "volumes move" in message, message
                assert user not in await locations(cl, [user])
                held = [v for v in await cl.list_volumes(pool) if v["name"] == home]
                assert [v["location"] for v in held] == ["member3"]  # no fresh home elsewhere
        finally:
            await loop.run_in_executor(None, start_member, 3)

        # (c) Moved to member2, the home goes with it, and so does the next server. member2
        # pulls the copy from member3, and for some seconds after member3 is back Online, until
        # member2's event connection to it is up again, Incus answers "Server isn't ready yet"
        # (a failed move leaves the volume where it was): an admin starts again, so does this.
        t0 = time.monotonic()
        while True:
            try:
                await volumes.Volumes(cl).move(pool, home, "member2")
                break
            except volumes.VolumeError as e:
                assert "isn't ready yet" in e.message and "it stays on member3" in e.message, e
                assert time.monotonic() - t0 < 60, e.message
                await asyncio.sleep(1)
        print(f"Volumes.move member3 -> member2: {time.monotonic() - t0:.1f} s")
        moved = await cl.get_volume(pool, home)
        assert moved["location"] == "member2" and moved["config"] == volume["config"]
        server = await hub.start_server(user, timeout=300)
        assert await locations(cl, [user]) == {user: "member2"}
        status, _ = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200
        assert await cl.read_file(container, f"/home/{user}/notes.txt") == b"mine\n"
        # In use, it stays.
        with pytest.raises(volumes.VolumeError, match="is used by"):
            await volumes.Volumes(cl).move(pool, home, "member1")
        await hub.stop_server(user)
