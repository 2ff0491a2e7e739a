"""A user's volume on a cluster: finding where it is when its member does not answer, and
moving it to another member (volumes.locate, move_source, Volumes.find and Volumes.move)."""

from __future__ import annotations

import pytest
from fakes import FakeLxd

from lxdspawner import volumes
from lxdspawner.lxd import LxdError
from lxdspawner.volumes import VolumeError, instances_using, locate, move_source

MEMBERS = [
    {"server_name": "m1", "status": "Online"},
    {"server_name": "m2", "status": "Online"},
    {"server_name": "m3", "status": "Offline"},
]


def vol(name="jupyter-home-ana", location="m1", used_by=(), **extra):
    return {"name": name, "location": location, "used_by": list(used_by), "config": {}, **extra}


# -- locate: the pool's list says where a volume is ------------------------------------------


def test_locate_finds_the_volume_and_not_its_snapshots_or_others():
    listing = [vol("jupyter-home-bob"), vol(location="m3"), vol("jupyter-home-ana/snap0")]
    assert locate("jupyter-home-ana", listing) == vol(location="m3")
    assert locate("jupyter-home-eve", listing) is None


def test_locate_refuses_a_name_held_on_two_members():
    with pytest.raises(VolumeError) as e:
        locate("jupyter-home-ana", [vol(location="m2"), vol(location="m1")])
    assert e.value.status == 409
    assert e.value.message == (
        "members m1, m2 each hold a volume named jupyter-home-ana: an admin must keep one and "
        "delete the others before its server can start"
    )


def test_instances_using_reads_the_names_from_used_by():
    used = ["/1.0/instances/jupyter-ana?project=default", "/1.0/instances/other"]
    assert instances_using(vol(used_by=used)) == ["jupyter-ana", "other"]


# -- move_source: whether and from where a volume can move ----------------------------------


def test_a_volume_moves_from_its_member_or_stays_when_it_is_there():
    assert move_source(vol(), pool="p", driver="btrfs", to="m2", members=MEMBERS) == "m1"
    assert move_source(vol(), pool="p", driver="btrfs", to="m1", members=MEMBERS) is None


@pytest.mark.parametrize(
    "volume, driver, to, members, status, message",
    [
        (
            vol(location="none"),
            "ceph",
            "m2",
            MEMBERS,
            400,
            "jupyter-home-ana is on pool p, a ceph pool every member reaches: nothing to move",
        ),
        (vol(location="none"), "dir", "m2", [], 400, "the daemon is not a cluster"),
        (vol(), "btrfs", "m9", MEMBERS, 404, "no cluster member 'm9' (members: m1, m2, m3)"),
        (
            vol(used_by=["/1.0/instances/jupyter-ana"]),
            "btrfs",
            "m2",
            MEMBERS,
            409,
            "jupyter-home-ana is used by jupyter-ana: stop the server first",
        ),
        (
            vol(),
            "btrfs",
            "m3",
            MEMBERS,
            503,
            "jupyter-home-ana cannot be moved from m1 to m3: m3 (the member to move it to) is "
            "Offline, not Online",
        ),
        (
            vol(location="m3"),
            "btrfs",
            "m1",
            MEMBERS,
            503,
            "jupyter-home-ana cannot be moved from m3 to m1: m3 (the member holding it) is "
            "Offline, not Online",
        ),
    ],
)
def test_a_volume_that_cannot_move_is_refused_saying_why(
    volume, driver, to, members, status, message
):
    with pytest.raises(VolumeError) as e:
        move_source(volume, pool="p", driver=driver, to=to, members=members)
    assert e.value.status == status
    assert e.value.message.startswith(message), e.value.message


# -- on the in-memory cluster ----------------------------------------------------------------

HOME = "jupyter-home-ana"


def plan() -> volumes.Plan:
    s = volumes.settings(hub="hub-1", home_volume_size="10GiB")
    return volumes.plans(s, username="ana", server_name="", home="/home/ana", prefix="jupyter")[0]


@pytest.fixture
def cluster() -> FakeLxd:
    fake = FakeLxd(members=["m1", "m2", "m3"])
    p = plan()
    fake.add_volume("default", HOME, config=p.config(), location="m3")
    return fake


