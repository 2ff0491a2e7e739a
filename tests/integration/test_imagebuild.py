"""``lxdspawner image build RECIPE.yaml`` as an operator runs it, on the bench's Incus: a tiny
recipe (a Debian package, a pip package, a file, a post-install script) is built on the host,
imported under its alias, and a container launched from it has all four; a second run is a
cache hit that neither builds nor imports. The image and alias are deleted afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lxdspawner.lxd import LxdClient, LxdError, image_source
from testbench.topology import INCUS

ROOT = Path(__file__).resolve().parents[2]
ALIAS = "lxdsp-test-custom"


def build(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f"c.LxdSpawner.endpoint = {INCUS.endpoint!r}\n")
    return subprocess.run(
        [sys.executable, "-m", "lxdspawner.cli", "image", "build", str(tmp_path / "tiny.yaml")]
        + ["-f", str(config), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
        check=False,
    )


async def test_a_custom_recipe_is_built_imported_and_cached(tmp_path, instances):
    (tmp_path / "tiny.yaml").write_text(
        f"alias: {ALIAS}\npackages: [jq]\npip: [tabulate]\n"
        "files:\n  - {src: hello.txt, dest: /etc/lxdspawner-hello.txt, mode: '0640'}\n"
        "script: post.sh\n"
    )
    (tmp_path / "hello.txt").write_text("hello from the recipe\n")
    (tmp_path / "post.sh").write_text("#!/bin/sh\necho post-install ran > /etc/lxdsp-marker\n")
    async with LxdClient(INCUS.endpoint) as client:
        try:
            done = build(tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"alias {ALIAS} -> " in done.stdout
            name = instances("custom")
            await client.create_instance(name, source=image_source(ALIAS), start=True)
            checks = {
                "jq": ["jq", "-n", "1+1"],
                "pip": ["/opt/jupyterhub/bin/python", "-c", "import tabulate; print('ok')"],
                "file": ["stat", "-c", "%a %U", "/etc/lxdspawner-hello.txt"],
                "script": ["cat", "/etc/lxdsp-marker"],
            }
            got = {k: (await client.exec(name, argv)).stdout.strip() for k, argv in checks.items()}
            assert got == {"jq": "2", "pip": "ok", "file": "640 root", "script": "post-install ran"}

            started = time.monotonic()
            again = build(tmp_path)
            assert again.returncode == 0, again.stdout + again.stderr
            assert "nothing to build" in again.stdout and "nothing to do" in again.stdout
            assert "uploading" not in again.stdout
            assert time.monotonic() - started < 15
        finally:
            fingerprint = await client.image_fingerprint(ALIAS)
            if fingerprint:
                try:
                    await client.delete_image(fingerprint)
                except LxdError:
                    pass
