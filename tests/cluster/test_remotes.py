"""One hub, three remotes: the local Incus and the local LXD 5.0 (unix sockets, in ``remotes``),
and the three-member Incus cluster over HTTPS as a remote of the incus command line (a config
directory with its config.yml, client certificate and servercerts/, given to the hub as
INCUS_CONF).

A server goes where the profile the user chose says: one profile per remote, each setting
``remote`` in its ``spawner_override`` (PROFILES). Three servers are started through the REST
API with ``user_options = {"profile": ...}``, a fourth through the spawn page's form in the real
browser (Chromium). Each server is reached through the proxy and its container is on the daemon
it should be on, and on no other; a hub restart finds them all. Then the cluster remote goes
down (its address is a TCP forwarder in this process, in front of member1, which the test stops:
the host's daemons and the cluster stay up for the tests running beside this one): a spawn there
fails naming the remote, spawns and polls on the two others go on, and nothing is stopped or
deleted anywhere.

This hub's id does not start with ``testbench-``: the other pytest session's clean-ups leave it
alone; it cleans up its own instances on all three daemons at the end. Its servers are
LIGHT_SERVER (the question is where they are, not JupyterLab) with ``network_isolation =
"open"`` (no ACL made on the shared bridges; the cluster's macvlan NICs need it anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lxdspawner.lxd import LxdClient, LxdError
from lxdspawner.network import forget_hub
from lxdspawner.ownership import KEY_HUB, KEY_USER
from testbench import topology
from testbench.hubtools import CHROMIUM, CHROMIUM_ARGS, SpawnFailed, chromium_missing, running_hub

from .conftest import BASE_IMAGE
from .test_cluster_spawner import LIGHT_SERVER


@pytest.fixture(autouse=True, scope="module")
def host_daemons_settled():
    """This test drives the host's Incus and LXD from the cluster's session, which
    scripts/run-tests.sh runs beside the host's sessions: it first waits for the `exclusive`
    tests to end (they stop and restart those daemons; ci49 lost LXD under this test). The
    script holds LXDSPAWNER_EXCLUSIVE_LOCK exclusively while they run."""
    path = os.environ.get("LXDSPAWNER_EXCLUSIVE_LOCK")
    if path:
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # blocks while the exclusive tests run
            fcntl.flock(lock, fcntl.LOCK_UN)
    return None


#: One profile per remote ("incus" the default), and one naming a remote nobody configured.
PROFILES = """
c.LxdSpawner.profile_list = [
    {"display_name": "Local Incus", "slug": "incus", "default": True,
     "spawner_override": {"remote": "incus"}},
    {"display_name": "Local LXD 5.0", "slug": "lxd", "spawner_override": {"remote": "lxd"}},
    {"display_name": "The cluster", "slug": "cluster",
     "description": "three Incus members over HTTPS", "spawner_override": {"remote": "cluster"}},
    {"display_name": "Misconfigured", "slug": "nowhere", "spawner_override": {"remote": "nowhere"}},
]
"""


class Forwarder:
    """A loopback TCP port forwarding to ``target``: the cluster remote's address, which the
    test can take down (every connection closed, the port refused) and bring back."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src, dst) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


def cli_config(directory: Path, cluster, port: int) -> Path:
    """What `incus remote add cluster https://...` leaves, pointing at the forwarder."""
    (directory / "servercerts").mkdir(parents=True)
    shutil.copy(cluster.client_cert, directory / "client.crt")
    shutil.copy(cluster.client_key, directory / "client.key")
    shutil.copy(cluster.server_cert, directory / "servercerts" / "cluster.crt")
    (directory / "config.yml").write_text(
        "default-remote: local\n"
        "remotes:\n"
        "  cluster:\n"
        f"    addr: https://127.0.0.1:{port}\n"
        "    protocol: incus\n"
        "    public: false\n"
    )
    return directory


def hub_config(hub_id: str) -> str:
    remotes = {
        "incus": {"endpoint": topology.INCUS.endpoint},
        "lxd": {"endpoint": topology.LXD.endpoint},
    }  # "cluster" is not here: it is the incus command line's (INCUS_CONF)
    return (
        'c.JupyterHub.spawner_class = "lxd"\n'
        f"c.LxdSpawner.hub_id = {hub_id!r}\n"
        f"c.LxdSpawner.remotes = {remotes!r}\n"
        f"c.LxdSpawner.image = {BASE_IMAGE!r}\n"
        f"c.Spawner.cmd = ['/usr/bin/python3', '-c', {LIGHT_SERVER!r}]\n"
        'c.LxdSpawner.name_prefix = "jrmt"\n'
        'c.LxdSpawner.home_volume_size = ""\n'
        'c.LxdSpawner.network_isolation = "open"\n'
        "c.LxdSpawner.shared_directories = []\n"
        "c.LxdSpawner.clone_shifted_base = False\n"
        "c.Spawner.start_timeout = 120\n"
        "c.Spawner.http_timeout = 120\n"
        "c.Spawner.poll_interval = 2\n" + PROFILES
    )


async def ours(client: LxdClient, hub_id: str) -> dict[str, str]:
    """user -> instance name of this hub's instances on one daemon."""
    return {
        (i.get("config") or {}).get(KEY_USER, ""): i["name"]
        for i in await client.list_instances(recursion=1)
        if (i.get("config") or {}).get(KEY_HUB) == hub_id
    }


async def clean_up(clients: dict[str, LxdClient], hub_id: str) -> None:
    for client in clients.values():
        for name in (await ours(client, hub_id)).values():
            with contextlib.suppress(LxdError):
                await client.stop_instance(name, force=True)
            with contextlib.suppress(LxdError):
                await client.delete_instance(name)
        with contextlib.suppress(LxdError):
            await forget_hub(client, hub_id)


