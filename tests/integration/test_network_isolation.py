"""Network isolation on the real daemons: what a user in an isolated container observes.

Two isolated containers (A, B: the NIC from lxdspawner.network, the guest API removed) and two
plain ones (C, D: the profile's NIC) on the daemon's bridge; on the host, the test process
plays the hub (a TCP listener on the bridge address), another service of the host (a second
port) and the proxy (it connects to the servers). Every blocked connection is also made from
a plain container, where it succeeds: the isolation, not the probe, is what blocks it.

What is enforced depends on the daemon and the kernel, and the tests say which:
- Incus 6.0 with a kernel that has nftables' bridge conntrack and reject: the ACL on the NIC
  too (only the hub's port on the host, nothing from or to other containers).
- Incus 6.0 on a kernel without them (this project's test machine): a container with the ACL
  does not start, and ``start_failure`` says why; without the ACL, as LXD 5.0.
- LXD 5.0: no ACL on a bridged NIC. Isolated containers cannot reach each other (port
  isolation) nor send as another container (IPv4 filtering), but reach every port of the host,
  and a container made without port isolation reaches theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import secrets
from pathlib import Path

import pytest

from lxdspawner.lxd import LxdError, image_source
from lxdspawner.lxd.errors import OperationFailed
from lxdspawner.network import (
    AclNotOurs,
    Isolation,
    acl_body,
    acl_name,
    ensure_acl,
    guest_api_config,
    nic_device,
    same_rules,
    start_failure,
    supported,
)
from testbench.hubtools import forget_network_acls

from .conftest import BRIDGE_GATEWAYS, BRIDGES, TINY_IMAGE, dump_instance
from .test_client import wait_for_ipv4

# They need the bridges bare of every other hub's ACL (and take those off): nothing else may
# use the host's daemons meanwhile (scripts/run-tests.sh runs them in the exclusive phase).
pytestmark = pytest.mark.exclusive

SERVER_PORT = 18888
PROBE_S = 2  # a blocked connection is dropped, not refused: each probe waits this long
HUB_ID = "lxdsp-test-net-hub"
GUEST_SOCKET = {"incus": "/dev/incus/sock", "lxd": "/dev/lxd/sock"}


def kernel_config() -> dict[str, str]:
    """The running kernel's build options (CONFIG_X: y/m), {} when the host does not say."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        return dict(line.split("=", 1) for line in text.splitlines() if line.startswith("CONFIG_"))
    return {}


def kernel_runs_nic_acls() -> bool | None:
    """Whether nftables' bridge family has conntrack and reject here (None: cannot tell)."""
    if Path("/sys/module/nf_conntrack_bridge").exists():
        return True
    config = kernel_config()
    if not config:
        return None
    return all(
        config.get(option) in ("y", "m")
        for option in ("CONFIG_NF_CONNTRACK_BRIDGE", "CONFIG_NFT_BRIDGE_REJECT")
    )


@pytest.fixture
async def net(lxd, request):
    """A name prefix for this test's instances and ACLs; all of them go at the end, whatever
    happened (the instances first: a daemon keeps an ACL that is in use)."""
    prefix = f"lxdsp-test-net-{secrets.token_hex(4)}"
    # Earlier test hubs' ACLs hold on the whole bridge; these containers must see it bare.
    await forget_network_acls(None)
    yield prefix
    report = getattr(request.node, "rep_call", None)
    failed = report is not None and report.failed
    names = [url.rsplit("/", 1)[-1] for url in await lxd.list_instances(recursion=0)]
    ours = [name for name in names if name.startswith(prefix)]
    if failed:
        for name in ours:
            await dump_instance(lxd, name)
    results = await asyncio.gather(
        *(lxd.remove_instance(name) for name in ours), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    for url in await lxd.request("GET", "/1.0/network-acls"):
        name = url.rsplit("/", 1)[-1]
        if name.startswith(prefix):
            try:
                await lxd.request("DELETE", f"/1.0/network-acls/{name}")
            except LxdError as e:
                errors.append(e)
    assert not errors, f"cleanup failed: {errors}"


class Host:
    """The host's side, on the bridge address: the hub (TCP), another service (TCP) and a
    UDP port that records who sent to it."""

    def __init__(self, gateway: str):
        self.gateway = gateway
        self.senders: list[str] = []
        self._servers: list = []
        self._transport = None

    async def start(self) -> Host:
        async def answer(reader, writer, text):
            try:
                await asyncio.wait_for(reader.readline(), PROBE_S)
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + text)
                await writer.drain()
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

        hub = await asyncio.start_server(lambda r, w: answer(r, w, b"hub"), self.gateway, 0)
        other = await asyncio.start_server(lambda r, w: answer(r, w, b"other"), self.gateway, 0)
        self._servers = [hub, other]
        self.hub_port = hub.sockets[0].getsockname()[1]
        self.other_port = other.sockets[0].getsockname()[1]

        host = self

        class Recorder(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                host.senders.append(addr[0])

        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            Recorder, local_addr=(self.gateway, 0)
        )
        self.udp_port = self._transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._transport is not None:
            self._transport.close()


