"""`lxdspawner doctor`'s checks past ``/1.0``, on the fake daemon: each member's image and
shared copies, clock skew, subordinate ids, stray bridge ports, what belongs to no server
(the hub's real SQLite database, read-only) and the probe container, which is always deleted."""

from __future__ import annotations

from fakes import IMAGE, SOURCE

from lxdspawner import doctorchecks, hostcheck, hubdb, names, probe, sharing
from lxdspawner.doctor import ERROR, OK, WARNING, Settings
from lxdspawner.lxd import ExecResult
from lxdspawner.ownership import Owner


async def test_members_image_shares_and_clocks(fake):
    fake.members = {"m1": "Online", "m2": "Online", "m3": "Offline"}
    fake.unpacked = {"m1": {IMAGE}}
    usr = names.shared_volume_name(IMAGE, "/usr")
    fake.add_volume("default", usr, config={sharing.KEY_READY: "true"}, location="m1")
    fake.clock_offsets = {"m2": 30.0}
    found = await doctorchecks.check_members(
        fake,
        "d",
        image="jupyter-base",
        pool="default",
        driver="btrfs",
        shared_directories=["/usr", "/opt/jupyterhub"],
        prepull="lxdspawner prepull -f hub.py",
    )
    by = {(r.check, r.severity): r for r in found}
    image = by["image", WARNING]
    assert "m2" in image.what and "m1" not in image.what and "m3" not in image.what
    assert image.fix == "lxdspawner prepull -f hub.py"
    assert "/usr on m2" in by["shares", WARNING].what
    assert by["shares", OK].what.startswith("no shared copy of /opt/jupyterhub")
    clock = by["clock", WARNING]
    assert "m2 ahead of m1" in clock.what and "timesyncd" in clock.fix
    fake.unpacked = {"m1": {IMAGE}, "m2": {IMAGE}}
    fake.clock_offsets = {}
    found = await doctorchecks.check_members(
        fake, "d", image="jupyter-base", pool="default", driver="btrfs",
        shared_directories=[], prepull="p",
    )  # fmt: skip
    assert [r.severity for r in found] == [OK, OK], found


def test_subordinate_ids():
    ok = hostcheck.check_ids(
        "/etc/subuid", "root:1000000:1000000000\n", isolated=True, needed=100, existing=3
    )
    assert ok.ok and "15257" in ok.what
    two = hostcheck.check_ids(
        "/etc/subuid",
        "root:100000:65536\nroot:1000000:1000000000\n",
        isolated=False,
        needed=0,
        existing=0,
    )
    assert not two.ok and not two.warning and "root:1000000:1000000000" in two.fix
    small = hostcheck.check_ids(
        "/etc/subgid", "root:100000:196608\n", isolated=True, needed=10, existing=1
    )
    assert not small.ok and small.warning and "holds 2 containers" in small.what
    full = hostcheck.check_ids(
        "/etc/subgid", "root:100000:196608\n", isolated=True, needed=0, existing=5
    )
    assert not full.ok and not full.warning
    none = hostcheck.check_ids("/etc/subuid", None, isolated=True, needed=0, existing=0)
    assert none.warning and "echo root:1000000:1000000000 >> /etc/subuid" in none.fix


async def test_host_ids_and_stray_bridge_ports(fake, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/subuid").write_text("root:1000000:1000000000\n")
    (tmp_path / "etc/subgid").write_text("root:100000:65536\nroot:1000000:1000000000\n")
    brif = tmp_path / "sys/class/net/incusbr0/brif"
    brif.mkdir(parents=True)
    for port in ("veth0001", "veth0002", "eno1"):
        (brif / port).touch()
    fake.add_instance("a", status="Running", config={"volatile.eth0.host_name": "veth0001"})
    found = await doctorchecks.check_host(
        fake, "d", bridge="incusbr0", isolated=True, needed=0, root=tmp_path
    )
    severities = {(r.check, r.what.split()[0].rstrip(":")): r.severity for r in found}
    assert severities["ids", "/etc/subuid"] == OK
    assert severities["ids", "/etc/subgid"] == ERROR
    bridge = next(r for r in found if r.check == "bridge")
    assert bridge.severity == WARNING and bridge.fix == "ip link delete veth0002"
    assert "eno1" not in bridge.what


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "98 22 0:51 / /var/lib/incus/storage-pools/lxdspawner rw,relatime shared:40 - btrfs "
    "/dev/loop0 rw,discard=async,space_cache=v2,user_subvol_rm_allowed,subvolid=5,subvol=/\n"
    "99 22 0:52 / /var/lib/lxd/storage-pools/lxdspawner rw,relatime shared:41 - btrfs "
    "/dev/loop1 rw,subvolid=5,subvol=/\n"
)


