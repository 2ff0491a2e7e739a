"""The warm pool end to end, on the real Incus through a real JupyterHub: one hub for every
check (pool.py, warmpool.py, preload.py).

A user's first page fills the pool; a member waits with its server's code imported and no
secret in it; a spawn takes it (the user's server is that container), serving as the user's uid
with the user's home volume; the pool is refilled; a hub restart keeps the member and uses it;
the image alias moving replaces it, and members of the image it moved to serve."""

from __future__ import annotations

import asyncio
import io
import re
import time

import aiohttp
import pytest

from lxdspawner import cli
from lxdspawner.lxd import LxdClient, NotFound
from lxdspawner.ownership import KEY_HUB, KEY_POOL, KEY_USER
from testbench.hubtools import LXD_HUB_IP, running_hub

from .conftest import SOCKETS, test_daemons
from .test_volumes import config, ok, wait_gone

# 64 MiB homes; the shared directories are another test's business (and per image: the
# rotation's second image would get its own copies).
SETTINGS = {
    "warm_pool_size": 1,
    "warm_pool_check_interval": 1.0,
    "home_volume_size": "64MiB",
    "shared_directories": [],
}


async def members(client: LxdClient, prefix: str, hub: str) -> list[dict]:
    """The hub's pool members waiting for a user (by their keys), oldest name first."""
    found = []
    for i in await client.list_instances(recursion=1):
        c = i.get("config") or {}
        if i["name"].startswith(prefix + "-") and c.get(KEY_HUB) == hub and c.get(KEY_POOL):
            if not c.get(KEY_USER):
                found.append(i)
    return sorted(found, key=lambda i: i["name"])


async def wait_member(
    client: LxdClient, prefix: str, hub: str, *, not_named=(), timeout: float = 90
) -> dict:
    """A running member not in ``not_named`` whose preloader waits for its claim."""
    deadline = time.monotonic() + timeout
    while True:
        for m in await members(client, prefix, hub):
            if m["name"] in not_named or m["status"] != "Running":
                continue
            try:
                log = await client.read_file_tail(m["name"], "/var/log/jupyterhub-singleuser.log")
            except NotFound:
                continue
            if b"waiting" in log:
                return m
        assert time.monotonic() < deadline, f"no waiting pool member within {timeout} s"
        await asyncio.sleep(0.5)


async def server_pid(client: LxdClient, name: str) -> str:
    return await ok(client, name, "systemctl show -p MainPID --value jupyterhub-singleuser")


async def user_token(hub, user: str) -> str:
    status, body = await hub.api("POST", f"/users/{user}/tokens", json={"note": "pool test"})
    assert status in (200, 201), body
    return body["token"]


