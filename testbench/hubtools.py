"""A real JupyterHub for end-to-end tests, driven through its REST API.

`running_hub` starts, in a temporary directory, a JupyterHub subprocess (``python -m
jupyterhub`` from this venv) behind a real configurable-http-proxy (CHP), with a base
configuration followed by the caller's configuration text::

    async with running_hub(tmp_path, config='c.JupyterHub.spawner_class = "lxd"') as hub:
        server = await hub.start_server("ana.maria@uni.es")
        status, body = await hub.get_via_proxy(server["url"] + "api/status")
        await hub.restart()                 # same db and config; servers survive
        await hub.stop_server("ana.maria@uni.es")

Why it is built this way:

- CHP is started here, not by the hub (``ConfigurableHTTPProxy.should_start = False`` and a
  shared auth token), as in a production deployment where the proxy is its own service. The
  proxy, and with it every route to a user's server, then outlives a hub restart: a restart
  test shows that servers are found again (``cleanup_servers = False``) and stay reachable,
  instead of only showing that a new hub can repopulate a new proxy. ``restart(keep_proxy=
  False)`` covers that second case as well.
- The hub binds its internal API on ``hub_ip`` (default: the host's address on the Incus
  bridge, from `testbench.topology`) so that a server in a container can reach it. The
  public proxy and the proxy's API listen on 127.0.0.1 only.
- JupyterHub may answer ``201`` to a spawn request that is still pending or has just failed,
  so `Hub.start_server` follows the spawn's progress event stream and then confirms with the
  user model; a failed spawn raises `SpawnFailed` with the hub's own failure message.
- Usernames and server names are URL-quoted completely (``quote(name, safe="")``), so names
  such as ``ana.maria@uni.es``, ``Élodie`` or ``x;touch pwned`` reach the API intact.

The caller's configuration runs after the base. To add a service or role, append to
``c.JupyterHub.services`` / ``c.JupyterHub.load_roles`` instead of assigning them, or the
harness loses its API token.

On leaving the ``async with`` block every server is stopped through the API, the hub and the
proxy are terminated, and, if the block raised, the tail of the hub's log is printed (pytest
shows it with the failure). `HUBS` lists live hubs for the conftest hook that does the same
for fixture-held hubs.

The tests and the benchmark (benchmarks/) both import it as ``testbench.hubtools``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from lxdspawner.lxd import LxdClient, LxdError
from lxdspawner.network import forget_hub
from lxdspawner.ownership import KEY_HUB, default_hub_id

from . import topology

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHP = REPO / ".cache" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"

#: Where a hub's API listens for containers on the Incus and the LXD bridge.
INCUS_HUB_IP = topology.INCUS.gateway
LXD_HUB_IP = topology.LXD.gateway
#: The test daemons' sockets, whose dedicated bridges carry the test hubs' network ACLs.
DAEMON_SOCKETS = tuple(d.socket for d in topology.DAEMONS.values())


#: The start of every test hub's id (see Hub.hub_id).
TEST_HUB_PREFIX = "testbench-"


async def forget_volumes(hub_id: str | None) -> None:
    """Delete the custom volumes a test hub made (None: every test hub's), unless an
    instance still uses one. Users' volumes outlive their servers by design; a test hub's
    go when it closes, and at the start and the end of a run."""
    for socket_path in DAEMON_SOCKETS:
        with contextlib.suppress(Exception):  # a daemon not set up here: nothing to forget
            async with LxdClient(f"unix://{socket_path}") as client:
                for pool in await client.storage_pools():
                    for volume in await client.list_volumes(pool):
                        hub = (volume.get("config") or {}).get(KEY_HUB, "")
                        if volume.get("used_by") or not hub.startswith(TEST_HUB_PREFIX):
                            continue
                        if hub_id is None or hub == hub_id:
                            with contextlib.suppress(LxdError):
                                await client.delete_volume(pool, volume["name"])


async def forget_network_acls(hub_id: str | None) -> None:
    """Take a test hub's network ACLs (None: every lxdspawner hub's) off the test daemons'
    bridges and delete them. Test hubs leave theirs on the bridge when they stop (taking one
    off makes the daemon reload the bridge's firewall, 0.8 s): at the start and the end of a
    run, and before a test that needs the bridge bare, they all go."""
    for socket_path in DAEMON_SOCKETS:
        with contextlib.suppress(Exception):  # a daemon not set up here: nothing to forget
            async with LxdClient(f"unix://{socket_path}") as client:
                await forget_hub(client, hub_id)


# The daemon the e2e tests use: LXDSPAWNER_DAEMON=incus (default) or lxd, as for
# scripts/setup-lxd.sh; its command line and the bridge address the hub must listen on.
DAEMON = os.environ.get("LXDSPAWNER_DAEMON", "incus")
_DAEMON = topology.LXD if DAEMON == "lxd" else topology.INCUS
DAEMON_CLI: tuple[str, ...] = _DAEMON.cli
DAEMON_HUB_IP = _DAEMON.gateway

CHROMIUM = os.environ.get("LXDSPAWNER_CHROMIUM", "/usr/bin/chromium")
# Debian's Chromium, driven by Playwright through executable_path (no `playwright install`).
# Without the background-networking flags it keeps trying to reach Google's services, which
# this machine refuses (and CI should not attempt).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_missing() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing: run scripts/ensure-tools.sh"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


# Hubs started by running_hub and not yet closed (for failure reports from conftest).
HUBS: list[Hub] = []


class HubError(RuntimeError):
    """The hub or the proxy did not start, or an API call gave an unexpected answer."""


class SpawnFailed(RuntimeError):
    """A server did not become ready; the message is the hub's (from the progress stream)."""

    def __init__(self, message: str, events: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message = message
        self.events = events or []


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port that is free on `ip` now (there is a race, as with every such helper)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def q(name: str) -> str:
    """Quote a user or server name as one URL path segment."""
    return quote(name, safe="")


def server_api_path(user: str, server_name: str = "") -> str:
    """The API path of a user's default or named server."""
    if server_name:
        return f"/users/{q(user)}/servers/{q(server_name)}"
    return f"/users/{q(user)}/server"


def progress_api_path(user: str, server_name: str = "") -> str:
    if server_name:
        return f"/users/{q(user)}/servers/{q(server_name)}/progress"
    return f"/users/{q(user)}/server/progress"


BASE_CONFIG = """\
# Written by testbench/hubtools.py: the harness's base configuration.
c = get_config()  # noqa: F821
c.JupyterHub.bind_url = {public_url!r}
c.JupyterHub.hub_bind_url = {hub_url!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret_file!r}
c.JupyterHub.pid_file = {pid_file!r}
c.JupyterHub.cleanup_servers = {cleanup_servers!r}
# A test hub's id says it is one: what test hubs leave on a daemon (volumes, ACLs) is found.
c.LxdSpawner.hub_id = {hub_id!r}

# The proxy is started by the harness so that it outlives hub restarts.
c.JupyterHub.proxy_class = "configurable-http-proxy"
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.auth_token = {proxy_token!r}

# Any username, one shared password (SharedPasswordAuthenticator is JupyterHub's
# replacement for DummyAuthenticator.password, deprecated since 5.3).
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = {password!r}
c.Authenticator.allow_all = True

# The harness's API token: a service holding the admin role.
c.JupyterHub.services = [{{"name": "e2e-harness", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "admin", "services": ["e2e-harness"]}}]
"""


# internal_ssl: every connection between the hub, the proxy and the servers is TLS with the
# hub's own CA. The hub makes the certificates at its start, so it starts the proxy with them.
INTERNAL_SSL_CONFIG = """
c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = {certs!r}
c.JupyterHub.trusted_alt_names = ["IP:{hub_ip}"]
c.ConfigurableHTTPProxy.should_start = True
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
"""


# JupyterHub's local spawners pick a port with random_port(): bind port 0, close, and hand the
# number to the server. Two spawns at once can draw the same number (CI saw it: "port 43019 is
# not available"), and any outgoing connection may take it first, since it comes from the
# ephemeral range. Local servers here get ports from one counter per hub below that range.
LOCAL_SPAWNER_CONFIG = """
import itertools as _itertools
import socket as _socket
from jupyterhub.spawner import SimpleLocalProcessSpawner as _SimpleLocalProcessSpawner

_ports = _itertools.count(21000)


def _unused_port():
    for port in _ports:
        with _socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class _DistinctPortsSpawner(_SimpleLocalProcessSpawner):
    async def start(self):
        self.port = _unused_port()
        return await super().start()


c.JupyterHub.spawner_class = _DistinctPortsSpawner
"""


class Hub:
    """One JupyterHub plus its proxy, in `workdir`. Use `running_hub` to get one."""

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        *,
        hub_ip: str = INCUS_HUB_IP,
        cleanup_servers: bool = True,
        debug: bool = False,
        password: str | None = None,
        internal_ssl: bool = False,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.hub_ip = hub_ip
        self.cleanup_servers = cleanup_servers
        self.debug = debug
        # With internal_ssl the hub makes the certificates and starts the proxy itself (with
        # them); the harness then starts no proxy of its own.
        self.internal_ssl = internal_ssl
        self.password = password or "pw-" + secrets.token_urlsafe(12)
        self.token = secrets.token_hex(32)
        self.proxy_token = secrets.token_hex(32)
        self.public_port = free_port("127.0.0.1")
        self.proxy_api_port = free_port("127.0.0.1")
        self.hub_port = free_port(hub_ip)
        self.public_url = f"http://127.0.0.1:{self.public_port}"
        self.proxy_api_url = f"http://127.0.0.1:{self.proxy_api_port}"
        self.hub_url = f"http://{hub_ip}:{self.hub_port}"
        self.api_url = f"{self.public_url}/hub/api"
        self.config_file = self.workdir / "jupyterhub_config.py"
        self.log_path = self.workdir / "jupyterhub.log"
        self.proxy_log_path = self.workdir / "proxy.log"
        self._hub: asyncio.subprocess.Process | None = None
        self._proxy: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        # Set by a test to add, e.g., the containers' logs to its failure report (conftest).
        self.diagnostics: Callable[[], str] | None = None
        self._write_config()

    # -- configuration and processes ---------------------------------------------------------

    def set_cleanup_servers(self, value: bool) -> None:
        """For the next start of the hub: whether it stops every server when it exits."""
        self.cleanup_servers = value
        self._write_config()

    def add_config(self, text: str) -> None:
        """For the next start of the hub: more configuration lines."""
        self.config += "\n" + text + "\n"
        self._write_config()

    def _write_config(self) -> None:
        base = BASE_CONFIG.format(
            public_url=self.public_url + "/",
            hub_url=self.hub_url,
            db_url=f"sqlite:///{self.workdir / 'jupyterhub.sqlite'}",
            cookie_secret_file=str(self.workdir / "jupyterhub_cookie_secret"),
            pid_file=str(self.workdir / "jupyterhub.pid"),
            cleanup_servers=self.cleanup_servers,
            hub_id=self.hub_id,
            proxy_api_url=self.proxy_api_url,
            proxy_token=self.proxy_token,
            password=self.password,
            token=self.token,
        )
        if self.internal_ssl:
            base += INTERNAL_SSL_CONFIG.format(
                chp=str(CHP),
                certs=str(self.workdir / "internal-ssl"),
                hub_ip=self.hub_ip,
                proxy_api_url=self.proxy_api_url.replace("http://", "https://"),
            )
        extra = "\n# --- the test's configuration ---\n" + self.config if self.config else ""
        self.config_file.write_text(base + extra + "\n")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The venv's scripts (jupyterhub-singleuser, the idle culler) must be found by name.
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _start_proxy(self) -> None:
        if not CHP.exists():
            raise HubError(f"{CHP} is missing: run scripts/ensure-tools.sh")
        env = self._env()
        env["CONFIGPROXY_AUTH_TOKEN"] = self.proxy_token
        # The same command line JupyterHub would use if it started CHP itself.
        cmd = [
            str(CHP),
            "--ip", "127.0.0.1",
            "--port", str(self.public_port),
            "--api-ip", "127.0.0.1",
            "--api-port", str(self.proxy_api_port),
            "--error-target", f"{self.hub_url}/hub/error",
            "--log-level", "debug" if self.debug else "info",
        ]  # fmt: skip
        with _append(self.proxy_log_path) as log:
            self._proxy = await asyncio.create_subprocess_exec(
                *cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 20
        headers = {"Authorization": f"token {self.proxy_token}"}
        while True:
            if self._proxy.returncode is not None:
                raise HubError(f"proxy exited ({self._proxy.returncode}):\n{self.proxy_log()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(
                    f"{self.proxy_api_url}/api/routes", headers=headers
                ) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise HubError(f"proxy did not answer in 20 s:\n{self.proxy_log()}")
            await asyncio.sleep(0.1)

    async def _start_hub(self, timeout: float = 60) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = [sys.executable, "-m", "jupyterhub", "-f", str(self.config_file)]
        if self.debug:
            cmd.append("--debug")
        with _append(self.log_path, f"\n===== hubtools: starting {' '.join(cmd)}\n") as log:
            self._hub = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,
            )
        # Up means: the API answers through the proxy and the hub has finished its start-up
        # (spawners polled, routes checked, services started), which it logs last.
        deadline = time.monotonic() + timeout
        while True:
            if self._hub.returncode is not None:
                raise HubError(
                    f"jupyterhub exited ({self._hub.returncode}) during start-up:\n"
                    + self.log_tail(60)
                )
            if "JupyterHub is now running" in self.log()[offset:]:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    status, _ = await self.api("GET", "/")
                    if status == 200:
                        return
            if time.monotonic() > deadline:
                raise HubError(f"jupyterhub not up in {timeout:.0f} s:\n" + self.log_tail(60))
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        if not self.internal_ssl:
            await self._start_proxy()
        await self._start_hub()

    @staticmethod
    async def _terminate(proc: asyncio.subprocess.Process | None, grace: float) -> None:
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            # Its own session: take any helper it left behind (CHP's node, a service) along.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def stop_hub(self, grace: float = 30) -> None:
        """Stop the hub process (SIGTERM: with cleanup_servers it stops the servers too)."""
        await self._terminate(self._hub, grace)

    async def restart(self, keep_proxy: bool = True, timeout: float = 60) -> None:
        """Stop the hub and start it again with the same database and configuration.

        With ``keep_proxy`` the proxy and its routes stay up throughout, as in a deployment
        where the proxy is its own service; without it the proxy is restarted too and the
        new hub has to put every route back.
        """
        await self.stop_hub()
        if not keep_proxy:
            await self._terminate(self._proxy, 10)
            await self._start_proxy()
        await self._start_hub(timeout)

    @property
    def hub_running(self) -> bool:
        return self._hub is not None and self._hub.returncode is None

    async def close(self) -> None:
        """Stop every server (if the hub is up), then the hub and the proxy."""
        try:
            if self.hub_running:
                await self.stop_all_servers()
        finally:
            await self.stop_hub()
            await self._terminate(self._proxy, 10)
            if self._session is not None:
                await self._session.close()
                self._session = None
            await forget_volumes(self.hub_id)

    @property
    def hub_id(self) -> str:
        """The hub's id: ``testbench-`` and the id lxdspawner would derive from the database
        (a test may set another in its configuration)."""
        derived = default_hub_id(f"sqlite:///{self.workdir / 'jupyterhub.sqlite'}")
        return TEST_HUB_PREFIX + derived.rsplit("-", 1)[-1]

    # -- logs -----------------------------------------------------------------------------

    def log(self) -> str:
        """The hub's log so far (all starts of this hub, separated by marker lines)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def proxy_log(self) -> str:
        try:
            return self.proxy_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def print_log_tail(self, lines: int = 120) -> None:
        print(f"\n===== tail of the hub log {self.log_path} =====\n{self.log_tail(lines)}")
        proxy_tail = "\n".join(self.proxy_log().splitlines()[-20:])
        print(f"===== tail of the proxy log {self.proxy_log_path} =====\n{proxy_tail}")
        if self.diagnostics is not None:
            try:
                print(self.diagnostics())
            except Exception as e:  # a report must not hide the failure
                print(f"(diagnostics failed: {e!r})")

    # -- HTTP -------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxy from the environment: everything here is local.
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def api(
        self, method: str, path: str, json: Any = None, timeout: float = 60
    ) -> tuple[int, Any]:
        """Call the hub's REST API (``path`` after /hub/api) → (status, decoded JSON or text).

        Quote names in ``path`` with `q` (or use `server_api_path`).
        """
        async with self.session.request(
            method,
            _url(self.api_url + path),
            json=json,
            headers=self.auth_headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as r:
            text = await r.text()
            try:
                body = _json_loads(text) if text else None
            except ValueError:
                body = text
            return r.status, body

    async def get_via_proxy(
        self, path: str, *, token: bool = True, allow_redirects: bool = False, timeout: float = 30
    ) -> tuple[int, str]:
        """GET ``path`` (e.g. a server's ``/user/<name>/api/status``) through the public proxy."""
        async with self.session.get(
            _url(self.public_url + path),
            headers=self.auth_headers if token else {},
            allow_redirects=allow_redirects,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            return r.status, await r.text()

    # -- users and servers ------------------------------------------------------------------

    async def user_model(self, user: str) -> dict[str, Any] | None:
        status, body = await self.api("GET", f"/users/{q(user)}")
        if status == 404:
            return None
        if status != 200:
            raise HubError(f"GET user {user!r}: {status} {body}")
        return body

    async def ensure_user(self, user: str) -> dict[str, Any]:
        """Create the user if missing; return the user model."""
        status, body = await self.api("POST", f"/users/{q(user)}")
        if status == 201:
            return body
        if status == 409:
            model = await self.user_model(user)
            if model is not None:
                return model
        raise HubError(f"creating user {user!r}: {status} {body}")

    async def server_model(self, user: str, server_name: str = "") -> dict[str, Any] | None:
        model = await self.user_model(user)
        if model is None:
            return None
        return (model.get("servers") or {}).get(server_name)

    async def progress_events(
        self, user: str, server_name: str = "", timeout: float = 120
    ) -> list[dict[str, Any]]:
        """Read the spawn's progress stream until it says ready or failed (or ends)."""
        events: list[dict[str, Any]] = []
        async with self.session.get(
            _url(self.api_url + progress_api_path(user, server_name)),
            headers=self.auth_headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_read=timeout),
        ) as r:
            if r.status != 200:
                # 400: not starting (no spawn in progress, none failed); 404: no such server.
                return [{"http_status": r.status, "message": await r.text()}]
            async for raw in r.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                event = _json_loads(line[len("data:") :])
                events.append(event)
                if event.get("ready") or event.get("failed"):
                    break
        return events

    async def start_server(
        self,
        user: str,
        server_name: str = "",
        user_options: dict[str, Any] | None = None,
        timeout: float = 180,
    ) -> dict[str, Any]:
        """Start a server and wait until the hub reports it ready; return its server model.

        Raises `SpawnFailed` with the hub's message (from the progress stream) if the spawn
        fails or the server is not ready within ``timeout`` seconds.
        """
        await self.ensure_user(user)
        path = server_api_path(user, server_name)
        status, body = await self.api("POST", path, json=user_options or {}, timeout=timeout)
        if status not in (201, 202):
            # A spawn that fails within the hub's slow_spawn_timeout turns the POST into a
            # bare 500; the progress stream still has the hub's message for it.
            events = await self.progress_events(user, server_name, timeout=10)
            failed = [e["message"] for e in events if e.get("failed")]
            detail = failed[-1] if failed else f"{body}"
            raise SpawnFailed(f"{detail} (POST {path} answered {status})", events)
        deadline = time.monotonic() + timeout
        try:
            events = await asyncio.wait_for(
                self.progress_events(user, server_name, timeout), timeout
            )
        except asyncio.TimeoutError:
            events = [{"message": f"no ready/failed progress event in {timeout:.0f} s"}]
        failed = [e for e in events if e.get("failed")]
        if failed:
            raise SpawnFailed(failed[-1].get("message", "Spawn failed"), events)
        # The stream said ready (or ended): the user model has the last word.
        while True:
            server = await self.server_model(user, server_name)
            if server and server.get("ready"):
                return server
            if server is None or server.get("pending") is None:
                # Gone or idle without being ready: ask the stream why it failed.
                more = await self.progress_events(user, server_name, timeout=10)
                messages = [e.get("message", "") for e in events + more]
                raise SpawnFailed(
                    f"server {user!r}/{server_name!r} is not running: "
                    + (" | ".join(m for m in messages[-3:] if m) or "no message"),
                    events + more,
                )
            if time.monotonic() > deadline:
                raise SpawnFailed(
                    f"server {user!r}/{server_name!r} not ready in {timeout:.0f} s "
                    f"(pending: {server.get('pending')}); last events: {events[-3:]}",
                    events,
                )
            await asyncio.sleep(0.25)

    async def stop_server(
        self, user: str, server_name: str = "", remove: bool = False, timeout: float = 120
    ) -> None:
        """Stop a server and wait until the hub no longer lists it."""
        path = server_api_path(user, server_name)
        status, body = await self.api(
            "DELETE", path, json={"remove": True} if remove else None, timeout=timeout
        )
        if status not in (202, 204):
            raise HubError(f"DELETE {path}: {status} {body}")
        deadline = time.monotonic() + timeout
        while True:
            server = await self.server_model(user, server_name)
            if server is None:
                return
            if time.monotonic() > deadline:
                raise HubError(f"server {user!r}/{server_name!r} still there: {server}")
            await asyncio.sleep(0.25)

    async def stop_all_servers(self, timeout: float = 120) -> None:
        status, users = await self.api("GET", "/users")
        if status != 200:
            raise HubError(f"GET /users: {status} {users}")
        stops = [
            self.stop_server(u["name"], name, timeout=timeout)
            for u in users
            for name in (u.get("servers") or {})
        ]
        results = await asyncio.gather(*stops, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise HubError(f"stopping servers at teardown: {errors}")


def _append(path: Path, header: str = ""):
    """A log file opened for appending (the child process writes to it)."""
    log = open(path, "ab")  # the caller closes it (with ...)
    if header:
        log.write(header.encode())
        log.flush()
    return log


def _url(url: str) -> URL:
    # Send the path exactly as quoted: yarl would otherwise turn "%3B" back into ";", and a
    # server whose base URL is /user/x%3Btouch%20pwned/ would not recognise its own path.
    return URL(url, encoded=True)


def _json_loads(text: str) -> Any:
    return json.loads(text)


@contextlib.asynccontextmanager
async def running_hub(
    workdir: Path,
    config: str = "",
    *,
    hub_ip: str = INCUS_HUB_IP,
    cleanup_servers: bool = True,
    debug: bool = False,
    password: str | None = None,
    internal_ssl: bool = False,
) -> AsyncIterator[Hub]:
    """Start a hub (see the module docstring); stop everything on exit."""
    hub = Hub(
        workdir,
        config,
        hub_ip=hub_ip,
        cleanup_servers=cleanup_servers,
        debug=debug,
        password=password,
        internal_ssl=internal_ssl,
    )
    HUBS.append(hub)
    try:
        try:
            await hub.start()
            yield hub
        except BaseException:
            hub.print_log_tail()
            raise
        finally:
            try:
                await hub.close()
            except Exception:
                hub.print_log_tail()
                raise
    finally:
        HUBS.remove(hub)


def daemon_cli(*args: str, cli: tuple[str, ...] = DAEMON_CLI) -> subprocess.CompletedProcess:
    """Run the daemon's command line (``incus ...`` or ``lxc ...``); never raises on failure."""
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, check=False)


def instance_names(cli: tuple[str, ...] = DAEMON_CLI) -> set[str]:
    return set(daemon_cli("list", "--format", "csv", "-c", "n", cli=cli).stdout.split())


def lxd_unavailable(image: str = "jupyter-base") -> str | None:
    """Why LxdSpawner cannot run here (not importable, daemon or image missing), or None."""
    try:
        from lxdspawner import LxdSpawner  # noqa: F401
    except Exception as e:
        return f"lxdspawner.LxdSpawner does not import: {e!r}"
    try:
        free_port(DAEMON_HUB_IP)
    except OSError:
        return f"no interface has the hub's address {DAEMON_HUB_IP}: run scripts/setup-lxd.sh"
    try:
        info = daemon_cli("image", "info", image)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{DAEMON_CLI[-1]} does not answer: {e}"
    if info.returncode != 0:
        return (
            f"no image {image!r} (lxdspawner/images/ensure-image.sh {image}): {info.stderr.strip()}"
        )
    return None


def instance_diagnostics(prefix: str = "jupyter-", cli: tuple[str, ...] = DAEMON_CLI) -> str:
    """Log, console and journal of every instance whose name starts with ``prefix``.

    For failure reports: call it from a test (or conftest) when something went wrong.
    ``cli`` is a daemon's command line, e.g. `DAEMON_CLI` or ``topology.LXD.cli``.
    """

    def run(*args: str) -> str:
        try:
            p = daemon_cli(*args, cli=cli)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"({' '.join(args)}: {e})"
        return (p.stdout + p.stderr).strip()

    names = [n for n in run("list", "--format", "csv", "-c", "n").splitlines() if n]
    out = []
    for name in names:
        if not name.startswith(prefix):
            continue
        out.append(
            f"===== instance {name}: info --show-log =====\n{run('info', '--show-log', name)}"
        )
        out.append(f"===== instance {name}: console --show-log =====\n"
                   + run("console", name, "--show-log")[-4000:])  # fmt: skip
        out.append(
            f"===== instance {name}: journal =====\n"
            + run("exec", name, "--", "journalctl", "-b", "--no-pager", "-n", "150")
        )
    return "\n".join(out) or f"(no instance named {prefix}*)"
