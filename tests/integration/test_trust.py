"""Users are adversaries: through a real JupyterHub and a real daemon, what a hostile user
(or a careless neighbour on the daemon) can no longer do.

- nothing a user's name holds runs as shell, in any quoting of {USERNAME}, on the hub host
  or in the container; post_hub_commands get none of the hub's secrets;
- no user takes or deletes an instance that is not their server's: not another user's whose
  name hashed alike, not another hub's, not one made by hand;
- a kept container (remove = False) is never deleted but by the admin deleting the server;
- nobody runs as root, owns the container's /, or rewrites what root reads at boot;
- failures say what failed (the setting, the command, the exit code), read a bounded log,
  and a stop that fails leaves nothing running that the hub forgot.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from yarl import URL

from lxdspawner import names
from lxdspawner.lxd import LxdClient, image_source
from lxdspawner.ownership import KEY_HUB, KEY_MANAGED, KEY_USER, MANAGED_BY
from testbench.hubtools import SpawnFailed, q, running_hub

from .conftest import SOCKETS, TINY_IMAGE
from .test_spawner import _instance_missing, deleted, server_pid, sh, wait_until

# Each breaks out of the quoting it is put in, were it pasted as it is.
HOSTILE = ["r`touch x`r", "s$(touch x)s", 'u";touch x;"u', "q';touch x;'q"]

COMMANDS = """
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.commands_to_prepare = [
    "printf '%s' {{USERNAME}} > $HOME/plain.txt",
    "printf '%s' 'for {{USERNAME}}.' > $HOME/single.txt",
    "printf '%s' \\"for {{USERNAME}}.\\" > $HOME/double.txt",
]
c.LxdSpawner.post_hub_commands = [
    "printf '%s\\\\n' 'started for {{USERNAME}}.' >> {host_dir}/single.txt",
    "printf '%s\\\\n' \\"started for {{username}}.\\" >> {host_dir}/double.txt",
    "env > {host_dir}/env-$$.txt",
]
"""


def _files_named_x(*places: Path) -> list[Path]:
    return [p / "x" for p in places if (p / "x").exists()]


async def test_no_username_runs_as_shell_and_post_hub_commands_get_no_secrets(
    tmp_path, host_dir, prefix, incus, leftovers
):
    config = COMMANDS.format(prefix=prefix, host_dir=host_dir)
    os.environ["LXDSPAWNER_TEST_SECRET"] = "hub-secret-value"  # the hub inherits it
    try:
        async with running_hub(tmp_path, config) as hub:
            await asyncio.gather(*(hub.start_server(u) for u in HOSTILE))
            for user in HOSTILE:
                name = names.instance_name(user, "", prefix)
                home = f"/home/{user}"
                for kind, expected in (
                    ("plain", user),
                    ("single", f"for {user}."),
                    ("double", f"for {user}."),
                ):
                    got = (await incus.read_file(name, f"{home}/{kind}.txt")).decode()
                    assert got == expected, (user, kind, got)
                found = await sh(incus, name, "find / -xdev -name x -newer /etc/hostname")
                assert found == "", (user, found)

            def post_done() -> bool:
                return all(
                    (host_dir / f).exists()
                    and len((host_dir / f).read_text().splitlines()) == len(HOSTILE)
                    for f in ("single.txt", "double.txt")
                )

            await wait_until(post_done, 30, "post_hub_commands for every user")
            for f in ("single.txt", "double.txt"):
                lines = sorted((host_dir / f).read_text().splitlines())
                assert lines == sorted(f"started for {u}." for u in HOSTILE), lines
            assert not _files_named_x(tmp_path, host_dir, Path.cwd(), Path("/tmp"))

            # The hub's environment (its secrets) is not theirs.
            envs = list(host_dir.glob("env-*.txt"))
            assert len(envs) == len(HOSTILE)
            for env_file in envs:
                variables = dict(
                    line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
                )
                assert "LXDSPAWNER_TEST_SECRET" not in variables
                assert "CONFIGPROXY_AUTH_TOKEN" not in variables
                assert variables["JUPYTERHUB_USER"] in HOSTILE
            # Their output reaches the hub's log; and so do the messages of lxdspawner's own
            # modules, in JupyterHub's format (the cache's start, here).
            assert "post_hub_commands for" in hub.log()
            assert re.search(r"\[I [^\]]* lxdspawner\.cache cache:\d+\] instance cache", hub.log())
            await hub.stop_all_servers()
    finally:
        del os.environ["LXDSPAWNER_TEST_SECRET"]


async def test_username_in_a_command_substitution_is_refused_naming_the_fix(
    tmp_path, prefix, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.post_hub_commands = ["logger `echo {{USERNAME}}`"]
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("r`touch x`r", timeout=60)
        said = str(failed.value) + hub.log()
        assert "post_hub_commands" in said and "$JUPYTERHUB_USER" in said, said[-3000:]
        assert not _files_named_x(tmp_path, Path.cwd())


async def _foreign(client: LxdClient, name: str, config: dict[str, str]) -> None:
    """An instance that is not this hub's server: made by hand, or by another hub."""
    await client.create_instance(name, source=image_source(TINY_IMAGE), config=config)


