"""Network isolation of the users' containers: the ACL, the NIC options, what each daemon does.

A container holds a possibly hostile user's server. By default it accepts connections only from
the proxy, on the server's port, and reaches only the hub's API, its bridge's DHCP and DNS, and
(``egress="internet"``) public addresses: no other container, no other port of the host (the
daemon's API, ssh), no cloud metadata (169.254.169.254), no private range.

What the daemons give us, read in their code (Incus 6.0.4, LXD 5.0.2) and measured on both:

- **Incus 6.0** (API extension ``network_bridge_acl_devices``, nftables firewall only) attaches
  ACLs to a bridged NIC (``security.acls``). The rules go into per-NIC chains of the ``bridge``
  nftables family (``nftablesInstanceBridgeFilter`` in
  internal/server/firewall/drivers/drivers_nftables_templates.go): ``in.<nic>`` (container to
  the host itself, or through it: egress rules), ``out.<nic>`` (host to container, the proxy's
  connections: ingress rules, so their source is the host's bridge address) and ``fwd.<nic>``
  (container to container on the same bridge: both). So a NIC ACL, unlike one on the network,
  also filters traffic between containers of one bridge.
- Those chains start with ``ct state established,related accept`` and end with ``reject``: the
  kernel needs nf_conntrack_bridge and nft_reject_bridge. Without them (our test machine's
  kernel lacks CONFIG_NF_CONNTRACK_BRIDGE and CONFIG_NFT_BRIDGE_REJECT) nft fails, the
  container does not start, and nothing in the API tells beforehand: :func:`start_failure`
  turns the daemon's error into an operator's message.
- Rules are ordered by action, not by position (``FirewallACLRules`` in
  internal/server/network/acl/acl_firewall.go): drop, reject, allow, then the default. So a
  reject of 10/8 would beat an allow of the hub at 10.1.2.3: we never reject, we only allow,
  and "any public address" is written as the ranges left once the private ones are taken out
  of 0.0.0.0/0.
- Once a NIC has an ACL, what no rule allows gets the default action, ``reject`` unless
  ``security.acls.default.{in,e}gress.action`` says otherwise; ingress rejects become drops
  (nftables cannot reject there). We set both to ``reject`` explicitly.
- A NIC ACL gets none of the network ACL's baseline rules (DNS, DHCP and ICMP to the host are
  allowed before a *network's* ACL, ``nftablesNetACLSetup``): DHCP and DNS need our own allow
  rules, and DHCP's answers (from the bridge address, UDP port 67) an ingress one.
  ``security.ipv4_filtering`` lets the first DHCP discover through by itself (``ip saddr
  0.0.0.0 ip daddr 255.255.255.255 udp dport 67 accept``), not the renewals.
- ``security.port_isolation`` (``instance_nic_bridged_port_isolation``, both daemons) sets the
  bridge port's ``isolated`` flag: two isolated ports cannot talk, an isolated port and a
  non-isolated one (a container made without it) can, and the host always can (measured).
- ``security.ipv4_filtering`` on a managed bridge needs no static address: the daemon reserves
  the container's DHCP lease at start (``setFilters`` in internal/server/device/nic_bridged.go)
  and drops any other source address. ``security.mac_filtering`` drops other source MACs.
- **LXD 5.0.2** (and LXD to this day) has ACLs for networks (``network_bridge_acl``) and OVN
  NICs, not for a bridged NIC: its nic_bridged.go knows no ``security.acls``. There isolation
  is port isolation plus MAC/IPv4 filtering: containers cannot reach each other, but reach
  every port of the host and whatever it routes to (:meth:`Capabilities.gaps` says so).
- **An ACL on a bridge network** (``network_bridge_acl``: Incus and LXD 5.0; measured with
  nftables) goes into the ``inet`` family, no bridge conntrack needed: egress rules filter what
  the bridge's instances send to the host and through it, ingress rules what the host sends
  them (the proxy's connections, whose source is the bridge's address). Measured on both
  daemons with an empty ACL: a container no longer reaches a host port, the host no longer
  reaches a container's port, and (with br_netfilter's ``bridge-nf-call-iptables``, as here)
  neither does another container; without br_netfilter port isolation still keeps them apart.
  The daemon adds DHCP, DNS and ICMP to the bridge before the rules. It applies to *every*
  instance on the network, so lxdspawner puts one there only on a network the operator gave
  it (``user.jupyterhub.managed-by=lxdspawner`` in the network's config, as our setup script
  does); each hub adds its own ACL to the network's list, and a rule of any of them allows.
  This is the default path: it holds on LXD 5.0 and on kernels without bridge conntrack.
- Both daemons validate ACL names as host names (``ValidName`` in acl_validation.go): 1 to 63
  ASCII letters, digits and hyphens, no hyphen first or last, no digit first (LXD 5.0). The
  guest API socket is removed by ``security.guestapi=false`` on Incus (``restrict_dev_incus``),
  ``security.devlxd=false`` on LXD (``restrict_devlxd``).

A NIC's ACL is named after the hub, the network and a hash of its rules: a change of rules
makes a new ACL, and the running containers keep the one they started with (a daemon refuses
to delete an ACL in use). A network's ACL is named after the hub and the network, and its rules
are updated in place. An ACL is ours only if it carries our keys and our hub's id; one
without them is never modified, whatever its name.

Use: ``caps = supported(client.dialect, firewall=...)`` once per daemon, then per spawn
``await prepare_nic(client, caps, hub_id, isolation, profile_nic)`` gives the NIC device and
the config keys; log ``caps.gaps(egress)``; pass a failed start's message to
:func:`start_failure`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from . import names
from .lxd.dialect import Dialect
from .lxd.errors import LxdError, NotFound
from .ownership import KEY_HUB, KEY_MANAGED, MANAGED_BY

#: The egress settings: only the hub (default), the hub and public addresses, or no ACL at all.
EGRESS_SETTINGS = ("hub-only", "internet", "open")
DEFAULT_EGRESS = "hub-only"

KEY_NETWORK = "user.jupyterhub.network"
KEY_EGRESS = "user.jupyterhub.egress"

#: Never reachable with ``egress="internet"``: private (RFC 1918), shared (CGNAT), link-local
#: (cloud metadata at 169.254.169.254), loopback, "this network", multicast and reserved.
NON_PUBLIC_IPV4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
#: Global unicast IPv6: everything else (ULA fc00::/7, link-local fe80::/10, ...) is private.
PUBLIC_IPV6 = "2000::/3"

SETTING = "c.LxdSpawner.network_isolation"
_OPEN_HINT = f'set {SETTING} = "open" and isolate them yourself (see SECURITY.md)'
_NAME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,53}")
_RULE_FIELDS = (
    "action",
    "source",
    "destination",
    "protocol",
    "source_port",
    "destination_port",
    "icmp_type",
    "icmp_code",
    "description",
    "state",
)


class IsolationError(Exception):
    """Network isolation cannot be set up as configured; the message says what to change."""


class NotIsolable(IsolationError):
    """The instance's NIC is of a kind the daemon cannot filter."""


