# JupyterHub's configuration, written by `lxdspawner install` (README: "Production"): edit it.
# The installer never overwrites this file: a newer version of it goes beside it as
# jupyterhub_config.py.new, and the installer says so. Apply a change with
#     systemctl restart jupyterhub       (users' servers and open notebooks stay up)
# Every LxdSpawner option is documented in its help text:
#     @VENV@/bin/jupyterhub --help-all | sed -n '/^LxdSpawner/,/^[A-Z]/p'
import os

c = get_config()  # noqa: F821

# -- The proxy: its own unit (jupyterhub-proxy.service), behind Caddy (HTTPS) ---------------

# The proxy's public side, where Caddy forwards to; the proxy runs on its own, so a hub
# restart keeps users' connections. Its token is CONFIGPROXY_AUTH_TOKEN from
# /etc/jupyterhub/proxy.env (read by both units).
c.JupyterHub.bind_url = "http://127.0.0.1:8000"
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"

# The hub's API, where the servers in the containers call the hub: an address of this host
# they reach (the containers' bridge, or this machine's own address when the daemon is
# elsewhere). lxdspawner's network isolation lets the containers reach this address only.
c.JupyterHub.hub_bind_url = "http://@HUB_ADDRESS@:8081"

# -- State: PostgreSQL, the password from /etc/jupyterhub/environment ---------------------------

c.JupyterHub.db_url = "postgresql+psycopg2://jupyterhub:{}@127.0.0.1:5432/jupyterhub".format(
    os.environ["JUPYTERHUB_DB_PASSWORD"]
)
c.JupyterHub.cookie_secret_file = "/var/lib/jupyterhub/jupyterhub_cookie_secret"  # noqa: S105
# Restarts and upgrades keep the users' servers: they live in their containers.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.cleanup_proxy = False

# -- Who may log in: this host's users in group jupyterhub-users (PAM) ------------------------

#     useradd -m -G jupyterhub-users alice && passwd alice
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {"jupyterhub-users"}
# c.Authenticator.admin_users = {"alice"}

# -- The spawner ------------------------------------------------------------------------------

c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.endpoint = "@ENDPOINT@"
c.LxdSpawner.image = "jupyter-base"
c.LxdSpawner.profiles = ["default"]
# This hub's name on the daemon, on every container and volume it makes: it touches no other.
c.LxdSpawner.hub_id = "@HUB_ID@"
# What a server's container may reach (SECURITY.md). The installer chose "@ISOLATION@":
# "internet" when the hub is this host and the containers' bridge is its own (a network ACL
# on the bridge: containers reach the hub's API and nothing else here); "ports" when the
# daemon is reached through --daemon-socket, because the hub may then be a container on that
# same bridge, and a bridge-wide ACL would cut the hub's own container off (containers still
# cannot reach each other, nor take another's address).
c.LxdSpawner.network_isolation = "@ISOLATION@"
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60

# -- Stop servers idle for an hour (jupyterhub-idle-culler, a hub service) ------------------

c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": ["@VENV@/bin/python", "-m", "jupyterhub_idle_culler", "--timeout=3600"],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
