"""Fixtures for tests against a real Incus or LXD daemon set up by scripts/setup-lxd.sh.

The daemons come from LXDSPAWNER_TEST_DAEMONS ("incus lxd" under `make test`, "incus" when
unset); their sockets, bridges and addresses from scripts/topology.env. A missing daemon
fails the test: in CI these tests must run, never be skipped.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from lxdspawner.lxd import LxdClient, LxdError
from testbench import topology

SOCKETS = {name: d.socket for name, d in topology.DAEMONS.items()}
BRIDGE_GATEWAYS = {name: d.gateway for name, d in topology.DAEMONS.items()}
BRIDGES = {name: d.bridge for name, d in topology.DAEMONS.items()}
TINY_IMAGE = "lxdspawner-tiny"
BASE_IMAGE = "jupyter-base"


def test_daemons() -> list[str]:
    return os.environ.get("LXDSPAWNER_TEST_DAEMONS", "incus").split()


test_daemons.__test__ = False  # a helper, not a test


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(params=test_daemons())
def daemon(request) -> str:
    """Each daemon under test in turn (client tests run against all of them)."""
    return request.param


def endpoint_for(daemon: str) -> str:
    socket = SOCKETS[daemon]
    if not os.path.exists(socket):
        pytest.fail(
            f"{daemon} is not running ({socket} missing): run scripts/setup-lxd.sh {daemon}"
        )
    return f"unix://{socket}"


@pytest.fixture
async def lxd(daemon):
    async with LxdClient(endpoint_for(daemon)) as client:
        yield client


@pytest.fixture
async def instances(lxd, request):
    """Names for test instances; each is deleted afterwards, its logs printed on failure."""
    made: list[str] = []

    def new_name(stem: str = "t") -> str:
        name = f"lxdsp-test-{stem}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield new_name
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for name in made:
        if failed:
            await dump_instance(lxd, name)
        try:
            await lxd.stop_instance(name, force=True)
        except LxdError:
            pass
        try:
            await lxd.delete_instance(name)
        except LxdError:
            pass


@pytest.fixture
def host_dir():
    """A host directory an unprivileged container can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lxdsp-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def dump_instance(client: LxdClient, name: str) -> None:
    print(f"\n===== {name}: lxc.log =====\n{await client.instance_log(name)}")
    print(f"===== {name}: console =====\n{await client.console_log(name)}")


async def remove_instances_named(client: LxdClient, prefix: str) -> None:
    """Stop and delete every instance whose name starts with ``prefix``."""
    for url in await client.list_instances(recursion=0):
        name = url.rsplit("/", 1)[-1]
        if name.startswith(prefix):
            try:
                await client.stop_instance(name, force=True)
            except LxdError:
                # Stopped already, maybe a moment ago by itself: give LXD's teardown the
                # time it takes, or this deletion would leak the container's interface.
                await asyncio.sleep(1)
            await client.delete_instance(name)


def bridge_ports(daemon: str = "incus") -> set[str]:
    """The host-side interfaces on the daemon's bridge: one per running container."""
    return set(os.listdir(f"/sys/class/net/{BRIDGES[daemon]}/brif"))


async def leaked_interfaces(client: LxdClient, before: set[str], daemon: str = "incus") -> set:
    """Interfaces that came onto the bridge since ``before`` and belong to no running
    container: what a container deleted before LXD had torn it down leaves behind. A leak
    stays; a container of another session stopping just now takes its interface away within
    a second or two, so only those still there after 3 s count."""
    leaked = None
    for _ in range(4):
        owned = set()
        for instance in await client.list_instances(recursion=2):
            network = (instance.get("state") or {}).get("network") or {}
            owned |= {nic.get("host_name") for nic in network.values()}
        now = bridge_ports(daemon) - before - owned
        leaked = now if leaked is None else leaked & now
        if not leaked:
            return set()
        await asyncio.sleep(1)
    return leaked


@pytest.fixture
def prefix():
    return "jt" + secrets.token_hex(3)


@pytest.fixture
async def incus():
    async with LxdClient(f"unix://{SOCKETS['incus']}") as client:
        yield client


@pytest.fixture
async def leftovers(incus, prefix, request):
    """Every instance this test's hub made (on Incus, and on LXD when the run uses it: the
    shifted base of a test on LXD stays otherwise) is gone at the end, whatever happened; on
    a failure, their LXD log, console and server log are printed first. And none of them has
    left its network interface on the host."""
    ports = bridge_ports()
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for url in await incus.list_instances(recursion=0):
            name = url.rsplit("/", 1)[-1]
            if name.startswith(prefix + "-"):
                await dump_instance(incus, name)
                try:
                    log = await incus.read_file_tail(name, "/var/log/jupyterhub-singleuser.log")
                    print(f"===== {name}: server log =====\n{log.decode(errors='replace')}")
                except Exception as e:  # the report must not hide the failure
                    print(f"===== {name}: no server log ({e}) =====")
    await remove_instances_named(incus, prefix + "-")
    if "lxd" in test_daemons():  # a test on LXD too leaves its shifted base there
        async with LxdClient(f"unix://{SOCKETS['lxd']}") as lxd:
            await remove_instances_named(lxd, prefix + "-")
    leaked = await leaked_interfaces(incus, ports)
    assert not leaked, f"host interfaces left by deleted containers: {sorted(leaked)}"
