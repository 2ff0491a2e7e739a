"""The hub harness (testbench/hubtools.py) proven with JupyterHub's SimpleLocalProcessSpawner.

No container daemon is needed: the hub binds to 127.0.0.1 and servers are local processes.
What these tests show about the harness is what the LXD tests rely on: a real hub behind a
real configurable-http-proxy starts, spawns, reports failures with the hub's message,
reaches servers through the proxy, quotes awkward names, stops, and restarts on its database.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from testbench.hubtools import CHP, LOCAL_SPAWNER_CONFIG, VENV_BIN, SpawnFailed, running_hub

pytestmark = [
    pytest.mark.e2e,
    # No daemon: scripts/run-tests.sh runs these beside the daemon tiers.
    pytest.mark.nodaemon,
    pytest.mark.skipif(not CHP.exists(), reason=f"{CHP} missing: run scripts/ensure-tools.sh"),
    pytest.mark.skipif(
        not (VENV_BIN / "jupyterhub-singleuser").exists()
        or not any((VENV_BIN.parent / "lib").glob("python3*/site-packages/jupyter_server")),
        reason="jupyter_server is not installed in the venv (pip install jupyterlab)",
    ),
]

AWKWARD = ["ana.maria@uni.es", "Élodie", "x;touch pwned"]


def local_config(tmp_path: Path) -> str:
    """Config text for SimpleLocalProcessSpawner, as these tests pass it to running_hub."""
    args = ["--allow-root"] if os.geteuid() == 0 else []
    home = tmp_path / "home"
    return (
        LOCAL_SPAWNER_CONFIG
        + f"""
c.Spawner.cmd = [{str(VENV_BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = {args!r}
c.SimpleLocalProcessSpawner.home_dir_template = {str(home) + "/{username}"!r}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.allow_named_servers = True

def _refuse_broken(spawner):
    # A spawn that fails the way a missing image does: with a message for the user.
    if spawner.name == "broken":
        raise RuntimeError("image 'no-such-image' not found (test hook)")

c.Spawner.pre_spawn_hook = _refuse_broken
"""
    )


async def _status(hub, server: dict) -> dict:
    status, body = await hub.get_via_proxy(server["url"] + "api/status")
    assert status == 200, (status, body[:300])
    return json.loads(body)


async def test_start_reach_stop_awkward_names_named_server_and_failed_spawn(tmp_path):
    async with running_hub(tmp_path, local_config(tmp_path), hub_ip="127.0.0.1") as hub:
        servers = await asyncio.gather(
            *(hub.start_server(u, timeout=90) for u in AWKWARD),
            hub.start_server("bob", "work-1", timeout=90),
        )
        named = servers.pop()
        for user, server in zip(AWKWARD, servers, strict=True):
            assert server["ready"] is True
            model = await hub.user_model(user)
            assert model["name"] == user  # created through the API exactly as given
            await _status(hub, server)
            # Without a token the server (through the proxy) sends us to log in.
            status, _ = await hub.get_via_proxy(server["url"] + "api/status", token=False)
            assert status in (302, 403), status
        for user in AWKWARD:
            await hub.stop_server(user)
            assert await hub.server_model(user) is None
        status, _ = await hub.get_via_proxy(servers[0]["url"] + "api/status")
        assert status != 200  # the route is gone with the server

        assert named["name"] == "work-1"
        await _status(hub, named)
        with pytest.raises(SpawnFailed) as failure:
            await hub.start_server("bob", "broken")
        assert "no-such-image" in failure.value.message
        assert (await hub.server_model("bob", "broken")) is None
        await hub.stop_server("bob", "work-1", remove=True)
        model = await hub.user_model("bob")
        assert "work-1" not in model["servers"]
        assert "test hook" in hub.log()  # log() gives the hub's log
    assert_no_file_named_pwned(tmp_path)


def assert_no_file_named_pwned(tmp_path: Path) -> None:
    """The name was never given to a shell (its `touch pwned` never ran)."""
    assert not list(tmp_path.rglob("pwned"))
    assert not Path("pwned").exists()


async def test_restart_keeps_servers_and_with_cleanup_stops_them(tmp_path):
    async with running_hub(
        tmp_path, local_config(tmp_path), hub_ip="127.0.0.1", cleanup_servers=False
    ) as hub:
        server = await hub.start_server("ana.maria@uni.es")
        before = await _status(hub, server)

        # The proxy (and the route) stays up: the new hub must find the server again.
        await hub.restart(keep_proxy=True)
        again = await hub.server_model("ana.maria@uni.es")
        assert again is not None and again["ready"], again
        assert again["started"] == server["started"]  # the same server, not a new one
        assert (await _status(hub, again))["started"] == before["started"]

        # A new proxy: the restarted hub has to put the route back. This hub is started
        # with cleanup_servers (JupyterHub's default), so it stops its servers on exit.
        hub.set_cleanup_servers(True)
        await hub.restart(keep_proxy=False)
        assert (await _status(hub, again))["started"] == before["started"]
        assert hub.log().count("JupyterHub is now running") == 3

        await hub.restart()
        assert await hub.server_model("ana.maria@uni.es") is None
        status, _ = await hub.get_via_proxy(server["url"] + "api/status")
        assert status != 200
