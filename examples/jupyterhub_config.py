# JupyterHub configuration for a real host: system users (PAM), one Incus/LXD container per
# user's server, through lxdspawner.
#
# Install it as /etc/jupyterhub/jupyterhub_config.py and run the hub with
# examples/jupyterhub.service. Every LxdSpawner option is documented in its help text:
#     jupyterhub --help-all | sed -n '/^LxdSpawner/,/^[A-Z]/p'
# tests/unit/test_examples.py loads this file, so the names below are kept current.

c = get_config()  # noqa: F821

# -- Where the hub listens ------------------------------------------------------------------

# The public address, served by configurable-http-proxy (started by the hub).
# HTTPS: either terminate TLS in front of the hub (nginx, Caddy, a load balancer; recommended,
# it also renews certificates), keeping this on http://127.0.0.1:8000, or let the proxy do it:
#     c.JupyterHub.bind_url = "https://hub.example.org:443"
#     c.JupyterHub.ssl_cert = "/etc/letsencrypt/live/hub.example.org/fullchain.pem"
#     c.JupyterHub.ssl_key = "/etc/letsencrypt/live/hub.example.org/privkey.pem"
c.JupyterHub.bind_url = "http://127.0.0.1:8000"

# The hub's internal API must be reachable from inside the containers: bind it to the address
# of the bridge they are attached to (`incus network get incusbr0 ipv4.address`), not 0.0.0.0.
# For remote cluster members, use an address they can route to and firewall it.
c.JupyterHub.hub_bind_url = "http://10.117.40.1:8081"

state_dir = "/var/lib/jupyterhub"  # the unit's StateDirectory (examples/jupyterhub.service)
c.JupyterHub.db_url = f"sqlite:///{state_dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{state_dir}/jupyterhub_cookie_secret"

# Restarting or upgrading the hub must not kill the users' servers: they live in their
# containers, and the hub finds them again from its database when it starts.
c.JupyterHub.cleanup_servers = False

# -- Who may log in ---------------------------------------------------------------------------

# System users of this host (PAM). The hub runs as root to authenticate them.
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {"jupyter"}
c.Authenticator.admin_users = {"alice"}

# Alternative: OAuth (pip install oauthenticator), e.g. GitHub or any OpenID Connect provider.
# Users then need not exist on the host; the servers run as `LxdSpawner.default_uid`.
#     c.JupyterHub.authenticator_class = "generic-oauth"
#     c.GenericOAuthenticator.client_id = "jupyterhub"
#     c.GenericOAuthenticator.client_secret = "..."          # better: from an environment file
#     c.GenericOAuthenticator.oauth_callback_url = "https://hub.example.org/hub/oauth_callback"
#     c.GenericOAuthenticator.authorize_url = "https://id.example.org/authorize"
#     c.GenericOAuthenticator.token_url = "https://id.example.org/token"
#     c.GenericOAuthenticator.userdata_url = "https://id.example.org/userinfo"
#     c.GenericOAuthenticator.username_claim = "preferred_username"
#     c.GenericOAuthenticator.allowed_groups = {"jupyter"}

# -- The spawner --------------------------------------------------------------------------------

c.JupyterHub.spawner_class = "lxd"  # or "incus": the same class

# The daemon: empty finds the local unix socket (Incus or LXD). A remote server or cluster:
#     c.LxdSpawner.endpoint = "https://lxd.example.org:8443"
#     c.LxdSpawner.client_cert = "/etc/jupyterhub/lxd-client.crt"
#     c.LxdSpawner.client_key = "/etc/jupyterhub/lxd-client.key"
#     c.LxdSpawner.server_cert = "/etc/jupyterhub/lxd-server.crt"   # pinned
c.LxdSpawner.endpoint = ""
c.LxdSpawner.project = ""  # "" is the default project
c.LxdSpawner.image = "jupyter-base"  # lxdspawner/images/ensure-image.sh jupyter-base
c.LxdSpawner.profiles = ["default"]

