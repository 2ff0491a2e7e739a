"""Network isolation's pure parts: the ACL's name and rules, the NIC, what each daemon can do,
and ensure_acl's decisions against a fake daemon."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lxdspawner import hardening, network
from lxdspawner.lxd.dialect import Dialect
from lxdspawner.lxd.errors import LxdError, NotFound, error_for_status
from lxdspawner.network import (
    AclNotOurs,
    Isolation,
    IsolationError,
    NotIsolable,
    acl_body,
    acl_name,
    acl_rules,
    attach_to_network,
    check_nic,
    ensure_acl,
    forget_hub,
    gateway_of,
    guest_api_config,
    is_dedicated,
    is_ours,
    network_acl_name,
    nic_device,
    nic_kind,
    prepare_nic,
    release_network,
    same_rules,
    start_failure,
    supported,
)
from lxdspawner.ownership import KEY_HUB, KEY_MANAGED, MANAGED_BY

GW = "10.117.40.1"
HUB = "10.117.40.1"


def isolation(**changes) -> Isolation:
    values = dict(hub_ip=HUB, hub_port=8081, proxy_ips=(GW,), server_port=8888, gateway=GW)
    values.update(changes)
    return Isolation(**values)


# The daemons' ValidName (acl_validation.go) with validate.IsHostname, in Incus 6.0 and LXD 5.0.
def valid_acl_name(name: str) -> bool:
    return (
        1 <= len(name) <= 63
        and re.fullmatch(r"[A-Za-z0-9-]+", name) is not None
        and not name.startswith("-")
        and not name.endswith("-")
        and not name[0].isdigit()  # LXD 5.0: no digit first; Incus: not all digits
        and not name.startswith(("@", "%", "#"))
    )


# -- a model of how the daemons evaluate our ACL on a NIC ---------------------------------------


def _matches_subject(field: str, address: str) -> bool:
    if not field:
        return True
    ip = ipaddress.ip_address(address)
    for subject in field.split(","):
        net = ipaddress.ip_network(subject, strict=False)
        if net.version == ip.version and ip in net:
            return True
    return False


def _matches_port(field: str, port: int | None) -> bool:
    if not field:
        return True
    for part in field.split(","):
        low, _, high = part.partition("-")
        if port is not None and int(low) <= port <= int(high or low):
            return True
    return False


def verdict(rules, *, src, dst, protocol="tcp", sport=40000, dport=None) -> str:
    """What a NIC with these rules and default actions "reject" does with one packet: drop
    and reject rules first, then allow, then the default (FirewallACLRules' order)."""
    for wanted in ("drop", "reject", "allow"):
        for rule in rules:
            if rule["action"] != wanted or rule["state"] != "enabled":
                continue
            if rule["protocol"] and rule["protocol"] != protocol:
                continue
            if not _matches_subject(rule["source"], src):
                continue
            if not _matches_subject(rule["destination"], dst):
                continue
            if rule["protocol"] in ("tcp", "udp"):
                if not _matches_port(rule["source_port"], sport):
                    continue
                if not _matches_port(rule["destination_port"], dport):
                    continue
            return wanted
    return "reject"


def egress_allows(iso: Isolation, dst: str, dport: int = 443, protocol: str = "tcp") -> bool:
    _, egress = acl_rules(iso)
    return verdict(egress, src="10.117.40.50", dst=dst, protocol=protocol, dport=dport) == "allow"


def ingress_allows(iso: Isolation, src: str, dport: int, protocol: str = "tcp", sport=40000):
    ingress, _ = acl_rules(iso)
    return (
        verdict(ingress, src=src, dst="10.117.40.50", protocol=protocol, sport=sport, dport=dport)
        == "allow"
    )


# -- Isolation ---------------------------------------------------------------------------------


def test_isolation_normalises_addresses():
    iso = isolation(proxy_ips=(GW, " 10.117.40.1", "2001:DB8:0::1"), host_ips=("2001:db8::2",))
    assert iso.proxy_ips == (GW, "2001:db8::1")
    assert iso.host_ips == ("2001:db8::2",)
    assert iso.egress == "hub-only"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"egress": "everything"}, "egress 'everything' is not one of 'hub-only', 'internet'"),
        ({"hub_port": 0}, "hub_port 0 is not a TCP port"),
        ({"server_port": 70000}, "server_port 70000 is not a TCP port"),
        ({"server_port": True}, "server_port True is not a TCP port"),
        ({"hub_ip": "hub.example.org"}, "hub_ip 'hub.example.org' is not an IP address"),
        ({"gateway": "fd00::1"}, "gateway 'fd00::1' is not an IPv4 address"),
        ({"proxy_ips": ()}, "proxy_ips is empty, so nothing could reach the server"),
        ({"proxy_ips": GW}, "proxy_ips and host_ips are tuples of IPs"),
    ],
)
def test_isolation_refuses_what_no_rule_could_say(changes, message):
    with pytest.raises(IsolationError, match=re.escape(message)):
        isolation(**changes)


# -- the ACL's name ----------------------------------------------------------------------------