async def test_a_btrfs_pool_whose_quotas_are_not_enforced(fake, tmp_path, monkeypatch):
    """Incus's pool (not LXD's, of the same name) has inconsistent quota accounting: a
    warning naming the rescan; consistent, an OK; quotas off or not a mount here, nothing."""
    monkeypatch.setattr(
        type(fake), "where", property(lambda self: "unix socket /var/lib/incus/unix.socket")
    )
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(MOUNTINFO)
    for uuid, device, flag in (("aaaa", "loop0", "1"), ("bbbb", "loop1", "0")):
        (tmp_path / f"sys/fs/btrfs/{uuid}/devices").mkdir(parents=True)
        (tmp_path / f"sys/fs/btrfs/{uuid}/devices/{device}").touch()
        (tmp_path / f"sys/fs/btrfs/{uuid}/qgroups").mkdir()
        (tmp_path / f"sys/fs/btrfs/{uuid}/qgroups/inconsistent").write_text(flag + "\n")

    async def quotas() -> list:
        found = await doctorchecks.check_host(
            fake, "d", bridge="", isolated=True, needed=0, root=tmp_path,
            pool="lxdspawner", driver="btrfs",
        )  # fmt: skip
        return [r for r in found if r.check == "quotas"]

    (warning,) = await quotas()
    assert warning.severity == WARNING and "no size limit" in warning.what, warning
    assert warning.fix == "btrfs quota rescan -w /var/lib/incus/storage-pools/lxdspawner"
    (tmp_path / "sys/fs/btrfs/aaaa/qgroups/inconsistent").write_text("0\n")
    assert [r.severity for r in await quotas()] == [OK]
    (tmp_path / "sys/fs/btrfs/aaaa/qgroups/inconsistent").unlink()
    assert [r.severity for r in await quotas()] == []
    (tmp_path / "proc/self/mountinfo").write_text("")
    assert await quotas() == []


def _hub_database(path) -> str:
    from jupyterhub import orm

    url = f"sqlite:///{path}"
    db = orm.new_session_factory(url)()
    ana = orm.User(name="ana")
    db.add(ana)
    db.add(orm.Spawner(user=ana, name=""))
    db.add(orm.Spawner(user=ana, name="lab"))
    db.commit()
    db.close()
    return url


async def test_what_belongs_to_no_server_with_the_hub_database(fake, tmp_path):
    url = _hub_database(tmp_path / "jupyterhub.sqlite")
    hub = hubdb.read(url)
    assert hub.has_server("ana", "lab") and not hub.has_server("ana", "gone")
    before = (tmp_path / "jupyterhub.sqlite").read_bytes()
    for user, server in (("ana", ""), ("ana", "lab"), ("ana", "gone"), ("bob", "")):
        await fake.create_instance(
            names.instance_name(user, server), source=SOURCE, config=Owner("h", user, server).keys()
        )
    await fake.create_instance("other-hub", source=SOURCE, config=Owner("h2", "zed").keys())
    fake.add_volume("default", "jupyter-bob", config=Owner("h", "bob").keys())
    fake.add_volume("default", "jupyter-ana", config=Owner("h", "ana").keys())
    found = await doctorchecks.check_owners(fake, "d", "h", hub)
    assert [r.severity for r in found] == [WARNING] * 3, found
    said = " ".join(r.what for r in found)
    assert "server 'gone'" in said and "jupyter-bob" in said and "zed" not in said
    volume = next(r for r in found if r.check == "volumes")
    assert volume.fix.startswith("lxdspawner volumes delete 'bob' --yes")
    assert len(fake.instances) == 5 and len(fake.volumes) == 2  # nothing deleted
    assert (tmp_path / "jupyterhub.sqlite").read_bytes() == before  # read-only
    assert await doctorchecks.check_owners(fake, "d", "h", None) == []


