"""What makes a container hold a hostile user (see SECURITY.md), read once a minute per daemon:
its own uid range, no guest API, the root disk's size, the NIC's isolation, and where the
container reaches the hub.

The settings come from the spawner as a :class:`Settings` value; what they give depends on
the profiles and their network on the daemon, so it is read from there (and kept for
:data:`TTL` seconds per daemon and settings, in :attr:`Daemon.hardenings`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit, urlunsplit

from . import network, objects
from .daemon import Daemon, DaemonError
from .lxd import LxdClient, LxdError, NotFound

log = logging.getLogger("lxdspawner.hardening")

#: Seconds the profiles and networks read for a hardening are taken as current.
TTL = 60.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """The spawner's settings a hardening depends on (hashable: the cache's key)."""

    hub_id: str
    profiles: tuple[str, ...]
    disk_limit: str
    network_isolation: str
    isolated_idmap: bool
    guest_api: bool
    hub_url: str
    hub_port: int
    server_port: int


async def harden(
    daemon: Daemon, settings: Settings, spec: objects.ServerSpec
) -> objects.ServerSpec:
    """``spec`` with the hardening config and system devices of ``settings`` on ``daemon``."""
    cached = daemon.hardenings.get(settings)
    if cached is None or time.monotonic() - cached[0] > TTL:
        config, devices = await _read(daemon, settings)
        cached = daemon.hardenings[settings] = (time.monotonic(), config, devices)
    return dataclasses.replace(spec, hardening=cached[1], system_devices=cached[2])


async def _read(daemon: Daemon, settings: Settings) -> tuple[dict, dict]:
    client = await daemon.client()
    assert client.dialect is not None
    caps = network.supported(client.dialect)
    config: dict[str, str] = {}
    devices: dict[str, dict[str, str]] = {}
    if not settings.guest_api:
        config.update(network.guest_api_config(caps))
    if settings.isolated_idmap:
        config["security.idmap.isolated"] = "true"
    profile_devices: dict[str, dict[str, str]] = {}
    for name in settings.profiles:
        try:
            profile = await client.profile(name)
        except NotFound as e:
            raise DaemonError(
                f"the profile {name!r} (c.LxdSpawner.profiles) does not exist on {client.where}"
            ) from e
        profile_devices.update(profile.get("devices") or {})
    if settings.disk_limit:
        try:
            root, device = objects.root_disk(profile_devices)
        except ValueError as e:
            raise DaemonError(f"disk_limit = {settings.disk_limit!r}: {e}") from e
        devices[root] = {**device, "size": settings.disk_limit}
    nic = await _isolated_nic(client, caps, settings, profile_devices.get("eth0"))
    if settings.network_isolation != "open":
        devices["eth0"] = nic
    return config, devices


async def _unfiltered_on_dedicated(client: LxdClient, settings: Settings, info: dict) -> None:
    """``"ports"`` or ``"open"`` on a bridge dedicated to lxdspawner: this hub's ACL (from an
    earlier setting) comes off. But while other hubs' ACLs are on the bridge, it is filtered
    whatever this hub says, and a connection no ACL allows is rejected: then this hub's ACL
    stays, allowing what its servers need (the hub's API, DHCP, DNS, the proxy), and the
    log says so."""
    mode, on = settings.network_isolation, str(info.get("name", ""))
    others = network.other_acls(info, settings.hub_id)
    try:
        if not others:
            if await network.release_network(client, settings.hub_id, on):
                log.info(
                    "network_isolation = %r: took this hub's ACL off network %s on %s",
                    mode,
                    on,
                    client.where,
                )
            return
        log.warning(
            "network_isolation = %r: network %s on %s carries other hubs' ACLs (%s), so it is "
            "filtered whatever this hub's setting; this hub's servers keep their hub's API, "
            "DHCP, DNS and the proxy allowed. Give this hub a bridge of its own for %r",
            mode,
            on,
            client.where,
            ", ".join(others),
            mode,
        )
        isolation = await _isolation(settings, info, "hub-only")
        await network.put_on_network(client, settings.hub_id, isolation, on)
    except (LxdError, network.IsolationError) as e:
        log.warning(
            "network_isolation = %r: could not update this hub's ACL on network %s on %s: %s",
            mode,
            on,
            client.where,
            getattr(e, "message", e),
        )


async def _isolation(settings: Settings, info: dict, egress: str) -> network.Isolation:
    """What this hub's servers may do on the network ``info``, as an ACL says it."""
    gateway = network.gateway_of(info)
    host = urlsplit(settings.hub_url).hostname or ""
    hub_ip = await address_of(host) if is_reachable_host(host) else gateway
    return network.Isolation(
        hub_ip=hub_ip,
        hub_port=settings.hub_port,
        # The proxy on this host connects from the bridge's address; a hub host
        # elsewhere (routed to the bridge) from the address the servers reach it at.
        proxy_ips=(gateway, hub_ip),
        server_port=settings.server_port,
        gateway=gateway,
        egress=egress,
    )


async def _isolated_nic(
    client: LxdClient, caps: network.Capabilities, settings: Settings, nic: dict | None
) -> dict[str, str]:
    mode = settings.network_isolation
    on = network.nic_network(nic or {})
    try:
        info = await client.network(on) if on else None
    except NotFound:
        info = None
    if mode in ("ports", "open") and network.is_dedicated(info):
        assert info is not None
        await _unfiltered_on_dedicated(client, settings, info)
    if mode == "open":
        return dict(nic or {})
    try:
        network.check_nic(nic, info, caps)
        assert nic is not None and info is not None
        if mode == "ports":
            return network.nic_device(nic, None, port_isolation=caps.port_isolation)
        isolation = await _isolation(settings, info, mode)
        prepared = await network.prepare_nic(client, caps, settings.hub_id, isolation, nic)
    except network.IsolationError as e:
        raise DaemonError(str(e)) from e
    for gap in prepared.gaps:
        log.warning("network isolation on %s: %s", client.where, gap)
    return prepared.device


# -- where the container reaches the hub ----------------------------------------------------------


async def address_of(host: str) -> str:
    """The IP address a firewall rule can name for the hub's host (a name is resolved
    here, on the hub host, IPv4 first)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise network.IsolationError(
            f"network isolation: the hub's address {host!r} (hub_connect_url) does not "
            f"resolve here ({e}), so no rule can let the servers reach it; give an IP "
            f'address there, or set c.LxdSpawner.network_isolation = "ports"'
        ) from e
    addresses = sorted({a[4][0] for a in found}, key=lambda a: (":" in a, a))
    return addresses[0]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_reachable_host(host: str) -> bool:
    """False for what JupyterHub puts there when the hub binds loopback or a wildcard:
    a loopback address, or this machine's own host name (rarely resolvable in a
    container). Any other name or address was chosen by the operator: keep it."""
    if host in (socket.gethostname(), socket.getfqdn()):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host != "localhost"
    return not (address.is_loopback or address.is_unspecified)


async def hub_api_url(
    daemon: Daemon, api_url: str, port: int, bind_ip: str, instance: dict
) -> str | None:
    """Where the container reaches the hub's API, when JupyterHub's own ``api_url`` won't
    do (None: it will). A loopback or wildcard address is replaced by the gateway of the
    container's bridge: this host as the container sees it."""
    parts = urlsplit(api_url)
    if is_reachable_host(parts.hostname or ""):
        return None
    if bind_ip and bind_ip not in ("0.0.0.0", "::") and is_loopback(bind_ip):  # noqa: S104
        raise DaemonError(
            f"the hub listens on {bind_ip}, which containers cannot reach: set "
            "c.JupyterHub.hub_bind_url to the address of the containers' bridge (e.g. "
            "'http://10.117.40.1:8081') or 0.0.0.0, or set c.LxdSpawner.hub_connect_url"
        )
    nic = (instance.get("expanded_devices") or {}).get("eth0") or {}
    on = nic.get("network") or nic.get("parent") or ""
    if not on:
        raise DaemonError(
            f"container {instance.get('name')} has no eth0 on a managed bridge, so the "
            "hub's address cannot be worked out: set c.LxdSpawner.hub_connect_url"
        )
    gateway = await daemon.gateway(on)
    return urlunsplit(parts._replace(netloc=f"{gateway}:{parts.port or port}"))


__all__ = ["TTL", "Settings", "address_of", "harden", "hub_api_url", "is_reachable_host"]