def test_acl_name_is_valid_on_both_daemons_and_stable():
    name = acl_name("hub-1", "lxdspbr0", isolation())
    assert re.fullmatch(r"lxdspawner-[0-9a-f]{8}", name)
    assert valid_acl_name(name)
    assert acl_name("hub-1", "lxdspbr0", isolation()) == name
    longest = acl_name("h", "n", isolation(), prefix="a" * 54)
    assert len(longest) == 63 and valid_acl_name(longest)


@pytest.mark.parametrize(
    "hub, network, changes",
    [
        ("hub-2", "lxdspbr0", {}),
        ("hub-1", "lxdspbr1", {}),
        ("hub-1", "lxdspbr0", {"hub_port": 8082}),
        ("hub-1", "lxdspbr0", {"server_port": 8889}),
        ("hub-1", "lxdspbr0", {"proxy_ips": (GW, "10.117.40.9")}),
        ("hub-1", "lxdspbr0", {"egress": "internet"}),
        ("hub-1", "lxdspbr0", {"egress": "internet", "host_ips": ("203.0.113.7",)}),
    ],
)
def test_acl_name_changes_with_hub_network_and_rules(hub, network, changes):
    assert acl_name(hub, network, isolation(**changes)) != acl_name(
        "hub-1", "lxdspbr0", isolation()
    )


@given(hub=st.text(min_size=1, max_size=200), network=st.text(max_size=20))
def test_any_hub_id_gives_a_valid_name(hub, network):
    assert valid_acl_name(acl_name(hub, network, isolation()))


@pytest.mark.parametrize("prefix", ["", "1abc", "-abc", "abc-", "a_b", "a" * 55, "été"])
def test_acl_name_refuses_a_prefix_the_daemons_would(prefix):
    with pytest.raises(IsolationError, match="ACL name prefix"):
        acl_name("hub", "net", isolation(), prefix=prefix)


# -- the ACL's body and rules ------------------------------------------------------------------


def test_body_carries_our_keys_and_only_allow_rules():
    body = acl_body("lxdspawner-0badcafe", isolation(), hub_id="hub-1", network="lxdspbr0")
    assert body["name"] == "lxdspawner-0badcafe"
    assert body["config"] == {
        KEY_MANAGED: MANAGED_BY,
        KEY_HUB: "hub-1",
        "user.jupyterhub.egress": "hub-only",
        "user.jupyterhub.network": "lxdspbr0",
    }
    assert "hub-1" in body["description"]
    assert is_ours(body, "hub-1") and not is_ours(body, "hub-2")
    for rule in body["ingress"] + body["egress"]:
        # A reject would be ordered before every allow: we leave the rest to the default.
        assert rule["action"] == "allow" and rule["state"] == "enabled"
        assert rule["description"]


def test_hub_only_rules_are_exactly_the_listed_ones():
    ingress, egress = acl_rules(isolation(proxy_ips=(GW, "10.0.0.5")))
    slim = [
        {k: v for k, v in r.items() if v and k not in ("action", "state", "description")}
        for r in ingress + egress
    ]
    assert slim == [
        {"protocol": "tcp", "source": f"{GW},10.0.0.5", "destination_port": "8888"},
        {"protocol": "udp", "source": GW, "source_port": "67", "destination_port": "68"},
        {"protocol": "tcp", "destination": HUB, "destination_port": "8081"},
        {"protocol": "udp", "destination": GW, "destination_port": "53"},
        {"protocol": "tcp", "destination": GW, "destination_port": "53"},
        {"protocol": "udp", "destination": f"{GW},255.255.255.255", "destination_port": "67"},
    ]


def test_hub_only_egress_reaches_the_hub_dhcp_and_dns_and_nothing_else():
    iso = isolation(hub_ip="10.0.0.2", hub_port=8081)
    assert egress_allows(iso, "10.0.0.2", 8081)
    assert egress_allows(iso, GW, 53, "udp") and egress_allows(iso, GW, 53, "tcp")
    assert egress_allows(iso, GW, 67, "udp") and egress_allows(iso, "255.255.255.255", 67, "udp")
    assert not egress_allows(iso, "10.0.0.2", 22)  # the hub host's ssh
    assert not egress_allows(iso, "10.0.0.2", 8081, "udp")
    assert not egress_allows(iso, GW, 8443)  # the daemon's API on the host
    assert not egress_allows(iso, GW, 22)
    assert not egress_allows(iso, GW, 8081)  # the hub port, but on another address
    assert not egress_allows(iso, "10.117.40.60", 8888)  # another container
    assert not egress_allows(iso, "169.254.169.254", 80)
    assert not egress_allows(iso, "1.1.1.1", 443)
    assert not egress_allows(iso, "2606:4700::1111", 443)
    assert not egress_allows(iso, "10.117.40.60", 53, "udp")  # DNS elsewhere than the bridge


def test_ingress_admits_only_the_proxy_on_the_server_port_and_dhcp_answers():
    iso = isolation(proxy_ips=(GW, "10.0.0.5"))
    assert ingress_allows(iso, GW, 8888) and ingress_allows(iso, "10.0.0.5", 8888)
    assert not ingress_allows(iso, GW, 22)
    assert not ingress_allows(iso, GW, 8888, "udp")
    assert not ingress_allows(iso, "10.117.40.60", 8888)  # another container
    assert ingress_allows(iso, GW, 68, "udp", sport=67)
    assert not ingress_allows(iso, GW, 68, "udp", sport=53)
    assert not ingress_allows(iso, "10.117.40.60", 68, "udp", sport=67)


