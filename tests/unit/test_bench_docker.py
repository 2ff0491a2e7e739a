"""The spawn benchmark's pure parts for the peer and the scenarios: dockerd's configuration
(off the host's firewall, its bridge on our subnet), the imported image's name and settings,
the docker hub's configuration, which scenarios and setups a command line runs, the warm
pool's size, and the three-column table with its ratios against the floor."""

from __future__ import annotations

import ipaddress

import pytest
from traitlets.config import Config

from benchmarks import benchlib as bl
from benchmarks import dockerbench as db
from testbench import topology

FP = "637475e8fd294d2326f64f9e5831ce35de3a3e97b28a02c870429f2b5e5e0b03"


def test_daemon_config_keeps_off_the_firewall_and_other_bridges():
    config = db.daemon_config()
    # Nothing on the host's firewall, forwarding or NAT.
    assert config["iptables"] is False
    assert config["ip6tables"] is False
    assert config["ip-forward"] is False
    assert config["ip-masq"] is False
    assert config["ipv6"] is False
    # The bridge on the topology's subnet for it, clear of Incus's and LXD's bridges.
    bridge = ipaddress.ip_interface(config["bip"])
    assert str(bridge) == topology.read()["LXDSP_DOCKER_BRIDGE_ADDRESS"]
    for taken in (topology.INCUS.subnet, topology.LXD.subnet):
        assert not bridge.network.overlaps(ipaddress.ip_network(taken))
    # No key that would reach further (published ports, more networks, remote access).
    assert set(config) <= {"bip", "iptables", "ip6tables", "ip-forward", "ip-masq", "ipv6",
                           "userland-proxy", "log-level"}  # fmt: skip


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        (topology.INCUS.bridge_address, "overlaps"),
        ("10.117.41.7/16", "overlaps"),
        ("10.117.60.0/24", "host address"),
        ("fd00::1/64", "IPv4"),
    ],
)
def test_daemon_config_refuses_a_bridge_we_cannot_use(address, problem):
    with pytest.raises(ValueError, match=problem) as e:
        db.daemon_config(address)
    assert "LXDSP_DOCKER_BRIDGE_ADDRESS" in str(e.value)


def test_image_is_named_and_labelled_by_the_incus_fingerprint():
    assert db.image_tag(FP) == f"{db.REPOSITORY}:637475e8fd29"
    assert db.image_tag(FP.upper() + "\n") == db.image_tag(FP)
    for bad in ("", "637475", "637475e8fd29; rm -rf /", "../../etc/passwd00"):
        with pytest.raises(ValueError, match="fingerprint"):
            db.image_tag(bad)
    changes = db.import_changes(FP)
    assert f"LABEL {db.FINGERPRINT_LABEL}={FP}" in changes
    # The same server, user and home as lxdspawner's unit in the same image.
    assert changes[0] == 'CMD ["/opt/jupyterhub/bin/jupyterhub-singleuser"]'
    assert "USER jupyter" in changes and "WORKDIR /home/jupyter" in changes
    assert any(c.startswith("ENV PATH=/opt/jupyterhub/bin:") for c in changes)


def test_hub_config_runs_dockerspawner_on_the_bridge_and_labels_containers():
    config = Config()
    exec(db.hub_config("lxdspawner-bench/jupyter-base:637475e8fd29"), {"c": config})  # noqa: S102
    ds = config.DockerSpawner
    assert config.JupyterHub.spawner_class == "docker"
    assert ds.image == "lxdspawner-bench/jupyter-base:637475e8fd29"
    assert ds.pull_policy == "never"
    assert ds.use_internal_ip is True and ds.network_name == "bridge"
    assert ds.remove is True  # deleted at stop, as lxdspawner's containers are
    assert ds.extra_create_kwargs == {"labels": {db.LABEL: db.LABEL_VALUE}}


def test_missing_packages():
    assert db.missing_packages(lambda m: True) == []
    assert db.missing_packages(lambda m: m != "docker") == ["docker>=7"]


def test_scenarios():
    assert bl.parse_scenarios(None, quick=True) == ["single", "burst10", "changeover"]
    assert bl.parse_scenarios("", quick=False) == list(bl.SCENARIOS)
    # The run's order, whatever the command line's; spaces and repeats do not matter.
    assert bl.parse_scenarios(" changeover,single ,single") == ["single", "changeover"]
    with pytest.raises(ValueError, match=r"unknown idle1000; known: single, volumes"):
        bl.parse_scenarios("single,idle1000")
    with pytest.raises(ValueError, match="none given"):
        bl.parse_scenarios(",")


