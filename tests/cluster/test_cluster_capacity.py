"""Guarantees on the real three-member cluster, through a real JupyterHub and proxy: a member
full by guarantees is skipped whatever its weight says, and a server no member has room for
fails with the message naming every member and its figures.

Each member reports this host's memory in /1.0/resources: the guarantees are chosen from it so
that, with overcommit 1.5, a member has room for two servers and none for a bigger one. One
hub, light servers (see test_cluster_spawner.py): a few seconds of the cluster session.
"""

from __future__ import annotations

import asyncio

import pytest

from testbench.hubtools import SpawnFailed, running_hub

from .test_cluster_spawner import hub_config, locations, with_diagnostics

#: Who asks for what: cq0 and cq1 on member1 (filling it), cq2 anywhere, cq3 too much.
GUARANTEES = """
def _guarantees(spawner):
    name = spawner.user.name
    spawner.mem_guarantee = {big} if name == "cq3" else {each}
    if name in ("cq0", "cq1"):
        spawner.target = "member1"

c.Spawner.pre_spawn_hook = _guarantees
c.LxdSpawner.overcommit = 1.5
c.LxdSpawner.host_weights = {{"member1": 100, "member2": 1, "member3": 1}}
c.LxdSpawner.home_volume_size = ""
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


async def test_a_member_full_by_guarantees_is_skipped_and_nothing_fitting_is_said(
    cluster, cl, tmp_path
):
    memory = {m: (await cl.resources(m))["memory"]["total"] for m in cluster.members}
    smallest = min(memory.values())
    each = int(smallest * 0.7)  # two fit in 1.5 times the memory, three do not
    big = int(max(memory.values()) * 1.6)  # more than any member has room for
    extra = GUARANTEES.format(each=each, big=big)
    async with running_hub(
        tmp_path, config=hub_config(cluster, extra), hub_ip=cluster.hub_ip
    ) as hub:
        with_diagnostics(hub, cluster, "jupyter-cq")
        # Together, as spawns in flight: both fit on member1, which is then full.
        await asyncio.gather(*(hub.start_server(u, timeout=180) for u in ("cq0", "cq1")))
        assert await locations(cl, ["cq0", "cq1"]) == {"cq0": "member1", "cq1": "member1"}

        # Weight 100 says member1; it has no room left, so another member takes it.
        await hub.start_server("cq2", timeout=180)
        elsewhere = (await locations(cl, ["cq2"]))["cq2"]
        assert elsewhere in ("member2", "member3")

        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("cq3", timeout=120)
        message = failed.value.message
        print(f"cq3: {message}")
        assert "no cluster member can take the server of user 'cq3'" in message, message
        needs = f"this server needs {gib(big)}"
        for m in cluster.members:
            held = 2 * each if m == "member1" else each if m == elsewhere else 0
            room = memory[m] * 1.5
            said = f"{m}: memory guaranteed {gib(held)} of {gib(room)} (overcommit 1.5), {needs}"
            assert said in message, message
        assert "cq3" not in await locations(cl, ["cq3"])
