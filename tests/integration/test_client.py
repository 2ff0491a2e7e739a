"""The async client against the real daemons: every method, and the errors an operator sees."""

from __future__ import annotations

import asyncio
import ipaddress
import os

import pytest
from aiohttp import web

from lxdspawner.lxd import (
    LxdClient,
    LxdError,
    NotFound,
    OperationFailed,
    Unreachable,
    image_source,
    ipv4_addresses,
)

from .conftest import BASE_IMAGE, BRIDGE_GATEWAYS, TINY_IMAGE


async def wait_for_ipv4(lxd, name, timeout=30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        addresses = ipv4_addresses(await lxd.instance_state(name))
        if addresses:
            return addresses[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} got no IPv4 within {timeout} s")


async def test_dialect_matches_the_daemon(lxd, daemon):
    assert lxd.dialect.product == daemon
    assert lxd.dialect.header_prefix == ("X-Incus-" if daemon == "incus" else "X-LXD-")
    assert "container_exec_recording" in lxd.dialect.api_extensions
    # Incus 6 creates and starts in one request; Debian's LXD 5.0.2 cannot.
    assert lxd.dialect.create_and_start == (daemon == "incus")


async def test_launch_gets_an_ipv4_on_our_bridge(lxd, instances, daemon):
    name = instances("ip")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    state = await lxd.instance_state(name)
    assert state["status"] == "Running"
    address = await wait_for_ipv4(lxd, name)
    assert ipaddress.ip_address(address) in ipaddress.ip_network(
        BRIDGE_GATEWAYS[daemon] + "/24", strict=False
    )


async def test_config_devices_and_list_filter(lxd, instances, host_dir):
    name = instances("cfg")
    (host_dir / "shared.txt").write_text("from the host")
    await lxd.create_instance(
        name,
        source=image_source(TINY_IMAGE),
        config={"user.jupyterhub.user": "ana.maria@uni.es", "limits.processes": "100"},
        devices={"data": {"type": "disk", "source": str(host_dir), "path": "/mnt/data"}},
    )
    instance = await lxd.get_instance(name)
    assert instance["status"] == "Stopped"
    assert instance["config"]["user.jupyterhub.user"] == "ana.maria@uni.es"
    assert instance["devices"]["data"]["path"] == "/mnt/data"
    listed = await lxd.list_instances(filter=f"name eq {name}")
    assert [i["name"] for i in listed] == [name]
    await lxd.start_instance(name)
    result = await lxd.exec(name, ["cat", "/mnt/data/shared.txt"])
    assert result.stdout == "from the host"


async def test_files_push_and_read_keep_owner_and_mode(lxd, instances):
    name = instances("files")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE))
    # Files can be written before the first start: that is how the server's unit gets in.
    await lxd.make_directory(name, "/etc/lxdsp", mode=0o750)
    await lxd.push_file(name, "/etc/lxdsp/secret", b"token=abc\n", uid=1000, gid=1000, mode=0o600)
    await lxd.make_symlink(name, "/etc/lxdsp/link", "secret")
    assert await lxd.read_file(name, "/etc/lxdsp/secret") == b"token=abc\n"
    await lxd.start_instance(name)
    result = await lxd.exec(name, ["stat", "-c", "%u:%g:%a", "/etc/lxdsp/secret"])
    assert result.stdout.strip() == "1000:1000:600"
    result = await lxd.exec(name, ["readlink", "/etc/lxdsp/link"])
    assert result.stdout.strip() == "secret"
    with pytest.raises(NotFound):
        await lxd.read_file(name, "/no/such/file")


async def test_exec_records_output_and_exit_code(lxd, instances):
    name = instances("exec")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    result = await lxd.exec(
        name,
        ["/bin/sh", "-c", 'echo "out $GREETING"; echo err >&2; id -u; exit 3'],
        environment={"GREETING": "x;touch /tmp/pwned"},
        user=1000,
        group=1000,
        cwd="/tmp",
    )
    assert result.exit_code == 3
    assert result.stdout.splitlines() == ["out x;touch /tmp/pwned", "1000"]
    assert result.stderr.strip() == "err"
    check = await lxd.exec(name, ["ls", "/tmp"])
    assert "pwned" not in check.stdout
    # The recorded output is deleted afterwards: nothing piles up in the instance's logs.
    assert await exec_records(lxd, name) == []


async def test_exec_reads_only_the_end_of_a_large_output(lxd, instances):
    name = instances("execbig")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    script = "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo THE-END; echo err-end >&2"
    result = await lxd.exec(name, ["/bin/sh", "-c", script])
    assert result.exit_code == 0
    assert len(result.stdout) <= lxd.exec_output_limit
    assert result.stdout.endswith("x\nTHE-END\n")
    assert result.stderr == "err-end\n"
    assert await exec_records(lxd, name) == []


