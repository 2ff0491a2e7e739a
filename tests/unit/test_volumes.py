"""Users' volumes: their names, the settings' checks, placement by data (pure), and the
spawner's volume work in process on an in-memory daemon: what is created, reused, kept and
deleted, and what the spawn page says when a volume cannot be used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fakes import FakeLxd, eventually, owned
from hypothesis import given
from hypothesis import strategies as st
from test_spawner_inprocess import HUB, fails, hub_daemon, server_answers, spawner, start  # noqa: F401

from lxdspawner import names, placement, volumes
from lxdspawner.ownership import Owner

HOME = "jupyter-home-ana"

# -- names --------------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=80), st.text(max_size=40))
def test_volume_names_are_safe_and_stable(user, server):
    for name in (
        names.home_volume_name(user, server, per_server=True),
        names.volume_name("scratch-{username}", user, server),
        names.volume_name("{username}-{servername}-work", user, server),
    ):
        assert names.is_valid_instance_name(name), name
        assert name == name.lower()
    assert names.volume_name("scratch-{username}", user) == names.volume_name(
        "scratch-{username}", user
    )


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_two_users_never_share_a_volume_name(a, b):
    if a != b:
        assert names.home_volume_name(a) != names.home_volume_name(b)
        assert names.volume_name("s-{username}", a) != names.volume_name("s-{username}", b)


def test_named_servers_share_the_users_home_unless_per_server():
    assert names.home_volume_name("ana", "lab") == HOME
    assert names.home_volume_name("ana", "", per_server=True) == HOME
    own = names.home_volume_name("ana", "lab", per_server=True)
    assert own != HOME and own.startswith("jupyter-home-ana-lab-")
    assert names.volume_name("scratch-{username}", "ana") == "scratch-ana"
    assert names.volume_name("course-data") == "course-data"


@pytest.mark.parametrize("template", ["Course Data", "data/../x", "x-{user}", "a-0123456789ab"])
def test_a_volume_name_that_cannot_be_used_is_named(template):
    with pytest.raises(ValueError, match="not usable"):
        names.volume_name(template, "ana")


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("10GiB", 10 * 1024**3), ("500MB", 500 * 1000**2), ("1.5G", 1_500_000_000), (4096, 4096)],
)
def test_sizes(text, size):
    assert volumes.parse_size(text, "home_volume_size") == size


@pytest.mark.parametrize("bad", ["ten gigs", "-1GiB", "0", "10 parsecs", True, []])
def test_a_size_that_is_not_one_names_the_setting(bad):
    with pytest.raises(ValueError, match="home_volume_size = "):
        volumes.parse_size(bad, "home_volume_size")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"home_volume_snapshots": {"every": "day"}}, "home_volume_snapshots has unknown keys"),
        ({"volumes": {"s-{username}": {"path": "relative"}}}, "volumes['s-{username}']['path']"),
        ({"volumes": {"s-{username}": {"path": "/s", "ro": 1}}}, "unknown keys ['ro']"),
        ({"volumes": {"c-{username}": {"path": "/c", "shared": True}}}, "a shared volume"),
        ({"volumes": {"x": {"path": "/x", "size": "lots"}}}, "volumes['x']['size'] = 'lots'"),
    ],
)
def test_settings_that_cannot_work_are_named(settings, named):
    with pytest.raises(ValueError) as failed:
        volumes.settings(hub="h", home_volume_size="1GiB", **settings)
    assert named in str(failed.value)


def test_plans_home_first_with_the_keys_of_their_owner():
    s = volumes.settings(
        hub="h",
        home_volume_size="1GiB",
        volumes={
            "scratch-{username}": {"path": "/scratch", "size": "2GiB"},
            "work-{servername}": "/work",
            "course": {"path": "/data", "read_only": True, "shared": True},
        },
    )
    home, scratch, work, course = volumes.plans(
        s, username="ana", server_name="lab", home="/home/ana", prefix="jupyter"
    )
    assert (home.name, home.path, home.owner) == (HOME, "/home/ana", Owner("h", "ana", ""))
    assert scratch.owner == Owner("h", "ana", "") and scratch.size == 2 * 1024**3
    assert work.owner == Owner("h", "ana", "lab")
    assert course.owner is None and course.device()["readonly"] == "true"
    assert home.config()["user.jupyterhub.volume"] == "home"
    assert "user.jupyterhub.user" not in course.config()


def test_two_volumes_at_one_path_are_refused():
    s = volumes.settings(hub="h", home_volume_size="1GiB", volumes={"x": "/home/ana"})
    with pytest.raises(ValueError, match="at one path"):
        volumes.plans(s, username="ana", server_name="", home="/home/ana", prefix="jupyter")


# -- placement follows the data (pure) ----------------------------------------------------------


def members(*specs) -> list[placement.Member]:
    return [placement.Member(n, s, (), i, 0, w) for n, s, i, w in specs]


def test_a_user_with_a_volume_goes_where_it_is_whatever_the_weights_and_target():
    cluster = members(("m1", "Online", 9, 1.0), ("m2", "Online", 0, 5.0), ("m3", "Online", 0, 0))
    request = placement.PlacementRequest("ana", require="m2", data_member="m3", data_volume=HOME)
    assert placement.weighted_least_loaded(cluster, request) == "m3"
    # Without a volume yet, weights and target apply as before.
    assert placement.weighted_least_loaded(cluster, placement.PlacementRequest("bo")) == "m2"


@pytest.mark.parametrize("status", ["Offline", "Evacuated"])
def test_the_member_holding_the_data_down_fails_the_spawn_naming_both(status):
    cluster = members(("m1", "Online", 0, 1.0), ("m2", status, 0, 1.0))
    request = placement.PlacementRequest("ana", data_member="m2", data_volume=HOME)
    with pytest.raises(placement.NoMemberAvailable) as failed:
        placement.weighted_least_loaded(cluster, request)
    message = failed.value.message
    assert "m2" in message and HOME in message and status in message
    assert "volumes move ana" in message


def test_a_remote_pool_pins_nothing():
    assert volumes.data_member({"location": "m2"}, "ceph") is None
    assert volumes.data_member({"location": "m2"}, "btrfs") == "m2"
    assert volumes.data_member({"location": "none"}, "btrfs") is None


# -- in process ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_the_first_spawn_creates_the_home_the_next_reuses_it(fake: FakeLxd):
    s = spawner(fake)
    _, said = await start(s)
    assert "Creating your home volume (10 GiB)" in said
    home = fake.volume("default", HOME)
    assert home is not None and home.config["size"] == str(10 * 1024**3)
    assert Owner(HUB, "ana").owns(home.config)
    device = fake.instances["jupyter-ana"].devices[names.volume_device_name("/home/ana")]
    assert device == {"type": "disk", "pool": "default", "source": HOME, "path": "/home/ana"}
    await s.stop()
    fake.finish_teardown("jupyter-ana")
    await eventually(lambda: "jupyter-ana" not in fake.instances)
    again = spawner(fake)
    again.load_state(s.get_state())
    _, said = await start(again)
    assert not any("home volume" in m for m in said), said
    assert fake.volume("default", HOME) is home


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_spawn_that_fails_before_the_start_deletes_the_empty_volume_it_made(fake: FakeLxd):
    fake.fail("start_instance", times=1)
    await fails(spawner(fake))
    assert fake.volume("default", HOME) is None


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_spawn_failing_after_the_start_keeps_the_volume(fake: FakeLxd):
    fake.dhcp = False  # the container starts, then never gets an address
    await fails(spawner(fake, start_timeout=1))
    assert fake.volume("default", HOME) is not None


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_an_existing_volume_is_never_deleted_by_a_failed_spawn(fake: FakeLxd):
    fake.add_volume(
        "default", HOME, config={**owned("ana", hub=HUB), "user.jupyterhub.volume": "home"}
    )
    fake.fail("start_instance", times=1)
    await fails(spawner(fake))
    assert fake.volume("default", HOME) is not None


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"user.note": "the admin's"}, "left untouched"),
        ({**owned("bob", hub=HUB), "user.jupyterhub.volume": "home"}, "left untouched"),
        ({**owned("ana", hub="other-hub"), "user.jupyterhub.volume": "home"}, "left untouched"),
    ],
)
@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_volume_under_the_users_name_that_is_not_theirs_is_left_alone(
    fake: FakeLxd, config, named
):
    foreign = fake.add_volume("default", HOME, config=config)
    before = dict(foreign.config)
    error, _ = await fails(spawner(fake))
    assert named in str(error) and HOME in str(error)
    assert fake.volume("default", HOME) is foreign and foreign.config == before
    assert not fake.instances


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"home_volume_size": "ten"}, "home_volume_size = 'ten'"),
        ({"home_volume_pool": "nowhere"}, "storage pool 'nowhere' (home_volume_pool)"),
        (
            {"volumes": {"course": {"path": "/data", "shared": True}}},
            "volumes['course']: the shared volume course does not exist",
        ),
    ],
)
@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_volume_settings_that_cannot_work_fail_the_spawn_naming_them(
    fake: FakeLxd, settings, named
):
    error, _ = await fails(spawner(fake, **settings))
    assert named in str(error)
    assert not fake.instances


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_shared_volume_with_a_size_is_made_once_for_everyone(fake: FakeLxd):
    course = {"course": {"path": "/data", "shared": True, "size": "1GiB", "read_only": True}}
    for user in ("ana", "bo"):
        await start(spawner(fake, user, volumes=course))
    shared = fake.volume("default", "course")
    assert shared is not None and "user.jupyterhub.user" not in shared.config
    for name in ("jupyter-ana", "jupyter-bo"):
        device = fake.instances[name].devices[names.volume_device_name("/data")]
        assert device["readonly"] == "true" and device["source"] == "course"


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_no_home_volume_when_turned_off(fake: FakeLxd):
    await start(spawner(fake, home_volume_size=""))
    assert not fake.volumes


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_delete_forever_deletes_volumes_only_when_told(fake: FakeLxd):
    for user in ("ana", "bo"):
        s = spawner(fake, user, delete_volumes_with_user=(user == "bo"))
        await start(s)
        await s.stop()
        fake.finish_teardown(f"jupyter-{user}")
        await eventually(lambda u=user: f"jupyter-{u}" not in fake.instances)
        await s.delete_forever()
    assert fake.volume("default", HOME) is not None
    assert fake.volume("default", "jupyter-home-bo") is None


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_named_servers_deletion_takes_only_its_own_volume(fake: FakeLxd):
    s = spawner(fake, home_volume_per_server=True, delete_volumes_with_user=True)
    s.orm_spawner = SimpleNamespace(name="lab", server=None)
    await start(s)
    await s.stop()
    fake.finish_teardown(s.instance_name)
    await eventually(lambda: s.instance_name not in fake.instances)
    lab = names.home_volume_name("ana", "lab", per_server=True)
    fake.add_volume(
        "default", HOME, config={**owned("ana", hub=HUB), "user.jupyterhub.volume": "home"}
    )
    await s.delete_forever()
    assert fake.volume("default", lab) is None
    assert fake.volume("default", HOME) is not None


def test_a_home_mounted_from_the_host_gets_no_volume():
    """The original spawner's configs mount host homes with filesystems_to_mount: they keep
    working, their host directory stays the home."""
    s = volumes.settings(hub="h", home_volume_size="1GiB", volumes={"s-{username}": "/s"})
    planned = volumes.plans(
        s, username="ana", server_name="", home="/home/ana", prefix="j", host_mounts=["/home/ana/"]
    )
    assert [p.path for p in planned] == ["/s"]
    with pytest.raises(ValueError, match="filesystems_to_mount"):
        volumes.plans(
            s, username="ana", server_name="", home="/home/ana", prefix="j", host_mounts=["/s"]
        )


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_a_volume_the_daemon_refuses_names_the_settings(fake: FakeLxd):
    from lxdspawner.lxd import LxdError

    fake.fail("create_volume", LxdError('option "snapshots.expiry": Invalid expiry expression'))
    error, _ = await fails(spawner(fake, home_volume_snapshots={"expiry": "1h"}))
    assert "Invalid expiry expression" in str(error)
    assert "home_volume_snapshots = {'expiry': '1h'}" in str(error)
    assert not fake.instances


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_an_existing_home_follows_the_snapshot_setting(fake: FakeLxd):
    keys = {**owned("ana", hub=HUB), "user.jupyterhub.volume": "home"}
    home = fake.add_volume("default", HOME, config={**keys, "snapshots.schedule": "@hourly"})
    await start(spawner(fake, home_volume_snapshots={"schedule": "@daily", "expiry": "1w"}))
    assert home.config["snapshots.schedule"] == "@daily"
    assert home.config["snapshots.expiry"] == "1w"


@pytest.mark.usefixtures("hub_daemon", "server_answers")
async def test_an_operators_shared_volume_is_shifted_for_containers_with_their_own_uids(
    fake: FakeLxd,
):
    course = fake.add_volume("default", "course", config={"user.note": "the operator's"})
    await start(spawner(fake, volumes={"course": {"path": "/data", "shared": True}}))
    assert course.config == {"user.note": "the operator's", "security.shifted": "true"}
