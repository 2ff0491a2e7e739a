"""The checks of ``lxdspawner doctor`` that look past the daemon's answer to ``/1.0``: each
member of a cluster (the image unpacked in its pool, the shared copies, its clock), what
belongs to no server (with the hub's database), this host's subordinate ids and the bridge's
stray ports (a local daemon), and the probe container. Each is an async function over an
:class:`~lxdspawner.lxd.LxdClient` returning :class:`~lxdspawner.findings.Result` values, so
the unit tier runs them against the fake daemon; :mod:`lxdspawner.doctor` calls them.

Clocks. Neither daemon reports its time in ``GET /1.0``; the ``Date`` header of that request
forwarded to a member (``?target=``) is the member's own (see
:meth:`~lxdspawner.lxd.LxdClient.server_time`), to the second. Each member's offset from this
host is its ``Date`` against the middle of the request; members disagreeing by more than
:data:`CLOCK_SKEW` seconds (two one-second readings can differ by two without any skew) are
a warning: TLS certificates, image expiry, snapshots' expiry and the cluster's heartbeats
all compare times across members.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from . import hardening, hostcheck, names, network, probe, sharing
from .findings import ERROR, OK, WARNING, Result, _tool
from .hubdb import HubServers
from .lxd import LxdClient, LxdError, NotFound
from .ownership import KEY_HUB, KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY

if TYPE_CHECKING:
    from .doctor import Settings

#: Seconds members' clocks may disagree before doctor warns.
CLOCK_SKEW = 5.0


def _listed(items: list[str], most: int = 5) -> str:
    return ", ".join(items[:most]) + (
        f" (and {len(items) - most} more)" if len(items) > most else ""
    )


# -- each member -------------------------------------------------------------------------------


async def check_members(
    client: LxdClient,
    name: str,
    *,
    image: str,
    pool: str | None,
    driver: str,
    shared_directories: Iterable[str],
    prepull: str,
) -> list[Result]:
    """The image unpacked in the root pool of each Online member (a standalone daemon: of
    itself), the shared copies of its directories there, and the members' clocks.
    ``prepull`` is the command that fixes a missing copy (with the operator's ``-f``)."""
    fingerprint = await client.image_fingerprint(image)
    if fingerprint is None or pool is None:
        return []  # check_image and check_profiles said why
    members = await client.cluster_members()
    online = [m["server_name"] for m in members if m.get("status") == "Online"]
    targets: list[str | None] = list(online) if members else [None]
    found: list[Result] = []
    if driver != "dir":  # a dir pool keeps no unpacked image: each server is a full copy
        missing = []
        for target in targets:
            if fingerprint not in await client.image_volumes(pool, target=target):
                missing.append(target or "this daemon")
        if missing:
            found.append(
                Result(
                    WARNING,
                    name,
                    "image",
                    f"image {image!r} is not unpacked in pool {pool!r} on "
                    f"{_listed(missing)}: the first server there waits for the copy and unpack",
                    prepull,
                )
            )
        else:
            where = f"all {len(targets)} members" if members else "this daemon"
            found.append(Result(OK, name, "image", f"{image!r} unpacked in {pool!r} on {where}"))
    found += await _shares(client, name, fingerprint, pool, targets, shared_directories, prepull)
    if len(online) > 1:
        found.append(await _clocks(client, name, online))
    return found


async def _shares(
    client: LxdClient,
    name: str,
    fingerprint: str,
    pool: str,
    targets: list[str | None],
    paths: Iterable[str],
    prepull: str,
) -> list[Result]:
    """The shared read-only copies per member. Missing is a warning for ``/usr`` (every
    image has it) and for a copy some members have; otherwise the image may lack the
    directory (prepull says "not in the image"), and it is only reported."""
    found = []
    for path in paths:
        volume = names.shared_volume_name(fingerprint, path)
        ready, missing = [], []
        for target in targets:
            try:
                config = (await client.get_volume(pool, volume, target=target)).get("config") or {}
            except NotFound:
                config = {}
            (ready if config.get(sharing.KEY_READY) == "true" else missing).append(
                target or "this daemon"
            )
        if not missing:
            found.append(Result(OK, name, "shares", f"shared {path} ready ({volume})"))
        elif path.rstrip("/") == "/usr" or ready:
            found.append(
                Result(
                    WARNING,
                    name,
                    "shares",
                    f"no shared copy of {path} on {_listed(missing)}: the first servers there "
                    "each read their own copy into memory until one is made",
                    prepull,
                )
            )
        else:
            found.append(
                Result(
                    OK,
                    name,
                    "shares",
                    f"no shared copy of {path} (the image may not have it; "
                    "`lxdspawner prepull` says)",
                )
            )
    return found


async def _clocks(client: LxdClient, name: str, members: list[str]) -> Result:
    offsets: dict[str, float] = {}
    for member in members:
        sent = time.time()
        told = await client.server_time(target=member)
        received = time.time()
        if told is not None:
            # Date is truncated to the second: its middle is half a second later.
            offsets[member] = told + 0.5 - (sent + received) / 2
    if len(offsets) < 2:
        return Result(OK, name, "clock", "the members send no Date header: clocks not compared")
    fast = max(offsets, key=offsets.__getitem__)
    slow = min(offsets, key=offsets.__getitem__)
    spread = offsets[fast] - offsets[slow]
    shown = ", ".join(f"{m} {offsets[m]:+.0f} s" for m in sorted(offsets))
    if spread > CLOCK_SKEW:
        return Result(
            WARNING,
            name,
            "clock",
            f"the members' clocks differ by about {spread:.0f} s ({fast} ahead of {slow}; "
            f"against this host: {shown})",
            "run a time service on every member (systemctl enable --now systemd-timesyncd, "
            "or chrony)",
        )
    return Result(OK, name, "clock", f"members' clocks agree within {CLOCK_SKEW:g} s ({shown})")


# -- what belongs to no server -------------------------------------------------------------------


async def check_owners(
    client: LxdClient, name: str, hub_id: str, hub: HubServers | None
) -> list[Result]:
    """With the hub's database: this hub's containers and volumes whose user or server it
    no longer has, each named with the command that deletes it (doctor never does), and
    probes a doctor left. Without it, nothing (see ``check_leftovers``)."""
    found: list[Result] = []
    tool = _tool(client)
    instances = await client.list_instances(recursion=1)
    for instance in instances:
        config = instance.get("config") or {}
        if config.get(KEY_MANAGED) != MANAGED_BY or config.get(KEY_HUB, "") != hub_id:
            continue
        if config.get(probe.KEY_PROBE) == "true":
            found.append(
                Result(
                    WARNING,
                    name,
                    "servers",
                    f"probe container {instance['name']} was left by a doctor run",
                    f"{tool} delete --force {instance['name']}",
                )
            )
            continue
        if hub is None:
            continue
        user, server = config.get(KEY_USER, ""), config.get(KEY_SERVER, "")
        if not hub.has_server(user, server):
            whose = f"{user!r}" + (f", server {server!r}" if server else "")
            found.append(
                Result(
                    WARNING,
                    name,
                    "servers",
                    f"container {instance['name']} ({instance.get('status', '?')}) belongs to "
                    f"no server of this hub (user {whose} is gone)",
                    f"copy what its owner needs, then {tool} delete --force {instance['name']}",
                )
            )
    if hub is None:
        return found
    orphans = []
    for pool in await client.storage_pools():
        for volume in await client.list_volumes(pool):
            config = volume.get("config") or {}
            if "/" in volume.get("name", "") or config.get(KEY_MANAGED) != MANAGED_BY:
                continue  # a snapshot, or not ours
            if config.get(KEY_HUB, "") != hub_id or not config.get(KEY_USER):
                continue  # another hub's, or a shared volume (nobody's)
            user, server = config[KEY_USER], config.get(KEY_SERVER, "")
            if not hub.has_server(user, server):
                orphans.append((pool, volume, user, server))
    for pool, volume, user, server in orphans:
        option = f" --server {server!r}" if server else ""
        found.append(
            Result(
                WARNING,
                name,
                "volumes",
                f"volume {volume['name']} in pool {pool!r} belongs to no server of this hub "
                f"(user {user!r}{', server ' + repr(server) if server else ''} is gone)",
                f"lxdspawner volumes delete {user!r}{option} --yes (after saving its data: "
                "lxdspawner volumes snapshot)",
            )
        )
    if not found:
        found.append(
            Result(OK, name, "servers", "every container and volume of this hub has its server")
        )
    return found


# -- this host ----------------------------------------------------------------------------------


def _btrfs_quotas(client: LxdClient, name: str, pool: str, root: Path) -> list[Result]:
    """Whether btrfs enforces the pool's size limits (see :mod:`lxdspawner.hostcheck`)."""
    socket = client.where.removeprefix("unix socket ").removeprefix("unix://")
    if not socket.startswith("/"):
        return []
    mount = str(Path(socket).parent / "storage-pools" / pool)
    state = hostcheck.btrfs_quota_state(mount, root)
    if state == "inconsistent":
        return [
            Result(
                WARNING,
                name,
                "quotas",
                f"btrfs quota accounting of pool {pool!r} is inconsistent: no size limit "
                "(disk_limit, home_volume_size) is enforced until a rescan ends",
                f"btrfs quota rescan -w {mount}",
            )
        ]
    if state == "consistent":
        return [Result(OK, name, "quotas", f"btrfs quotas of pool {pool!r} are enforced")]
    return []


async def _all_instances(client: LxdClient) -> list[dict]:
    return await client.request(
        "GET", "/1.0/instances", params={"recursion": 1, "all-projects": "true"}
    )


async def check_host(
    client: LxdClient,
    name: str,
    *,
    bridge: str,
    isolated: bool,
    needed: int,
    root: Path = Path("/"),
    pool: str | None = None,
    driver: str = "",
) -> list[Result]:
    """For a daemon on this host: root's subordinate uid and gid ranges, the bridge's veth
    ports that no instance owns, and whether a btrfs ``pool`` enforces its quotas."""
    found: list[Result] = []
    if pool and driver == "btrfs":
        found += _btrfs_quotas(client, name, pool, root)
    instances = await _all_instances(client)
    existing = sum(
        1
        for i in instances
        if (i.get("expanded_config") or i.get("config") or {}).get("security.idmap.isolated")
        == "true"
    )
    for path, text in hostcheck.read_ids(root).items():
        finding = hostcheck.check_ids(
            path, text, isolated=isolated, needed=needed, existing=existing
        )
        severity = OK if finding.ok else WARNING if finding.warning else ERROR
        found.append(Result(severity, name, "ids", finding.what, finding.fix))
    ports = hostcheck.bridge_ports(bridge, root) if bridge else None
    if ports is not None:
        stray = hostcheck.stray_ports(ports, hostcheck.owned_interfaces(instances))
        if stray:
            found.append(
                Result(
                    WARNING,
                    name,
                    "bridge",
                    f"{len(stray)} interface(s) on {bridge} that no container owns (leaked by "
                    f"containers deleted mid-teardown): {_listed(stray)}",
                    "; ".join(f"ip link delete {port}" for port in stray[:5])
                    + (" ..." if len(stray) > 5 else ""),
                )
            )
        else:
            found.append(
                Result(OK, name, "bridge", f"every veth on {bridge} belongs to a container")
            )
    return found


# -- the probe ----------------------------------------------------------------------------------


async def check_probe(
    client: LxdClient,
    name: str,
    hub_url: str,
    *,
    hub_id: str,
    profiles: list[str],
    image: str,
    settings_hint: str,
    bridge: str = "",
) -> Result:
    """A probe container fetches the hub's API at ``hub_url``; what it found, with the fix.
    ``settings_hint`` names the setting that chose ``hub_url``; ``bridge`` is the network of
    the probe's NIC, whose ACLs may explain a refusal."""
    outcome = await probe.probe(client, hub_url, hub_id=hub_id, profiles=profiles, image=image)
    url = probe.api_url(hub_url)
    if outcome.kind == probe.HUB:
        return Result(
            OK, name, "probe", f"a container reached the hub's API at {url}: {outcome.detail}"
        )
    host_reaches = outcome.from_host in (probe.HUB, probe.OTHER)
    if outcome.kind == probe.OTHER:
        return Result(
            ERROR,
            name,
            "probe",
            f"from a container, {url} answers but is not the hub's API: {outcome.detail}",
            f"point {settings_hint} at the hub's own address and port",
        )
    if outcome.kind == probe.NO_ADDRESS:
        return Result(
            ERROR,
            name,
            "probe",
            f"{outcome.detail}: containers get no address, so no server can reach the hub",
            f"check the bridge's DHCP ({_tool(client)} network show <bridge>: ipv4.dhcp) "
            "and the host's firewall for DHCP on the bridge",
        )
    if outcome.kind == probe.FAILED:
        return Result(
            ERROR,
            name,
            "probe",
            outcome.detail,
            "fix the errors above (image, profiles), or skip the probe: --no-probe",
        )
    if host_reaches:
        waiting = await _acl_not_yet(client, bridge, hub_id, url)
        if waiting:
            return Result(
                WARNING,
                name,
                "probe",
                f"the hub answers at {url} from this host but not from a container "
                f"({outcome.detail}): {waiting}",
                "start (or restart) the hub with this configuration: it puts its ACL on the "
                "bridge; then run doctor again",
            )
        return Result(
            ERROR,
            name,
            "probe",
            f"the hub answers at {url} from this host but not from a container "
            f"({outcome.detail}): something between them blocks it",
            f"containers reach this host at the bridge's gateway: set {settings_hint} to it "
            "(not localhost), and let the bridge reach the hub's port through the host's "
            "firewall (e.g. nft/iptables: accept tcp dport <hub port> from the bridge's subnet)",
        )
    return Result(
        ERROR,
        name,
        "probe",
        f"nothing answers at {url}, from a container ({outcome.detail}) nor from this host "
        f"({outcome.from_host}): the hub is not running there",
        f"start the hub, or set {settings_hint} to where it listens; before the hub's first "
        "start, run doctor with --no-probe",
    )


async def _acl_not_yet(client: LxdClient, bridge: str, hub_id: str, url: str) -> str:
    """Why a container is refused the hub's API while the hub itself has not yet opened the
    way, or "" if that is not why.

    On a bridge dedicated to lxdspawner (``network_isolation``) every hub puts its own ACL on
    the bridge when it starts, and the daemon rejects what none of the ACLs allows. So before
    this configuration's hub has started once (or after its address or port changed), the
    probe is refused for a reason the hub's start removes: this hub's ACL is missing, or
    allows another address or port. That is a warning, not an error."""
    if not bridge:
        return ""
    try:
        info = await client.network(bridge)
    except LxdError:
        return ""
    acls = network.acl_list(info)
    if not network.is_dedicated(info) or not acls:
        return ""
    parts = urlsplit(url)
    host, port = parts.hostname or "", str(parts.port or (443 if parts.scheme == "https" else 80))
    if not hardening.is_reachable_host(host):  # a container's own loopback: no ACL's doing
        return ""
    try:
        address = await hardening.address_of(host)
    except network.IsolationError:
        return ""
    own = network.network_acl_name(hub_id, bridge)
    if own not in acls:
        return (
            f"bridge {bridge} is dedicated to lxdspawner and carries network ACLs "
            f"({_listed(acls)}), which reject what they do not allow; this hub's own "
            f"({own}, hub_id {hub_id!r}) is not among them yet"
        )
    try:
        acl = await client.request("GET", f"/1.0/network-acls/{quote(own, safe='')}")
    except LxdError:
        return ""
    for rule in acl.get("egress") or []:
        destinations = str(rule.get("destination", "")).split(",")
        ports = str(rule.get("destination_port", "")).split(",")
        if rule.get("action") == "allow" and address in destinations and port in ports:
            return ""
    return (
        f"this hub's ACL {own} on bridge {bridge} does not allow {address} port "
        f"{port} yet (it was written by the hub's last start, with another address or port)"
    )


def hub_url_for(settings: Settings, gateway: str | None) -> tuple[str, str]:
    """The URL servers will use for the hub (as the spawner picks it) and the setting that
    chose it: see :func:`lxdspawner.doctor.check_hub` for the rules."""
    s = settings
    base = (s.base_url or "/").rstrip("/")
    if s.spawner_hub_connect_url:
        return s.spawner_hub_connect_url, "c.LxdSpawner.hub_connect_url"
    if s.hub_connect_url:
        return s.hub_connect_url, "c.JupyterHub.hub_connect_url"
    port, scheme = s.hub_port, "http"
    if s.hub_bind_url:
        parts = urlsplit(s.hub_bind_url)
        host, port, scheme = parts.hostname or "", parts.port or port, parts.scheme or scheme
        base = parts.path.rstrip("/").removesuffix("/hub") or base
        hint = "c.JupyterHub.hub_bind_url"
    else:
        host = s.hub_ip or ""
        hint = "c.JupyterHub.hub_ip"
    if host in ("", "0.0.0.0", "::") or host.startswith("127.") or host == "localhost":  # noqa: S104
        host = gateway or host
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{base}/hub/", hint
