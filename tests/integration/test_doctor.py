"""`lxdspawner doctor` as an operator runs it, on the bench's Incus: it passes on a config like
the test hubs' (its probe container reaching the hub's API), and fails naming the fix on a
daemon that is not there, a missing image, a hub bound to loopback, and a hub address
containers cannot reach (``hub_connect_url`` naming localhost: the host reaches it, a
container does not).

The hub's API here is a small HTTP server on the bridge's gateway answering ``/hub/api`` as
JupyterHub does (``{"version": ...}``): what the probe tests is the way from a container to
that address and port, and a whole hub would add seconds for nothing more."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lxdspawner import network
from lxdspawner.lxd import LxdClient
from testbench.hubtools import TEST_HUB_PREFIX, forget_network_acls
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


def problems(results: list[dict]) -> list[dict]:
    """The rows an operator would read first: everything not ``ok``."""
    return [r for r in results if r["severity"] != "ok"]


def errors(results: list[dict]) -> dict[str, dict]:
    return {r["check"]: r for r in results if r["severity"] == "error"}


async def put_hub_acl(hub_id: str, hub_port: int) -> None:
    """Put on the bridge the network ACL a hub ``hub_id`` on ``hub_port`` puts there when it
    starts (its servers reach its API and nothing else)."""
    isolation = network.Isolation(
        hub_ip=INCUS.gateway,
        hub_port=hub_port,
        proxy_ips=(INCUS.gateway,),
        server_port=8888,
        gateway=INCUS.gateway,
    )
    async with LxdClient(INCUS.endpoint) as client:
        await network.put_on_network(client, hub_id, isolation, INCUS.bridge)


@pytest.fixture
async def hub_id():
    """A test hub's id for the doctor's config; its ACL leaves the bridge at the end."""
    hub_id = TEST_HUB_PREFIX + "doctor" + secrets.token_hex(3)
    yield hub_id
    await forget_network_acls(hub_id)


async def test_doctor_on_the_bench(tmp_path, hub_api, hub_id):
    port, loopback_port = hub_api
    good = (
        f"c.LxdSpawner.endpoint = {INCUS.endpoint!r}\n"
        "c.LxdSpawner.image = 'jupyter-base'\n"
        f"c.LxdSpawner.hub_id = {hub_id!r}\n"
        f"c.JupyterHub.hub_ip = {INCUS.gateway!r}\n"
        f"c.JupyterHub.hub_port = {port}\n"
    )
    # The bridge is dedicated to lxdspawner: every hub puts its ACL there when it starts and
    # the daemon rejects what none allows. Before this hub's start (here: its ACL still allows
    # the port of an earlier configuration) the refusal is expected, and said so.
    await put_hub_acl(hub_id, loopback_port)
    status, results = await asyncio.to_thread(doctor, tmp_path, good)
    assert status == 0, problems(results)
    probe = next(r for r in results if r["check"] == "probe")
    assert probe["severity"] == "warning", probe
    assert f"does not allow {INCUS.gateway} port {port} yet" in probe["what"], probe
    assert "start (or restart) the hub" in probe["fix"]

    # Another hub's id (a hub not started yet): its ACL is not on the bridge at all.
    other = good.replace(repr(hub_id), repr(hub_id + "x"))
    status, results = await asyncio.to_thread(doctor, tmp_path, other)
    probe = next(r for r in results if r["check"] == "probe")
    assert status == 0 and probe["severity"] == "warning", probe
    assert f"hub_id '{hub_id}x') is not among them yet" in probe["what"], probe

    # Once the hub has started (its ACL allows its port), the probe gets through.
    await put_hub_acl(hub_id, port)
    status, results = await asyncio.to_thread(doctor, tmp_path, good)
    assert status == 0, problems(results)
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