class AclNotOurs(IsolationError):
    """The ACL name we computed is held by an ACL without our keys (or another hub's)."""

    def __init__(self, message: str, *, name: str):
        super().__init__(message)
        self.name = name


# -- what the ACL must allow -------------------------------------------------------------------


@dataclass(frozen=True)
class Isolation:
    """What a user's container may do on the network.

    ``hub_ip``/``hub_port``: the hub's API, where the server calls the hub. ``proxy_ips``: the
    addresses the proxy connects from (on one host, the bridge's address). ``server_port``: the
    server's port in the container. ``gateway``: the bridge's IPv4 address (DHCP, DNS).
    ``egress``: ``"hub-only"``, ``"internet"`` (also any public address) or ``"open"`` (no ACL).
    ``host_ips``: the hub host's other addresses (its public ones), unreachable also with
    ``"internet"``; the hub, proxy and gateway addresses are excluded already.
    """

    hub_ip: str
    hub_port: int
    proxy_ips: tuple[str, ...]
    server_port: int
    gateway: str
    egress: str = DEFAULT_EGRESS
    host_ips: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.egress not in EGRESS_SETTINGS:
            raise IsolationError(
                f"network isolation: egress {self.egress!r} is not one of "
                + ", ".join(repr(s) for s in EGRESS_SETTINGS)
            )
        for what, port in (("hub_port", self.hub_port), ("server_port", self.server_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise IsolationError(f"network isolation: {what} {port!r} is not a TCP port")
        if isinstance(self.proxy_ips, str) or isinstance(self.host_ips, str):
            raise IsolationError("network isolation: proxy_ips and host_ips are tuples of IPs")
        object.__setattr__(self, "hub_ip", _ip("hub_ip", self.hub_ip))
        object.__setattr__(self, "gateway", _ip("gateway", self.gateway, version=4))
        proxies = _unique(_ip("proxy_ips", a) for a in self.proxy_ips)
        if not proxies:
            raise IsolationError(
                "network isolation: proxy_ips is empty, so nothing could reach the server; "
                "give the addresses the proxy connects from (on one host, the bridge's address)"
            )
        object.__setattr__(self, "proxy_ips", proxies)
        object.__setattr__(self, "host_ips", _unique(_ip("host_ips", a) for a in self.host_ips))


def _ip(what: str, value: str, *, version: int | None = None) -> str:
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise IsolationError(
            f"network isolation: {what} {value!r} is not an IP address (a host name cannot "
            "go into a firewall rule: give the address the containers use)"
        ) from None
    if version and address.version != version:
        raise IsolationError(f"network isolation: {what} {value!r} is not an IPv{version} address")
    return str(address)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# -- the ACL -----------------------------------------------------------------------------------


def _rule(action: str = "allow", *, description: str, **criteria: str) -> dict[str, str]:
    """A rule with every field the daemons answer (empty when unused), so GET compares equal."""
    rule = dict.fromkeys(_RULE_FIELDS, "")
    rule.update(action=action, state="enabled", description=description, **criteria)
    return rule


def public_ranges(isolation: Isolation) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) CIDRs of "any public address": everything but the private and reserved
    ranges and the hub host's own addresses. Written out, since a reject would beat every
    allow (rules are ordered by action) and so could not leave the hub reachable."""
    host = {isolation.hub_ip, isolation.gateway, *isolation.proxy_ips, *isolation.host_ips}
    v4_out = [ipaddress.ip_network(n) for n in NON_PUBLIC_IPV4]
    v6_out = []
    for address in host:
        net = ipaddress.ip_network(address)
        (v4_out if net.version == 4 else v6_out).append(net)
    return (
        _complement(ipaddress.ip_network("0.0.0.0/0"), v4_out),
        _complement(ipaddress.ip_network(PUBLIC_IPV6), v6_out),
    )


def _complement(universe: Any, excluded: list[Any]) -> list[str]:
    remaining = [universe]
    for hole in ipaddress.collapse_addresses(excluded):
        next_remaining = []
        for net in remaining:
            if hole.subnet_of(net):
                next_remaining.extend(net.address_exclude(hole))
            elif not net.subnet_of(hole):
                next_remaining.append(net)
        remaining = next_remaining
    return [str(n) for n in sorted(ipaddress.collapse_addresses(remaining))]


def acl_rules(isolation: Isolation) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(ingress, egress): allow rules only; the NIC's default actions reject the rest."""
    if isolation.egress == "open":
        raise IsolationError('network isolation: egress "open" means no ACL at all')
    gw = isolation.gateway
    ingress = [
        _rule(
            description="the proxy reaches the server",
            protocol="tcp",
            source=",".join(isolation.proxy_ips),
            destination_port=str(isolation.server_port),
        ),
        _rule(
            description="DHCP answers from the bridge",
            protocol="udp",
            source=gw,
            source_port="67",
            destination_port="68",
        ),
    ]
    egress = [
        _rule(
            description="the server reaches the hub's API",
            protocol="tcp",
            destination=isolation.hub_ip,
            destination_port=str(isolation.hub_port),
        ),
        _rule(
            description="DNS of the bridge",
            protocol="udp",
            destination=gw,
            destination_port="53",
        ),
        _rule(
            description="DNS of the bridge (TCP)",
            protocol="tcp",
            destination=gw,
            destination_port="53",
        ),
        _rule(
            description="DHCP of the bridge",
            protocol="udp",
            destination=f"{gw},255.255.255.255",
            destination_port="67",
        ),
    ]
    if isolation.egress == "internet":
        v4, v6 = public_ranges(isolation)
        egress.append(_rule(description="public IPv4 addresses", destination=",".join(v4)))
        egress.append(_rule(description="public IPv6 addresses", destination=",".join(v6)))
    return ingress, egress


def _config(hub_id: str, network: str, isolation: Isolation) -> dict[str, str]:
    config = {KEY_MANAGED: MANAGED_BY, KEY_HUB: hub_id, KEY_EGRESS: isolation.egress}
    if network:
        config[KEY_NETWORK] = network
    return config


def _content(hub_id: str, network: str, isolation: Isolation) -> dict[str, Any]:
    ingress, egress = acl_rules(isolation)
    return {
        "description": f"lxdspawner: what the servers of hub {hub_id} may do on the network "
        f"({isolation.egress})",
        "ingress": ingress,
        "egress": egress,
        "config": _config(hub_id, network, isolation),
    }


def acl_name(hub_id: str, network: str, isolation: Isolation, *, prefix: str = MANAGED_BY) -> str:
    """``<prefix>-<8 hex>``: one ACL per hub, network and rule set, a valid name on both
    daemons. The hash covers the whole ACL, so different rules never share a name."""
    _check_prefix(prefix)
    content = _content(hub_id, network, isolation)
    return names.acl_name(prefix, json.dumps({"network": network, **content}, sort_keys=True))


def _check_prefix(prefix: str) -> None:
    if not _NAME_PREFIX.fullmatch(prefix) or prefix.endswith("-"):
        raise IsolationError(
            f"network isolation: ACL name prefix {prefix!r} must be 1 to 54 ASCII letters, "
            "digits and hyphens, start with a letter and not end with a hyphen"
        )


def acl_body(name: str, isolation: Isolation, *, hub_id: str, network: str = "") -> dict:
    """The body of ``POST /1.0/network-acls``: rules, description and our keys."""
    return {"name": name, **_content(hub_id, network, isolation)}


def is_ours(acl: Mapping, hub_id: str) -> bool:
    """Whether an ACL (as ``GET /1.0/network-acls/<name>`` answers) is this hub's."""
    config = acl.get("config") or {}
    return config.get(KEY_MANAGED) == MANAGED_BY and config.get(KEY_HUB) == hub_id


def _rules_of(rules: Iterable[Mapping] | None) -> list[dict[str, str]]:
    return [{k: str(r.get(k) or "") for k in _RULE_FIELDS} for r in rules or ()]


def same_rules(current: Mapping, wanted: Mapping) -> bool:
    """Whether an existing ACL has the wanted description, rules and our config keys."""
    config = current.get("config") or {}
    return (
        (current.get("description") or "") == wanted["description"]
        and _rules_of(current.get("ingress")) == _rules_of(wanted["ingress"])
        and _rules_of(current.get("egress")) == _rules_of(wanted["egress"])
        and all(config.get(k) == v for k, v in wanted["config"].items())
    )


def _foreign(name: str, acl: Mapping, hub_id: str) -> AclNotOurs:
    config = acl.get("config") or {}
    if config.get(KEY_MANAGED) == MANAGED_BY:
        whose = f"hub {config.get(KEY_HUB, '(none)')!r}'s"
        fix = "give each hub its own id (c.LxdSpawner.hub_id)"
    else:
        whose = f"not lxdspawner's (it lacks {KEY_MANAGED}={MANAGED_BY})"
        fix = "rename or delete that ACL if it is not in use"
    return AclNotOurs(
        f"network isolation: the network ACL {name!r} exists but is {whose}, not hub "
        f"{hub_id!r}'s: lxdspawner never modifies an ACL it did not make; {fix}",
        name=name,
    )


async def ensure_acl(
    client: Any,
    hub_id: str,
    isolation: Isolation,
    *,
    network: str = "",
    prefix: str = MANAGED_BY,
    name: str = "",
) -> str:
    """Create this hub's ACL for ``isolation`` if missing, repair it if ours and changed, and
    return its name; AclNotOurs if the name is held by an ACL that is not this hub's.
    ``name``: the ACL's name (default: :func:`acl_name`, which changes with the rules).

    Spawns in a burst race to create it: whatever a losing create answers (Incus and LXD say
    400 "already exists", or 409/500 when the insert itself collides), the ACL is read again,
    and one that is ours and right is success.
    """
    name = name or acl_name(hub_id, network, isolation, prefix=prefix)
    body = acl_body(name, isolation, hub_id=hub_id, network=network)
    path = f"/1.0/network-acls/{quote(name, safe='')}"
    current = await _get_acl(client, path)
    if current is None:
        try:
            await client.request("POST", "/1.0/network-acls", json_body=body)
            return name
        except LxdError:
            current = await _get_acl(client, path)
            if current is None:
                raise
    if not is_ours(current, hub_id):
        raise _foreign(name, current, hub_id)
    if not same_rules(current, body):
        config = {**(current.get("config") or {}), **body["config"]}
        put = {k: body[k] for k in ("description", "ingress", "egress")}
        await client.request("PUT", path, json_body={**put, "config": config})
    return name


async def _get_acl(client: Any, path: str) -> dict | None:
    try:
        return await client.request("GET", path)
    except NotFound:
        return None


# -- the ACL on a dedicated bridge ----------------------------------------------------------------


def is_dedicated(network: Mapping | None) -> bool:
    """Whether the operator gave this network to lxdspawner (its config has
    ``user.jupyterhub.managed-by=lxdspawner``): then an ACL on the whole network is ours to
    set, since every instance on it is a hub's server."""
    return bool(network) and (network.get("config") or {}).get(KEY_MANAGED) == MANAGED_BY


def network_acl_name(hub_id: str, network: str, *, prefix: str = MANAGED_BY) -> str:
    """``<prefix>-<8 hex>`` of the hub and the network: the one ACL a hub puts on a dedicated
    network. Its rules are updated in place when the hub's settings change (no instance
    names it, so nothing keeps an old one alive)."""
    _check_prefix(prefix)
    return names.acl_name(prefix, "network", hub_id, network)


def acl_list(network: Mapping) -> list[str]:
    """The ACLs on ``network`` (``GET /1.0/networks/<name>``), in their order."""
    value = str((network.get("config") or {}).get("security.acls") or "")
    return [a.strip() for a in value.split(",") if a.strip()]


#: (event loop, daemon, network) -> the lock spawns take to put this hub's ACL on the network.
_network_locks: dict[tuple[int, str, str], asyncio.Lock] = {}

#: Tries of a read-modify-write of a network's ACL list that another writer got in between.
_ETAG_TRIES = 8


#: Incus re-reads a bridge's ports when its config changes and fails if one vanishes meanwhile
#: (``ip -d -j link show vethXXXX``: "does not exist", a container deleted at that moment:
#: measured in ci44). The write did not happen; the next try, a moment later, works.
_VANISHED = "Failed to delete bridge children interfaces"
_VANISHED_PAUSE = 0.3


def _bridge_port_vanished(e: LxdError) -> bool:
    return _VANISHED in e.message and "does not exist" in e.message


async def _edit_network_acls(client: Any, network: str, edit: Any) -> bool:
    """Set ``security.acls`` of ``network`` to ``edit(current list)``, with If-Match so a
    concurrent writer (another hub, a burst of spawns) is not overwritten: on 412 read again,
    and also when a bridge port vanished under the daemon (see :data:`_VANISHED`).
    True if it changed anything."""
    path = f"/1.0/networks/{quote(network, safe='')}"
    for attempt in range(_ETAG_TRIES):
        info, etag = await client.request_with_etag(path)
        current = acl_list(info)
        wanted = edit(current)
        if wanted == current:
            return False
        headers = {"If-Match": etag} if etag else None
        try:
            await client.request(
                "PATCH",
                path,
                json_body={"config": {"security.acls": ",".join(wanted)}},
                headers=headers,
            )
            return True
        except LxdError as e:
            if e.status == 412:
                continue
            if not _bridge_port_vanished(e) or attempt == _ETAG_TRIES - 1:
                raise
            await asyncio.sleep(_VANISHED_PAUSE)
    raise IsolationError(
        f"network isolation: the ACL list of network {network!r} kept changing under us "
        f"({_ETAG_TRIES} tries); try the spawn again"
    )


async def attach_to_network(client: Any, network: str, acl: str) -> bool:
    """Add ``acl`` to the network's ACLs (the operator's and other hubs' stay): from then on
    it applies to every instance on the network, on every cluster member."""
    return await _edit_network_acls(client, network, lambda acls: list(_unique([*acls, acl])))


async def put_on_network(
    client: Any, hub_id: str, isolation: Isolation, network: str, *, prefix: str = MANAGED_BY
) -> str:
    """Make this hub's ACL on the dedicated ``network`` say ``isolation``, and attach it;
    its name. IsolationError (naming the network and the way out) if the daemon refuses."""
    name = network_acl_name(hub_id, network, prefix=prefix)
    # One spawn of a burst writes; the others then find it done. A write makes the daemon
    # reload the network's firewall, which a server starting meanwhile could see half-done.
    key = (id(asyncio.get_running_loop()), getattr(client, "where", ""), network)
    lock = _network_locks.setdefault(key, asyncio.Lock())
    try:
        async with lock:
            await ensure_acl(client, hub_id, isolation, network=network, prefix=prefix, name=name)
            await attach_to_network(client, network, name)
    except LxdError as e:
        raise IsolationError(
            f"network isolation: could not put this hub's ACL {name!r} on network {network!r}, "
            f"which is dedicated to lxdspawner: {e.message}; let the hub's client manage "
            f'network ACLs and that network, or set {SETTING} = "ports"'
        ) from e
    return name


def other_acls(network: Mapping, hub_id: str, *, prefix: str = MANAGED_BY) -> list[str]:
    """The ACLs on ``network`` (``GET /1.0/networks/<name>``) that are not this hub's."""
    own = network_acl_name(hub_id, str(network.get("name", "")), prefix=prefix)
    return [a for a in acl_list(network) if a != own]


async def release_network(
    client: Any, hub_id: str, network: str, *, prefix: str = MANAGED_BY
) -> bool:
    """Take this hub's ACL off ``network`` and delete it (when the hub's setting no longer
    wants one there); an ACL of the same name that is not ours is left alone. True if the
    network had it."""
    name = network_acl_name(hub_id, network, prefix=prefix)
    path = f"/1.0/network-acls/{quote(name, safe='')}"
    current = await _get_acl(client, path)
    if current is None or not is_ours(current, hub_id):
        return False
    detached = await _edit_network_acls(
        client, network, lambda acls: [a for a in acls if a != name]
    )
    try:
        await client.request("DELETE", path)
    except NotFound:
        pass
    return detached


async def forget_hub(client: Any, hub_id: str | None = None) -> list[str]:
    """Take the ACLs of hub ``hub_id`` (None: of every lxdspawner hub) off every network and
    delete them: for a hub gone for good (``lxdspawner`` tests, a renamed hub). Only ACLs
    carrying our keys. Returns their names."""
    acls = await client.request("GET", "/1.0/network-acls", params={"recursion": "1"}) or []
    ours = {
        a["name"]
        for a in acls
        if (a.get("config") or {}).get(KEY_MANAGED) == MANAGED_BY
        and (hub_id is None or is_ours(a, hub_id))
    }
    if not ours:
        return []
    networks = await client.request("GET", "/1.0/networks", params={"recursion": "1"}) or []
    for info in networks:
        if ours & set(acl_list(info)):
            await _edit_network_acls(
                client, info["name"], lambda current: [a for a in current if a not in ours]
            )
    for name in sorted(ours):
        try:
            await client.request("DELETE", f"/1.0/network-acls/{quote(name, safe='')}")
        except NotFound:
            pass
        except LxdError:
            pass  # still on an instance's NIC: it goes with the instance's ACL list
    return sorted(ours)


# -- what the daemon can do ----------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a daemon can enforce on a container's bridged NIC, from its API extensions.

    ``acls``: network ACL objects exist. ``nic_acls``: an ACL can be attached to a bridged NIC
    (Incus' ``network_bridge_acl_devices``, with the nftables firewall); ``no_nic_acls`` says
    why not. ``port_isolation``: ``security.port_isolation``. ``guest_api_key``: the instance
    key that removes the guest API socket ("" if the daemon has none). ``network_acls``: an
    ACL can be attached to a bridge network (``network_bridge_acl``; both daemons), which we
    do on a network dedicated to lxdspawner (:func:`is_dedicated`).

    The API cannot tell whether the host's kernel can run a NIC's ACL (it needs bridge
    connection tracking): a start that fails for that is explained by :func:`start_failure`.
    """

    product: str
    acls: bool
    nic_acls: bool
    port_isolation: bool
    guest_api_key: str
    firewall: str = ""
    no_nic_acls: str = ""
    network_acls: bool = False

    @property
    def daemon(self) -> str:
        return "Incus" if self.product == "incus" else "LXD"

    @property
    def cli(self) -> str:
        return "incus" if self.product == "incus" else "lxc"

    def without_nic_acls(self, why: str) -> Capabilities:
        """These capabilities, less NIC ACLs (say, the kernel cannot run them), and why."""
        return replace(self, nic_acls=False, no_nic_acls=why)

    def gaps(self, egress: str = DEFAULT_EGRESS, *, network: str = "") -> tuple[str, ...]:
        """What this daemon does not enforce for ``egress``, one sentence each, for the log.
        ``network``: the dedicated network the ACL is on, if it is on one."""
        if egress == "open":
            return (
                'network isolation is off (egress "open"): containers reach, and are reached '
                "by, whatever their bridge and the host let through",
            )
        gaps = []
        if not self.nic_acls and not (network and self.network_acls):
            dedicate = (
                f"; dedicate the bridge to the hub ({self.cli} network set <bridge> "
                f"{KEY_MANAGED}={MANAGED_BY}) and lxdspawner puts the ACL on the whole network"
                if self.network_acls
                else ""
            )
            gaps.append(
                f"no ACL on the containers' NICs ({self.no_nic_acls}): a container reaches "
                "every port of the host on its bridge (the daemon's API if it listens there, "
                "ssh, ...) and whatever the host routes to (other networks, 169.254.169.254, "
                "the internet if the bridge has NAT), and any container on the bridge made "
                "without port isolation reaches its server's port" + dedicate
            )
        if not self.port_isolation:
            gaps.append(
                f"{self.daemon} has no security.port_isolation: containers on one bridge reach "
                "each other" + (" where their ACL allows it" if self.nic_acls else "")
            )
        if not self.guest_api_key:
            gaps.append(f"{self.daemon} cannot remove the guest API socket from a container")
        return tuple(gaps)


def supported(dialect: Dialect, *, firewall: str = "") -> Capabilities:
    """What the daemon behind ``dialect`` can do. ``firewall`` is ``GET /1.0``'s
    ``environment.firewall`` when known: NIC ACLs need ``nftables``."""
    incus = dialect.product == "incus"
    daemon = "Incus" if incus else "LXD"
    if dialect.has("restrict_dev_incus"):
        guest = "security.guestapi"
    elif dialect.has("restrict_devlxd"):
        guest = "security.devlxd"
    else:
        guest = ""
    why = ""
    if not dialect.has("network_bridge_acl_devices"):
        why = (
            f"{daemon} {dialect.server_version}".rstrip()
            + " has no security.acls on bridged NICs (API extension network_bridge_acl_devices)"
        )
    elif firewall not in ("", "nftables"):
        why = f"{daemon} applies ACLs to bridged NICs with nftables only; it uses {firewall}"
    return Capabilities(
        product="incus" if incus else "lxd",
        acls=dialect.has("network_acl"),
        nic_acls=not why,
        port_isolation=dialect.has("instance_nic_bridged_port_isolation"),
        guest_api_key=guest,
        firewall=firewall,
        no_nic_acls=why,
        network_acls=dialect.has("network_bridge_acl"),
    )


_BRIDGE_CONNTRACK = "Protocol error"  # nft: "ct" in the bridge family without nf_conntrack_bridge
_BRIDGE_REJECT = "No such file or directory"  # nft: "reject" there without nft_reject_bridge


def start_failure(message: str, *, product: str = "incus") -> IsolationError | None:
    """The error to show for a failed start of an instance with an isolated NIC, when the
    daemon's ``message`` says why isolation could not be set up; None for other failures.

    Incus writes a NIC's ACL into ``bridge`` nftables chains whose first rule is ``ct state
    established,related accept`` and whose default is ``reject``: a kernel without
    nf_conntrack_bridge (CONFIG_NF_CONNTRACK_BRIDGE) makes nft fail with "Protocol error",
    one without nft_reject_bridge (CONFIG_NFT_BRIDGE_REJECT) with "No such file or directory",
    and the container does not start.
    """
    daemon = "Incus" if product == "incus" else "LXD"
    device = re.search(r'Failed to start device "([^"]+)"', message)
    nic = device.group(1) if device else "the NIC"
    if "bridge filter rules" in message and (
        _BRIDGE_CONNTRACK in message or _BRIDGE_REJECT in message
    ):
        missing = []
        if _BRIDGE_CONNTRACK in message:
            missing.append(("nf_conntrack_bridge", "CONFIG_NF_CONNTRACK_BRIDGE"))
        if _BRIDGE_REJECT in message:
            missing.append(("nft_reject_bridge", "CONFIG_NFT_BRIDGE_REJECT"))
        modules = " ".join(m for m, _ in missing)
        them = "them" if len(missing) > 1 else "it"
        options = " and ".join(o for _, o in missing)
        return IsolationError(
            f"network isolation: {daemon} could not apply the network ACL to {nic}: this "
            f"host's kernel lacks {', '.join(m for m, _ in missing)} (nftables on bridges), "
            f"which an ACL on a bridged NIC needs; load {them} (modprobe {modules}) or boot a "
            f"kernel built with {options}, or {_OPEN_HINT}"
        )
    if "Security ACLs are only supported when using nftables firewall" in message:
        return IsolationError(
            f"network isolation: {daemon} applies ACLs to a bridged NIC only with its nftables "
            f"firewall driver, and this one uses xtables (iptables); switch the host to "
            f"nftables, or {_OPEN_HINT}"
        )
    return None


def guest_api_config(caps: Capabilities) -> dict[str, str]:
    """Instance config that removes the guest API socket (/dev/incus, /dev/lxd)."""
    return {caps.guest_api_key: "false"} if caps.guest_api_key else {}


# -- the NIC -------------------------------------------------------------------------------------


def nic_network(nic: Mapping) -> str:
    """The network (or host interface) a NIC device is on: ``network``, else ``parent``."""
    return str(nic.get("network") or nic.get("parent") or "")


def nic_kind(nic: Mapping, network: Mapping | None) -> str:
    """``bridged``, ``macvlan``, ``ovn``, ... : the NIC's type, from its ``nictype`` or (for a
    ``network=`` NIC) the network's type. ``network`` is ``GET /1.0/networks/<name>``."""
    if nic.get("nictype"):
        return str(nic["nictype"])
    kind = str((network or {}).get("type") or "")
    return {"bridge": "bridged", "": "unknown"}.get(kind, kind)


def check_nic(
    nic: Mapping | None,
    network: Mapping | None,
    caps: Capabilities,
    *,
    device: str = "eth0",
) -> None:
    """Raise NotIsolable unless ``nic`` is a NIC the daemon can isolate: bridged, on a bridge
    the daemon manages. ``network`` is ``GET /1.0/networks/<nic_network(nic)>`` (None if the
    daemon does not know it)."""
    on = nic_network(nic or {})
    if not nic or nic.get("type") != "nic":
        raise NotIsolable(
            f"network isolation: the instance has no NIC {device} (its profiles give none), so "
            "the proxy could not reach its server; add one on a managed bridge to the profile"
        )
    kind = nic_kind(nic, network)
    managed = bool(network and network.get("managed"))
    if kind == "bridged" and managed and (network or {}).get("type") == "bridge":
        return
    if kind == "bridged":
        raise NotIsolable(
            f"network isolation: {device} is a bridged NIC on {on}, a bridge {caps.daemon} does "
            f"not manage, so it cannot filter it; give the containers a managed bridge "
            f"({caps.product if caps.product == 'incus' else 'lxc'} network create), or "
            + _OPEN_HINT
        )
    if kind == "ovn":
        raise NotIsolable(
            f"network isolation: {device} is an ovn NIC on {on}: lxdspawner isolates "
            f"containers on bridge networks only; give the containers a managed bridge, or "
            + _OPEN_HINT
        )
    if kind == "unknown":
        raise NotIsolable(
            f"network isolation: {device} is on {on or '(no network)'}, which {caps.daemon} "
            f"does not know as a network; give the containers a managed bridge, or " + _OPEN_HINT
        )
    article = "an" if kind[:1] in "aeiou" else "a"
    raise NotIsolable(
        f"network isolation: {device} is {article} {kind} NIC on {on or '(no parent)'}, which "
        f"{caps.daemon} cannot filter; give the containers a managed bridge, or " + _OPEN_HINT
    )


def gateway_of(network: Mapping) -> str:
    """A managed bridge's IPv4 address (from ``ipv4.address``, ``10.1.2.1/24``): the
    containers' gateway, DHCP and DNS server."""
    value = str((network.get("config") or {}).get("ipv4.address") or "")
    try:
        return str(ipaddress.ip_interface(value).ip)
    except ValueError:
        raise IsolationError(
            f"network isolation: network {network.get('name', '')!r} has no IPv4 address "
            f"(ipv4.address={value!r}), so containers on it get no DHCP from it"
        ) from None


def nic_device(
    base_nic: Mapping,
    acl: str | None,
    *,
    port_isolation: bool,
    ipv6_filtering: bool = False,
) -> dict[str, str]:
    """The instance's NIC: the profile's ``base_nic`` with our ACL (None where the daemon
    cannot attach one), default actions ``reject``, port isolation (where supported), and MAC
    and IPv4 filtering (with DHCP: the daemon reserves the lease, no static address needed).

    ``ipv6_filtering`` also drops IPv6 from any address but the container's (all of it on a
    bridge without IPv6); the daemons refuse to start such a NIC unless the host has
    ``br_netfilter`` loaded, so it is off by default. With an ACL, the default reject drops
    IPv6 anyway unless ``egress="internet"`` allows public IPv6 addresses.
    An ACL the operator put on ``base_nic`` is kept next to ours (a rule of either allows).
    """
    nic = {k: str(v) for k, v in base_nic.items()}
    if acl:
        theirs = [a.strip() for a in nic.get("security.acls", "").split(",") if a.strip()]
        nic["security.acls"] = ",".join(_unique([*theirs, acl]))
        nic["security.acls.default.ingress.action"] = "reject"
        nic["security.acls.default.egress.action"] = "reject"
    if port_isolation:
        nic["security.port_isolation"] = "true"
    nic["security.mac_filtering"] = "true"
    nic["security.ipv4_filtering"] = "true"
    if ipv6_filtering:
        nic["security.ipv6_filtering"] = "true"
    return nic


@dataclass(frozen=True)
class IsolatedNic:
    """What :func:`prepare_nic` decided: the NIC device, instance config keys, the ACL (if
    attached: to the NIC, or to the dedicated network ``on_network``) and what the daemon
    leaves open (for the log)."""

    device: dict[str, str]
    config: dict[str, str]
    acl: str | None
    gaps: tuple[str, ...]
    on_network: str = ""


async def prepare_nic(
    client: Any,
    caps: Capabilities,
    hub_id: str,
    isolation: Isolation,
    base_nic: Mapping | None,
    *,
    device: str = "eth0",
    prefix: str = MANAGED_BY,
    ipv6_filtering: bool = False,
) -> IsolatedNic:
    """Check the NIC, make sure the ACL exists, and build the isolated NIC and config.

    On a network dedicated to lxdspawner (:func:`is_dedicated`) the hub's ACL goes on the
    network, where both daemons apply it to every instance on it (both directions, also
    between two instances of the bridge) on every member; the NIC gets port isolation and
    MAC/IPv4 filtering. Elsewhere the ACL goes on the NIC where the daemon can (Incus), and
    is left out where it cannot (LXD: the gaps say what that leaves open).
    With ``egress="open"`` the NIC is the profile's, unchanged, and only the guest API goes.
    """
    config = guest_api_config(caps)
    if isolation.egress == "open":
        return IsolatedNic(dict(base_nic or {}), config, None, caps.gaps("open"))
    on = nic_network(base_nic or {})
    network = None
    if on:
        try:
            network = await client.network(on)
        except NotFound:
            network = None
    check_nic(base_nic, network, caps, device=device)
    assert base_nic is not None  # check_nic raised otherwise
    if caps.network_acls and is_dedicated(network):
        name = await put_on_network(client, hub_id, isolation, on, prefix=prefix)
        nic = nic_device(
            base_nic, None, port_isolation=caps.port_isolation, ipv6_filtering=ipv6_filtering
        )
        return IsolatedNic(nic, config, name, caps.gaps(isolation.egress, network=on), on)
    acl = None
    if caps.nic_acls:
        acl = await ensure_acl(client, hub_id, isolation, network=on, prefix=prefix)
    nic = nic_device(
        base_nic, acl, port_isolation=caps.port_isolation, ipv6_filtering=ipv6_filtering
    )
    return IsolatedNic(nic, config, acl, caps.gaps(isolation.egress))


__all__ = [
    "EGRESS_SETTINGS",
    "AclNotOurs",
    "Capabilities",
    "IsolatedNic",
    "Isolation",
    "IsolationError",
    "NotIsolable",
    "acl_body",
    "acl_name",
    "acl_rules",
    "attach_to_network",
    "check_nic",
    "ensure_acl",
    "forget_hub",
    "gateway_of",
    "guest_api_config",
    "is_dedicated",
    "is_ours",
    "nic_device",
    "nic_kind",
    "network_acl_name",
    "nic_network",
    "prepare_nic",
    "other_acls",
    "public_ranges",
    "put_on_network",
    "release_network",
    "same_rules",
    "start_failure",
    "supported",
]
