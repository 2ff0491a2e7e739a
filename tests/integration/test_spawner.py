"""LxdSpawner through a real JupyterHub, configurable-http-proxy and Incus/LXD daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lxdspawner import names, sharing
from lxdspawner.lxd import LxdClient, NotFound
from lxdspawner.names import instance_name
from testbench.hubtools import LXD_HUB_IP, SpawnFailed, running_hub

from .conftest import SOCKETS, remove_instances_named, test_daemons

ALL_OPTIONS = """
c.JupyterHub.spawner_class = "lxd"
c.JupyterHub.allow_named_servers = True
c.Spawner.poll_interval = 2
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = {endpoint!r}
c.LxdSpawner.image = "jupyter-base"
c.LxdSpawner.files_to_push = [[{greeting!r}, "/etc/greeting.txt"]]
c.LxdSpawner.filesystems_to_mount = [["data", {data_dir!r} + "/{{USERNAME}}", "/mnt/data"]]
c.LxdSpawner.commands_to_prepare = [
    "echo prepared for {{USERNAME}} > $HOME/prepared.txt",
    "id -u > $HOME/uid.txt",
]
c.LxdSpawner.post_hub_commands = ["echo {{USERNAME}} >> " + {post_file!r}]
c.LxdSpawner.process_limit = 300
c.LxdSpawner.get_uid_gid = lambda spawner: (1000, 1000)
c.Spawner.mem_limit = "512M"
c.Spawner.cpu_limit = 0.5
c.Spawner.environment = {{"GREETING": "hello $HOME %n 'quoted'"}}
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 90
"""


def all_options(prefix: str, host_dir: Path, endpoint: str = "") -> str:
    greeting = host_dir / "greeting.txt"
    greeting.write_text("hello from the hub host\n")
    greeting.chmod(0o640)
    (host_dir / "data").mkdir()
    return ALL_OPTIONS.format(
        prefix=prefix,
        endpoint=endpoint,
        greeting=str(greeting),
        data_dir=str(host_dir / "data"),
        post_file=str(host_dir / "post.txt"),
    )


async def sh(client: LxdClient, name: str, script: str) -> str:
    result = await client.exec(name, ["/bin/sh", "-c", script])
    assert result.exit_code == 0, f"{script!r} failed: {result.output}"
    return result.stdout.strip()


async def server_pid(client: LxdClient, name: str) -> str:
    return await sh(client, name, "systemctl show -p MainPID --value jupyterhub-singleuser")


async def wait_until(predicate, timeout: float, what: str):
    """Wait for ``predicate()`` (plain or async) to be true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_every_option_of_the_original_spawner(tmp_path, host_dir, prefix, incus, leftovers):
    config = all_options(prefix, host_dir)
    (host_dir / "data" / "alice").mkdir()
    (host_dir / "data" / "alice" / "hello.txt").write_text("mounted\n")
    (host_dir / "data" / "alice").chmod(0o755)
    async with running_hub(tmp_path, config) as hub:
        server = await hub.start_server("alice")
        status, body = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200, body

        name = f"{prefix}-alice"
        instance = await incus.get_instance(name)
        config_keys = instance["config"]
        assert config_keys["user.jupyterhub.user"] == "alice"
        assert config_keys["limits.memory"] == str(512 * 1024**2)
        assert config_keys["limits.cpu.allowance"] == "50ms/100ms"
        assert config_keys["limits.processes"] == "300"
        assert instance["devices"]["data"]["source"] == str(host_dir / "data" / "alice")

        assert await sh(incus, name, "cat /etc/greeting.txt") == "hello from the hub host"
        assert await sh(incus, name, "stat -c %a /etc/greeting.txt") == "640"
        assert await sh(incus, name, "cat /mnt/data/hello.txt") == "mounted"
        assert await sh(incus, name, "cat /home/alice/prepared.txt") == "prepared for alice"
        assert await sh(incus, name, "cat /home/alice/uid.txt") == "1000"
        pid = await server_pid(incus, name)
        assert await sh(incus, name, f"stat -c %u:%g /proc/{pid}") == "1000:1000"
        environ = await sh(incus, name, f"tr '\\0' '\\n' < /proc/{pid}/environ")
        assert "GREETING=hello $HOME %n 'quoted'" in environ.splitlines()
        assert "JUPYTERHUB_DEFAULT_URL=/lab" in environ.splitlines()

        # The API token: in a file only root (systemd) can read, never in config or on a command
        # line; the server gets it in its environment.
        assert await sh(incus, name, "stat -c '%u %a' /etc/lxdspawner/singleuser.env") == "0 600"
        token = next(
            line.split("=", 1)[1].strip("'")
            for line in environ.splitlines()
            if line.startswith("JUPYTERHUB_API_TOKEN=")
        )
        assert token not in json.dumps(instance)
        assert token not in await sh(incus, name, "cat /proc/*/cmdline | tr '\\0' ' '")

        await wait_until((host_dir / "post.txt").exists, 30, "post_hub_commands")
        assert (host_dir / "post.txt").read_text() == "alice\n"

        # Each step was reported as progress (the spawn page shows these).
        for step in (
            "Creating container",
            "Pushing configuration",
            "Starting container",
            "Running preparation commands",
            "Waiting for the server",
        ):
            assert step in hub.log(), step

        await hub.stop_server("alice")
        await deleted(incus, name)


