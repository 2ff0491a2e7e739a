"""The test bench's topology file (scripts/topology.env) reads the same in bash and Python,
and the facts `scripts/cluster.sh up` prints are what the cluster fixture understands."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from testbench import topology
from testbench.cluster import Cluster


def test_bash_reads_the_file_as_python_does():
    values = topology.read()
    script = 'source "$1"; shift; for k in "$@"; do printf "%s=%s\\n" "$k" "${!k}"; done'
    p = subprocess.run(
        ["bash", "-c", script, "bash", str(topology.TOPOLOGY_FILE), *values],
        capture_output=True,
        text=True,
        check=True,
    )
    assert topology.parse_env(p.stdout) == values


def test_each_daemon_has_its_own_bridge_and_subnet():
    incus, lxd = topology.INCUS, topology.LXD
    assert incus.bridge != lxd.bridge and incus.socket != lxd.socket
    assert not ipaddress.ip_network(incus.subnet).overlaps(ipaddress.ip_network(lxd.subnet))
    for d in (incus, lxd):
        assert ipaddress.ip_address(d.gateway) in ipaddress.ip_network(d.subnet)
        assert d.endpoint == f"unix://{d.socket}"
    assert lxd.cli == ("env", f"LXD_DIR={lxd.state_dir}", "lxc")
    assert topology.daemon("lxd") is lxd
    with pytest.raises(ValueError, match="unknown daemon 'podman'"):
        topology.daemon("podman")


@pytest.mark.parametrize(
    "line", ['A="quoted"', "A=two words", "A=$HOME/x", "lower=case", "export A=1"]
)
def test_anything_bash_might_read_differently_is_refused(line):
    with pytest.raises(ValueError, match="not a plain KEY=value line"):
        topology.parse_env(f"# fine\n\nB=1\n{line}\n", "x.env")


def test_cluster_facts_make_a_cluster():
    facts = """
# the cluster's API, for the hub
LXDSP_CLUSTER_ENDPOINT=https://192.0.2.11:8443
LXDSP_CLUSTER_CLIENT_CERT=/s/client.crt
LXDSP_CLUSTER_CLIENT_KEY=/s/client.key
LXDSP_CLUSTER_SERVER_CERT=/s/server.crt
LXDSP_CLUSTER_MEMBERS=m1,m2
LXDSP_CLUSTER_MEMBER_URLS=https://192.0.2.11:8443,https://192.0.2.12:8443
LXDSP_CLUSTER_HUB_IP=192.0.2.1
LXDSP_CLUSTER_SUBNET=192.0.2.0/24
LXDSP_CLUSTER_INCUS_DIR=/s/member1
LXDSP_CLUSTER_INCUS_CONF=/s/cli
"""
    cluster = Cluster.from_facts(facts)
    assert cluster.members == ("m1", "m2")
    assert cluster.member_urls["m2"] == "https://192.0.2.12:8443"
    assert cluster.hub_ip == "192.0.2.1" and cluster.subnet == "192.0.2.0/24"
    assert cluster.cli == ("env", "INCUS_DIR=/s/member1", "INCUS_CONF=/s/cli", "incus")
    assert "c.LxdSpawner.endpoint = 'https://192.0.2.11:8443'" in cluster.spawner_config()
