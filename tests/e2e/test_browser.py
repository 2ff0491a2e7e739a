"""What a person sees: the demo hub driven by a headless Chromium.

The hub is the demo's (scripts/demo_config.py: LxdSpawner, image ``jupyter-base``,
JupyterLab, named servers) on ports and directories of the test's own. Every step leaves a
screenshot in ``test-output/test_browser/<test>/<mode>/``.

    LXDSPAWNER_E2E_SPAWNER=lxd    (default) LxdSpawner against the local Incus
    LXDSPAWNER_E2E_SPAWNER=local  JupyterHub's SimpleLocalProcessSpawner, to work on the
                                  browser flow without containers
    LXDSPAWNER_E2E_IMAGE          image for the lxd mode (default: jupyter-base)
    LXDSPAWNER_DAEMON=lxd         the hub listens on the LXD bridge instead (its address in
                                  scripts/topology.env)
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from pathlib import Path

import pytest
import pytest_asyncio

from lxdspawner.names import instance_name
from testbench.hubtools import (
    CHP,
    DAEMON_CLI,
    DAEMON_HUB_IP,
    LOCAL_SPAWNER_CONFIG,
    REPO,
    VENV_BIN,
    chromium_missing,
    daemon_cli,
    instance_diagnostics,
    instance_names,
    lxd_unavailable,
    running_hub,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHP.exists(), reason=f"{CHP} missing: run scripts/ensure-tools.sh"),
    pytest.mark.skipif(bool(chromium_missing()), reason=str(chromium_missing())),
]

MODE = os.environ.get("LXDSPAWNER_E2E_SPAWNER", "lxd")
IMAGE = os.environ.get("LXDSPAWNER_E2E_IMAGE", "jupyter-base")
DEMO_CONFIG = REPO / "scripts" / "demo_config.py"
SPAWN_TIMEOUT_MS = 120_000


def hub_config(*extra: str) -> str:
    """The demo's settings (loaded from scripts/demo_config.py), then the mode's, then extra."""
    text = f"""
import importlib.util as _ilu
_spec = _ilu.spec_from_file_location("lxdspawner_demo_config", {str(DEMO_CONFIG)!r})
_demo = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_demo)
_demo.apply_demo_settings(c)
"""
    if MODE == "local":
        args = ["--allow-root"] if os.geteuid() == 0 else []
        text += (
            LOCAL_SPAWNER_CONFIG
            + f"""