async def api_as(hub, path: str, token: str) -> tuple[int, str]:
    async with hub.session.get(
        hub.public_url + path,
        headers={"Authorization": f"token {token}"},
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        return r.status, await r.text()


async def log_in(hub, user: str) -> str:
    """Log ``user`` in through the login form, as a browser does; the page it lands on."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.get(hub.public_url + "/hub/login") as r:
            xsrf = re.search(r'name="_xsrf" value="([^"]+)"', await r.text())
        form = {"username": user, "password": hub.password}
        if xsrf:
            form["_xsrf"] = xsrf.group(1)
        async with browser.post(hub.public_url + "/hub/login", data=form) as r:
            assert r.status == 200, await r.text()
            return str(r.url)


async def instance_of(client: LxdClient, prefix: str, user: str) -> str:
    for i in await client.list_instances(recursion=1):
        if i["name"].startswith(prefix + "-") and i["config"].get(KEY_USER) == user:
            return i["name"]
    raise AssertionError(f"no container of {user}")


@pytest.mark.parametrize("daemon", test_daemons())
async def test_a_spawn_takes_a_preloaded_member_and_the_pool_is_kept_and_rotated(
    daemon, tmp_path, prefix, leftovers
):
    async with LxdClient(f"unix://{SOCKETS[daemon]}") as incus:
        await _pool_end_to_end(daemon, tmp_path, prefix, incus)


async def _pool_end_to_end(daemon: str, tmp_path, prefix: str, incus: LxdClient) -> None:
    alias = f"{prefix}-img"
    base = await incus.image_fingerprint("jupyter-base")
    tiny = await incus.image_fingerprint("lxdspawner-tiny")
    assert base and tiny, "the test images are missing (make setup)"
    await incus.request("POST", "/1.0/images/aliases", json_body={"name": alias, "target": base})
    try:
        text = config(prefix, daemon, **SETTINGS).replace('"jupyter-base"', repr(alias))
        kwargs = {"hub_ip": LXD_HUB_IP} if daemon == "lxd" else {}
        async with running_hub(tmp_path, text, **kwargs) as hub:
            hub_id = hub.hub_id
            # alice logs in: her first page makes her spawner, and with it the pool, before
            # anybody spawns.
            assert "/hub/spawn" in await log_in(hub, "alice")
            member = await wait_member(incus, prefix, hub_id)
            assert "warm pool: filling 1 of" in hub.log()
            name = member["name"]

            # Waiting: nothing of any user, no token, in the member.
            assert not (member["config"].get("user.jupyterhub.server"))
            code = await ok(
                incus,
                name,
                "ls /etc/lxdspawner/pool-env.json /etc/lxdspawner/singleuser.env "
                "2>/dev/null | wc -l",
            )
            assert code == "0"
            pid = await server_pid(incus, name)
            environ = await ok(incus, name, f"tr '\\0' '\\n' < /proc/{pid}/environ")
            assert "JUPYTERHUB" not in environ, environ
            assert await ok(incus, name, f"stat -c %u /proc/{pid}") == "0"
            out = io.StringIO()  # what an operator sees
            assert await cli.list_servers(incus, out=out) == 0
            (row,) = [line for line in out.getvalue().splitlines() if name in line]
            assert row.split()[:3] == ["(pool)", "-", name], row

            # bob's spawn takes it: his server is that container, as his uid, his home.
            started = time.monotonic()
            await hub.start_server("bob")
            took = time.monotonic() - started
            assert await instance_of(incus, prefix, "bob") == name
            assert f"Taking the preloaded container {name} from the warm pool" in hub.log()
            pid = await server_pid(incus, name)
            assert await ok(incus, name, f"stat -c %u /proc/{pid}") == "1000"
            assert await ok(incus, name, f"readlink /proc/{pid}/cwd") == "/home/bob"
            assert await ok(incus, name, "stat -c '%u %a' /home/bob") == "1000 700"
            mounted = await ok(incus, name, "grep ' /home/bob ' /proc/self/mountinfo | wc -l")
            assert mounted == "1", "the home volume is not mounted at the home"
            assert await ok(incus, name, "stat -c '%u %a' /etc/lxdspawner/pool-env.json") == (
                "1000 600"
            )
            # The server is bob's: it loaded his environment (/proc/<pid>/environ shows only
            # what the process started with), so it lets bob in, and not alice.
            for user, expected in (("bob", 200), ("alice", 403)):
                token = await user_token(hub, user)
                status, body = await api_as(hub, "/user/bob/api/status", token)
                assert status == expected, f"{user}: {status} {body}"
            print(f"spawn from the pool: {took:.2f} s")

            # Refilled in the background; bob's container goes at his stop, used once.
            refill = await wait_member(incus, prefix, hub_id, not_named={name})
            await hub.stop_server("bob")
            await wait_gone(incus, name)

            # A hub restart keeps the member, and the next spawn takes it.
            # (The restarted hub deletes its members when it exits: checked at the end.)
            hub.set_cleanup_servers(False)
            hub.add_config("c.LxdSpawner.warm_pool_remove_on_exit = True\n")
            await hub.restart()
            assert [m["name"] for m in await members(incus, prefix, hub_id)] == [refill["name"]]
            await hub.start_server("carol")
            assert await instance_of(incus, prefix, "carol") == refill["name"]
            third = await wait_member(incus, prefix, hub_id, not_named={refill["name"]})

            # The alias moves to another image: the member is deleted, and members of the new
            # definition are made (lxdspawner-tiny has no systemd: making them fails after
            # the create, which is that image's business, and is retried later, not at once).
            await incus.request("PUT", f"/1.0/images/aliases/{alias}", json_body={"target": tiny})
            old_key = third["config"][KEY_POOL][:8]
            deadline = time.monotonic() + 60
            while True:
                log = hub.log()
                made = [
                    line
                    for line in log.splitlines()
                    if f"warm pool: making {prefix}-pool-" in line
                    and f"{prefix}-pool-{old_key}-" not in line
                ]
                if f"deleting {third['name']} (its definition is replaced)" in log and made:
                    break
                assert time.monotonic() < deadline, "not rotated"
                await asyncio.sleep(0.5)
            await wait_gone(incus, third["name"])
            assert "the next try in 15 s" in made[0], made

            # The alias moves to an image that works: its members are made, and serve.
            await incus.request("PUT", f"/1.0/images/aliases/{alias}", json_body={"target": base})
            fourth = await wait_member(incus, prefix, hub_id, not_named={third["name"]})
            await hub.start_server("dave")
            assert await instance_of(incus, prefix, "dave") == fourth["name"]
            pid = await server_pid(incus, fourth["name"])
            assert await ok(incus, fourth["name"], f"readlink /proc/{pid}/cwd") == "/home/dave"
            hub.set_cleanup_servers(True)
        # warm_pool_remove_on_exit: the hub's exit deleted its members.
        assert await members(incus, prefix, hub_id) == []
    finally:
        await incus.request("DELETE", f"/1.0/images/aliases/{alias}")