PRIVATE = ["10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
           "169.254.169.254", "127.0.0.1", "0.0.0.1", "224.0.0.251", "255.255.255.255",
           "fd00::1", "fe80::1", "::1"]  # fmt: skip


def test_internet_egress_reaches_public_addresses_only():
    iso = isolation(egress="internet", host_ips=("203.0.113.7", "2001:db8::7"))
    for public in ("1.1.1.1", "151.101.0.223", "8.8.8.8", "2606:4700::1111"):
        assert egress_allows(iso, public, 443), public
        assert egress_allows(iso, public, 53, "udp"), public
    for private in PRIVATE:
        assert not egress_allows(iso, private, 443), private
    assert not egress_allows(iso, "203.0.113.7", 22)  # the hub host's public address
    assert not egress_allows(iso, "2001:db8::7", 22)
    assert egress_allows(iso, "203.0.113.8", 22)
    assert egress_allows(iso, HUB, 8081) and not egress_allows(iso, HUB, 22)
    ingress, _ = acl_rules(iso)
    assert ingress == acl_rules(isolation())[0]  # egress does not open ingress


def test_internet_egress_keeps_a_public_hub_to_its_port():
    iso = isolation(egress="internet", hub_ip="198.51.100.10", proxy_ips=("198.51.100.11",))
    assert egress_allows(iso, "198.51.100.10", 8081)
    assert not egress_allows(iso, "198.51.100.10", 22)
    assert not egress_allows(iso, "198.51.100.11", 22)
    assert egress_allows(iso, "198.51.100.12", 22)


@given(st.ip_addresses(v=4))
def test_internet_egress_is_exactly_the_public_ipv4_space(address):
    iso = isolation(egress="internet", host_ips=("198.51.100.1",))
    private = any(
        address in ipaddress.ip_network(n)
        for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                  "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
                  "224.0.0.0/4", "240.0.0.0/4", "198.51.100.1/32")
    )  # fmt: skip
    assert egress_allows(iso, str(address), 12345) == (not private)


def test_open_has_no_acl():
    with pytest.raises(IsolationError, match='"open" means no ACL'):
        acl_rules(isolation(egress="open"))


# -- comparing with what the daemon answers ----------------------------------------------------


def daemon_answer(body: dict) -> dict:
    """An ACL as GET answers it: empty rule fields left out, used_by and project added."""
    answer = copy.deepcopy({k: v for k, v in body.items()})
    for direction in ("ingress", "egress"):
        answer[direction] = [{k: v for k, v in r.items() if v} for r in answer[direction]]
    answer["config"]["user.operator.note"] = "theirs"
    answer.update(used_by=["/1.0/instances/x"], project="default")
    return answer


def test_same_rules_ignores_what_the_daemon_leaves_out_and_adds():
    body = acl_body("lxdspawner-0badcafe", isolation(), hub_id="hub-1")
    assert same_rules(daemon_answer(body), body)
    changed = daemon_answer(body)
    changed["egress"][0]["destination_port"] = "22"
    assert not same_rules(changed, body)
    relabelled = daemon_answer(body)
    relabelled["config"][KEY_HUB] = "hub-2"
    assert not same_rules(relabelled, body)


# -- ensure_acl against a fake daemon ---------------------------------------------------------


class FakeDaemon:
    """Just /1.0/network-acls, answering as the daemons do; ``gap`` yields to the event loop
    between a create's check and its insert, as the real daemon's database does."""

    def __init__(self, *, gap: bool = False):
        self.acls: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.gap = gap

    async def request(self, method, path, *, json_body=None, **_):
        self.calls.append((method, path))
        if method == "POST":
            name = json_body["name"]
            if name in self.acls:
                raise error_for_status(
                    400, "POST /1.0/network-acls: The network ACL already exists"
                )
            if self.gap:
                await asyncio.sleep(0)
                if name in self.acls:
                    raise error_for_status(
                        500, "POST /1.0/network-acls: UNIQUE constraint failed: networks_acls"
                    )
            self.acls[name] = daemon_answer(json_body)
            return None
        name = path.rsplit("/", 1)[-1]
        if name not in self.acls:
            raise error_for_status(404, f"{method} {path}: Network ACL not found")
        if method == "GET":
            return copy.deepcopy(self.acls[name])
        if method == "PUT":
            self.acls[name].update(copy.deepcopy(json_body))
            return None
        raise AssertionError(f"unexpected {method} {path}")


async def test_ensure_acl_creates_then_leaves_alone():
    daemon = FakeDaemon()
    name = await ensure_acl(daemon, "hub-1", isolation(), network="lxdspbr0")
    assert name == acl_name("hub-1", "lxdspbr0", isolation())
    assert [m for m, _ in daemon.calls] == ["GET", "POST"]
    assert same_rules(daemon.acls[name], acl_body(name, isolation(), hub_id="hub-1"))
    daemon.calls.clear()
    assert await ensure_acl(daemon, "hub-1", isolation(), network="lxdspbr0") == name
    assert [m for m, _ in daemon.calls] == ["GET"]