def test_probe_urls_and_outcomes():
    assert probe.api_url("http://10.0.0.1:8081") == "http://10.0.0.1:8081/hub/api"
    assert probe.api_url("http://h:8081/jupyter/hub/") == "http://h:8081/jupyter/hub/api"
    assert probe.classify(0, '{"version": "5.3.0"}', "")[0] == probe.HUB
    assert probe.classify(1, "", "wget: can't connect: Connection refused")[0] == probe.REFUSED
    assert probe.classify(1, "", "wget: download timed out")[0] == probe.BLOCKED
    assert probe.classify(1, "", "wget: server returned error: HTTP/1.1 404")[0] == probe.OTHER
    loopback = Settings(hub_ip="0.0.0.0", base_url="/jupyter/")
    assert doctorchecks.hub_url_for(loopback, "10.0.0.1") == (
        "http://10.0.0.1:8081/jupyter/hub/",
        "c.JupyterHub.hub_ip",
    )
    chosen = Settings(hub_connect_url="http://hub:8081")
    assert doctorchecks.hub_url_for(chosen, None)[1] == "c.JupyterHub.hub_connect_url"


async def test_probe_reaches_the_hub_and_is_deleted(fake):
    asked = []

    def answer(instance, command):
        asked.append((instance.config.get(probe.KEY_PROBE), command))
        return ExecResult(0, '{"version": "5.3.0"}', "")

    fake.exec_handler = answer
    found = await doctorchecks.check_probe(
        fake,
        "d",
        "http://127.0.0.1:1/hub/",
        hub_id="h",
        profiles=["default"],
        image="jupyter-base",
        settings_hint="c.JupyterHub.hub_ip",
    )
    assert found.severity == OK and "JupyterHub 5.3.0" in found.what
    assert asked[0][0] == "true" and asked[0][1][0] == "sh"
    assert asked[0][1][-1] == "http://127.0.0.1:1/hub/api"
    assert fake.instances == {}  # the probe is gone


async def test_probe_blocked_names_the_fix_and_leaves_nothing(fake):
    fake.exec_handler = lambda i, c: ExecResult(1, "", "wget: download timed out")
    found = await doctorchecks.check_probe(
        fake,
        "d",
        "http://127.0.0.1:1/hub/",
        hub_id="h",
        profiles=["default"],
        image="jupyter-base",
        settings_hint="c.JupyterHub.hub_connect_url",
    )
    assert found.severity == ERROR and "the hub is not running there" in found.what
    assert "c.JupyterHub.hub_connect_url" in found.fix and "--no-probe" in found.fix
    assert fake.instances == {}
    fake.dhcp = False
    fake.exec_handler = lambda i, c: 0
    doctorchecks.probe.ADDRESS_TIMEOUT = 0.0
    try:
        found = await doctorchecks.check_probe(
            fake, "d", "http://127.0.0.1:1/", hub_id="h", profiles=["default"],
            image="jupyter-base", settings_hint="x",
        )  # fmt: skip
    finally:
        doctorchecks.probe.ADDRESS_TIMEOUT = 20.0
    assert found.severity == ERROR and "no IPv4" in found.what and "ipv4.dhcp" in found.fix
    assert fake.instances == {}


async def test_a_probe_of_another_hub_is_not_deleted(fake):
    await fake.create_instance(
        names.probe_name("x"),
        source=SOURCE,
        config={probe.KEY_PROBE: "true", "user.jupyterhub.hub": "h2"},
    )
    await probe.remove(fake, names.probe_name("x"), "h")
    assert names.probe_name("x") in fake.instances
