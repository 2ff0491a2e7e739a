"""LxdSpawner behind a real hub and proxy, through the hub's REST API (no browser).

Awkward usernames end to end, and the promise that matters most to an operator: with
``cleanup_servers = False`` a hub restart (here with a new proxy as well) finds every running
server again, the same one, still reachable; and the containers go when the servers do.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hubtools import (
    CHP,
    DAEMON_CLI,
    DAEMON_HUB_IP,
    instance_diagnostics,
    instance_names,
    lxd_unavailable,
    running_hub,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHP.exists(), reason=f"{CHP} missing: run scripts/ensure-tools.sh"),
]

USERS = ["ana.maria@uni.es", "Élodie", "x;touch pwned"]
CONFIG = """
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.image = "jupyter-base"
"""


def spawned() -> set[str]:
    # Only the spawner's containers: other tests may create instances of their own meanwhile.
    return {n for n in instance_names() if n.startswith("jupyter-")}


@pytest.fixture
def lxd():
    reason = lxd_unavailable("jupyter-base")
    if reason:
        pytest.skip(reason)


async def test_awkward_names_survive_a_hub_restart(lxd, tmp_path):
    before_test = spawned()
    async with running_hub(tmp_path, CONFIG, hub_ip=DAEMON_HUB_IP, cleanup_servers=False) as hub:
        hub.diagnostics = lambda: instance_diagnostics("jupyter-", DAEMON_CLI)
        servers = await asyncio.gather(*(hub.start_server(u) for u in USERS))
        started = {s["started"] for s in servers}
        ours = spawned() - before_test
        assert len(ours) == len(USERS), ours
        for server in servers:
            status, body = await hub.get_via_proxy(server["url"] + "api/status")
            assert status == 200, (status, body[:300])

        await hub.restart(keep_proxy=False)

        for user, server in zip(USERS, servers, strict=True):
            again = await hub.server_model(user)
            assert again is not None and again["ready"], (user, again)
            assert again["started"] in started  # the same server, found again
            status, body = await hub.get_via_proxy(server["url"] + "api/status")
            assert status == 200, (status, body[:300])
            assert json.loads(body)["kernels"] == 0
        assert spawned() - before_test == ours

        for user in USERS:
            await hub.stop_server(user)
        assert not (spawned() & ours), "containers outlived their servers"