async def test_names_are_not_ownership(tmp_path, prefix, incus, leftovers, monkeypatch):
    """Two users whose names hash alike (the hash shortened to one hex digit to force it), an
    instance made by hand and another hub's server holding users' names: nobody takes or
    deletes what is not their server's."""
    monkeypatch.setattr(names, "HASH_LENGTH", 1)
    by_name: dict[str, str] = {}
    for i in range(200):
        user = "ana" + "." * (i + 1)  # the same slug, "ana", and hashed: "." is not kept
        other = by_name.setdefault(names.instance_name(user, "", prefix), user)
        if other != user:
            break
    else:
        raise AssertionError("no collision in 200 names with a one-digit hash")
    first, second = other, user
    shared_name = names.instance_name(first, "", prefix)
    hand_made = f"{prefix}-frank"
    other_hub = f"{prefix}-gina"
    await _foreign(incus, hand_made, {"user.note": "made by hand"})
    other_keys = {KEY_MANAGED: MANAGED_BY, KEY_HUB: "another-hub", KEY_USER: "gina"}
    await _foreign(incus, other_hub, other_keys)

    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
import lxdspawner.names
lxdspawner.names.HASH_LENGTH = 1
# Home volume names hash the user as instance names do: with one hex digit, the two users'
# homes collide too (1 in 16) and the second spawn is refused, as it must be (a volume is
# never taken over); this test is about the instances.
c.LxdSpawner.home_volume_size = ""
"""
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server(first)
        await hub.start_server(second)
        await asyncio.gather(hub.start_server("frank"), hub.start_server("gina"))
        assert hub.log().count("holds the name") >= 3, hub.log_tail()

        # Each server has its own container, carrying its own keys.
        mine = {}
        for instance in await incus.list_instances():
            config_keys = instance["config"]
            if instance["name"].startswith(prefix) and config_keys.get(KEY_HUB) not in (
                None,
                "another-hub",
            ):
                mine[config_keys[KEY_USER]] = instance["name"]
        assert set(mine) == {first, second, "frank", "gina"}, mine
        assert len(set(mine.values())) == 4
        assert mine[first] == shared_name and mine[second] != shared_name
        assert hand_made not in mine.values() and other_hub not in mine.values()
        for user in (first, second, "frank", "gina"):
            server = await hub.server_model(user)
            status, _ = await hub.get_via_proxy(server["url"] + "api/status")
            assert status == 200, user
            assert server["state"]["instance"] == mine[user], server["state"]

        # Stopping the one whose name was taken deletes its own container, nothing else.
        await hub.stop_server(second)
        await hub.stop_server("frank")
        await hub.stop_server("gina")
        for user in (second, "frank", "gina"):
            await deleted(incus, mine[user])
        assert (await incus.get_instance(shared_name))["status"] == "Running"
        assert (await incus.get_instance(hand_made))["config"]["user.note"] == "made by hand"
        assert (await incus.get_instance(other_hub))["config"][KEY_HUB] == "another-hub"
        await hub.stop_server(first)
        await deleted(incus, shared_name)
    for name in (hand_made, other_hub):
        assert not await _instance_missing(incus, name), f"{name} was deleted"


def _daemon_pid() -> int:
    """The standalone Incus daemon as scripts/setup-lxd.sh starts it (not the cluster's)."""
    found = subprocess.run(
        ["pgrep", "-f", "incusd --logfile /var/log/lxdspawner-incus.log"],
        capture_output=True,
        text=True,
    )
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"the Incus daemon: {found.stdout!r}"
    return pids[0]


class _Frozen:
    """The daemon stops answering (SIGSTOP) until the block ends: a daemon error."""

    def __enter__(self):
        self.pid = _daemon_pid()
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


async def test_remove_false_is_kept_until_the_admin_deletes_the_server(
    tmp_path, host_dir, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.remove = False
c.LxdSpawner.api_timeout = 3
c.Spawner.start_timeout = 20
"""
    name = f"{prefix}-kim"
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server("kim")
        await sh(incus, name, "echo mine > /home/kim/installed.txt")
        await hub.stop_server("kim")
        assert (await incus.get_instance(name))["status"] == "Stopped"

        # Running when its user starts it (started by hand, or the hub lost track): stopped
        # and reused, not deleted.
        await incus.start_instance(name)
        await hub.start_server("kim")
        assert "Stopping the kept container" in hub.log()
        assert await sh(incus, name, "cat /home/kim/installed.txt") == "mine"
        await hub.stop_server("kim")

        # (A daemon failing during its start leaves it as well: the in-process tier's
        # test_a_kept_container_is_never_deleted_whatever_fails, for every kind of failure.)

        # A changed setting reaches the kept container: a mount added to the config.
        (host_dir / "data").mkdir()
        (host_dir / "data" / "hello.txt").write_text("mounted\n")
        mount = ["data", f"{host_dir}/data", "/mnt/data"]
        hub.add_config(f"c.LxdSpawner.filesystems_to_mount = [{mount!r}]")
        await hub.restart()
        await hub.start_server("kim")
        assert await sh(incus, name, "cat /mnt/data/hello.txt") == "mounted"
        assert await sh(incus, name, "cat /home/kim/installed.txt") == "mine"
        await hub.stop_server("kim")
        assert (await incus.get_instance(name))["status"] == "Stopped"

        # Deleting the user is the one way it goes.
        status, body = await hub.api("DELETE", f"/users/{q('kim')}")
        assert status == 204, body
        await deleted(incus, name)


async def test_no_root_no_system_account_and_root_owns_what_it_reads(
    tmp_path, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
"""
    async with running_hub(tmp_path, config) as hub:
        # "root" and "daemon" are accounts of the hub host: not people, not their uids.
        for user in ("root", "daemon"):
            await hub.start_server(user)
            name = names.instance_name(user, "", prefix)
            pid = await server_pid(incus, name)
            assert await sh(incus, name, f"stat -c %u:%g /proc/{pid}") == "1000:1000", user
            assert (
                await sh(
                    incus,
                    name,
                    "id -u; id -g",
                )
                != "0"
            )

        name = names.instance_name("root", "", prefix)
        # What root (systemd) reads at every boot is root's, and the user cannot rewrite it.
        env_file = "/etc/lxdspawner/singleuser.env"
        assert await sh(incus, name, f"stat -c '%u %a' {env_file}") == "0 600"
        tried = await incus.exec(
            name,
            ["/bin/sh", "-c", f"echo LD_PRELOAD=/tmp/x.so >> {env_file}"],
            user=1000,
            group=1000,
        )
        assert tried.exit_code != 0
        # The container starts again by itself (a host reboot, a daemon restart): the file
        # is still root's and the server runs as the user.
        await incus.request(
            "PUT", f"/1.0/instances/{name}/state", json_body={"action": "restart", "timeout": 30}
        )

        async def server_back() -> bool:
            try:
                pid = await server_pid(incus, name)
            except AssertionError:
                return False
            return pid not in ("", "0")

        await wait_until(server_back, 60, "the server to run again after the restart")
        assert await sh(incus, name, f"stat -c '%u %a' {env_file}") == "0 600"
        pid = await server_pid(incus, name)
        assert await sh(incus, name, f"stat -c %u /proc/{pid}") == "1000"
        await hub.stop_all_servers()


async def test_a_dotdot_username_gets_a_home_of_its_own(
    tmp_path, host_dir, prefix, incus, leftovers
):
    """JupyterHub 6 refuses the username ".."; a site's authenticator may not (JupyterHub
    before 4.1 did not). A browser cannot reach such a server (URL parsers take "%2E%2E" for
    ".."), but the hub's API, called directly, starts it: its home must not be /home/..
    (that is /, which root would hand to the user)."""
    out = host_dir / "out"
    out.mkdir()
    out.chmod(0o777)  # written from the unprivileged container
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.filesystems_to_mount = [["out", "{out}", "/mnt/out"]]
c.LxdSpawner.commands_to_prepare = [
    "pwd > /mnt/out/pwd.txt; stat -c %u / /home > /mnt/out/owners.txt"
]
from jupyterhub.authenticators.shared import SharedPasswordAuthenticator as _Shared

class _AnyName(_Shared):
    def validate_username(self, username):
        return bool(username) and "/" not in username

c.JupyterHub.authenticator_class = _AnyName
"""
    async with running_hub(tmp_path, config) as hub:
        # Straight to the hub, not through the proxy: the proxy's URL parser takes %2E%2E for
        # "..", and this server's route, /user/../, is its "/" (so it takes the hub's place
        # there while it runs: one reason JupyterHub 6 refuses the name).
        hub.api_url = f"{hub.hub_url}/hub/api"
        status, body = await hub.api("POST", "/users", json={"usernames": [".."]})
        assert status == 201, body
        url = URL(f"{hub.api_url}/users/%2E%2E/server", encoded=True)
        async with hub.session.post(url, headers=hub.auth_headers) as r:
            assert r.status in (201, 202), await r.text()
        await wait_until((out / "owners.txt").exists, 90, "the preparation command")
        home = f"/home/{names.home_component('..')}"
        assert home != "/home/.." and "/" not in home.removeprefix("/home/")
        assert (out / "pwd.txt").read_text().strip() == home
        assert (out / "owners.txt").read_text().split() == ["0", "0"]  # root keeps / and /home
        # The preparation ran: the server may still be starting, and JupyterHub refuses to
        # stop a pending spawn (500 "pending spawn"); ask again until it takes the stop.
        deadline = time.monotonic() + 60
        while True:
            async with hub.session.delete(url, headers=hub.auth_headers) as r:
                if r.status in (202, 204):
                    break
                text = await r.text()
            assert time.monotonic() < deadline, f"the stop was refused: {r.status} {text}"
            await asyncio.sleep(1)
        await wait_until(
            lambda: _instance_missing(incus, names.instance_name("..", "", prefix)),
            60,
            "the server of '..' to be gone",
        )


LOUD_SERVER = "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo LAST-WORDS; exit 3"


async def test_failures_say_what_failed_and_read_a_bounded_log(tmp_path, prefix, incus, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.commands_to_prepare = ["{{USERNAME}}"]
"""
    async with running_hub(tmp_path, config) as hub:
        # The name is one word: the shell looks for a command of that name, and exits 127.
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("q;touch x;q", timeout=90)
        message = str(failed.value)
        assert "commands_to_prepare" in message and "{USERNAME}" in message, message
        assert "exit code 127" in message, message
        assert "/operations/" not in message

    # A server that writes 20 MB to its log and dies: the message shows the end of it.
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.Spawner.cmd = ["/bin/sh", "-c", {LOUD_SERVER!r}]
c.Spawner.http_timeout = 20
"""
    async with running_hub(tmp_path / "log", config) as hub:
        t0 = time.monotonic()
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("lou", timeout=120)
        message = str(failed.value)
        assert "LAST-WORDS" in message, message[-500:]
        assert len(message) < 20_000
        print(f"failed spawn with a 20 MB log reported in {time.monotonic() - t0:.1f} s")
        assert await _instance_missing(incus, f"{prefix}-lou")


@pytest.mark.exclusive
async def test_a_stop_that_fails_keeps_the_server_recorded_and_stops_it_later(
    tmp_path, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.api_timeout = 2
c.LxdSpawner.stop_timeout = 2
"""
    name = f"{prefix}-sid"
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server("sid")
        with _Frozen():
            status, _ = await hub.api("DELETE", "/users/sid/server", timeout=120)
            assert status in (202, 204, 500), status

            async def failed_stop_logged() -> bool:
                return "could not stop" in hub.log()

            await wait_until(failed_stop_logged, 90, "the stop to give up")
            # The hub lets the server go; its state still names the container.
            _, model = await hub.api("GET", "/users/sid?include_stopped_servers=1")
            state = (model["servers"].get("") or {}).get("state") or {}
            assert state.get("instance") == name, model
        # The daemon answers again: the container is stopped and deleted in the background.
        await wait_until(lambda: _instance_missing(incus, name), 90, f"{name} to be deleted")
        assert "stopped " + name in hub.log() or "whose stop had failed" in hub.log()


@pytest.mark.lxd
async def test_a_base_name_held_by_another_instance_is_left_alone(tmp_path, prefix):
    """LXD 5.0 makes servers from a shifted base named <prefix>-base-<fingerprint>: a user
    whose name gives that name, or anybody's instance there, is never deleted for it."""
    if "lxd" not in os.environ.get("LXDSPAWNER_TEST_DAEMONS", "incus").split():
        pytest.skip("LXD is not among LXDSPAWNER_TEST_DAEMONS")
    from lxdspawner.names import base_name
    from testbench.hubtools import LXD_HUB_IP

    endpoint = f"unix://{SOCKETS['lxd']}"
    async with LxdClient(endpoint) as lxd:
        fingerprint = await lxd.image_fingerprint("jupyter-base")
        squatter = base_name(prefix, fingerprint)
        await _foreign(lxd, squatter, {"user.note": "not a base"})
        config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = {endpoint!r}
c.Spawner.start_timeout = 120
"""
        try:
            async with running_hub(tmp_path, config, hub_ip=LXD_HUB_IP) as hub:
                server = await hub.start_server("lena", timeout=150)
                status, _ = await hub.get_via_proxy(server["url"] + "api/status")
                assert status == 200
                assert "held by another instance" in hub.log()
                assert (await lxd.get_instance(squatter))["config"]["user.note"] == "not a base"
                await hub.stop_all_servers()
        finally:
            from .conftest import remove_instances_named

            await remove_instances_named(lxd, prefix + "-")
