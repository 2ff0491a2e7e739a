"""`lxdspawner doctor` as an operator runs it, on the bench's Incus: it passes on a config like
the test hubs', and fails naming the fix on a daemon that is not there, a missing image and a
hub bound to loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testbench.topology import INCUS

ROOT = Path(__file__).resolve().parents[2]


def doctor(tmp_path: Path, config: str) -> tuple[int, list[dict]]:
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(config)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lxdspawner.cli", "doctor", "-f", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return done.returncode, json.loads(done.stdout)


def errors(results: list[dict]) -> dict[str, dict]:
    return {r["check"]: r for r in results if r["severity"] == "error"}


def test_doctor_on_the_bench(tmp_path):
    good = (
        f"c.LxdSpawner.endpoint = {INCUS.endpoint!r}\n"
        "c.LxdSpawner.image = 'jupyter-base'\n"
        f"c.JupyterHub.hub_ip = {INCUS.gateway!r}\n"
    )
    status, results = doctor(tmp_path, good)
    assert status == 0, results
    assert {r["check"] for r in results} >= {"daemon", "storage", "network", "image", "hub"}
    assert any(f"gateway {INCUS.gateway}" in r["what"] for r in results)

    status, results = doctor(tmp_path, good.replace(INCUS.socket, "/nonexistent/unix.socket"))
    assert status == 1
    assert "systemctl start incus" in errors(results)["daemon"]["fix"]
    assert "c.LxdSpawner.endpoint" in errors(results)["daemon"]["fix"]

    status, results = doctor(tmp_path, good.replace("'jupyter-base'", "'no-such-image'"))
    assert status == 1
    fix = errors(results)["image"]["fix"]
    assert f"image build RECIPE.yaml --alias no-such-image -f {tmp_path}/" in fix
    assert set(errors(results)) == {"image"}

    status, results = doctor(tmp_path, good.replace(repr(INCUS.gateway), "'127.0.0.1'"))
    assert status == 1
    fix = errors(results)["hub"]["fix"]
    assert f"c.JupyterHub.hub_ip = {INCUS.gateway!r}" in fix and "hub_connect_url" in fix
