"""A fresh ``pip install`` builds and imports an image with no file from the checkout, on each
daemon under test (Debian's LXD 5.0 as well as Incus).

The wheel is built from the tree and pip-installed into a new virtualenv
(:func:`testbench.wheel.venv_with_wheel`); its ``lxdspawner`` command runs from a directory
outside the checkout, with no PYTHONPATH and an empty image cache, and builds the cheapest
recipe, ``lxdspawner-tiny`` (busybox: a second or so), under a test alias. Its fresh metadata
(a new creation date) gives it a fingerprint no daemon has, so the import really uploads. Then
a container launched from the alias starts, and a second run is a cache hit that imports
nothing. Every message about the import names the daemon (product and version). The alias and
its image are deleted afterwards (the image only when no other alias points at it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lxdspawner.lxd import LxdError, image_source
from testbench.wheel import venv_with_wheel

from .conftest import endpoint_for

ROOT = Path(__file__).resolve().parents[2]
ALIAS = "lxdsp-test-wheel-tiny"
PRODUCT = {"incus": "Incus", "lxd": "LXD"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    return venv_with_wheel(tmp_path_factory.mktemp("wheel"))


def build(venv: Path, work: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LXDSPAWNER_CACHE"] = str(work / "cache")
    return subprocess.run(
        [venv / "bin" / "lxdspawner", "image", "build", "lxdspawner-tiny"]
        + ["--alias", ALIAS, "--endpoint", endpoint],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_the_installed_wheel_builds_and_imports_the_tiny_image(
    venv, tmp_path, daemon, lxd, instances
):
    endpoint = endpoint_for(daemon)
    named = f"{PRODUCT[daemon]} {lxd.dialect.server_version} at "
    try:
        done = build(venv, tmp_path, endpoint)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        # The recipe and scripts are the installed package's, never the checkout's.
        assert f"{venv}/lib/" in done.stderr, output
        assert str(ROOT) not in output
        assert f"uploading to {named}" in done.stdout, output
        assert f"created alias {ALIAS} -> " in done.stdout, output
        image = await lxd.image(await lxd.image_fingerprint(ALIAS))
        assert image["properties"]["variant"] == "lxdspawner-tiny"

        name = instances("wheel")
        await lxd.create_instance(name, source=image_source(ALIAS), start=True)
        assert (await lxd.instance_state(name))["status"] == "Running"

        again = build(venv, tmp_path, endpoint)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"nothing to do: {ALIAS} -> " in again.stdout and named in again.stdout
        assert "uploading" not in again.stdout
    finally:
        fingerprint = await lxd.image_fingerprint(ALIAS)
        if fingerprint:
            try:
                await lxd.request("DELETE", f"/1.0/images/aliases/{ALIAS}")
                if not (await lxd.image(fingerprint)).get("aliases"):
                    await lxd.delete_image(fingerprint)
            except LxdError:
                pass