async def test_remove_false_keeps_the_container_and_what_the_user_installed(
    tmp_path, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.remove = False
"""
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server("kim")
        name = f"{prefix}-kim"
        await sh(incus, name, "echo mine > /home/kim/installed.txt")
        await hub.stop_server("kim")
        assert (await incus.get_instance(name))["status"] == "Stopped"
        server = await hub.start_server("kim")
        status, _ = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200
        assert await sh(incus, name, "cat /home/kim/installed.txt") == "mine"
        await hub.stop_server("kim")
        assert (await incus.get_instance(name))["status"] == "Stopped"


AWKWARD = ["ana.maria@uni.es", "Élodie", "x;touch pwned", "$(touch pwned2)"]


async def test_awkward_usernames_named_servers_and_injection(
    tmp_path, host_dir, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.JupyterHub.allow_named_servers = True
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.commands_to_prepare = ["echo {{USERNAME}} > $HOME/me.txt"]
c.LxdSpawner.post_hub_commands = ["echo {{USERNAME}} >> {host_dir}/post.txt"]
"""
    async with running_hub(tmp_path, config) as hub:
        servers = [(u, "") for u in AWKWARD] + [("alice", "lab"), ("alice", "")]
        await asyncio.gather(*(hub.start_server(u, s) for u, s in servers))
        names = [instance_name(u, s, prefix) for u, s in servers]
        assert len(set(names)) == len(names)
        for (user, server), name in zip(servers, names, strict=True):
            instance = await incus.get_instance(name)
            assert instance["config"]["user.jupyterhub.user"] == user
            # LXD drops empty config values: no key means the default server.
            assert instance["config"].get("user.jupyterhub.server", "") == server
            model = await hub.server_model(user, server)
            status, _ = await hub.get_via_proxy(model["url"] + "api/status")
            assert status == 200, (user, server)
            home = f"/home/{user}"
            me = await incus.read_file(name, f"{home}/me.txt")
            assert me.decode().strip() == user
            found = await sh(incus, name, "find / -xdev -name pwned -o -xdev -name pwned2")
            assert found == ""
        post = host_dir / "post.txt"
        await wait_until(
            lambda: post.exists() and len(post.read_text().splitlines()) == len(servers),
            30,
            "post_hub_commands for every server",
        )
        assert sorted((host_dir / "post.txt").read_text().splitlines()) == sorted(
            u for u, _ in servers
        )
        for where in (tmp_path, Path.cwd(), host_dir, Path("/tmp")):
            assert not (where / "pwned").exists() and not (where / "pwned2").exists()
        await asyncio.gather(*(hub.stop_server(u, s) for u, s in servers))
        for name in names:
            await deleted(incus, name)


async def test_servers_survive_a_hub_restart(tmp_path, prefix, incus, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
"""
    async with running_hub(tmp_path, config, cleanup_servers=False) as hub:
        server = await hub.start_server("bob")
        name = f"{prefix}-bob"
        pid_before = await server_pid(incus, name)
        await hub.restart()
        model = await hub.server_model("bob")
        assert model and model["ready"], model
        status, _ = await hub.get_via_proxy(server["url"] + "api/status")
        assert status == 200
        # The same server process: the restart did not touch it.
        assert await server_pid(incus, name) == pid_before
        await hub.stop_server("bob")
        await deleted(incus, name)


async def test_a_hub_moved_to_another_daemon_still_polls_and_stops_its_servers(
    tmp_path, prefix, incus, leftovers
):
    """The server's state records the daemon its container is on: restarted with another
    `endpoint` (here LXD's socket instead of Incus'), the hub still finds the running server
    there, and stopping it deletes that container; the next start goes to the new daemon."""
    if "lxd" not in test_daemons():
        pytest.skip("needs the LXD daemon too (LXDSPAWNER_TEST_DAEMONS with lxd)")
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = "unix://{SOCKETS["incus"]}"
"""
    name = f"{prefix}-ann"
    async with LxdClient(f"unix://{SOCKETS['lxd']}") as lxd:
        try:
            async with running_hub(tmp_path, config, cleanup_servers=False) as hub:
                server = await hub.start_server("ann")
                pid_before = await server_pid(incus, name)
                hub.add_config(f'c.LxdSpawner.endpoint = "unix://{SOCKETS["lxd"]}"')
                await hub.restart()
                model = await hub.server_model("ann")
                assert model and model["ready"], model  # not lost track of at startup
                status, _ = await hub.get_via_proxy(server["url"] + "api/status")
                assert status == 200
                assert await server_pid(incus, name) == pid_before
                await hub.stop_server("ann")
                await deleted(incus, name)  # on the daemon that held it
                # A new start goes where the configuration says now.
                await hub.start_server("ann", timeout=150)
                assert (await lxd.get_instance(name))["status"] == "Running"
                await hub.stop_server("ann")
                await deleted(lxd, name)
        finally:
            await remove_instances_named(lxd, prefix + "-")


async def test_stop_start_again_and_hub_exit_leave_no_container(tmp_path, prefix, incus, leftovers):
    """A server stopped and started again at once gets a fresh container; a hub that exits
    with cleanup_servers (the default) deletes its containers before it is gone. Nothing of
    them is left on the host: a container deleted before LXD has torn it down leaks its
    host-side network interface."""
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
"""
    name = f"{prefix}-sam"
    async with running_hub(tmp_path, config) as hub:
        await asyncio.gather(hub.start_server("sam"), hub.start_server("tom"))
        interfaces = {
            await host_interface(incus, name),
            await host_interface(incus, f"{prefix}-tom"),
        }
        await hub.stop_server("sam")
        await hub.start_server("sam")  # the same name, at once
        assert (await incus.get_instance(name))["status"] == "Running"
        interfaces.add(await host_interface(incus, name))
        await deleted_later_is_logged(hub)
        # sam's server still runs when the hub exits (cleanup_servers stops it on the way out).
        await hub.stop_server("tom")
        await hub.stop_hub()
        # Neither is left behind.
        for left in (name, f"{prefix}-tom"):
            assert await _instance_missing(incus, left), (await incus.get_instance(left))["status"]
    assert len(interfaces) == 3
    assert not host_interfaces_left(interfaces)


def host_interfaces_left(interfaces) -> list[str]:
    return [i for i in interfaces if Path("/sys/class/net", i).exists()]


async def host_interface(client: LxdClient, name: str) -> str:
    """The host side of the container's eth0 (a veth on the bridge)."""
    state = await client.instance_state(name)
    return state["network"]["eth0"]["host_name"]


async def deleted_later_is_logged(hub) -> None:
    """No warning about a failed background deletion."""
    assert "after its server stopped" not in hub.log(), hub.log_tail()


async def test_killed_server_is_reported_stopped(tmp_path, prefix, incus, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.Spawner.poll_interval = 1
"""
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server("carol")
        name = f"{prefix}-carol"
        interface = await host_interface(incus, name)
        pid = await server_pid(incus, name)
        await sh(incus, name, f"kill -9 {pid}")

        async def gone():
            return await hub.server_model("carol") is None

        await wait_until(gone, 60, "the hub to notice the server is gone")
        # The hub then stopped it properly: the container is deleted too.
        await wait_until(lambda: _instance_missing(incus, name), 60, "the container to be deleted")
        assert not host_interfaces_left([interface])  # torn down before it was deleted


async def _instance_missing(client: LxdClient, name: str) -> bool:
    try:
        await client.get_instance(name)
    except NotFound:
        return True
    return False


async def deleted(client: LxdClient, name: str) -> None:
    """The container of a stopped server is gone (waiting a little, as the cache and the
    daemon may answer a moment apart)."""
    await wait_until(lambda: _instance_missing(client, name), 20, f"{name} to be deleted")


async def test_missing_image_is_a_clear_error(tmp_path, prefix, incus, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.image = "no-such-image"
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("dave", timeout=60)
        message = str(failed.value)
        assert "no-such-image" in message and "c.LxdSpawner.image" in message
        assert "Traceback" not in message
        assert "c.LxdSpawner.image" in hub.log()
        assert await _instance_missing(incus, f"{prefix}-dave")
        status, _ = await hub.api("GET", "/users")
        assert status == 200


async def test_bad_setting_shape_names_the_setting(tmp_path, prefix, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.files_to_push = ["/etc/passwd"]
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("erin", timeout=60)
        assert "files_to_push[0]" in str(failed.value) or "files_to_push[0]" in hub.log()


async def test_missing_host_file_and_directory_are_named(tmp_path, prefix, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.files_to_push = [["/no/such/file", "/etc/x"]]
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed, match="/no/such/file"):
            await hub.start_server("frank", timeout=60)


async def test_failing_prepare_command_shows_exit_code_and_output(
    tmp_path, prefix, incus, leftovers
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.commands_to_prepare = ["echo preparing-went-wrong; exit 7"]
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("gina", timeout=60)
        assert "exit code 7" in str(failed.value)
        assert "preparing-went-wrong" in str(failed.value)
        assert await _instance_missing(incus, f"{prefix}-gina")


@pytest.mark.exclusive
@pytest.mark.lxd
async def test_spawn_on_lxd_and_daemon_stopped_during_a_spawn(tmp_path, prefix):
    """One spawn on Debian's LXD 5.0; then LXD dies mid-spawn: a clear error, the hub lives."""
    if "lxd" not in os.environ.get("LXDSPAWNER_TEST_DAEMONS", "incus").split():
        pytest.skip("LXD is not among LXDSPAWNER_TEST_DAEMONS")
    endpoint = f"unix://{SOCKETS['lxd']}"
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.endpoint = {endpoint!r}
c.Spawner.start_timeout = 120
"""
    async with LxdClient(endpoint) as lxd:
        try:
            async with running_hub(tmp_path, config, hub_ip=LXD_HUB_IP) as hub:
                servers = await asyncio.gather(
                    hub.start_server("henry", timeout=150), hub.start_server("hal", timeout=150)
                )
                for server in servers:
                    status, _ = await hub.get_via_proxy(server["url"] + "api/status")
                    assert status == 200
                # On LXD, servers are copies of a base shifted once (no remap at each start);
                # each copy still gets its own machine-id (and so its own DHCP identity).
                bases = [
                    i for i in await lxd.list_instances() if i["name"].startswith(f"{prefix}-base-")
                ]
                assert [b["status"] for b in bases] == ["Stopped"]
                ids = {
                    (await lxd.read_file(f"{prefix}-{u}", "/etc/machine-id")).strip()
                    for u in ("henry", "hal")
                }
                assert len(ids) == 2 and b"" not in ids
                # The shared read-only /usr and /opt/jupyterhub (made by `make test`'s prepull)
                # work on LXD too, where the volume is shifted instead of idmapped.
                devices = (await lxd.get_instance(f"{prefix}-henry"))["devices"]
                for path in ("/usr", "/opt/jupyterhub"):
                    assert names.shared_device_name(path) in devices, (path, devices)
                await asyncio.gather(hub.stop_server("henry"), hub.stop_server("hal"))

                spawn = asyncio.create_task(hub.start_server("ivy", timeout=150))

                async def creating():
                    return any(
                        i.rsplit("/", 1)[-1] == f"{prefix}-ivy"
                        for i in await lxd.list_instances(recursion=0)
                    )

                await wait_until(creating, 60, "the spawn to reach LXD")
                _stop_lxd()
                with pytest.raises(SpawnFailed) as failed:
                    await spawn
                assert "not reachable" in str(failed.value) or "daemon" in str(failed.value)
                status, _ = await hub.api("GET", "/users")
                assert status == 200
        finally:
            _start_lxd()
            await lxd.close()
            # Whatever happened, nothing of this test stays on LXD (its base included).
            async with LxdClient(endpoint) as fresh:
                await remove_instances_named(fresh, prefix + "-")


def _stop_lxd() -> None:
    # The daemon only (setup-lxd.sh starts it with --logfile): not the short-lived
    # `lxd fork...` helpers, which may be gone by the time they would be killed.
    found = subprocess.run(
        ["pgrep", "-xf", "/usr/bin/lxd --logfile .*"], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    assert pids, "the LXD daemon is not running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _start_lxd() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "setup-lxd.sh"
    subprocess.run([str(script), "lxd"], check=True, capture_output=True)


def _requests_total(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("lxdspawner_api_requests_total")
    )


async def test_poll_costs_no_api_request_per_server(tmp_path, prefix, leftovers):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.Spawner.poll_interval = 1
"""
    async with running_hub(tmp_path, config) as hub:
        await asyncio.gather(hub.start_server("pat"), hub.start_server("quinn"))
        await asyncio.sleep(2)  # let the spawns' last events settle
        status, before = await hub.get_via_proxy("/hub/metrics")
        assert status == 200 and "lxdspawner_api_requests_total" in before
        await asyncio.sleep(4)  # about 4 poll cycles for each of the 2 servers
        _, after = await hub.get_via_proxy("/hub/metrics")
        assert _requests_total(after) - _requests_total(before) == 0
        assert "lxdspawner_spawn_step_seconds_count" in after
        for user in ("pat", "quinn"):
            assert (await hub.server_model(user))["ready"]


@pytest.mark.parametrize(
    "script, expected",
    [
        ("echo warming up forever; exec sleep 600", "did not answer"),
        # It may die before or after the container has its address: either way, its words.
        ("echo the server broke >&2; exit 3", ("exited while starting", "stopped while booting")),
    ],
    ids=["hangs", "crashes"],
)
async def test_a_server_that_does_not_come_up_shows_its_log(
    tmp_path, prefix, incus, leftovers, script, expected
):
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.Spawner.cmd = ["/bin/sh", "-c", {script!r}]
c.Spawner.http_timeout = 8
"""
    async with running_hub(tmp_path, config) as hub:
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("lou", timeout=90)
        message = str(failed.value)
        assert any(e in message for e in ((expected,) if isinstance(expected, str) else expected))
        assert "last lines of the server's log" in message
        assert script.split(";")[0].removeprefix("echo ").split(" >&2")[0] in message
        assert await _instance_missing(incus, f"{prefix}-lou")


async def _memory_mib(client: LxdClient, name: str) -> float:
    return (await client.instance_state(name))["memory"]["usage"] / 2**20


async def test_servers_share_one_read_only_copy_of_the_environment(
    tmp_path, prefix, incus, leftovers
):
    """The image's /opt/jupyterhub and /usr come from one volume each per image: servers share
    their page cache, as local processes share their virtualenv's. The first server of a new
    image goes without (the copies are made in the background); the next ones mount them
    read-only."""
    fingerprint = await incus.image_fingerprint("jupyter-base")
    paths = ("/opt/jupyterhub", "/usr")
    volumes = [names.shared_volume_name(fingerprint, path) for path in paths]
    for volume in volumes:
        try:
            await incus.delete_volume("lxdspawner", volume)  # as on a daemon that never had it
        except NotFound:
            pass
    config = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.shared_directories = {list(paths)!r}
"""
    async with running_hub(tmp_path, config) as hub:
        await hub.start_server("own")
        own_devices = (await incus.get_instance(f"{prefix}-own"))["devices"]
        assert not any(d.startswith(sharing.DEVICE) for d in own_devices), own_devices

        async def ready() -> bool:
            for volume in volumes:
                try:
                    made = await incus.get_volume("lxdspawner", volume)
                except NotFound:
                    return False
                if made["config"].get(sharing.KEY_READY) != "true":
                    return False
            return True

        await wait_until(ready, 180, f"volumes {volumes} filled")
        for volume in volumes:
            assert f"volume {volume} ready" in hub.log()
        # One after the other: a page is charged to the first container that reads it.
        for user in ("shared1", "shared2"):
            await hub.start_server(user)
            name = f"{prefix}-{user}"
            devices = (await incus.get_instance(name))["devices"]
            for path, volume in zip(paths, volumes, strict=True):
                device = devices[names.shared_device_name(path)]
                assert device["source"] == volume and device["readonly"] == "true"
                # What the user sees: the same software, read-only.
                options = await sh(incus, name, f"findmnt -no OPTIONS {path}")
                assert options.split(",")[0] == "ro", options
                touched = await incus.exec(name, ["touch", f"{path}/x"])
                assert "Read-only file system" in touched.stderr
        await asyncio.sleep(3)  # idle
        mib = {u: await _memory_mib(incus, f"{prefix}-{u}") for u in ("own", "shared1", "shared2")}
        print(f"idle memory (MiB): {mib}")
        # Only the first server of an image pays for the software's page cache (measured:
        # 240 MiB with its own copy, 135 MiB sharing one; the server's RSS is about 110 MiB).
        assert mib["shared2"] < mib["own"] - 60, mib
        await hub.stop_all_servers()
    # Servers come and go; the copies stay for the next ones.
    assert await ready()