async def spawn_in_browser(hub, user: str, profile: str) -> None:
    """Log in, choose ``profile`` on the spawn page, submit, and wait for the server's page
    (LIGHT_SERVER answers ``{}``)."""
    reason = chromium_missing()
    if reason:
        pytest.fail(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(60_000)
            await page.goto(hub.public_url + "/hub/login?next=/hub/spawn")
            await page.fill("#username_input", user)
            await page.fill("#password_input", hub.password)
            await page.click("#login_submit")
            choice = page.locator(f'input[name="profile"][value="{profile}"]')
            await choice.wait_for()
            assert await page.get_by_text("three Incus members over HTTPS").is_visible()
            await choice.check()
            await page.click('#spawn_form button[type="submit"]')
            await page.wait_for_url(re.compile(f".*/user/{re.escape(user)}/.*"), timeout=120_000)
            await page.wait_for_function("document.body.innerText.trim() === '{}'")
        finally:
            await browser.close()


async def test_one_hub_three_remotes(cluster, tmp_path, monkeypatch):
    hub_id = f"remotes-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:4]
    users = {remote: f"{remote}-{tag}" for remote in ("incus", "lxd", "cluster")}
    member1 = urlsplit(cluster.endpoint)
    forwarder = Forwarder(member1.hostname, member1.port or 8443)
    await forwarder.start()
    monkeypatch.setenv(
        "INCUS_CONF", str(cli_config(tmp_path / "incus-conf", cluster, forwarder.port))
    )
    clients = {
        "incus": LxdClient(topology.INCUS.endpoint),
        "lxd": LxdClient(topology.LXD.endpoint),
        "cluster": cluster.client(),
    }
    try:
        for client in clients.values():
            await client.open()
        async with running_hub(
            tmp_path / "hub",
            config=hub_config(hub_id),
            hub_ip=cluster.hub_ip,
            cleanup_servers=False,
        ) as hub:
            await asyncio.gather(
                *(hub.start_server(u, user_options={"profile": r}) for r, u in users.items())
            )

            async def check_everywhere(expected: dict[str, str]) -> None:
                """Each user's container is on its remote's daemon (user -> remote), on no
                other, and its server answers through the proxy."""
                found = {r: await ours(c, hub_id) for r, c in clients.items()}
                for user, remote in expected.items():
                    where = [r for r, there in found.items() if user in there]
                    assert where == [remote], (user, found)
                    server = await hub.server_model(user)
                    assert server and server["ready"], (user, server)
                    status, body = await hub.get_via_proxy(server["url"] + "api/status")
                    assert status == 200, (user, status, body[:300])

            # The form, in the real browser: the LXD profile (not the default) for a fourth user.
            by_form = f"lxdform-{tag}"
            await spawn_in_browser(hub, by_form, "lxd")
            placed = {user: remote for remote, user in users.items()} | {by_form: "lxd"}
            await check_everywhere(placed)
            server = await hub.server_model(users["cluster"])
            print(f"state shown: {'state' in server}")
            if "state" in server:  # the state records the remote and its name
                assert server["state"]["remote_name"] == "cluster", server["state"]
                assert server["state"]["endpoint"] == f"https://127.0.0.1:{forwarder.port}"

            await hub.restart()
            await check_everywhere(placed)

            # The cluster remote goes down.
            await forwarder.stop()
            late = f"cluster2-{tag}"
            with pytest.raises(SpawnFailed) as failed:
                await hub.start_server(late, user_options={"profile": "cluster"}, timeout=60)
            print(f"spawn on the remote that is down: {failed.value}")
            assert "remote 'cluster'" in str(failed.value), failed.value
            assert "not reachable" in str(failed.value), failed.value
            with pytest.raises(SpawnFailed) as unknown:
                await hub.start_server(f"nowhere-{tag}", user_options={"profile": "nowhere"})
            print(f"spawn on an unknown remote: {unknown.value}")
            assert "remote = 'nowhere'" in str(unknown.value), unknown.value
            assert "'incus'" in str(unknown.value) and "'cluster'" in str(unknown.value)

            # The others keep working: a new spawn on each, and the polls that ran since.
            more = {"incus": f"incus2-{tag}", "lxd": f"lxd2-{tag}"}
            await asyncio.gather(
                *(hub.start_server(u, user_options={"profile": r}) for r, u in more.items())
            )
            assert f"poll of {users['cluster']}" in hub.log()  # the hub polled it meanwhile
            for user in users.values():  # none of the servers was dropped, the cluster's too
                server = await hub.server_model(user)
                assert server and server["ready"], (user, server)
            # Nothing was stopped or deleted on any daemon.
            found = {r: await ours(c, hub_id) for r, c in clients.items()}
            for remote, user in users.items():
                assert user in found[remote], (user, found)
            status = await clients["cluster"].instance_state(found["cluster"][users["cluster"]])
            assert status["status"] == "Running"

            # A hub restarted while the remote is down starts, and finds the others' servers.
            await hub.restart()
            await check_everywhere({u: r for u, r in placed.items() if r != "cluster"})
            server = await hub.server_model(users["cluster"])
            assert server and server["ready"], server  # reported running: poll cannot tell

            # Back up (the same port): the hub stops every server as usual at the end.
            await forwarder.start()
            await hub.stop_all_servers()
            deadline = time.monotonic() + 60  # deleted in the background once torn down
            for remote, client in clients.items():
                while left := await ours(client, hub_id):
                    assert time.monotonic() < deadline, (remote, left)
                    await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(Exception):
            await forwarder.stop()
        await clean_up(clients, hub_id)
        for client in clients.values():
            await client.close()
