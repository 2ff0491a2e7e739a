"""The production install (`lxdspawner install`, README "Production") on a fresh Debian 12.

This machine's PID 1 is not systemd, so the install runs in a fresh Debian 12 system
container on the host's Incus (``testbench/install-image.sh``: plain Debian + systemd, built
with mmdebstrap and cached). That container has no route to PyPI, npm or Debian, as a campus
cluster's hosts often have none: the host writes the offline bundle (``lxdspawner install
--bundle``, cached by its inputs in /var/cache/lxdspawner/install-bundle), the container gets
it read-only, with the host's Incus socket through a proxy device, and runs
``install.sh --from-bundle --daemon-socket``. Then, as an operator and a user would see it:

- Chromium on the host logs in over HTTPS at the container's address (Caddy's internal CA;
  HTTP redirects to HTTPS), starts a server (a container on the host's Incus, made by the hub
  inside), runs a cell in JupyterLab;
- ``systemctl restart jupyterhub`` in the container, and later an ``--upgrade`` run: the same
  tab runs another cell each time and no websocket of the page closed (the proxy is its own
  unit, the server its own container);
- a second installer run changes nothing and says so; the hub's users are in PostgreSQL.

Clean-up: the server is stopped through the hub, the install container deleted, and what the
hub made on the host (instances, volumes, ACLs carrying its test hub id) removed.

Needs: the host's Incus (`make setup`), the jupyter-base image, Chromium, network access on
the host for the first bundle (apt, PyPI, npm), mmdebstrap. Run alone, under the daemons'
lock: ``flock /tmp/lxdsp-daemons.lock pytest -m install tests/install``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from lxdspawner.lxd import LxdClient, LxdError
from lxdspawner.ownership import KEY_HUB
from testbench import topology
from testbench.hubtools import (
    REPO,
    chromium_missing,
    forget_network_acls,
    forget_volumes,
    lxd_unavailable,
)

pytestmark = [
    pytest.mark.install,
    # It takes every hub's ACLs off the Incus bridge (they would block the install container):
    # it runs alone on the host's daemons (scripts/run-tests.sh's exclusive phase).
    pytest.mark.exclusive,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(bool(chromium_missing()), reason=str(chromium_missing())),
]

BUNDLE = Path("/var/cache/lxdspawner/install-bundle")
HOST_SOCKET = topology.INCUS.socket
INNER_SOCKET = "/srv/incus.socket"
# A name of this run's own: a home volume is kept by design when its server goes.
USER, PASSWORD = f"alice{secrets.token_hex(3)}", "correct-horse-" + secrets.token_hex(4)


def run(*args: str, input: str | None = None, timeout: float = 900) -> str:
    """A command on the host; its standard output, or a failure showing both outputs."""
    done = subprocess.run(
        args, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        output = done.stdout + done.stderr
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{output[-6000:]}")
    return done.stdout


def run_quiet(*args: str, timeout: float = 120) -> str:
    """A command whose failure is not the test's (waits, diagnostics, clean-up)."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


def prepare() -> tuple[str, str]:
    """The Debian 12 image's alias and the bundle's log (both cached on the host)."""
    image = run(str(REPO / "testbench" / "install-image.sh")).strip().splitlines()[-1]
    BUNDLE.mkdir(parents=True, exist_ok=True)
    log = run(
        sys.executable, "-m", "lxdspawner.cli", "install", "--bundle", str(BUNDLE), "--skip-image"
    )
    return image, log


def installer_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("lxdspawner install:")]


async def host_instances(hub_id: str) -> list[str]:
    async with LxdClient(f"unix://{HOST_SOCKET}") as client:
        return [
            i["name"]
            for i in await client.list_instances(recursion=1)
            if (i.get("config") or {}).get(KEY_HUB) == hub_id
        ]


async def remove_hub_leftovers(hub_id: str) -> None:
    """The hub in the container made these on the host: they go with the test (twice, a
    moment apart: a spawn under way when the hub's container went may still land one)."""
    async with LxdClient(f"unix://{HOST_SOCKET}") as client:
        first = await host_instances(hub_id)
        await asyncio.sleep(2)
        for name in sorted(set(first) | set(await host_instances(hub_id))):
            try:
                await client.stop_instance(name, force=True)
            except LxdError:
                pass
            try:
                await client.delete_instance(name)
            except LxdError:
                pass
    await forget_volumes(hub_id)
    await forget_network_acls(hub_id)


async def wait_hub(url: str, timeout: float = 90) -> None:
    """Until the hub answers its API through Caddy and the proxy."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/hub/api/", ssl=False) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the hub at {url} did not answer within {timeout} s")
            await asyncio.sleep(0.5)


async def run_cell(page, panel, code: str, expect: str) -> None:
    """Type ``code`` into the notebook's active cell, run it, wait for ``expect``."""
    editor = panel.locator(".jp-Cell.jp-mod-active .cm-content")
    await editor.wait_for(timeout=60_000)
    for _ in range(3):
        await editor.click()
        await page.keyboard.press("Control+a")
        await page.keyboard.type(code)
        if code in await editor.inner_text():
            break
        await asyncio.sleep(1)
    await page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
    await page.keyboard.press("Shift+Enter")
    await panel.locator(".jp-OutputArea-output", has_text=expect).first.wait_for(timeout=60_000)