# Cluster placement: relative weight per member (0: never place servers there).
#     c.LxdSpawner.host_weights = {"node1": 2, "node2": 1, "node3": 0}

# Homes: each user gets a persistent home volume (a custom storage volume with a quota),
# created at the first spawn, kept across stops, culls, hub restarts and reboots, snapshotted
# daily and kept a week; `lxdspawner volumes list` shows them (README: "Storage"). The server
# runs with the user's uid/gid from this host's passwd database (LxdSpawner.get_uid_gid).
c.LxdSpawner.home_dir = "/home/{username}"
c.LxdSpawner.home_volume_size = "10GiB"
c.LxdSpawner.home_volume_snapshots = {"schedule": "@daily", "expiry": "1w"}
# An admin deleting a user keeps their volumes (listed as belonging to no user) unless:
#     c.LxdSpawner.delete_volumes_with_user = True
# Course material, one read-only volume for everyone (create it, or give it a "size"):
#     c.LxdSpawner.volumes = {"course-data": {"path": "/data", "read_only": True, "shared": True}}
# Or, as the original spawner did, each user's home directory on this host, mounted (a home
# mounted this way gets no volume):
#     c.LxdSpawner.filesystems_to_mount = [["home", "/home/{USERNAME}", "/home/{USERNAME}"]]

# Delete a container when its server stops (the default). With False a stopped container is
# kept and restarted next time (faster, keeps what the user installed with apt or pip).
c.LxdSpawner.remove = True

# Isolation (see SECURITY.md): these are the defaults. Each container gets its own uid range
# (Incus), a process limit and a root disk size; on its bridge it reaches no other container
# and cannot spoof an address. "hub-only" also limits what it reaches on the host and beyond
# (Incus, with nf_conntrack_bridge and nft_reject_bridge loaded).
c.LxdSpawner.process_limit = 2000
c.LxdSpawner.disk_limit = "10GiB"
c.LxdSpawner.network_isolation = "ports"

# Encrypt the traffic between the hub, the proxy and the servers (tokens, cookies). The hub's
# certificate must name the address the containers reach it at.
#     c.JupyterHub.internal_ssl = True
#     c.JupyterHub.trusted_alt_names = ["IP:10.117.40.1"]

# Shell commands run in the container before the server starts (as the user). The username
# is in $JUPYTERHUB_USER; {USERNAME} works unquoted or inside '...' / "..." (never as shell).
#     c.LxdSpawner.commands_to_prepare = ["mkdir -p $HOME/work"]

# This hub's name on the daemon, written on every container it makes: it touches no other.
# The default is derived from the database; a production hub names itself, so that moving
# it to a new host or database keeps its servers.
c.LxdSpawner.hub_id = "jupyterhub-main"

# Servers never run as root or a system account (uids below 1000, gids below 100), whatever
# the username ("root" included): lower these only on purpose.
#     c.LxdSpawner.min_uid = 1000
#     c.LxdSpawner.min_gid = 100

# -- What each server gets --------------------------------------------------------------------

c.Spawner.default_url = "/lab"
c.Spawner.mem_limit = "4G"
c.Spawner.cpu_limit = 2.0
c.Spawner.environment = {"TZ": "Europe/Madrid"}
c.Spawner.start_timeout = 120  # first start on a node unpacks the image: allow for it
c.Spawner.http_timeout = 60

# -- Capacity -----------------------------------------------------------------------------------

c.JupyterHub.active_server_limit = 200  # running servers in total; more must wait
c.JupyterHub.concurrent_spawn_limit = 20  # servers starting at the same time
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 3

# -- Stop idle servers --------------------------------------------------------------------------

# pip install jupyterhub-idle-culler. Stops servers idle for an hour, checking every 5 min.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [
            "python3",
            "-m",
            "jupyterhub_idle_culler",
            "--timeout=3600",
            "--cull-every=300",
        ],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
