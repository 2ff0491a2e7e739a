"""instance_patches and extra_objects through a real JupyterHub and Incus: one hub for all."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest

from lxdspawner.lxd import LxdClient, NotFound
from lxdspawner.names import instance_name
from testbench.hubtools import SpawnFailed, running_hub

from .test_spawner import deleted, sh, wait_until

# Two servers fail on purpose, chosen by their names, so one hub shows everything: a
# template whose variable does not exist, and a patch the daemon refuses.
CONFIG = """
c.JupyterHub.spawner_class = "lxd"
c.JupyterHub.allow_named_servers = True
c.LxdSpawner.name_prefix = {prefix!r}
c.LxdSpawner.instance_patches = {{
    "10-env": '''
config:
  environment.PATCHED_FOR: "{{{{ username }}}}/{{{{ servername }}}}"
  user.patched-name: "{{{{ instance_name }}}}"
''',
    "20-device": {{
        "devices": {{
            "patched": {{"type": "disk", "source": {host_dir!r}, "path": "/mnt/patched"}},
        }},
    }},
    "30-template": {{
        "config": {{"user.t": "{{{{ no_such_variable if servername == 'badtpl' else 'ok' }}}}"}},
    }},
    "40-refused": {{
        "config": {{"limits.memory": "{{{{ 'lots' if servername == 'refused' else '1GiB' }}}}"}},
    }},
}}
c.LxdSpawner.extra_objects = {{
    "acl": '''
kind: network-acl
body:
  name: "{{{{ instance_name }}}}-acl"
  description: "extra ACL of {{{{ username }}}}"
  egress:
    - action: reject
      state: enabled
      destination: 192.0.2.0/24
''',
}}
"""


async def acl(client: LxdClient, name: str) -> dict | None:
    try:
        return await client.request("GET", f"/1.0/network-acls/{quote(name, safe='')}")
    except NotFound:
        return None


async def test_patches_and_extra_objects(tmp_path, host_dir, prefix, incus, leftovers):
    (host_dir / "hello.txt").write_text("patched in\n")
    config = CONFIG.format(prefix=prefix, host_dir=str(host_dir))
    # cleanup_servers off: bob's server stays when the hub stops, and ends while it is down
    async with running_hub(tmp_path, config, cleanup_servers=False) as hub:
        await asyncio.gather(hub.start_server("alice", "lab"), hub.start_server("bob"))
        name = instance_name("alice", "lab", prefix)
        bob = instance_name("bob", "", prefix)

        # the config key and the device, seen inside the container
        assert await sh(incus, name, "printenv PATCHED_FOR") == "alice/lab"
        assert await sh(incus, name, "cat /mnt/patched/hello.txt") == "patched in"
        instance = await incus.get_instance(name)
        assert instance["config"]["user.patched-name"] == name
        assert instance["config"]["limits.memory"] == "1GiB"
        assert instance["config"]["user.jupyterhub.user"] == "alice"

        # the ACL, made with the server, carrying our keys; gone when the server stops
        made = await acl(incus, f"{name}-acl")
        assert made is not None
        assert made["description"] == "extra ACL of alice"
        assert made["config"]["user.jupyterhub.user"] == "alice"
        assert made["config"]["user.jupyterhub.server"] == "lab"
        assert made["config"]["user.jupyterhub.hub"] == hub.hub_id
        await hub.stop_server("alice", "lab")
        await deleted(incus, name)
        await wait_until(
            lambda: _gone(incus, f"{name}-acl"), 20, "the extra ACL to go with the container"
        )

        # a template error: the spawn fails naming the patch, and nothing is made
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("alice", "badtpl", timeout=60)
        assert "instance_patches['30-template']" in str(failed.value)
        assert "'no_such_variable' is undefined" in str(failed.value)

        # a patch the daemon refuses: the message names it and the daemon's reason; the ACL
        # made for the server goes with the failed spawn
        with pytest.raises(SpawnFailed) as failed:
            await hub.start_server("alice", "refused", timeout=60)
        assert "instance_patches '40-refused'" in str(failed.value), str(failed.value)
        assert "Invalid value: lots" in str(failed.value)  # the daemon's reason

        for server in ("badtpl", "refused"):
            left = instance_name("alice", server, prefix)
            await deleted(incus, left)
            assert await acl(incus, f"{left}-acl") is None, server

        # a server that ends while the hub is down: its container, then its ACL, go once
        # the hub is back and finds it stopped
        await hub.stop_hub()
        await incus.stop_instance(bob, force=True)
        assert await acl(incus, f"{bob}-acl") is not None
        await hub.restart()
        await deleted(incus, bob)
        await wait_until(lambda: _gone(incus, f"{bob}-acl"), 20, "bob's ACL, after a hub restart")


async def _gone(client: LxdClient, name: str) -> bool:
    return await acl(client, name) is None
