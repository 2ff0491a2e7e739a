# For operators of the original lxdspawner (the one that drove the `lxc` command line).
#
# The option names and meanings are kept: a configuration written for it works with the
# lines below. What changes underneath:
#   - The spawner talks to the daemon's REST API (no `lxc` binary, no blocking calls), and
#     works with Incus as well as LXD.
#   - The server runs as a systemd unit inside the container, not as an `lxc exec` held by
#     the hub, so a hub restart no longer kills it (see cleanup_servers below). The image
#     therefore needs systemd and `jupyterhub-singleuser` (lxdspawner/images/jupyter-base is one).
#   - On a cluster, a server goes to the member with the fewest servers (counting the ones
#     still starting), weighted by `host_weights`, skipping offline members.
#   - Container names come from the username but are always valid ("jupyter-" + the name,
#     or a slug plus a short hash for names LXD would refuse).
#
# tests/unit/test_examples.py loads this file, so the names below are kept current.

c = get_config()  # noqa: F821

c.JupyterHub.spawner_class = "lxd"  # the same class as before: lxdspawner.LxdSpawner
c.LxdSpawner.image = "container_image_name"

# System users, the same uids inside the containers as on the hosts: the host's passwd and
# group files are copied into every container before its server starts (from the hub host),
# and the server runs with the user's uid/gid from them.
c.JupyterHub.authenticator_class = "pam"
c.LxdSpawner.files_to_push = [["/etc/passwd", "/etc/passwd"], ["/etc/group", "/etc/group"]]

# Privileged containers, so that uid 1234 in the container is uid 1234 on the host and on the
# NFS server. (Unprivileged containers map uids to a private range; with Incus, idmapped
# mounts remove the need for this on local disks, not on NFS.)
c.LxdSpawner.privileged_containers = True

# Homes on NFS, mounted on every cluster member at /srv/nfs/home: the whole tree is mounted
# at /home in each container, as before. (To give each user only their own directory:
# [["home", "/srv/nfs/home/{USERNAME}", "/home/{USERNAME}"]].)
c.LxdSpawner.filesystems_to_mount = [["home", "/srv/nfs/home", "/home"]]
c.LxdSpawner.home_dir = "/home/{username}"

# Containers are deleted when their server stops, as before. Keep them instead with:
#     c.LxdSpawner.remove = False
c.LxdSpawner.remove = True

# New: servers survive a hub restart (the original could not offer this).
c.JupyterHub.cleanup_servers = False

# The containers reach the hub on the bridge's address (the original's `hub_ip`).
c.JupyterHub.hub_bind_url = "http://10.117.40.1:8081"

# New: {USERNAME} in commands is the username as one literal piece of its word, also inside
# '...' or "..."; a command with it in backquotes or $(...) is refused (use "$JUPYTERHUB_USER").
# post_hub_commands run with a minimal environment (not the hub's), for at most 60 s each.
c.LxdSpawner.post_hub_commands = ["logger 'server started for {USERNAME}'"]

# New: servers never run as root or a system account (uid below 1000, gid below 100), even
# for a user named "root": lower c.LxdSpawner.min_uid / min_gid only if you mean it.

# New: this hub's name on the daemon, on every container it makes; it touches no other.
# The default comes from the hub's database; set it to keep it when the hub moves.
#     c.LxdSpawner.hub_id = "physics-hub"
