"""`lxdspawner doctor` as an operator runs it, on the bench's Incus: it passes on a config like
the test hubs' (its probe container reaching the hub's API), and fails naming the fix on a
daemon that is not there, a missing image, a hub bound to loopback, and a hub address
containers cannot reach (``hub_connect_url`` naming localhost: the host reaches it, a
container does not).

The hub's API here is a small HTTP server on the bridge's gateway answering ``/hub/api`` as
JupyterHub does (``{"version": ...}``): what the probe tests is the way from a container to
that address and port, and a whole hub would add seconds for nothing more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

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


class _HubApi(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b'{"version": "5.3.0"}' if self.path.rstrip("/") == "/hub/api" else b"no"
        self.send_response(200 if body != b"no" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_api():
    """A hub's API on the bridge's gateway and on loopback; yields the two ports."""
    servers = [ThreadingHTTPServer((host, 0), _HubApi) for host in (INCUS.gateway, "127.0.0.1")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [s.server_address[1] for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def errors(results: list[dict]) -> dict[str, dict]:
    return {r["check"]: r for r in results if r["severity"] == "error"}


def test_doctor_on_the_bench(tmp_path, hub_api):
    port, loopback_port = hub_api
    good = (
        f"c.LxdSpawner.endpoint = {INCUS.endpoint!r}\n"
        "c.LxdSpawner.image = 'jupyter-base'\n"
        f"c.JupyterHub.hub_ip = {INCUS.gateway!r}\n"
        f"c.JupyterHub.hub_port = {port}\n"
    )
    status, results = doctor(tmp_path, good)
    assert status == 0, results
    assert {r["check"] for r in results} >= {
        "daemon", "storage", "network", "image", "hub", "ids", "probe"
    }  # fmt: skip
    assert any(f"gateway {INCUS.gateway}" in r["what"] for r in results)
    probe = next(r for r in results if r["check"] == "probe")
    assert "a container reached the hub's API" in probe["what"] and "5.3.0" in probe["what"]

    unreachable = good + f"c.JupyterHub.hub_connect_url = 'http://127.0.0.1:{loopback_port}'\n"
    status, results = doctor(tmp_path, unreachable)
    assert status == 1
    probe = errors(results)["probe"]
    assert "from this host but not from a container" in probe["what"], probe
    assert "c.JupyterHub.hub_connect_url" in probe["fix"] and "gateway" in probe["fix"]

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
