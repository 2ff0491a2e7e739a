"""`lxdspawner list` against the real daemons: a server's container, as an operator sees it."""

from __future__ import annotations

import io

from lxdspawner import cli
from lxdspawner.lxd import image_source
from lxdspawner.objects import KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY

from .conftest import TINY_IMAGE
from .test_client import wait_for_ipv4


async def test_list_shows_user_server_status_and_address(lxd, instances):
    running, stopped, other = instances("listrun"), instances("liststop"), instances("notours")
    ours = {KEY_MANAGED: MANAGED_BY, KEY_USER: "ana maria", "user.jupyterhub.hub": "hub-a"}
    await lxd.create_instance(
        running, source=image_source(TINY_IMAGE), config={**ours, KEY_SERVER: "work"}, start=True
    )
    await lxd.create_instance(stopped, source=image_source(TINY_IMAGE), config=ours)
    await lxd.create_instance(other, source=image_source(TINY_IMAGE))
    address = await wait_for_ipv4(lxd, running)

    out = io.StringIO()
    assert await cli.list_servers(lxd, out=out) == 0
    rows = {line.split()[-5]: line for line in out.getvalue().splitlines()[1:] if line}
    assert rows[running].split()[-6:] == ["work", running, "Running", "-", address, "hub-a"]
    assert rows[stopped].split()[-6:] == ["-", stopped, "Stopped", "-", "-", "hub-a"]
    assert rows[running].startswith("ana maria ")
    assert other not in out.getvalue()
