"""The README's Prometheus example works as written: a real hub with lxdspawner, configured
with the README's snippet, is scraped the way the README's Prometheus config says.

The two code blocks of the README's "Metrics" section are taken from the README itself (the
token file's path pointed at a temporary one), so an example that stops working, or a metric
lxdspawner stops serving, fails here and not on an operator's monitoring. No container
daemon is needed: the metrics are served from the hub's start, before any spawn. The same
hub runs the README's snippet that puts its sqlite file in WAL mode ("The hub's database").
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import aiohttp
import pytest
import yaml

from testbench.hubtools import CHP, running_hub

pytestmark = [
    pytest.mark.e2e,
    # No daemon: scripts/run-tests.sh runs these beside the daemon tiers.
    pytest.mark.nodaemon,
    pytest.mark.skipif(not CHP.exists(), reason=f"{CHP} missing: run scripts/ensure-tools.sh"),
]

README = Path(__file__).resolve().parents[2] / "README.md"
TOKEN_PATH = "/etc/jupyterhub/prometheus.token"


def wal_block() -> str:
    """The Python block of the README's "The hub's database" (a sqlite hub in WAL mode)."""
    text = README.read_text()
    section = text[text.index("\n### The hub's database\n") :]
    section = section[: section.index("\n## ", 1)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def metrics_blocks() -> tuple[str, str]:
    """The Python and YAML code blocks of the README's "Metrics" section."""
    text = README.read_text()
    section = text[text.index("\n## Metrics\n") :]
    section = section[: section.index("\n## ", 1)]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    yml = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(yml) == 1, "the Metrics section has one of each"
    return python[0], yml[0]


def scrape_config(yml: str) -> tuple[dict, dict]:
    """The job of the README's Prometheus config, and the header Prometheus sends with it."""
    scrape = yaml.safe_load(yml)["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"]
    credentials = Path(scrape["authorization"]["credentials_file"]).read_text().strip()
    # Prometheus' default authorization type is Bearer.
    kind = scrape["authorization"].get("type", "Bearer")
    return scrape, {"Authorization": f"{kind} {credentials}"}


async def test_readme_scrape_example(tmp_path):
    python, yml = metrics_blocks()
    assert TOKEN_PATH in python and TOKEN_PATH in yml, "both read the same token file"
    token = secrets.token_hex(32)
    token_file = tmp_path / "prometheus.token"
    token_file.write_text(token + "\n")  # as `openssl rand -hex 32 >` writes it

    scrape, bearer = scrape_config(yml.replace(TOKEN_PATH, str(token_file)))

    config = 'c.JupyterHub.spawner_class = "lxd"\n' + python.replace(TOKEN_PATH, str(token_file))
    # The same hub checks the README's other snippet: its sqlite file in WAL mode.
    config += "\n" + wal_block()
    async with running_hub(tmp_path / "hub", config, hub_ip="127.0.0.1") as hub:
        assert (tmp_path / "hub" / "jupyterhub.sqlite-wal").exists(), "the hub's db in WAL mode"
        # The snippet appends: the harness's own service and role are still there.
        assert (await hub.api("GET", "/users"))[0] == 200
        url = hub.public_url + scrape["metrics_path"]  # through the proxy, as in the example
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(url, headers=bearer) as r:
                assert r.status == 200, await r.text()
                metrics = await r.text()
            async with session.get(url) as r:
                assert r.status == 403, "metrics need the token"
            async with session.get(hub.api_url + "/users", headers=bearer) as r:
                assert r.status == 403, "the token can read metrics, nothing else"
    assert "# TYPE lxdspawner_spawn_step_seconds histogram" in metrics
    assert "jupyterhub_event_loop_interval_seconds_bucket" in metrics
    assert re.search(r"^jupyterhub_total_users \d", metrics, re.M), metrics[:2000]