async def test_install_from_bundle_https_restart_keeps_the_tab(browser, output_dir):
    reason = lxd_unavailable("jupyter-base")
    if reason:
        pytest.fail(reason)
    started = time.monotonic()
    image, bundle_log = prepare()
    print("\n".join(installer_lines(bundle_log)))
    prepared = time.monotonic()

    # Other hubs' network ACLs on the bridge would filter the install container too (the
    # daemon tiers' sessions take them off the same way).
    await forget_network_acls(None)
    name = f"lxdsp-test-install-{secrets.token_hex(4)}"
    hub_id = f"testbench-install-{secrets.token_hex(4)}"
    cli = ("incus",)
    try:
        run(*cli, "init", image, name)
        run(*cli, "config", "device", "add", name, "bundle", "disk",
            f"source={BUNDLE}", "path=/mnt/bundle", "readonly=true")  # fmt: skip
        run(*cli, "config", "device", "add", name, "incus", "proxy",
            f"connect=unix:{HOST_SOCKET}", f"listen=unix:{INNER_SOCKET}",
            "bind=instance", "mode=0660")  # fmt: skip
        run(*cli, "start", name)

        def inside(*args: str, input: str | None = None) -> str:
            return run(*cli, "exec", name, "--", *args, input=input)

        run_quiet(*cli, "exec", name, "--", "systemctl", "is-system-running", "--wait")
        address = re.search(r"inet ([0-9.]+)/", inside("ip", "-4", "-o", "addr", "show", "eth0"))
        assert address, "the install container got no IPv4 address"
        ip = address.group(1)

        install = ("bash", "/mnt/bundle/install.sh", "--from-bundle", "/mnt/bundle",
                   "--daemon-socket", INNER_SOCKET, "--hub-id", hub_id)  # fmt: skip
        first = installer_lines(inside(*install))
        (output_dir / "install-1.txt").write_text("\n".join(first))
        assert any("changed: started jupyterhub.service" in line for line in first), first
        assert any("changed: created PostgreSQL database jupyterhub" in line for line in first)
        installed = time.monotonic()

        inside("useradd", "--create-home", "--groups", "jupyterhub-users", USER)
        inside("chpasswd", input=f"{USER}:{PASSWORD}\n")
        url = f"https://{ip}"
        await wait_hub(url)

        context = await browser.new_context(
            ignore_https_errors=True, viewport={"width": 1280, "height": 800}
        )
        closed: list[str] = []
        try:
            page = await context.new_page()
            page.on("websocket", lambda ws: ws.on("close", lambda _: closed.append(ws.url)))
            # HTTP is redirected to HTTPS, whose certificate Caddy's own CA signed.
            response = await page.goto(f"http://{ip}/hub/login")
            assert page.url.startswith(f"https://{ip}/"), page.url
            details = await response.security_details()
            assert "Caddy Local Authority" in (details or {}).get("issuer", ""), details
            await page.fill("#username_input", USER)
            await page.fill("#password_input", PASSWORD)
            await page.click("#login_submit")
            await page.wait_for_url(re.compile(rf".*/user/{USER}/lab.*"), timeout=180_000)
            await page.click('.jp-LauncherCard[data-category="Notebook"]', timeout=90_000)
            panel = page.locator(".jp-NotebookPanel:visible")
            await run_cell(page, panel, "print(6 * 7)", "42")
            await page.screenshot(path=str(output_dir / "before-restart.png"))
            spawned = time.monotonic()
            assert await host_instances(hub_id), "no server container on the host's Incus"

            # The hub restarts; the proxy (its own unit) and the server keep the tab's
            # connections: the next cell runs over the same websocket.
            inside("systemctl", "restart", "jupyterhub")
            await wait_hub(url)
            await run_cell(page, panel, "print(6 * 7 + 1)", "43")
            await page.screenshot(path=str(output_dir / "after-restart.png"))
            assert closed == [], f"websockets closed across the hub's restart: {closed}"

            second = installer_lines(inside(*install))
            (output_dir / "install-2.txt").write_text("\n".join(second))
            assert not [line for line in second if ": changed:" in line], second
            assert "nothing changed" in second[-1], second

            # An upgrade run (the packages again, the hub's unit restarted) keeps the user's
            # server and its connections: the tab runs a third cell.
            upgrade = installer_lines(inside(*install, "--upgrade"))
            (output_dir / "install-upgrade.txt").write_text("\n".join(upgrade))
            await wait_hub(url)
            await run_cell(page, panel, "print(6 * 7 + 2)", "44")
            assert await host_instances(hub_id), "the upgrade run took the server away"
            assert closed == [], f"websockets closed across the upgrade run: {closed}"

            users = inside("runuser", "-u", "postgres", "--", "psql", "-tAc",
                           "select name from users", "jupyterhub")  # fmt: skip
            assert USER in users.split(), users

            # Stop the server as its user does, from the hub's home page.
            await page.goto(f"{url}/hub/home")
            await page.click("#stop")
            deadline = time.monotonic() + 60
            while await host_instances(hub_id):
                assert time.monotonic() < deadline, "the server's container is still there"
                await asyncio.sleep(0.5)
        finally:
            await context.close()
        print(
            f"timings: image+bundle {prepared - started:.0f} s, install "
            f"{installed - prepared:.0f} s, login to first cell {spawned - installed:.0f} s, "
            f"total {time.monotonic() - started:.0f} s"
        )
    except BaseException:
        units = ("-u", "jupyterhub", "-u", "jupyterhub-proxy", "-u", "caddy")
        journal = run_quiet(
            *cli, "exec", name, "--", "journalctl", "--no-pager", "-n", "120", *units
        )
        print(journal[-12000:])
        raise
    finally:
        run_quiet(*cli, "delete", "--force", name)
        await remove_hub_leftovers(hub_id)