@pytest.fixture
async def host(daemon):
    h = await Host(BRIDGE_GATEWAYS[daemon]).start()
    yield h
    h.close()


async def fetch(lxd, name: str, address: str, port: int) -> str:
    """What ``name`` gets from http://address:port/ ("" if it cannot connect)."""
    # busybox's wget -T crashes (1.35): the time limit comes from timeout(1).
    result = await lxd.exec(
        name, ["timeout", str(PROBE_S), "wget", "-q", "-O", "-", f"http://{address}:{port}/"]
    )
    return result.stdout.strip() if result.exit_code == 0 else ""


async def host_fetch(address: str, port: int) -> str:
    """What the host (as the proxy does) gets from http://address:port/ ("" if nothing)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), PROBE_S)
    except (OSError, asyncio.TimeoutError):
        return ""
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), PROBE_S)
    except (OSError, asyncio.TimeoutError):
        return ""
    finally:
        writer.close()
    return response.decode(errors="replace").partition("\r\n\r\n")[2].strip()


async def capabilities(lxd, daemon):
    """The daemon's capabilities, less NIC ACLs where this kernel cannot run them."""
    firewall = (await lxd.server_info())["environment"].get("firewall", "")
    caps = supported(lxd.dialect, firewall=firewall)
    if caps.nic_acls and kernel_runs_nic_acls() is False:
        caps = caps.without_nic_acls("this kernel lacks nf_conntrack_bridge/nft_reject_bridge")
    return caps


def isolation(daemon: str, host: Host) -> Isolation:
    gateway = BRIDGE_GATEWAYS[daemon]
    return Isolation(
        hub_ip=gateway,
        hub_port=host.hub_port,
        proxy_ips=(gateway,),
        server_port=SERVER_PORT,
        gateway=gateway,
    )


def profile_nic(daemon: str) -> dict:
    return {"type": "nic", "network": BRIDGES[daemon], "name": "eth0"}


# -- the ACL object --------------------------------------------------------------------------


async def test_a_burst_makes_one_acl_which_stays_ours(lxd, daemon, net, host):
    iso = isolation(daemon, host)
    network = BRIDGES[daemon]
    names = await asyncio.gather(
        *(ensure_acl(lxd, HUB_ID, iso, network=network, prefix=net) for _ in range(30))
    )
    name = names[0]
    assert set(names) == {name} == {acl_name(HUB_ID, network, iso, prefix=net)}
    listed = [u.rsplit("/", 1)[-1] for u in await lxd.request("GET", "/1.0/network-acls")]
    assert [n for n in listed if n.startswith(net)] == [name]
    wanted = acl_body(name, iso, hub_id=HUB_ID, network=network)
    assert same_rules(await lxd.request("GET", f"/1.0/network-acls/{name}"), wanted)

    # Changed behind our back: put right.
    await lxd.request(
        "PUT",
        f"/1.0/network-acls/{name}",
        json_body={**wanted, "egress": [], "description": "edited by hand"},
    )
    assert not same_rules(await lxd.request("GET", f"/1.0/network-acls/{name}"), wanted)
    assert await ensure_acl(lxd, HUB_ID, iso, network=network, prefix=net) == name
    assert same_rules(await lxd.request("GET", f"/1.0/network-acls/{name}"), wanted)

    # The name another rule set would get, held by an ACL without our keys: left alone.
    other = dataclasses.replace(iso, server_port=SERVER_PORT + 1)
    taken = acl_name(HUB_ID, network, other, prefix=net)
    await lxd.request(
        "POST", "/1.0/network-acls", json_body={"name": taken, "description": "someone's"}
    )
    with pytest.raises(AclNotOurs, match=f"the network ACL '{taken}' exists but is not "):
        await ensure_acl(lxd, HUB_ID, other, network=network, prefix=net)
    foreign = await lxd.request("GET", f"/1.0/network-acls/{taken}")
    assert foreign["description"] == "someone's" and not foreign.get("egress")


# -- attaching it to a NIC -------------------------------------------------------------------


async def test_attaching_the_acl_to_a_bridged_nic(lxd, daemon, net, host):
    """Incus takes it (and needs the kernel's bridge conntrack to start the container); LXD
    5.0 refuses the option, as ``supported`` says."""
    caps = supported(lxd.dialect)
    acl = await ensure_acl(
        lxd, HUB_ID, isolation(daemon, host), network=BRIDGES[daemon], prefix=net
    )
    nic = nic_device(profile_nic(daemon), acl, port_isolation=caps.port_isolation)
    name = f"{net}-acl"
    if daemon == "lxd":
        assert not caps.nic_acls
        with pytest.raises(OperationFailed, match='Invalid device option "security.acls'):
            await lxd.create_instance(name, source=image_source(TINY_IMAGE), devices={"eth0": nic})
        return
    assert caps.nic_acls
    kernel = kernel_runs_nic_acls()
    try:
        await lxd.create_instance(
            name, source=image_source(TINY_IMAGE), devices={"eth0": nic}, start=True
        )
    except OperationFailed as e:
        explained = start_failure(e.message, product=daemon)
        assert explained is not None, f"not explained: {e.message}"
        assert "lacks nf_conntrack_bridge" in str(explained)
        assert kernel is not True, f"this kernel has bridge conntrack, yet: {e.message}"
    else:
        assert kernel is not False, "the kernel lacks bridge conntrack, yet the NIC started"
        await wait_for_ipv4(lxd, name)  # DHCP through the ACL