c.Spawner.cmd = [{str(VENV_BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = {args!r}
"""
        )
    else:
        text += f"c.LxdSpawner.image = {IMAGE!r}\n"
    return text + "\n".join(extra) + "\n"


#: The one user the module's hub offers profiles to (everybody else: no form, as before).
PROFILE_USER = "e2e-profiles"
PROFILES_CONFIG = """
def _e2e_profiles(spawner):
    if spawner.user.name != PROFILE_USER:
        return []
    return [
        {"display_name": "Standard", "default": True,
         "spawner_override": {"environment": {"E2E_PROFILE": "standard"}}},
        {"display_name": "Big memory", "slug": "big", "description": "2 GB of memory",
         "spawner_override": {"mem_limit": "2G", "environment": {"E2E_PROFILE": "big"}},
         "profile_options": {"flavour": {
             "display_name": "Flavour",
             "choices": {
                 "plain": {"display_name": "Plain", "default": True},
                 "spiced": {"display_name": "Spiced",
                            "spawner_override": {"environment": {"E2E_FLAVOUR": "spiced"}}},
             },
             "unlisted_choice": {
                 "enabled": True, "display_name": "Other", "validation_regex": "[a-z]+",
                 "validation_message": "lower-case letters only",
                 "spawner_override": {"environment": {"E2E_FLAVOUR": "{value}"}},
             },
         }}},
    ]


c.LxdSpawner.profile_list = _e2e_profiles
""".replace("PROFILE_USER", repr(PROFILE_USER))


@pytest.fixture(scope="module")
def mode() -> str:
    if MODE not in ("lxd", "local"):
        pytest.fail(f"LXDSPAWNER_E2E_SPAWNER={MODE!r}: choose lxd or local")
    if MODE == "lxd":
        reason = lxd_unavailable(IMAGE)
        if reason:
            pytest.skip(f"{reason} (LXDSPAWNER_E2E_SPAWNER=local runs without containers)")
    return MODE


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(mode, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo-hub")
    hub_ip = DAEMON_HUB_IP if mode == "lxd" else "127.0.0.1"
    config = hub_config(
        f"c.SimpleLocalProcessSpawner.home_dir_template = '{workdir}/home/{{username}}'",
        PROFILES_CONFIG,
    )
    async with running_hub(workdir, config, hub_ip=hub_ip) as hub:
        if mode == "lxd":
            hub.diagnostics = lambda: instance_diagnostics("jupyter-", DAEMON_CLI)
        yield hub


class Shots:
    """Numbered full-page screenshots of one test, in its output directory."""

    def __init__(self, page, directory: Path):
        self.page = page
        self.directory = directory
        self.n = 0

    async def __call__(self, name: str) -> Path:
        self.n += 1
        path = self.directory / f"{self.n:02d}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def failure(self) -> None:
        """The page as it was when the test failed (never hides the failure itself)."""
        try:
            await self("FAILED")
        except Exception as e:
            print(f"no failure screenshot: {e!r}")


async def new_page(browser, output_dir: Path):
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    page = await context.new_page()
    shots = output_dir / MODE  # test-output/test_browser/<test>/{lxd,local}/
    shots.mkdir(exist_ok=True)
    return context, page, Shots(page, shots)


async def log_in(page, shot, hub, username: str, next_path: str | None = None) -> None:
    url = hub.public_url + "/hub/login"
    if next_path:
        url += "?next=" + next_path
    await page.goto(url)
    await page.fill("#username_input", username)
    await page.fill("#password_input", hub.password)
    await shot("login")
    await page.click("#login_submit")


async def watch_spawn(page, shot, server_path: str, ready: str = ".jp-LauncherCard") -> None:
    """From the spawn page (if we see it) into JupyterLab at ``server_path``, until
    ``ready`` shows (the launcher of a new user's JupyterLab)."""
    try:
        await page.wait_for_url(re.compile(r".*/hub/spawn-pending/.*"), timeout=15_000)
        await page.wait_for_selector("#progress-message:not(:empty)", timeout=15_000)
        await shot("progress")
    except Exception:
        # A fast spawn may go straight to the server: nothing to see then.
        pass
    await page.wait_for_url(
        re.compile(".*" + re.escape(server_path) + "lab.*"), timeout=SPAWN_TIMEOUT_MS
    )
    await page.wait_for_selector(ready, timeout=60_000)
    await shot("lab")


async def run_in_new_notebook(page, shot, code: str) -> str:
    """Open a notebook from the launcher, run ``code`` in its first cell, return the output."""
    await page.click('.jp-LauncherCard[data-category="Notebook"]')
    panel = page.locator(".jp-NotebookPanel:visible")
    editor = panel.locator(".jp-Cell .cm-content").first
    await editor.wait_for(timeout=60_000)
    # Keys typed while the new notebook is still settling can be lost: type until the cell
    # holds the code, and run it once the kernel is idle.
    for _ in range(3):
        await editor.click()
        await page.keyboard.press("Control+a")
        await page.keyboard.type(code)
        if code in (await editor.inner_text()):
            break
        await asyncio.sleep(1)
    await page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
    await page.keyboard.press("Shift+Enter")
    output = panel.locator(".jp-OutputArea-output").first
    await output.wait_for(timeout=60_000)
    text = (await output.inner_text()).strip()
    await shot("notebook")
    return text


async def save_notebook(page, name: str) -> str:
    """Save the open notebook (JupyterLab asks for a name at the first save); its name."""
    await page.keyboard.press("Control+s")
    rename = page.get_by_role("button", name="Rename and Save")
    try:
        await rename.wait_for(timeout=10_000)
    except Exception:
        name = "Untitled.ipynb"  # a JupyterLab that does not ask
    else:
        await page.locator(".jp-Dialog input").first.fill(name)
        await rename.click()
    await page.locator(".jp-DirListing-itemName", has_text=name).first.wait_for(timeout=30_000)
    await page.locator(".lm-TabBar-tab.jp-mod-dirty").wait_for(state="detached", timeout=30_000)
    return name


async def wait_gone(hub, user: str, server_name: str = "", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await hub.server_model(user, server_name) is not None:
        assert time.monotonic() < deadline, f"{user}/{server_name} still listed by the hub"
        await asyncio.sleep(0.5)


async def test_login_lab_notebook_stop_and_the_notebook_is_still_there(
    hub, browser, output_dir, mode
):
    """Log in, write a notebook, stop the server from the control panel (its container is
    deleted), start it again: the same notebook opens, with what was written in it."""
    user = "e2e-lab"
    context, page, shot = await new_page(browser, output_dir)
    try:
        await log_in(page, shot, hub, user)
        await watch_spawn(page, shot, f"/user/{user}/")

        hostname = await run_in_new_notebook(
            page, shot, "import socket; print(socket.gethostname())  # kept-across-stops"
        )
        notebook = await save_notebook(page, "kept.ipynb")
        if mode == "lxd":
            assert hostname.startswith("jupyter-") and user in hostname, hostname
            assert hostname in instance_names()
        else:
            assert hostname == socket.gethostname()

        await page.goto(hub.public_url + "/hub/home")
        await page.wait_for_selector("#stop")
        await shot("home")
        await page.click("#stop")
        await page.wait_for_selector("#stop", state="hidden", timeout=90_000)
        await page.wait_for_function(
            "document.querySelector('#start').textContent.includes('Start My Server')"
        )
        await shot("stopped")

        await wait_gone(hub, user)
        if mode == "lxd":
            deadline = time.monotonic() + 20
            while hostname in instance_names():
                assert time.monotonic() < deadline, "the container outlived its server"
                await asyncio.sleep(0.5)

        await page.click("#start")
        # JupyterLab may open the notebook again by itself (its workspace is in the home).
        await watch_spawn(page, shot, f"/user/{user}/", ".jp-LauncherCard, .jp-NotebookPanel")
        await page.goto(hub.public_url + f"/user/{user}/lab/tree/{notebook}")
        panel = page.locator(".jp-NotebookPanel:visible")
        # The cell as it was written, and its output as it was saved.
        await panel.locator(".jp-Cell .cm-content", has_text="kept-across-stops").first.wait_for(
            timeout=90_000
        )
        await panel.locator(".jp-OutputArea-output", has_text=hostname).first.wait_for(
            timeout=30_000
        )
        await shot("reopened")
        await hub.stop_server(user)
    except BaseException:
        await shot.failure()
        raise
    finally:
        await context.close()


async def test_named_server(hub, browser, output_dir, mode):
    user = "e2e-named"
    context, page, shot = await new_page(browser, output_dir)
    try:
        await log_in(page, shot, hub, user, next_path="/hub/home")
        await page.wait_for_url(re.compile(r".*/hub/home"))
        await page.fill(".new-server-name", "work")
        await shot("home")
        await page.click(".new-server-btn")
        # JupyterHub 6 creates the named server without starting it: the page reloads and
        # lists it with a "start" button.
        await page.wait_for_selector("#start-work:visible")
        await shot("listed")
        await page.click("#start-work")
        await watch_spawn(page, shot, f"/user/{user}/work/")

        server = await hub.server_model(user, "work")
        assert server is not None and server["ready"], server
        assert await hub.server_model(user) is None  # the default server was never started
        await hub.stop_server(user, "work", remove=True)
    except BaseException:
        await shot.failure()
        raise
    finally:
        await context.close()


async def test_profiles_form_choose_refused_started_remembered(hub, browser, output_dir, mode):
    """The spawn page offers the profiles; a value the operator's regex refuses gives the
    form again with the reason and no container; a non-default profile and choice start a
    server that has them; the form shown later preselects them."""
    if mode != "lxd":
        pytest.skip("profile_list is LxdSpawner's")
    user = PROFILE_USER
    name = instance_name(user, "", "jupyter")
    big = 'input[name="profile"][value="big"]'
    flavour = 'select[name="profile-option-big--flavour"]'
    context, page, shot = await new_page(browser, output_dir)
    try:
        await log_in(page, shot, hub, user)
        await page.wait_for_selector(big)
        assert await page.locator('input[name="profile"][value="standard"]').is_checked()
        assert await page.get_by_text("2 GB of memory").is_visible()
        await page.check(big)
        await page.select_option(flavour, "unlisted_choice")
        await page.fill('input[name="profile-option-big--flavour--unlisted-choice"]', "Curry 2")
        await shot("form")
        await page.click('#spawn_form button[type="submit"]')
        error = page.locator(".spawn-error-msg")
        await error.wait_for()
        assert "'Curry 2' is not accepted: lower-case letters only" in await error.inner_text()
        await shot("refused")
        assert name not in instance_names()

        await page.check(big)
        await page.select_option(flavour, "spiced")
        await page.click('#spawn_form button[type="submit"]')
        await watch_spawn(page, shot, f"/user/{user}/")
        environ = daemon_cli(
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "tr '\\0' '\\n' < /proc/$(systemctl show -p MainPID --value"
            " jupyterhub-singleuser)/environ",
        ).stdout.splitlines()
        assert "E2E_PROFILE=big" in environ and "E2E_FLAVOUR=spiced" in environ, environ
        memory = daemon_cli("config", "get", name, "limits.memory").stdout.strip()
        assert memory == str(2 * 1024**3)

        await hub.stop_server(user)
        await page.goto(hub.public_url + "/hub/spawn")
        await page.wait_for_selector(big)
        assert await page.locator(big).is_checked()
        assert await page.locator(flavour).input_value() == "spiced"
        await shot("remembered")
    except BaseException:
        await shot.failure()
        raise
    finally:
        await context.close()


async def test_missing_image_shows_a_clear_error(browser, output_dir, mode, tmp_path):
    """A hub whose image does not exist: the spawn page says so, without a traceback."""
    if mode == "lxd":
        broken = 'c.LxdSpawner.image = "no-such-image"'
    else:
        # What a spawner that explains its failures does (LxdSpawner should do the same):
        # raise SpawnException, whose message JupyterHub shows. Any other exception that
        # ends a spawn within a second gets "Unhandled error starting server" on the page.
        broken = """
from jupyterhub.spawner import SpawnException
def _no_image(spawner):
    raise SpawnException("image 'no-such-image' not found (local stand-in)", reason="image")
c.Spawner.pre_spawn_hook = _no_image
"""
    hub_ip = DAEMON_HUB_IP if mode == "lxd" else "127.0.0.1"
    async with running_hub(tmp_path, hub_config(broken), hub_ip=hub_ip) as hub:
        context, page, shot = await new_page(browser, output_dir)
        try:
            await log_in(page, shot, hub, "e2e-broken")
            # A spawn that fails within the hub's slow_spawn_timeout (10 s) gets the hub's
            # error page at once, or its "Spawn failed" page when it failed before the
            # pending page loaded; a slower failure shows on the progress page (red bar).
            failed_page = "h1:has-text('Spawn failed')"
            shown = f"#progress-bar.bg-danger, div.error, {failed_page}"
            try:
                await page.wait_for_selector(shown, timeout=20_000)
            except Exception:
                # A spawn that fails while the pending page opens its event stream can leave
                # that page at "starting up" (JupyterHub's race, seen under load): a reload
                # shows the failure, as it would for a person.
                await shot("stale-pending-page")
                await page.reload()
                await page.wait_for_selector(shown, timeout=60_000)
            if await page.locator("div.error").count():
                message = (await page.inner_text("div.error")).strip()
            elif await page.locator(failed_page).count():
                message = (await page.inner_text("div.text-center")).strip()
            else:
                message = (await page.inner_text("#progress-message")).strip()
            await shot("failed")
            assert "no-such-image" in message, message
            assert "Traceback" not in message and 'File "' not in message, message
            assert "Unhandled error" not in message, message

            # Reloading shows the hub's error page with the same message.
            await page.goto(hub.public_url + "/hub/spawn")
            body = await page.inner_text("body")
            await shot("reloaded")
            assert "no-such-image" in body and "Traceback" not in body, body
            assert await hub.server_model("e2e-broken") is None
        except BaseException:
            await shot.failure()
            raise
        finally:
            await context.close()


async def test_internal_ssl_end_to_end(browser, output_dir, mode, tmp_path):
    """c.JupyterHub.internal_ssl = True: the hub, the proxy and the server speak TLS with the
    hub's own CA. The server's certificate names the container's address; its key is
    root's, readable by the server's group only. A person sees JupyterLab run a cell."""
    if mode != "lxd":
        pytest.skip("this is about the containers' certificates")
    user = "e2e-tls"
    name = f"jupyter-{user}"
    async with running_hub(tmp_path, hub_config(), hub_ip=DAEMON_HUB_IP, internal_ssl=True) as hub:
        hub.diagnostics = lambda: instance_diagnostics("jupyter-", DAEMON_CLI)
        context, page, shot = await new_page(browser, output_dir)
        try:
            await log_in(page, shot, hub, user)
            await watch_spawn(page, shot, f"/user/{user}/")
            out = await run_in_new_notebook(
                page, shot, "import os; print(os.environ['JUPYTERHUB_SSL_CERTFILE'])"
            )
            assert out == "/etc/lxdspawner/ssl/server.crt", out
        except BaseException:
            await shot.failure()
            raise
        finally:
            await context.close()
        owner = daemon_cli(
            "exec", name, "--", "stat", "-c", "%u %g %a", "/etc/lxdspawner/ssl/server.key"
        )
        assert owner.stdout.split() == ["0", "1000", "640"], owner
        # The proxy reaches the server over TLS, at the address the certificate names.
        assert re.search(r"Adding user e2e-tls to proxy .* => https://10\.117\.4\d\.", hub.log())
        await hub.stop_server(user)