async def test_a_volume_whose_member_does_not_answer_is_found_in_the_pools_list(cluster):
    p = volumes.Plan(**{**plan().__dict__, "pool": "default"})
    cluster.members["m3"] = "Offline"
    prepared = await volumes.Volumes(cluster).prepare([p], shifted="")
    assert (prepared.member, prepared.pinned_by) == ("m3", HOME)
    assert prepared.unreadable == "Server isn't ready yet"
    # Answering, it is read directly.
    cluster.members["m3"] = "Online"
    prepared = await volumes.Volumes(cluster).prepare([p], shifted="")
    assert (prepared.member, prepared.unreadable) == ("m3", "")


async def test_a_volume_that_cannot_be_read_nor_listed_is_said(cluster):
    p = volumes.Plan(**{**plan().__dict__, "pool": "default"})
    cluster.members["m3"] = "Offline"
    cluster.fail("list_volumes", LxdError("no leader", status=503))
    with pytest.raises(VolumeError) as e:
        await volumes.Volumes(cluster).prepare([p], shifted="")
    assert e.value.message == (
        f"your home volume {HOME} on pool default cannot be read: Server isn't ready yet (nor "
        "the pool's volumes: no leader)"
    )


async def test_move_copies_the_volume_with_its_config_and_deletes_the_original(cluster):
    original = cluster.volume("default", HOME, "m3")
    original.content.add("notes.txt")
    await volumes.Volumes(cluster).move("default", HOME, "m1")
    assert cluster.volume("default", HOME, "m3") is None
    moved = cluster.volume("default", HOME, "m1")
    assert moved.config == original.config and moved.content == {"notes.txt"}
    # There already: nothing to do.
    before = cluster.requests["copy_volume_to_member"]
    await volumes.Volumes(cluster).move("default", HOME, "m1")
    assert cluster.requests["copy_volume_to_member"] == before


async def test_move_refuses_a_volume_in_use_a_missing_one_and_a_duplicate(cluster):
    cluster.add_instance("jupyter-ana", location="m3")
    cluster.instances["jupyter-ana"].devices = {
        "home": {"type": "disk", "pool": "default", "source": HOME, "path": "/home/ana"}
    }
    keeper = volumes.Volumes(cluster)
    with pytest.raises(VolumeError, match="is used by jupyter-ana: stop the server first"):
        await keeper.move("default", HOME, "m1")
    with pytest.raises(VolumeError, match="no volume jupyter-home-bob on pool default"):
        await keeper.move("default", "jupyter-home-bob", "m1")
    del cluster.instances["jupyter-ana"]
    cluster.add_volume("default", HOME, location="m1")
    with pytest.raises(VolumeError) as e:
        await keeper.move("default", HOME, "m2")
    assert e.value.message.startswith("members m1, m3 each hold a volume named")


async def test_a_failed_copy_leaves_the_original_alone(cluster):
    cluster.fail("copy_volume_to_member", LxdError("pull failed: connection reset"))
    with pytest.raises(VolumeError) as e:
        await volumes.Volumes(cluster).move("default", HOME, "m1")
    assert e.value.message == (
        f"copying {HOME} (pool default) from m3 to m1 failed: pull failed: connection reset; "
        "it stays on m3"
    )
    assert cluster.volume("default", HOME, "m3") is not None
    assert cluster.volume("default", HOME, "m1") is None


async def test_move_on_a_daemon_without_the_one_call_copy_says_how_to_do_it():
    lxd = FakeLxd(product="lxd", members=["m1", "m2"])
    lxd.add_volume("default", HOME, config=plan().config(), location="m1")
    with pytest.raises(VolumeError) as e:
        await volumes.Volumes(lxd).move("default", HOME, "m2")
    assert e.value.message == (
        "the fake daemon lacks API extension cluster_internal_custom_volume_copy (LXD 5.0 "
        f"lacks it): move {HOME} with `lxc storage volume move default/{HOME} "
        f"default/{HOME} --target m1 --destination-target m2`"
    )
    assert lxd.volume("default", HOME, "m1") is not None
