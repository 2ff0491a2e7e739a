"""The operator's commands on the three-member cluster: ``lxdspawner image build`` imports
under an alias the cluster serves on every member, and ``lxdspawner doctor`` checks each
member (the image unpacked in its pool, the members' clocks), naming ``prepull`` as the fix
for a member without the image, which then passes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

from lxdspawner.lxd import LxdError

CLI = Path(sys.executable).parent / "lxdspawner"


async def lxdspawner(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(CLI), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await proc.communicate())[0].decode()
    return proc.returncode, out


async def test_image_build_and_doctor_on_every_member(cl, cluster, tmp_path):
    alias = f"lxdsp-clu-built-{uuid.uuid4().hex[:8]}"
    connection = ["--endpoint", cluster.endpoint, "--cert", cluster.client_cert,
                  "--key", cluster.client_key, "--server-cert", cluster.server_cert]  # fmt: skip
    try:
        status, out = await lxdspawner("image", "build", "lxdspawner-tiny", "--alias", alias,
                                       *connection)  # fmt: skip
        assert status == 0, out
        target = (await cl.image_alias(alias))["target"]
        assert target == await cl.image_fingerprint("lxdspawner-tiny"), out

        config = tmp_path / "jupyterhub_config.py"
        config.write_text(
            f"c.LxdSpawner.endpoint = {cluster.endpoint!r}\n"
            f"c.LxdSpawner.client_cert = {cluster.client_cert!r}\n"
            f"c.LxdSpawner.client_key = {cluster.client_key!r}\n"
            f"c.LxdSpawner.server_cert = {cluster.server_cert!r}\n"
            f"c.LxdSpawner.image = {alias!r}\n"
            f"c.JupyterHub.hub_connect_url = 'http://{cluster.hub_ip}:8081'\n"
        )

        async def findings() -> dict[str, dict]:
            status, out = await lxdspawner(
                "doctor", "-f", str(config), "--format", "json", "--no-probe"
            )
            assert status in (0, 1), out
            return {r["check"]: r for r in json.loads(out)}

        found = await findings()
        assert "clock" in found, [r for r in found.values() if r["severity"] != "ok"]
        clock = found["clock"]
        assert clock["severity"] == "ok", clock
        for member in cluster.members:
            assert member in clock["what"], clock
        image = found["image"]
        if image["severity"] != "ok":  # a member without the image: the fix is prepull
            assert image["severity"] == "warning", image
            assert "prepull" in image["fix"] and "-f" in image["fix"], image
            status, out = await lxdspawner("prepull", "-f", str(config))
            assert status == 0, out
            image = (await findings())["image"]
        assert image["severity"] == "ok", image
        assert f"on all {len(cluster.members)} members" in image["what"], image
    finally:
        try:
            await cl.request("DELETE", f"/1.0/images/aliases/{alias}")
        except LxdError:
            pass
