"""Fixtures for tests on a real three-member Incus cluster (scripts/cluster.sh).

The session's first cluster test builds the cluster (`scripts/cluster.sh up`: 15 to 45 s
from nothing, depending on the machine's load; 2 to 3 s when it is already up) and the session
ends with `scripts/cluster.sh down`, which leaves nothing running. Set
LXDSPAWNER_KEEP_CLUSTER=1 to keep it between runs while working on these tests.

What the tests know of the cluster (endpoint, certificates, members and their addresses,
the hub's address and the containers' subnet) is what `scripts/cluster.sh up` prints, as
the ``cluster`` fixture's `testbench.cluster.Cluster`.

Every test here carries the ``cluster`` marker: ``pytest -m cluster`` runs them alone,
``pytest -m "not cluster"`` skips them. A cluster that cannot be built fails the tests, it
does not skip them: in CI they must run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lxdspawner.lxd import LxdClient, LxdError, ipv4_addresses
from lxdspawner.volumes import KEY_VOLUME
from testbench.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster.sh"
TINY_IMAGE = "lxdspawner-tiny"
BASE_IMAGE = "jupyter-base"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cluster: needs the three-member Incus cluster of scripts/cluster.sh "
        "(built by the session fixture, torn down at the end)",
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if f"{os.sep}cluster{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


def _script_env() -> dict[str, str]:
    """The environment for scripts/cluster.sh: its Python helper (testbench/cluster.py) and
    the image builds run on this interpreter's venv, wherever the venv is."""
    env = dict(os.environ, PYTHON=sys.executable)
    if sys.prefix != sys.base_prefix:
        env["VENV"] = sys.prefix
    return env


def run_script(*args: str, timeout: float = 300) -> str:
    """Run scripts/cluster.sh and return its stdout; its output goes into the failure
    message if it fails."""
    t0 = time.monotonic()
    p = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_script_env(),
    )
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"scripts/cluster.sh {' '.join(args)} failed ({p.returncode}) after {took:.1f} s:\n"
            f"{p.stdout}\n{p.stderr}"
        )
    print(f"scripts/cluster.sh {' '.join(args)}: {took:.1f} s")
    return p.stdout


def stop_member(n: int, kill: bool = False) -> None:
    """Stop member n's daemon: SIGTERM (it says goodbye), or SIGKILL (a crash)."""
    run_script("stop-member", str(n), *(["--kill"] if kill else []), timeout=60)


def start_member(n: int) -> None:
    run_script("start-member", str(n), timeout=150)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    try:
        facts = run_script("up", timeout=600)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield Cluster.from_facts(facts)
    if os.environ.get("LXDSPAWNER_KEEP_CLUSTER") != "1":
        run_script("down", timeout=300)


@pytest.fixture
async def cl(cluster):
    async with cluster.client() as client:
        yield client


@pytest.fixture(autouse=True)
async def no_users_volumes_left(cluster):
    """Each test starts without users' volumes (home volumes pin their users' servers to a
    member) and leaves none: with LXDSPAWNER_KEEP_CLUSTER=1 a test's second run would
    otherwise place its users where the first run left their homes."""
    async with cluster.client() as client:
        await delete_users_volumes(client)
    yield
    async with cluster.client() as client:
        await delete_users_volumes(client)


async def delete_users_volumes(client: LxdClient) -> None:
    """Delete the custom volumes lxdspawner made for users (KEY_VOLUME), on every member; one
    still in use (a kept container of a test that failed) is left."""
    for pool in await client.storage_pools():
        for volume in await client.list_volumes(pool):
            if KEY_VOLUME not in (volume.get("config") or {}) or "/" in volume["name"]:
                continue
            try:
                await client.delete_volume(pool, volume["name"], target=volume.get("location"))
            except LxdError as e:
                print(f"left {pool}/{volume['name']} on {volume.get('location')}: {e.message}")


@pytest.fixture
async def cluster_instances(cl, request):
    """Names for test instances; each is deleted afterwards (its log printed on failure)."""
    made: list[str] = []

    def new_name(stem: str = "t") -> str:
        name = f"lxdsp-clu-{stem}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield new_name
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    await asyncio.gather(*(_remove(cl, name, failed) for name in made))


async def _remove(client: LxdClient, name: str, dump: bool) -> None:
    if dump:
        print(f"\n===== {name}: lxc.log =====\n{await client.instance_log(name)}")
        print(f"===== {name}: console =====\n{await client.console_log(name)}")
    try:
        await client.stop_instance(name, force=True)
    except LxdError:
        pass
    try:
        await client.delete_instance(name)
    except LxdError:
        pass


async def wait_for_ipv4(client: LxdClient, name: str, timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        addresses = ipv4_addresses(await client.instance_state(name))
        if addresses:
            return addresses[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} got no IPv4 within {timeout} s")


async def wait_for_status(
    client: LxdClient, member: str, want_online: bool, timeout: float = 60.0
) -> float:
    """Wait until ``member`` is (or is no longer) Online as the cluster reports it; return
    the seconds it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status = "?"
    while loop.time() - t0 < timeout:
        try:
            members = {m["server_name"]: m["status"] for m in await client.cluster_members()}
            status = members.get(member, "missing")
            if (status == "Online") == want_online:
                return loop.time() - t0
        except LxdError as e:  # the cluster may be electing a leader
            status = f"error: {e}"
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"{member} still {status!r} after {timeout:.0f} s (waiting for "
        f"{'Online' if want_online else 'not Online'})"
    )