async def test_ensure_acl_repairs_ours_and_keeps_the_operators_keys():
    daemon = FakeDaemon()
    name = await ensure_acl(daemon, "hub-1", isolation())
    daemon.acls[name]["egress"].append({"action": "allow", "destination": "0.0.0.0/0"})
    daemon.acls[name]["description"] = "edited"
    assert await ensure_acl(daemon, "hub-1", isolation()) == name
    assert daemon.calls[-1][0] == "PUT"
    assert same_rules(daemon.acls[name], acl_body(name, isolation(), hub_id="hub-1"))
    assert daemon.acls[name]["config"]["user.operator.note"] == "theirs"


@pytest.mark.parametrize(
    "config, whose",
    [
        ({}, f"not lxdspawner's (it lacks {KEY_MANAGED}={MANAGED_BY})"),
        ({KEY_HUB: "hub-1"}, "not lxdspawner's"),
        ({KEY_MANAGED: MANAGED_BY, KEY_HUB: "hub-2"}, "hub 'hub-2''s"),
    ],
)
async def test_ensure_acl_never_touches_an_acl_not_ours(config, whose):
    daemon = FakeDaemon()
    name = acl_name("hub-1", "", isolation())
    foreign = {"name": name, "description": "", "ingress": [], "egress": [], "config": config}
    daemon.acls[name] = copy.deepcopy(foreign)
    with pytest.raises(AclNotOurs) as raised:
        await ensure_acl(daemon, "hub-1", isolation())
    assert raised.value.name == name
    assert str(raised.value).startswith(
        f"network isolation: the network ACL '{name}' exists but is {whose}"
    )
    assert "lxdspawner never modifies an ACL it did not make" in str(raised.value)
    assert daemon.acls[name] == foreign
    assert [m for m, _ in daemon.calls] == ["GET"]


async def test_a_burst_of_spawns_makes_one_acl():
    daemon = FakeDaemon(gap=True)
    names = await asyncio.gather(*(ensure_acl(daemon, "hub-1", isolation()) for _ in range(30)))
    assert len(set(names)) == 1 and list(daemon.acls) == [names[0]]
    assert sum(m == "POST" for m, _ in daemon.calls) == 30  # 29 lost the race, quietly


async def test_a_failed_create_that_left_nothing_is_reported():
    class Refusing(FakeDaemon):
        async def request(self, method, path, **kwargs):
            if method == "POST":
                raise error_for_status(400, "POST /1.0/network-acls: Invalid egress rule 0")
            return await super().request(method, path, **kwargs)

    with pytest.raises(LxdError, match="Invalid egress rule 0"):
        await ensure_acl(Refusing(), "hub-1", isolation())


async def test_ensure_acl_refuses_open():
    with pytest.raises(IsolationError):
        await ensure_acl(FakeDaemon(), "hub-1", isolation(egress="open"))


# -- what each daemon can do -------------------------------------------------------------------

INCUS_6_0 = Dialect(
    product="incus",
    server_version="6.0.4",
    api_extensions=frozenset(
        {"network_acl", "network_bridge_acl", "network_bridge_acl_devices",
         "instance_nic_bridged_port_isolation", "restrict_dev_incus"}
    ),
)  # fmt: skip
LXD_5_0 = Dialect(
    product="lxd",
    server_version="5.0.2",
    api_extensions=frozenset(
        {"network_acl", "network_bridge_acl", "instance_nic_bridged_port_isolation",
         "restrict_devlxd"}
    ),
)  # fmt: skip


def test_incus_6_0_isolates_fully():
    caps = supported(INCUS_6_0, firewall="nftables")
    assert (caps.acls, caps.nic_acls, caps.port_isolation) == (True, True, True)
    assert caps.guest_api_key == "security.guestapi"
    assert guest_api_config(caps) == {"security.guestapi": "false"}
    assert caps.gaps() == () and caps.gaps("internet") == ()


def test_lxd_5_0_has_no_nic_acls_and_says_what_that_leaves_open():
    caps = supported(LXD_5_0, firewall="nftables")
    assert (caps.acls, caps.nic_acls, caps.port_isolation) == (True, False, True)
    assert guest_api_config(caps) == {"security.devlxd": "false"}
    (gap,) = caps.gaps()
    assert gap.startswith(
        "no ACL on the containers' NICs (LXD 5.0.2 has no security.acls on bridged NICs "
        "(API extension network_bridge_acl_devices)): a container reaches every port of the "
        "host on its bridge"
    )
    assert "169.254.169.254" in gap


def test_incus_with_xtables_has_no_nic_acls():
    caps = supported(INCUS_6_0, firewall="xtables")
    assert not caps.nic_acls
    assert "with nftables only; it uses xtables" in caps.gaps()[0]


def test_capabilities_without_nic_acls_and_open():
    caps = supported(INCUS_6_0).without_nic_acls("the kernel lacks nf_conntrack_bridge")
    assert not caps.nic_acls and "the kernel lacks nf_conntrack_bridge" in caps.gaps()[0]
    assert "network isolation is off" in caps.gaps("open")[0]
    bare = supported(Dialect(product="lxd"))
    assert bare.guest_api_key == "" and guest_api_config(bare) == {}
    assert len(bare.gaps()) == 3


# -- the NIC -----------------------------------------------------------------------------------

INCUS = supported(INCUS_6_0)
LXD = supported(LXD_5_0)
BRIDGE = {"name": "lxdspbr0", "type": "bridge", "managed": True,
          "config": {"ipv4.address": "10.117.40.1/24", "ipv6.address": "none"}}  # fmt: skip
