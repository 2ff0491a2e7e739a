"""JupyterHub configuration for ``make demo`` (started by scripts/demo.sh).

Two parts, so the browser tests run the same demo on their own ports and directories:

- `apply_demo_settings` is *what* the demo is: LxdSpawner with the ``jupyter-base`` image,
  JupyterLab, 1 GB / 1 CPU per server, named servers, one shared password for any username,
  an ``admin`` user, and the idle culler as a hub service.
- `apply_demo_location` is *where* it runs: the public URL (http://127.0.0.1:8000), the hub's
  internal API on the Incus bridge (port 8081 on its address in scripts/topology.env,
  reachable from the containers),
  the state directory (.cache/demo: database, cookie secret, passwords), and the
  configurable-http-proxy installed by scripts/ensure-tools.sh.

JupyterHub executes this file with ``get_config`` in its namespace; that is when both parts
are applied. Imported as a module (tests/e2e), it applies nothing by itself.

Environment (all optional):
  LXDSPAWNER_DEMO_DIR      state directory              (default: <repo>/.cache/demo)
  LXDSPAWNER_DEMO_URL      public URL                   (default: http://127.0.0.1:8000)
  LXDSPAWNER_DEMO_HUB_IP   address of the hub's API     (default: the host's address on the
                           Incus bridge, or on the LXD bridge with LXDSPAWNER_DAEMON=lxd;
                           scripts/demo.sh sets it)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHP = REPO / ".cache" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"

CULLER_SERVICE = "idle-culler"
# JupyterHub stops a service with SIGINT, and waits 30 s before SIGTERM. A hub started in the
# background by a script (a test run, CI) inherits an ignored SIGINT, and so does Python in
# the culler, which then sat out those 30 s at every hub exit: give it SIGINT back.
RUN_CULLER_WITH_SIGINT = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('jupyterhub_idle_culler', run_name='__main__', alter_sys=True)"
)
CULLER_ROLE = {
    "name": "idle-culler",
    "description": "Find idle servers and stop them",
    # What jupyterhub-idle-culler needs when it culls servers only (not users).
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": [CULLER_SERVICE],
}


def apply_demo_settings(c: Any) -> None:
    """The demo's behaviour; leaves ports, paths and passwords to the caller."""
    # Any username with the shared demo password. The `admin` user logs in with a separate,
    # longer password: SharedPasswordAuthenticator never makes a user-password login admin.
    c.JupyterHub.authenticator_class = "shared-password"
    c.Authenticator.allow_all = True
    c.Authenticator.admin_users = {"admin"}

    c.JupyterHub.spawner_class = "lxd"
    c.LxdSpawner.image = "jupyter-base"
    c.Spawner.default_url = "/lab"
    c.Spawner.mem_limit = "1G"
    c.Spawner.cpu_limit = 1.0
    c.JupyterHub.allow_named_servers = True
    # Two containers kept booted with the server's code imported: a spawn takes one (about
    # 0.6 s instead of 3 to 5). Made after the first spawn; gone with the demo (Ctrl-C).
    c.LxdSpawner.warm_pool_size = 2
    c.LxdSpawner.warm_pool_remove_on_exit = True
    # Ctrl-C on the demo stops every server (and, with the default `remove`, deletes the
    # containers); a production hub sets this to False (see examples/jupyterhub_config.py).
    c.JupyterHub.cleanup_servers = True

    # Append, not assign: whoever loaded us may have services and roles of their own.
    c.JupyterHub.services.append(
        {
            "name": CULLER_SERVICE,
            "command": [
                sys.executable,
                "-c",
                RUN_CULLER_WITH_SIGINT,
                "--timeout=3600",
                "--cull-every=300",
            ],
        }
    )
    c.JupyterHub.load_roles.append(CULLER_ROLE)


def apply_demo_location(
    c: Any,
    *,
    state_dir: Path,
    public_url: str,
    hub_ip: str,
    hub_port: int = 8081,
) -> None:
    """Where the demo runs and keeps its state; reads the passwords demo.sh wrote."""
    state_dir = Path(state_dir)
    c.JupyterHub.bind_url = public_url
    c.JupyterHub.hub_bind_url = f"http://{hub_ip}:{hub_port}"
    c.JupyterHub.db_url = f"sqlite:///{state_dir / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(state_dir / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(state_dir / "jupyterhub.pid")
    c.ConfigurableHTTPProxy.command = [str(CHP)]
    c.ConfigurableHTTPProxy.pid_file = str(state_dir / "proxy.pid")
    c.SharedPasswordAuthenticator.user_password = _read_secret(state_dir / "password")
    c.SharedPasswordAuthenticator.admin_password = _read_secret(state_dir / "admin-password")


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(f"{path} is missing: start the demo with scripts/demo.sh") from None


def _hub_ip_from_env() -> str:
    if os.environ.get("LXDSPAWNER_DEMO_HUB_IP"):
        return os.environ["LXDSPAWNER_DEMO_HUB_IP"]
    # Imported here, not at the top: tests/e2e load this file for apply_demo_settings alone,
    # in a hub that does not have the repository on its path.
    try:
        from testbench import topology
    except ImportError:
        raise SystemExit(
            "set LXDSPAWNER_DEMO_HUB_IP, or start the demo with scripts/demo.sh"
        ) from None
    daemon = os.environ.get("LXDSPAWNER_DAEMON", "incus")
    return topology.DAEMONS.get(daemon, topology.INCUS).gateway


if "get_config" in globals():  # executed by JupyterHub as its configuration file
    c = get_config()  # noqa: F821
    apply_demo_settings(c)
    apply_demo_location(
        c,
        state_dir=Path(os.environ.get("LXDSPAWNER_DEMO_DIR", REPO / ".cache" / "demo")),
        public_url=os.environ.get("LXDSPAWNER_DEMO_URL", "http://127.0.0.1:8000"),
        hub_ip=_hub_ip_from_env(),
    )