async def exec_records(lxd, name):
    """The exec output records the daemon keeps for an instance (Incus in a folder of its own)."""
    logs = await lxd.request("GET", f"/1.0/instances/{name}/logs")
    if lxd.dialect.product == "incus":
        logs += await lxd.request("GET", f"/1.0/instances/{name}/logs/exec-output")
    return [entry for entry in logs if entry.rsplit("/", 1)[-1].startswith("exec")]


async def test_exec_gives_exit_codes_126_and_127_of_commands_that_ran(lxd, instances):
    name = instances("exec127")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    # The daemons fail these operations ("Command not found"), yet the command ran.
    result = await lxd.exec(name, ["/bin/sh", "-c", "echo before; q_no_such_cmd"])
    assert result.exit_code == 127
    assert result.stdout == "before\n"
    assert "q_no_such_cmd: not found" in result.stderr
    assert (await lxd.exec(name, ["/bin/sh", "-c", "exit 127"])).exit_code == 127
    quiet = await lxd.exec(name, ["/bin/sh", "-c", "q_no_such_cmd"], record_output=False)
    assert quiet.exit_code == 127
    assert (await lxd.exec(name, ["/bin/sh", "-c", "exit 126"])).exit_code == 126
    assert (await lxd.exec(name, ["/bin/sh", "-c", "exit 3"])).exit_code == 3
    assert await exec_records(lxd, name) == []


async def test_exec_of_a_command_that_cannot_start_says_which(lxd, instances):
    name = instances("execmiss")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    with pytest.raises(OperationFailed) as missing:
        await lxd.exec(name, ["/no/such/binary"])
    assert str(missing.value) == f"command '/no/such/binary' not found in {name}"
    with pytest.raises(OperationFailed, match=r"command 'q_no_such' not found in .*/usr/bin"):
        await lxd.exec(name, ["q_no_such"], record_output=False)
    await lxd.push_file(name, "/tmp/not-executable", b"echo hi\n", mode=0o644)
    with pytest.raises(OperationFailed, match="/tmp/not-executable has no execute permission"):
        await lxd.exec(name, ["/tmp/not-executable"])
    with pytest.raises(OperationFailed, match="/tmp is a directory"):
        await lxd.exec(name, ["/tmp"])
    assert await exec_records(lxd, name) == []
    await lxd.stop_instance(name, force=True)
    with pytest.raises(LxdError, match="not running"):
        await lxd.exec(name, ["/bin/true"])


async def test_read_file_tail_of_a_running_and_a_stopped_instance(lxd, instances):
    name = instances("tail")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    big = os.urandom(5 * 2**20 + 123)
    await lxd.push_file(name, "/var/log/big.log", big)
    await lxd.push_file(name, "/var/log/short.log", b"one line\n")
    await lxd.push_file(name, "/var/log/empty.log", b"")
    # What read_file_tail relies on: the daemon answers a suffix range with just the tail.
    status, body, _ = await lxd.raw(
        "GET",
        f"/1.0/instances/{name}/files",
        params={"path": "/var/log/big.log"},
        headers={"Range": "bytes=-1000"},
    )
    assert (status, body) == (206, big[-1000:])
    for running in (True, False):
        assert await lxd.read_file_tail(name, "/var/log/big.log") == big[-65536:]
        assert await lxd.read_file_tail(name, "/var/log/big.log", max_bytes=10) == big[-10:]
        assert await lxd.read_file_tail(name, "/var/log/short.log") == b"one line\n"
        assert await lxd.read_file_tail(name, "/var/log/empty.log") == b""
        with pytest.raises(NotFound, match="/var/log/missing.log"):
            await lxd.read_file_tail(name, "/var/log/missing.log")
        if running:
            # The server's log must stay readable once the container has powered off.
            await lxd.stop_instance(name, force=True)
    assert (await lxd.get_instance(name))["status"] == "Stopped"