PROFILE_NIC = {"type": "nic", "network": "lxdspbr0", "name": "eth0"}


@pytest.mark.parametrize(
    "nic",
    [PROFILE_NIC, {"type": "nic", "nictype": "bridged", "parent": "lxdspbr0", "name": "eth0"}],
)
def test_a_nic_on_a_managed_bridge_can_be_isolated(nic):
    assert nic_kind(nic, BRIDGE) == "bridged"
    check_nic(nic, BRIDGE, INCUS)
    check_nic(nic, BRIDGE, LXD)


OPEN = 'or set c.LxdSpawner.network_isolation = "open" and isolate them yourself (see SECURITY.md)'


@pytest.mark.parametrize(
    "nic, network, caps, message",
    [
        (
            {"type": "nic", "nictype": "macvlan", "parent": "enp3s0"},
            {"name": "enp3s0", "type": "physical", "managed": False},
            LXD,
            "network isolation: eth0 is a macvlan NIC on enp3s0, which LXD cannot filter; "
            f"give the containers a managed bridge, {OPEN}",
        ),
        (
            {"type": "nic", "network": "macnet"},
            {"name": "macnet", "type": "macvlan", "managed": True},
            INCUS,
            "network isolation: eth0 is a macvlan NIC on macnet, which Incus cannot filter; "
            f"give the containers a managed bridge, {OPEN}",
        ),
        (
            {"type": "nic", "nictype": "physical", "parent": "enp4s0"},
            None,
            INCUS,
            "network isolation: eth0 is a physical NIC on enp4s0, which Incus cannot filter; "
            f"give the containers a managed bridge, {OPEN}",
        ),
        (
            {"type": "nic", "nictype": "bridged", "parent": "br0"},
            {"name": "br0", "type": "bridge", "managed": False},
            INCUS,
            "network isolation: eth0 is a bridged NIC on br0, a bridge Incus does not manage, so "
            "it cannot filter it; give the containers a managed bridge (incus network create), "
            + OPEN,
        ),
        (
            {"type": "nic", "network": "ovn0"},
            {"name": "ovn0", "type": "ovn", "managed": True},
            LXD,
            "network isolation: eth0 is an ovn NIC on ovn0: lxdspawner isolates containers on "
            f"bridge networks only; give the containers a managed bridge, {OPEN}",
        ),
        (
            {"type": "nic", "nictype": "ipvlan", "parent": "enp3s0"},
            None,
            INCUS,
            "network isolation: eth0 is an ipvlan NIC on enp3s0, which Incus cannot filter; "
            f"give the containers a managed bridge, {OPEN}",
        ),
        (
            {"type": "nic", "network": "gone"},
            None,
            LXD,
            "network isolation: eth0 is on gone, which LXD does not know as a network; give "
            f"the containers a managed bridge, {OPEN}",
        ),
        (
            None,
            None,
            INCUS,
            "network isolation: the instance has no NIC eth0 (its profiles give none), so the "
            "proxy could not reach its server; add one on a managed bridge to the profile",
        ),
    ],
)
def test_a_nic_that_cannot_be_isolated_is_refused_with_what_to_do(nic, network, caps, message):
    with pytest.raises(NotIsolable) as raised:
        check_nic(nic, network, caps)
    assert str(raised.value) == message


def test_nic_device_on_incus():
    nic = nic_device(PROFILE_NIC, "lxdspawner-0badcafe", port_isolation=True)
    assert nic == {
        "type": "nic",
        "network": "lxdspbr0",
        "name": "eth0",
        "security.acls": "lxdspawner-0badcafe",
        "security.acls.default.ingress.action": "reject",
        "security.acls.default.egress.action": "reject",
        "security.port_isolation": "true",
        "security.mac_filtering": "true",
        "security.ipv4_filtering": "true",
    }
    assert PROFILE_NIC == {"type": "nic", "network": "lxdspbr0", "name": "eth0"}


def test_nic_device_on_lxd_5_0_has_no_acl_keys():
    nic = nic_device(PROFILE_NIC, None, port_isolation=True, ipv6_filtering=True)
    assert not any(k.startswith("security.acls") for k in nic)
    assert nic["security.port_isolation"] == "true"
    assert nic["security.ipv6_filtering"] == "true"


def test_nic_device_keeps_the_operators_acl():
    base = {**PROFILE_NIC, "security.acls": "site-wide, lxdspawner-0badcafe"}
    nic = nic_device(base, "lxdspawner-0badcafe", port_isolation=False)
    assert nic["security.acls"] == "site-wide,lxdspawner-0badcafe"
    assert "security.port_isolation" not in nic


def test_gateway_of_a_bridge():
    assert gateway_of(BRIDGE) == "10.117.40.1"
    with pytest.raises(IsolationError, match="network 'b' has no IPv4 address"):
        gateway_of({"name": "b", "config": {"ipv4.address": "none"}})