def test_setups_always_have_the_floor_and_lxd():
    assert bl.parse_setups(None) == ["floor", "lxd", "docker", "lxdpool"]
    assert bl.parse_setups(None, quick=True) == ["floor", "lxd", "docker"]
    assert bl.parse_setups("lxdpool", quick=True) == ["floor", "lxd", "lxdpool"]
    assert bl.parse_setups("docker") == ["floor", "lxd", "docker"]
    assert bl.parse_setups("lxdpool,floor") == ["floor", "lxd", "lxdpool"]
    with pytest.raises(ValueError, match="unknown kube"):
        bl.parse_setups("docker,kube")


def test_pool_size_is_sized_for_the_largest_burst():
    assert bl.pool_size_for(["single"]) == 2
    assert bl.pool_size_for(["single", "burst10", "changeover"]) == 10
    assert bl.pool_size_for(list(bl.SCENARIOS)) == 50
    assert bl.pool_size_for(list(bl.SCENARIOS), 4) == 4
    assert bl.pool_size_for(["burst50"], 0) == 0
    with pytest.raises(ValueError, match="--pool-size -1"):
        bl.pool_size_for([], -1)


def _single(spawn_s, stop_s, mib):
    return {"spawn_s": spawn_s, "stop_s": stop_s, "memory": {"bytes": mib * 2**20}}


def test_peer_summary_and_table_three_columns():
    data = {
        "floor": {
            "single": [_single(4.0, 1.0, 128), _single(2.0, 1.0, 128)],
            "burst": [{"wall_s": 20.0, "stop_wall_s": 8.0}],
        },
        "lxd": {
            "single": [_single(3.0, 0.5, 64), _single(3.0, 0.5, 64)],
            "burst": [{"wall_s": 10.0, "stop_wall_s": 4.0}],
            "changeover": [{"first_s": 11.0, "next_s": 12.0}],
        },
        "docker": {"single": [_single(6.0, 2.0, 256)], "burst": [{"wall_s": 30.0}]},
    }
    rows = {r["metric"]: r for r in bl.peer_summary(data)}
    # Rows nobody measured are left out; a row one setup measured stays.
    assert "burst of 50, all ready (s)" not in rows
    assert "changeover: next 10, 2 s after (s)" in rows
    spawn = rows["single spawn (s)"]
    assert spawn["setups"]["floor"]["median"] == 3.0
    assert spawn["ratio"] == {"lxd": 1.0, "docker": 2.0}
    assert rows["idle memory per server (MiB)"]["ratio"]["lxd"] == 0.5
    assert rows["burst of 10, all ready (s)"]["ratio"] == {"lxd": 0.5, "docker": 1.5}
    # docker's burst has no stop figure: no ratio, not a crash.
    assert rows["10 stops at once (s)"]["ratio"] == {"lxd": 0.5, "docker": None}
    # No floor figure: no ratio.
    assert rows["changeover: first 10 ready (s)"]["ratio"]["lxd"] is None

    text = bl.peer_table(list(rows.values()), ["floor", "lxd", "docker"])
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "floor", "med", "p95", "lxd", "med", "p95", "ratio",
                                "docker", "med", "p95", "ratio", "n"]  # fmt: skip
    spawn_line = next(ln for ln in lines if ln.startswith("single spawn"))
    assert "1.00x" in spawn_line and "2.00x" in spawn_line and spawn_line.endswith("2/2/1")
    memory_line = next(ln for ln in lines if ln.startswith("idle memory"))
    assert memory_line.split()[5:9] == ["128", "128", "64", "64"]
    change = next(ln for ln in lines if ln.startswith("changeover: first"))
    assert "n/a" in change and change.endswith("0/1/0")


def test_peer_summary_idle_servers_pools_every_servers_memory():
    idle = {"memory_bytes": [100 * 2**20, 120 * 2**20, 110 * 2**20], "hub_cpu_per_s": 0.02,
            "next_spawn_s": 5.0, "stop_all_s": 30.0}  # fmt: skip
    lxd = {"memory_bytes": [90 * 2**20] * 4, "hub_cpu_per_s": 0.01, "next_spawn_s": 4.0}
    rows = {
        r["metric"]: r for r in bl.peer_summary({"floor": {"idle": [idle]}, "lxd": {"idle": [lxd]}})
    }
    memory = rows["idle servers: memory per server (MiB)"]
    assert memory["setups"]["floor"]["n"] == 3 and memory["setups"]["lxd"]["n"] == 4
    assert memory["setups"]["floor"]["median"] == 110 * 2**20
    assert rows["idle servers: hub CPU (ms per s)"]["ratio"]["lxd"] == 0.5
    text = bl.peer_table(list(rows.values()), ["floor", "lxd"])
    assert next(ln for ln in text.splitlines() if "hub CPU" in ln).split()[7:11] == [
        "20", "20", "10", "10",
    ]  # fmt: skip
    assert rows["idle servers: one more spawn (s)"]["ratio"]["lxd"] == 0.8
    assert rows["idle servers: all stopped (s)"]["ratio"]["lxd"] is None
