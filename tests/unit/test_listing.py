"""What `lxdspawner list` shows (pure)."""

from lxdspawner.listing import Server, servers, table
from lxdspawner.objects import KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY


def instance(name, user, server="", status="Running", location="none", ipv4=None, ours=True):
    config = {KEY_USER: user, KEY_SERVER: server} | ({KEY_MANAGED: MANAGED_BY} if ours else {})
    addresses = [{"family": "inet", "scope": "global", "address": ipv4}] if ipv4 else []
    return {
        "name": name,
        "status": status,
        "location": location,
        "config": config,
        "state": {"network": {"eth0": {"addresses": addresses}}},
    }


def test_the_hub_of_each_server_is_shown():
    made = instance("jupyter-ana", "ana")
    made["config"]["user.jupyterhub.hub"] = "physics-hub"
    assert servers([made])[0].hub == "physics-hub"
    assert table(servers([made])).splitlines()[1].split()[-1] == "physics-hub"


def test_only_ours_sorted_by_user_then_server():
    listed = servers(
        [
            instance("jupyter-zoe", "zoe", ipv4="10.0.0.3"),
            instance("web", "ana", ours=False),
            instance("jupyter-ana--work", "ana", "work", status="Stopped", location="member2"),
            instance("jupyter-ana", "ana", ipv4="10.0.0.2"),
        ]
    )
    assert listed == [
        Server("ana", "", "jupyter-ana", "Running", "", "10.0.0.2"),
        Server("ana", "work", "jupyter-ana--work", "Stopped", "member2", ""),
        Server("zoe", "", "jupyter-zoe", "Running", "", "10.0.0.3"),
    ]


def test_the_table_has_aligned_columns_and_one_line_per_server():
    text = table(
        [
            Server(
                "ana.maria@uni.es",
                "",
                "jupyter-ana-maria-uni-es-1a2b3c4d",
                "Running",
                "",
                "10.0.0.2",
            ),
            Server("tab\tand\nnewline", "work", "jupyter-x", "Stopped", "member2", ""),
        ]
    )
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["USER", "SERVER", "CONTAINER", "STATUS", "MEMBER", "IPV4", "HUB"]
    assert lines[1].split() == [
        "ana.maria@uni.es",
        "-",
        "jupyter-ana-maria-uni-es-1a2b3c4d",
        "Running",
        "-",
        "10.0.0.2",
        "-",
    ]
    assert lines[2].split()[0] == "tab\\tand\\nnewline"
    assert lines[0].index("CONTAINER") == lines[1].index("jupyter-") == lines[2].index("jupyter-")