# What Incus 6.0.4 answered on this project's test machine (kernel without bridge conntrack).
KERNEL_FAILURE = (
    'Failed to start device "eth0": Failed adding bridge filter rules for instance device '
    '"lxdsp-test-net-pb.eth0" (bridge): Failed apply nftables config: Failed to run: nft -f -: '
    "exit status 1 (/dev/stdin:13:2-9: Error: Could not process rule: Protocol error\n"
    "\tct state established,related accept\n\t^^^^^^^^\n/dev/stdin:21:25-30: Error: Could not "
    'process rule: No such file or directory\n\tiifname "vethd96332d5" reject\n'
)


def test_start_failure_explains_a_kernel_without_bridge_conntrack():
    error = start_failure(KERNEL_FAILURE)
    assert str(error) == (
        "network isolation: Incus could not apply the network ACL to eth0: this host's kernel "
        "lacks nf_conntrack_bridge, nft_reject_bridge (nftables on bridges), which an ACL on a "
        "bridged NIC needs; load them (modprobe nf_conntrack_bridge nft_reject_bridge) or boot "
        "a kernel built with CONFIG_NF_CONNTRACK_BRIDGE and CONFIG_NFT_BRIDGE_REJECT, " + OPEN
    )
    only_ct = KERNEL_FAILURE.split("/dev/stdin:21")[0]
    assert "lacks nf_conntrack_bridge (nftables" in str(start_failure(only_ct))
    assert "xtables" in str(
        start_failure("Security ACLs are only supported when using nftables firewall")
    )
    assert start_failure('Failed to start device "eth0": no such network') is None


# -- prepare_nic -------------------------------------------------------------------------------


class FakeNetworks(FakeDaemon):
    def __init__(self, networks):
        super().__init__()
        self.networks = networks

    async def network(self, name):
        if name not in self.networks:
            raise NotFound(f"GET /1.0/networks/{name}: Network not found", status=404)
        return self.networks[name]


async def test_prepare_nic_on_incus_attaches_the_acl():
    client = FakeNetworks({"lxdspbr0": BRIDGE})
    plan = await prepare_nic(client, INCUS, "hub-1", isolation(), PROFILE_NIC)
    assert plan.acl == acl_name("hub-1", "lxdspbr0", isolation()) and plan.acl in client.acls
    assert plan.device["security.acls"] == plan.acl
    assert plan.config == {"security.guestapi": "false"}
    assert plan.gaps == ()


async def test_prepare_nic_on_lxd_5_0_isolates_what_it_can():
    client = FakeNetworks({"lxdspbr0": BRIDGE})
    plan = await prepare_nic(client, LXD, "hub-1", isolation(), PROFILE_NIC)
    assert plan.acl is None and client.acls == {}
    assert plan.device["security.port_isolation"] == "true"
    assert "security.acls" not in plan.device
    assert plan.config == {"security.devlxd": "false"}
    assert plan.gaps == LXD.gaps()


async def test_prepare_nic_refuses_before_making_anything():
    client = FakeNetworks({})
    nic = {"type": "nic", "nictype": "macvlan", "parent": "enp3s0"}
    with pytest.raises(NotIsolable, match="eth0 is a macvlan NIC on enp3s0"):
        await prepare_nic(client, INCUS, "hub-1", isolation(), nic)
    assert client.calls == []


async def test_prepare_nic_open_leaves_the_nic_alone():
    client = FakeNetworks({})
    nic = {"type": "nic", "nictype": "macvlan", "parent": "enp3s0"}
    plan = await prepare_nic(client, INCUS, "hub-1", isolation(egress="open"), nic)
    assert plan.device == nic and plan.acl is None
    assert plan.config == {"security.guestapi": "false"}
    assert client.calls == []


# -- the ACL on a dedicated network ------------------------------------------------------------

DEDICATED = {**BRIDGE, "config": {**BRIDGE["config"], KEY_MANAGED: MANAGED_BY}}


class FakeDaemonWithNetworks(FakeDaemon):
    """Also /1.0/networks (GET with an ETag, PATCH honouring If-Match, the lists) and ACL
    deletion. ``interloper`` changes a network's ACL list between a read and the write, as
    another hub would, ``times`` times."""

    where = "the fake daemon"

    def __init__(self, networks, *, interloper=None, times=1):
        super().__init__()
        self.networks = {name: {**copy.deepcopy(n), "name": name} for name, n in networks.items()}
        self.version = dict.fromkeys(self.networks, 0)
        self.interloper, self.times = interloper, times

    async def network(self, name):
        if name not in self.networks:
            raise NotFound(f"GET /1.0/networks/{name}: Network not found", status=404)
        return copy.deepcopy(self.networks[name])

    async def request_with_etag(self, path):
        self.calls.append(("GET", path))
        name = path.rsplit("/", 1)[-1]
        answer, etag = await self.network(name), f'"{name}-{self.version[name]}"'
        if self.interloper and self.times:
            self.times -= 1
            self.interloper(self, name)
        return answer, etag

    def set_acls(self, name, acls):
        self.networks[name]["config"]["security.acls"] = acls
        self.version[name] += 1

    async def request(self, method, path, *, json_body=None, headers=None, params=None, **_):
        if path == "/1.0/network-acls" and method == "GET":
            return [copy.deepcopy(a) for a in self.acls.values()]
        if path == "/1.0/networks" and method == "GET":
            return [copy.deepcopy(n) for n in self.networks.values()]
        if path.startswith("/1.0/networks/"):
            self.calls.append((method, path))
            name = path.rsplit("/", 1)[-1]
            assert method == "PATCH"
            if headers and headers["If-Match"] != f'"{name}-{self.version[name]}"':
                raise error_for_status(412, f"PATCH {path}: ETag doesn't match")
            self.set_acls(name, json_body["config"]["security.acls"])
            return None
        if method == "DELETE":
            self.calls.append((method, path))
            if self.acls.pop(path.rsplit("/", 1)[-1], None) is None:
                raise error_for_status(404, f"DELETE {path}: Network ACL not found")
            return None
        return await super().request(method, path, json_body=json_body)