async def test_read_file_tail_is_bounded_when_a_daemon_ignores_the_range(tmp_path):
    """Against a fake daemon that sends whole files: only the read cap is read."""
    content = bytes(range(256)) * 4096  # 1 MiB
    ranges = []

    async def files(request):
        ranges.append(request.headers.get("Range"))
        return web.Response(body=content, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/1.0/instances/{name}/files", files)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = str(tmp_path / "fake.socket")
    await web.UnixSite(runner, socket).start()
    try:
        client = LxdClient(f"unix://{socket}")
        try:
            assert await client.read_file_tail("c", "/big", max_bytes=1000) == content[-1000:]
            client.tail_read_cap = 300_000
            assert (
                await client.read_file_tail("c", "/big", max_bytes=1000)
                == (content[299_000:300_000])
            )
        finally:
            await client.close()
    finally:
        await runner.cleanup()
    assert ranges == ["bytes=-1000", "bytes=-1000"]


async def test_events_show_start_and_stop(lxd, instances):
    name = instances("events")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE))
    seen: list[str] = []
    ready = asyncio.Event()

    async def watch():
        async for event in lxd.events(types=("lifecycle",)):
            ready.set()
            if event.get("metadata", {}).get("source", "").endswith(f"/instances/{name}"):
                seen.append(event["metadata"]["action"])
                if event["metadata"]["action"] in ("instance-stopped", "instance-shutdown"):
                    return

    async def keepalive_ready():
        # The stream only yields when events flow: make sure it is connected first.
        while not ready.is_set():
            await lxd.request("PATCH", f"/1.0/instances/{name}", json_body={"description": "x"})
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(keepalive_ready(), 10)
    await lxd.start_instance(name)
    await lxd.stop_instance(name, timeout=20)
    await asyncio.wait_for(watcher, 30)
    assert "instance-started" in seen
    assert "instance-stopped" in seen or "instance-shutdown" in seen


async def test_graceful_stop_and_delete(lxd, instances):
    name = instances("stop")
    await lxd.create_instance(name, source=image_source(TINY_IMAGE), start=True)
    await lxd.stop_instance(name, timeout=20)
    assert (await lxd.get_instance(name))["status"] == "Stopped"
    await lxd.delete_instance(name)
    with pytest.raises(NotFound, match="not found"):
        await lxd.get_instance(name)


async def test_missing_instance_and_missing_image_errors(lxd, instances):
    with pytest.raises(NotFound) as missing:
        await lxd.get_instance("lxdsp-test-no-such-instance")
    assert "lxdsp-test-no-such-instance" in str(missing.value)
    with pytest.raises((NotFound, OperationFailed, LxdError)) as no_image:
        await lxd.create_instance(instances("noimg"), source=image_source("no-such-image"))
    assert "image" in str(no_image.value).lower() or "not found" in str(no_image.value).lower()


async def test_storage_volume_with_quota(lxd):
    name = "lxdsp-test-vol"
    try:
        await lxd.delete_volume("lxdspawner", name)
    except NotFound:
        pass
    await lxd.create_volume("lxdspawner", name, config={"size": "64MiB"})
    try:
        volume = await lxd.get_volume("lxdspawner", name)
        assert volume["config"]["size"] == "64MiB"
        assert name in [v["name"] for v in await lxd.list_volumes("lxdspawner")]
    finally:
        await lxd.delete_volume("lxdspawner", name)
    with pytest.raises(NotFound):
        await lxd.get_volume("lxdspawner", name)


async def test_standalone_server_has_no_members_and_has_resources(lxd):
    assert await lxd.cluster_members() == []
    resources = await lxd.resources()
    assert resources["cpu"]["total"] >= 1
    assert resources["memory"]["total"] > 0


async def test_request_count_counts(lxd):
    before = lxd.request_count
    await lxd.server_info()
    assert lxd.request_count == before + 1


async def test_unreachable_daemon_says_where(tmp_path):
    client = LxdClient(f"unix://{tmp_path}/nothing.socket")
    with pytest.raises(Unreachable, match="nothing.socket"):
        await client.open()
    await client.close()


async def test_https_without_client_certificate_is_explained():
    client = LxdClient("https://127.0.0.1:1")
    with pytest.raises(LxdError, match="client certificate"):
        await client.open()
    await client.close()


# On Incus only: on LXD, test_spawn_on_lxd_and_daemon_stopped_during_a_spawn (test_spawner.py)
# runs the server from this image through the spawner.
@pytest.mark.parametrize("daemon", ["incus"])
async def test_single_user_image_runs_jupyterhub_singleuser(lxd, instances):
    name = instances("base")
    await lxd.create_instance(name, source=image_source(BASE_IMAGE), start=True)
    await wait_for_ipv4(lxd, name, timeout=60)
    result = await lxd.exec(name, ["/opt/jupyterhub/bin/jupyterhub-singleuser", "--version"])
    assert result.exit_code == 0, result.output
    import jupyterhub

    # The image's jupyterhub has the hub's major.minor: the two must speak the same API.
    major_minor = ".".join(jupyterhub.__version__.split(".")[:2])
    version = await lxd.exec(
        name,
        ["/opt/jupyterhub/bin/python", "-c", "import jupyterhub; print(jupyterhub.__version__)"],
    )
    assert version.stdout.strip().startswith(major_minor + ".")
    user = await lxd.exec(name, ["id", "-u", "jupyter"])
    assert user.stdout.strip() == "1000"