# -- what a user observes --------------------------------------------------------------------


async def test_what_a_user_in_an_isolated_container_observes(lxd, daemon, net, host):
    caps = await capabilities(lxd, daemon)
    iso = isolation(daemon, host)
    gateway = BRIDGE_GATEWAYS[daemon]
    acl = None
    if caps.nic_acls:
        acl = await ensure_acl(lxd, HUB_ID, iso, network=BRIDGES[daemon], prefix=net)
    isolated = nic_device(profile_nic(daemon), acl, port_isolation=caps.port_isolation)
    specs = {
        "a": ({"eth0": isolated}, guest_api_config(caps)),
        "b": ({"eth0": isolated}, guest_api_config(caps)),
        "c": ({"eth0": profile_nic(daemon)}, {}),
        "d": ({"eth0": profile_nic(daemon)}, {}),
    }
    names = {k: f"{net}-{k}" for k in specs}
    await asyncio.gather(
        *(
            lxd.create_instance(
                names[k],
                source=image_source(TINY_IMAGE),
                devices=devices,
                config=config,
                start=True,
            )
            for k, (devices, config) in specs.items()
        )
    )
    # DHCP works through the isolation: the NIC was isolated before the container started.
    ips = dict(
        zip(
            names,
            await asyncio.gather(*(wait_for_ipv4(lxd, n) for n in names.values())),
            strict=True,
        )
    )
    serve = (
        f"mkdir -p /srv && hostname > /srv/index.html && httpd -p {SERVER_PORT} -h /srv && "
        f"test -S {GUEST_SOCKET[daemon]}"
    )
    served = await asyncio.gather(*(lxd.exec(n, ["sh", "-c", serve]) for n in names.values()))
    guest_api = {k: r.exit_code == 0 for k, r in zip(names, served, strict=True)}
    assert guest_api == {"a": False, "b": False, "c": True, "d": True}

    probes = {
        "A to the hub": fetch(lxd, names["a"], gateway, host.hub_port),
        "A to the host's other port": fetch(lxd, names["a"], gateway, host.other_port),
        "A to B's server": fetch(lxd, names["a"], ips["b"], SERVER_PORT),
        "A to C's server": fetch(lxd, names["a"], ips["c"], SERVER_PORT),
        "C to A's server": fetch(lxd, names["c"], ips["a"], SERVER_PORT),
        "C to D's server": fetch(lxd, names["c"], ips["d"], SERVER_PORT),
        "C to the hub": fetch(lxd, names["c"], gateway, host.hub_port),
        "C to the host's other port": fetch(lxd, names["c"], gateway, host.other_port),
        "the proxy to A's server": host_fetch(ips["a"], SERVER_PORT),
        "the proxy to B's server": host_fetch(ips["b"], SERVER_PORT),
    }
    got = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
    acl_on = caps.nic_acls
    assert got == {
        "A to the hub": "hub",
        # The host's other services: closed by the ACL; LXD 5.0 (no NIC ACL) leaves them open.
        "A to the host's other port": "" if acl_on else "other",
        "A to B's server": "" if caps.port_isolation or acl_on else names["b"],
        # A container made without port isolation: only an ACL keeps it apart.
        "A to C's server": "" if acl_on else names["c"],
        "C to A's server": "" if acl_on else names["a"],
        # The same connections without isolation: the probes themselves work.
        "C to D's server": names["d"],
        "C to the hub": "hub",
        "C to the host's other port": "other",
        "the proxy to A's server": names["a"],
        "the proxy to B's server": names["b"],
    }

    # root in A takes B's address and sends from it; C does the same with D's. Only C's
    # datagram reaches the host: IPv4 filtering drops what A sends as another container.
    spoof = "ip addr flush dev eth0 && ip addr add {ip}/24 dev eth0 && " + (
        f"timeout 1 tftp -g -r x -l /tmp/x {gateway} {host.udp_port}; true"
    )
    await asyncio.gather(
        lxd.exec(names["a"], ["sh", "-c", spoof.format(ip=ips["b"])]),
        lxd.exec(names["c"], ["sh", "-c", spoof.format(ip=ips["d"])]),
    )
    assert ips["d"] in host.senders
    assert ips["b"] not in host.senders and ips["a"] not in host.senders