def test_only_a_network_given_to_lxdspawner_is_dedicated():
    assert is_dedicated(DEDICATED)
    assert not is_dedicated(BRIDGE) and not is_dedicated(None)
    assert not is_dedicated({**BRIDGE, "config": {KEY_MANAGED: "someone-else"}})


def test_network_acl_name_is_per_hub_and_network_and_valid():
    name = network_acl_name("hub-1", "lxdspbr0")
    assert valid_acl_name(name) and name == network_acl_name("hub-1", "lxdspbr0")
    assert name != network_acl_name("hub-2", "lxdspbr0")
    assert name != network_acl_name("hub-1", "lxdspbr1")
    with pytest.raises(IsolationError, match="prefix"):
        network_acl_name("hub-1", "lxdspbr0", prefix="-bad")


@pytest.mark.parametrize("caps", [INCUS, LXD], ids=["incus", "lxd"])
async def test_on_a_dedicated_network_the_acl_goes_on_the_network(caps):
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    plan = await prepare_nic(client, caps, "hub-1", isolation(), PROFILE_NIC)
    name = network_acl_name("hub-1", "lxdspbr0")
    assert plan.acl == name and plan.on_network == "lxdspbr0"
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == name
    assert same_rules(client.acls[name], acl_body(name, isolation(), hub_id="hub-1"))
    # The NIC: no ACL of its own (the network's holds), port isolation and filtering.
    assert "security.acls" not in plan.device
    assert plan.device["security.port_isolation"] == "true"
    assert plan.device["security.ipv4_filtering"] == "true"
    assert plan.gaps == ()


async def test_the_network_acl_is_updated_in_place_and_attached_once():
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    await prepare_nic(client, LXD, "hub-1", isolation(), PROFILE_NIC)
    client.calls.clear()
    await prepare_nic(client, LXD, "hub-1", isolation(hub_port=9000), PROFILE_NIC)
    name = network_acl_name("hub-1", "lxdspbr0")
    assert list(client.acls) == [name]
    assert "9000" in {r["destination_port"] for r in client.acls[name]["egress"]}
    assert not [c for c in client.calls if c[0] == "PATCH"]  # already on the network


async def test_other_acls_on_the_network_stay_and_a_concurrent_writer_is_not_overwritten():
    def another_hub(daemon, network):
        daemon.set_acls(network, "operators,lxdspawner-otherhub")

    network = {**DEDICATED, "config": {**DEDICATED["config"], "security.acls": "operators"}}
    client = FakeDaemonWithNetworks({"lxdspbr0": network}, interloper=another_hub)
    await prepare_nic(client, LXD, "hub-1", isolation(), PROFILE_NIC)
    name = network_acl_name("hub-1", "lxdspbr0")
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == (
        f"operators,lxdspawner-otherhub,{name}"
    )
    assert [m for m, p in client.calls if "/networks/" in p].count("PATCH") == 2  # one 412


async def test_a_network_that_never_settles_is_a_clear_error():
    client = FakeDaemonWithNetworks(
        {"lxdspbr0": DEDICATED}, interloper=lambda d, n: d.set_acls(n, "x"), times=100
    )
    with pytest.raises(IsolationError, match="kept changing"):
        await attach_to_network(client, "lxdspbr0", "lxdspawner-00000000")


async def test_a_burst_attaches_the_network_acl_once():
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    await asyncio.gather(
        *(prepare_nic(client, INCUS, "hub-1", isolation(), PROFILE_NIC) for _ in range(20))
    )
    assert [m for m, p in client.calls if "/networks/" in p].count("PATCH") == 1


async def test_a_port_that_vanished_under_the_daemon_is_tried_again(monkeypatch):
    """Incus fails a bridge's PATCH when a container's veth goes while it re-reads the ports
    (ci44): nothing was written, and the next try works."""
    monkeypatch.setattr(network, "_VANISHED_PAUSE", 0)

    class Racing(FakeDaemonWithNetworks):
        failures = 1

        async def request(self, method, path, **kwargs):
            if method == "PATCH" and self.failures:
                self.failures -= 1
                raise error_for_status(
                    500,
                    f"PATCH {path}: Failed to delete bridge children interfaces: Failed to run: "
                    'ip -d -j link show veth5d1 : exit status 1 (Device "veth5d1" does not '
                    "exist.)",
                )
            return await super().request(method, path, **kwargs)

    client = Racing({"lxdspbr0": DEDICATED})
    assert await attach_to_network(client, "lxdspbr0", "lxdspawner-00000000")
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == "lxdspawner-00000000"
    other = Racing({"lxdspbr0": DEDICATED})
    other.failures = 100  # not forever: the daemon's own words
    with pytest.raises(LxdError, match="does not exist"):
        await attach_to_network(other, "lxdspbr0", "lxdspawner-00000000")


async def test_a_refused_write_names_the_network_and_the_way_out():
    class Restricted(FakeDaemonWithNetworks):
        async def request(self, method, path, **kwargs):
            if method == "PATCH":
                raise error_for_status(403, f"PATCH {path}: Forbidden")
            return await super().request(method, path, **kwargs)

    with pytest.raises(IsolationError) as raised:
        await prepare_nic(Restricted({"lxdspbr0": DEDICATED}), LXD, "hub-1", isolation(),
                          PROFILE_NIC)  # fmt: skip
    said = str(raised.value)
    assert "'lxdspbr0'" in said and "Forbidden" in said and "network_isolation" in said


async def test_release_takes_only_this_hubs_acl_off_and_deletes_it():
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    await prepare_nic(client, LXD, "hub-1", isolation(), PROFILE_NIC)
    await prepare_nic(client, LXD, "hub-2", isolation(hub_port=9000), PROFILE_NIC)
    mine, theirs = (network_acl_name(h, "lxdspbr0") for h in ("hub-1", "hub-2"))
    assert await release_network(client, "hub-1", "lxdspbr0")
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == theirs
    assert list(client.acls) == [theirs]
    assert not await release_network(client, "hub-1", "lxdspbr0")  # nothing left to do
    # An ACL of that name without our keys is not ours to take off.
    client.acls[mine] = {"name": mine, "ingress": [], "egress": [], "config": {}}
    client.set_acls("lxdspbr0", f"{theirs},{mine}")
    assert not await release_network(client, "hub-1", "lxdspbr0")
    assert mine in client.acls and mine in client.networks["lxdspbr0"]["config"]["security.acls"]


async def test_forget_hub_clears_one_hub_or_every_hub_and_nothing_else():
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED, "lxdspbr1": DEDICATED})
    for hub in ("hub-1", "hub-2"):
        for nic in (PROFILE_NIC, {**PROFILE_NIC, "network": "lxdspbr1"}):
            await prepare_nic(client, LXD, hub, isolation(), nic)
    client.acls["operators"] = {"name": "operators", "ingress": [], "egress": [], "config": {}}
    client.set_acls("lxdspbr1", client.networks["lxdspbr1"]["config"]["security.acls"]
                    + ",operators")  # fmt: skip
    gone = await forget_hub(client, "hub-1")
    assert sorted(gone) == sorted(network_acl_name("hub-1", n) for n in ("lxdspbr0", "lxdspbr1"))
    assert set(client.acls) == {network_acl_name("hub-2", "lxdspbr0"),
                                network_acl_name("hub-2", "lxdspbr1"), "operators"}  # fmt: skip
    await forget_hub(client)
    assert set(client.acls) == {"operators"}
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == ""
    assert client.networks["lxdspbr1"]["config"]["security.acls"] == "operators"


def test_lxd_on_a_bridge_not_dedicated_says_how_to_dedicate_it():
    (gap,) = LXD.gaps()
    assert "lxc network set <bridge> user.jupyterhub.managed-by=lxdspawner" in gap
    assert LXD.gaps(network="lxdspbr0") == ()


# -- "ports" and "open" on a dedicated bridge (hardening) --------------------------------------


def settings(mode: str, hub_id: str = "hub-1") -> hardening.Settings:
    return hardening.Settings(
        hub_id=hub_id,
        profiles=("default",),
        disk_limit="",
        network_isolation=mode,
        isolated_idmap=False,
        guest_api=False,
        hub_url=f"http://{HUB}:8081/hub/api",
        hub_port=8081,
        server_port=8888,
    )


@pytest.mark.parametrize("mode", ["ports", "open"])
async def test_unfiltered_takes_the_hubs_acl_off_a_bridge_it_alone_filters(mode):
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    await prepare_nic(client, LXD, "hub-1", isolation(), PROFILE_NIC)
    await hardening._unfiltered_on_dedicated(client, settings(mode), client.networks["lxdspbr0"])
    assert client.networks["lxdspbr0"]["config"]["security.acls"] == ""
    assert client.acls == {}


@pytest.mark.parametrize("mode", ["ports", "open"])
async def test_unfiltered_keeps_its_servers_working_on_a_bridge_other_hubs_filter(mode, caplog):
    """Other hubs' ACLs filter the whole bridge: what no ACL allows is rejected, so this hub's
    ACL stays, allowing its hub's API and proxy (never more than "hub-only")."""
    client = FakeDaemonWithNetworks({"lxdspbr0": DEDICATED})
    await prepare_nic(client, LXD, "hub-2", isolation(hub_port=9000), PROFILE_NIC)
    await prepare_nic(client, LXD, "hub-1", isolation(egress="internet"), PROFILE_NIC)
    info = copy.deepcopy(client.networks["lxdspbr0"])
    await hardening._unfiltered_on_dedicated(client, settings(mode), info)
    mine = network_acl_name("hub-1", "lxdspbr0")
    assert mine in client.networks["lxdspbr0"]["config"]["security.acls"].split(",")
    assert same_rules(client.acls[mine], acl_body(mine, isolation(), hub_id="hub-1"))
    assert "carries other hubs' ACLs" in caplog.text and mode in caplog.text
