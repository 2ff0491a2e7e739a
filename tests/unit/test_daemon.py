"""The hub's Daemon against an in-memory Incus: placement on a cluster, whose a name is, the
stop-and-remove protocol, poll, the orphan reaper, and making a server's container.

What is asserted is what a user or an operator would see: which member or name a server
gets, the error a spawn page shows, which containers exist in what state, what the daemon
was told (its lifecycle events), and how many requests a poll costs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import pytest
from fakes import IMAGE, SOURCE, FakeLxd, eventually, owned, server_unit

from lxdspawner import cache as cache_module
from lxdspawner import daemon as daemon_module
from lxdspawner import members, names, objects, recipes, removals, sharing
from lxdspawner.daemon import Daemon, DaemonError, MemberFailed, Source
from lxdspawner.lxd import ExecResult, LxdError, NotFound, Unreachable
from lxdspawner.members import SUSPECT_FOR
from lxdspawner.ownership import KEY_HUB, Owner
from lxdspawner.placement import ONLINE, PlacementRequest
from lxdspawner.volumes import VolumeError

HUB = "hub-1"
ANA = Owner(HUB, "ana")
NAME = "jupyter-ana"
CANDIDATES = [NAME, "jupyter-ana-2", "jupyter-ana-3"]
#: ANA's keys as LXD keeps them (it drops empty values: no server key for a default server).
ANA_KEYS = {k: v for k, v in owned("ana").items() if v}


def running(entry) -> bool:
    return entry is not None and entry.status == "Running"


def stopped(entry) -> bool:
    return entry is not None and entry.status == "Stopped"


async def server(
    daemon: Daemon, fake: FakeLxd, name: str = NAME, owner: Owner = ANA, **create
) -> None:
    """A server's container, running, as the daemon's cache has seen it start."""
    await fake.create_instance(name, source=SOURCE, config=owner.keys(), start=True, **create)
    await (await daemon.cache()).wait_for(name, running, 1)


async def claim(daemon: Daemon, *, recorded: str = "", keep: bool = False, **say):
    return await daemon.claim(
        CANDIDATES, ANA, recorded=recorded, keep=keep, teardown_timeout=5, **say
    )


def spec(name: str = NAME, user: str = "ana", **settings) -> objects.ServerSpec:
    return objects.ServerSpec(
        instance=name,
        username=user,
        server_name="",
        hub=HUB,
        uid=1000,
        gid=1000,
        home=f"/home/{user}",
        cmd=("jupyterhub-singleuser",),
        **settings,
    )


@pytest.fixture
def cluster() -> FakeLxd:
    fake = FakeLxd(members=["m1", "m2", "m3"])
    fake.add_image(IMAGE, "jupyter-base", directories={"/usr"})
    return fake


@pytest.fixture
def daemon(fake, make_daemon) -> Daemon:
    fake.exec_handler = server_unit(fake)
    return make_daemon(fake)


@pytest.fixture
def on_cluster(cluster, make_daemon) -> Daemon:
    cluster.exec_handler = server_unit(cluster)
    return make_daemon(cluster)


class Clock:
    """time as a module reads it, moved on by hand from the real one."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(cache_module, "time", clock)
    monkeypatch.setattr(members, "time", clock)
    return clock


# -- placement ---------------------------------------------------------------------------------


async def test_a_burst_of_placements_spreads_over_the_members(on_cluster, cluster):
    await server(on_cluster, cluster, "jupyter-old", Owner(HUB, "old"), target="m1")
    chosen = await asyncio.gather(
        *(on_cluster.place(PlacementRequest(user=f"u{i}"), weights={}) for i in range(5))
    )
    # m1 holds one server already: 2 + 2 + 1 more give every member two.
    assert Counter(chosen) == {"m1": 1, "m2": 2, "m3": 2}
    for member in chosen:
        on_cluster.landed(member)
    assert await on_cluster.place(PlacementRequest(user="next"), weights={}) == "m2"


async def test_a_member_a_spawn_just_failed_on_is_skipped_for_a_while(on_cluster, cluster, clock):
    failed = on_cluster.member_failed("m1", NAME, Unreachable("m1 stopped answering"))
    assert isinstance(failed, MemberFailed)
    assert (failed.status, failed.reason, failed.member) == (503, "member", "m1")
    assert failed.message.startswith(
        f"cluster member m1 failed during the spawn of {NAME}: m1 stopped answering. It is "
        f"left out of placement for {SUSPECT_FOR:.0f} s"
    )
    assert cluster.members["m1"] == ONLINE  # LXD has not noticed yet
    for i in range(4):
        member = await on_cluster.place(PlacementRequest(user=f"u{i}"), weights={})
        on_cluster.landed(member)
        assert member != "m1"
    clock.ahead = SUSPECT_FOR
    assert await on_cluster.place(PlacementRequest(user="later"), weights={}) == "m1"


async def test_only_a_failure_the_daemon_answered_blames_the_member(on_cluster):
    assert on_cluster.member_failed("m1", NAME, ValueError("our own bug")) is None
    try:
        raise DaemonError("could not create") from LxdError("member m1: I/O error")
    except DaemonError as e:
        assert on_cluster.member_failed("m1", NAME, e).message.endswith("start again.")
    # Creating the home volume there: the daemon's answer is two causes down.
    try:
        try:
            raise VolumeError("creating jupyter-home-ana failed") from LxdError("not ready")
        except VolumeError as e:
            raise DaemonError(e.message, reason="volume") from e
    except DaemonError as e:
        failed = on_cluster.member_failed("m1", NAME, e)
        assert failed.message.startswith(f"cluster member m1 failed during the spawn of {NAME}:")
        assert "not ready. It is left out of placement" in failed.message


async def test_no_usable_member_is_a_503_naming_each_member(on_cluster, cluster):
    cluster.members.update(m1="Offline", m2="Evacuated", m3="Offline")
    with pytest.raises(DaemonError) as error:
        await on_cluster.place(PlacementRequest(user="ana"), weights={})
    assert (error.value.status, error.value.reason) == (503, "placement")
    for member in ("m1: ", "m2: ", "m3: "):
        assert member in error.value.message
    assert on_cluster.members.in_flight == {}  # nothing left counted in flight


async def test_a_policy_must_name_a_member(on_cluster):
    with pytest.raises(DaemonError, match="placement_policy chose 'elsewhere'"):
        await on_cluster.place(
            PlacementRequest(user="ana"), weights={}, policy=lambda members, request: "elsewhere"
        )


async def test_a_standalone_daemon_places_nowhere_and_says_a_target_is_ignored(daemon, caplog):
    assert await daemon.place(PlacementRequest(user="ana"), weights={}) is None
    assert await daemon.place(PlacementRequest(user="ana", require="node2"), weights={}) is None
    assert "target 'node2' ignored: the fake daemon is not a cluster" in caplog.text
    daemon.landed(None)


# -- a server's name ---------------------------------------------------------------------------


async def test_a_name_held_by_another_instance_is_left_alone_and_the_next_is_taken(
    daemon, fake, caplog
):
    fake.add_instance(NAME, status="Running", config={"user.note": "made by hand"})
    fake.add_instance("jupyter-ana-2", status="Running", config=owned("bob"))
    assert await claim(daemon) == ("jupyter-ana-3", None)
    assert fake.instances[NAME].status == fake.instances["jupyter-ana-2"].status == "Running"
    assert fake.instances[NAME].config == {"user.note": "made by hand"}
    assert "an instance lxdspawner did not make holds the name jupyter-ana" in caplog.text
    assert "user 'bob', server '' of hub 'hub-1' holds the name jupyter-ana-2" in caplog.text


async def test_a_server_finds_its_own_container(daemon, fake):
    fake.add_instance(NAME, config=owned("ana"))
    name, existing = await claim(daemon)
    assert name == NAME and existing["config"] == ANA_KEYS


async def test_no_free_name_is_an_error_naming_them(daemon, fake):
    for name in CANDIDATES:
        fake.add_instance(name, config=owned("bob"))
    with pytest.raises(DaemonError, match="no free container name for this server: jupyter-ana, "):
        await claim(daemon)


async def test_a_container_of_lxdspawner_0_1_is_adopted_only_under_the_recorded_name(daemon, fake):
    old = {k: v for k, v in owned("ana").items() if k != KEY_HUB}
    fake.add_instance(NAME, config=old)
    assert await claim(daemon) == ("jupyter-ana-2", None)
    name, existing = await claim(daemon, recorded=NAME)
    assert name == NAME and existing is not None
    # Another hub's is never this hub's, recorded or not.
    fake.instances[NAME].config = owned("ana", hub="hub-2")
    assert await claim(daemon, recorded=NAME) == ("jupyter-ana-2", None)


async def test_a_kept_container_that_cannot_be_read_is_a_clear_error(daemon, fake):
    fake.add_instance(NAME, config=owned("ana"))
    fake.fail("get_instance", LxdError("disk on fire", status=500), times=None)
    with pytest.raises(DaemonError) as error:
        await claim(daemon, recorded=NAME, keep=True)
    assert error.value.message == (
        "this server's kept container jupyter-ana cannot be read (disk on fire); it is kept "
        "as it is (remove = False): start again once it can be reached, or have an admin "
        "delete the server to start afresh"
    )
    # Not kept, on a standalone daemon: the daemon's own error (no other name would do).
    with pytest.raises(LxdError, match="disk on fire"):
        await claim(daemon, recorded=NAME)
    assert NAME in fake.instances


async def test_on_a_cluster_a_name_on_a_member_that_is_down_is_skipped_and_reaped_later(
    on_cluster, cluster, quick_sleeps
):
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    await server(on_cluster, cluster, "jupyter-ana-2", target="m2")
    cluster.members["m2"] = "Offline"
    assert await claim(on_cluster, recorded=NAME) == ("jupyter-ana-3", None)
    assert on_cluster.members.is_orphan(NAME)  # its name is not used while it waits
    cluster.members["m2"] = "Online"
    await eventually(lambda: not cluster.instances)  # the other one on m2 was skipped too
    assert not on_cluster.members.is_orphan(NAME)


async def test_on_a_cluster_a_kept_container_on_a_member_that_is_down_is_left_alone(
    on_cluster, cluster, quick_sleeps
):
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    await server(on_cluster, cluster, "jupyter-ana-2", target="m2")
    cluster.members["m2"] = "Offline"
    with pytest.raises(DaemonError, match="kept container jupyter-ana cannot be read"):
        await claim(on_cluster, recorded=NAME, keep=True)
    assert await claim(on_cluster, recorded="", keep=True) == ("jupyter-ana-3", None)
    cluster.members["m2"] = "Online"
    for _ in range(50):
        await asyncio.sleep(0)
    assert cluster.instances[NAME].status == cluster.instances["jupyter-ana-2"].status
    assert cluster.instances[NAME].status == "Running"


async def test_a_start_waits_for_the_removal_an_earlier_stop_left_running(daemon, fake):
    await server(daemon, fake)
    await daemon.stop(NAME, ANA, remove=True, timeout=5)
    said = []
    claiming = asyncio.ensure_future(claim(daemon, say=lambda m, p: said.append(m)))
    await eventually(lambda: said)
    assert said == ["Waiting for the previous container to be deleted"]
    assert not claiming.done()
    fake.finish_teardown(NAME)
    assert await asyncio.wait_for(claiming, 2) == (NAME, None)
    assert NAME not in fake.instances


# -- stopping and removing ----------------------------------------------------------------------


async def test_a_stop_with_remove_stops_the_unit_and_deletes_after_the_teardown(daemon, fake):
    await server(daemon, fake)
    await daemon.stop(NAME, ANA, remove=True, timeout=5)
    # The server has exited (its container powered off), the container is still there.
    assert fake.instances[NAME].status == "Stopped"
    for _ in range(20):
        await asyncio.sleep(0)
    assert NAME in fake.instances and fake.requests["delete_instance"] == 0
    fake.finish_teardown(NAME)
    await eventually(lambda: NAME not in fake.instances)
    assert fake.lifecycle[-2:] == [("instance-shutdown", NAME), ("instance-deleted", NAME)]
    assert ("instance-stopped", NAME) not in fake.lifecycle  # not stopped through the API


async def test_a_stop_now_is_a_forced_stop_and_the_container_goes_at_once(daemon, fake):
    await server(daemon, fake)
    await daemon.stop(NAME, ANA, remove=True, now=True, timeout=5)
    await eventually(lambda: NAME not in fake.instances)
    assert fake.lifecycle[-2:] == [("instance-stopped", NAME), ("instance-deleted", NAME)]


async def test_a_stop_without_remove_keeps_the_container(daemon, fake):
    await server(daemon, fake)
    await daemon.stop(NAME, ANA, remove=False, timeout=5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Stopped"
    assert fake.requests["delete_instance"] == 0


async def test_a_stop_of_a_container_that_is_gone_or_stopped_is_fine(daemon, fake):
    await daemon.stop(NAME, ANA, remove=True, timeout=5)
    fake.add_instance(NAME, config=owned("ana"))
    await daemon.stop(NAME, ANA, remove=True, timeout=5)
    await eventually(lambda: NAME not in fake.instances)


@pytest.mark.parametrize("held_by", [owned("bob"), owned("ana", hub="hub-2"), {"a": "b"}])
async def test_an_instance_that_is_not_the_owners_is_never_stopped_or_deleted(
    daemon, fake, held_by, caplog
):
    fake.add_instance(NAME, status="Running", config=held_by)
    await daemon.cache()
    await daemon.stop(NAME, ANA, remove=True, timeout=5)
    assert await daemon.delete_forever(NAME, ANA, 5) is False
    assert (
        await daemon.poll(NAME, ANA, remove=True, may_remove=True, member_grace=60, timeout=5) == 0
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Running"
    assert "ana: not stopping jupyter-ana: it is " in caplog.text


async def test_a_stop_the_daemon_keeps_failing_raises_then_is_retried_until_it_works(
    daemon, fake, quick_sleeps
):
    attempts = quick_sleeps(daemon_module)
    quick_sleeps(removals)
    fake.exec_handler = server_unit(fake, teardown=True)
    await server(daemon, fake)
    fake.down = True
    with pytest.raises(DaemonError) as error:
        await daemon.stop(NAME, ANA, remove=True, timeout=5)
    assert error.value.message.startswith(f"could not stop {NAME} (cannot reach the LXD")
    assert error.value.message.endswith(
        "it stays recorded and is stopped as soon as the daemon answers"
    )
    assert attempts.slept == [1, 2]  # three attempts
    assert fake.instances[NAME].status == "Running"
    fake.down = False
    await eventually(lambda: NAME not in fake.instances)


async def test_a_new_start_of_the_server_takes_over_from_a_stop_being_retried(
    daemon, fake, quick_sleeps
):
    quick_sleeps(daemon_module)
    quick_sleeps(removals)
    await server(daemon, fake)
    for method in ("exec", "stop_instance"):
        fake.fail(method, times=None)
    with pytest.raises(DaemonError):
        await daemon.stop(NAME, ANA, remove=True, timeout=5)
    await fake.wait_calls("stop_instance", 10)  # tried again and again in the background
    name, existing = await claim(daemon, recorded=NAME)
    assert name == NAME and existing["status"] == "Running"
    tried = fake.requests["stop_instance"]
    fake.heal("exec")
    fake.heal("stop_instance")
    for _ in range(50):
        await asyncio.sleep(0)
    assert fake.requests["stop_instance"] == tried
    assert fake.instances[NAME].status == "Running"  # the start goes on with it


# -- poll ---------------------------------------------------------------------------------------


async def poll(daemon: Daemon, *, remove=True, may_remove=True, grace=60.0, owner=ANA):
    return await daemon.poll(
        NAME, owner, remove=remove, may_remove=may_remove, member_grace=grace, timeout=5
    )


async def test_polling_a_running_server_costs_no_request(daemon, fake):
    await server(daemon, fake)
    before = fake.request_count
    for _ in range(200):
        assert await poll(daemon) is None
    assert fake.request_count == before


async def test_a_running_server_is_running_whatever_the_grace(daemon, fake):
    await server(daemon, fake)
    assert await poll(daemon, grace=0) is None
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Running"


async def test_a_server_that_ended_is_removed_unless_a_spawn_is_pending(daemon, fake):
    await server(daemon, fake)
    fake.power_off(NAME)
    await (await daemon.cache()).wait_for(NAME, stopped, 1)
    assert await poll(daemon, may_remove=False) == 0
    for _ in range(20):
        await asyncio.sleep(0)
    assert NAME in fake.instances
    assert await poll(daemon) == 0
    await eventually(lambda: NAME not in fake.instances)
    assert await poll(daemon) == 0  # gone


async def test_a_kept_server_that_ended_stays(daemon, fake):
    await server(daemon, fake)
    fake.power_off(NAME)
    await (await daemon.cache()).wait_for(NAME, stopped, 1)
    assert await poll(daemon, remove=False) == 0
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Stopped"


async def test_when_the_daemon_cannot_tell_the_server_is_reported_running(daemon, fake, caplog):
    await server(daemon, fake)
    fake.power_off(NAME)
    await (await daemon.cache()).wait_for(NAME, stopped, 1)
    fake.fail("get_instance", LxdError("database is locked", status=503))
    assert await poll(daemon) is None
    assert "poll of ana: database is locked" in caplog.text
    assert NAME in fake.instances


@pytest.mark.parametrize("remove", [True, False])
async def test_a_server_whose_member_stays_offline_is_reported_stopped(
    on_cluster, cluster, clock, quick_sleeps, remove
):
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    cluster.members["m2"] = "Offline"
    await (await on_cluster.cache()).refresh_members()
    assert await poll(on_cluster, remove=remove) is None  # a missed heartbeat is no outage
    clock.ahead = 61
    assert await poll(on_cluster, remove=remove) == 0
    assert NAME in cluster.instances
    cluster.members["m2"] = "Online"
    if remove:  # deleted once its member is back
        await eventually(lambda: NAME not in cluster.instances)
    else:  # kept: it waits there for its user
        for _ in range(50):
            await asyncio.sleep(0)
        assert cluster.instances[NAME].status == "Running"


async def test_a_server_on_a_member_back_before_the_cache_saw_it_is_running(
    on_cluster, cluster, clock, quick_sleeps
):
    """The cache reads the members' status every few seconds: a server started on a member
    that just came back is not reported stopped for the member's old outage."""
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    cluster.members["m2"] = "Offline"
    await (await on_cluster.cache()).refresh_members()
    clock.ahead = 61
    cluster.members["m2"] = "Online"  # back; the cache has not read it yet
    assert await poll(on_cluster) is None
    assert (await on_cluster.cache()).member_down_for("m2") == 0
    assert cluster.instances[NAME].status == "Running"


# -- the orphan reaper, delete_forever, cleanup_failed_start ------------------------------------


async def test_an_orphan_is_deleted_once_its_member_answers_if_it_is_still_the_owners(
    on_cluster, cluster, quick_sleeps
):
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    await server(on_cluster, cluster, "jupyter-ana-2", target="m2")
    cluster.members["m2"] = "Offline"
    on_cluster.orphan(NAME, ANA)
    on_cluster.orphan("jupyter-ana-2", ANA)
    await cluster.wait_calls("get_instance", 6)  # tried while m2 is down
    assert NAME in cluster.instances
    # Meanwhile an admin gave the second one to bob.
    cluster.instances["jupyter-ana-2"].config = owned("bob")
    cluster.members["m2"] = "Online"
    await eventually(lambda: not on_cluster.members.is_orphan("jupyter-ana-2"))
    await eventually(lambda: NAME not in cluster.instances)
    assert cluster.instances["jupyter-ana-2"].status == "Running"


async def test_delete_forever_deletes_a_kept_container_of_the_owner_only(daemon, fake):
    fake.add_instance(NAME, config=owned("ana"))
    fake.add_instance("jupyter-ana-2", status="Running", config=owned("ana"))
    fake.add_instance("jupyter-bob", config=owned("bob"))
    assert await daemon.delete_forever(NAME, ANA, 5) is True
    assert await daemon.delete_forever("jupyter-ana-2", ANA, 5) is True
    assert await daemon.delete_forever("jupyter-bob", ANA, 5) is False
    assert await daemon.delete_forever("nobody", ANA, 5) is False
    assert sorted(fake.instances) == ["jupyter-bob"]


async def test_after_a_failed_spawn_the_container_is_deleted_or_if_kept_stopped(daemon, fake):
    await server(daemon, fake)
    await server(daemon, fake, "jupyter-kept")
    await daemon.cleanup_failed_start(NAME, ANA, delete=True, timeout=5)
    await daemon.cleanup_failed_start("jupyter-kept", ANA, delete=False, timeout=5)
    await daemon.cleanup_failed_start("nobody", ANA, delete=True, timeout=5)
    assert NAME not in fake.instances
    assert fake.instances["jupyter-kept"].status == "Stopped"


async def test_a_cleanup_the_daemon_refuses_is_logged_and_on_a_cluster_retried(
    on_cluster, cluster, quick_sleeps, caplog
):
    quick_sleeps(members)
    await server(on_cluster, cluster, target="m2")
    cluster.members["m2"] = "Offline"
    await on_cluster.cleanup_failed_start(NAME, ANA, delete=True, timeout=5)
    assert "cleanup after failed spawn of jupyter-ana: member m2" in caplog.text
    cluster.members["m2"] = "Online"
    await eventually(lambda: NAME not in cluster.instances)


# -- making a server's container -----------------------------------------------------------------


async def test_a_missing_image_names_the_setting(daemon, fake):
    with pytest.raises(DaemonError) as error:
        await daemon.create(spec(), Source(image="no-such-image"))
    assert error.value.message.startswith(
        "the image 'no-such-image' (c.LxdSpawner.image) does not exist on the fake daemon: "
        "build and import it"
    )
    # The command it names builds the operator's own recipe under that alias.
    command = recipes.lxdspawner_command()
    assert f"(sudo {command} image build RECIPE.yaml --alias no-such-image)" in (
        error.value.message
    )
    fake.fail("create_instance", LxdError("no space left on device", status=500))
    with pytest.raises(DaemonError, match="could not create container jupyter-ana: no space"):
        await daemon.create(spec(), Source(image="jupyter-base"))
    assert fake.instances == {}


async def test_a_new_container_carries_its_owners_keys(daemon, fake):
    await daemon.create(spec(mem_limit=2**30), Source(image=IMAGE))
    assert fake.instances[NAME].config == {**ANA_KEYS, "limits.memory": str(2**30)}


def ready_share(fake: FakeLxd, path: str = "/usr", member: str | None = None) -> str:
    volume = names.shared_volume_name(IMAGE, path)
    config = {sharing.KEY_READY: "true", sharing.SHIFTED: "true"}
    fake.add_volume("default", volume, config=config, location=member)
    return names.shared_device_name(path)


async def test_a_shared_directory_whose_volume_went_is_left_out_and_looked_at_again(
    daemon, fake, caplog
):
    device = ready_share(fake)
    source = Source(image="jupyter-base", shared_directories=("/usr",))
    await daemon.create(spec(), source)
    assert fake.instances[NAME].devices[device]["readonly"] == "true"
    await fake.remove_instance(NAME)
    await fake.delete_volume("default", names.shared_volume_name(IMAGE, "/usr"))  # by hand
    await daemon.create(spec("jupyter-bob", "bob"), source)
    assert device not in fake.instances["jupyter-bob"].devices
    assert "create with the shared directories failed" in caplog.text
    assert sorted(fake.instances) == ["jupyter-bob"]


async def test_on_a_cluster_shared_directories_are_used_only_where_the_member_is_known(
    on_cluster, cluster
):
    device = ready_share(cluster, member="m2")
    shared = Source(image="jupyter-base", shared_directories=("/usr",))
    await on_cluster.create(spec(), shared)
    await on_cluster.create(spec("jupyter-bob", "bob"), dataclasses.replace(shared, member="m2"))
    assert device not in cluster.instances[NAME].devices
    assert device in cluster.instances["jupyter-bob"].devices


async def test_on_lxd_a_new_server_is_a_copy_of_the_shifted_base(make_daemon):
    lxd = FakeLxd(product="lxd")
    lxd.add_image(IMAGE, "jupyter-base")
    daemon = make_daemon(lxd)
    said = []
    await daemon.create(spec(), Source(image="jupyter-base"), lambda m, p: said.append(m))
    base = names.base_name("jupyter", IMAGE)
    assert said == ["Preparing a base container for this image (once per image)"]
    assert lxd.instances[NAME].image == IMAGE and base in lxd.instances
    del lxd.images[IMAGE]
    with pytest.raises(DaemonError, match="the image 'jupyter-base'"):
        await daemon.create(spec("jupyter-bob", "bob"), Source(image="jupyter-base"))


async def test_a_kept_container_is_stopped_and_given_the_current_settings(daemon, fake):
    kept = fake.add_instance(
        NAME, status="Running", config={**owned("ana"), "volatile.uuid": "u1", "limits.cpu": "8"}
    )
    await (await daemon.cache()).wait_for(NAME, running, 1)
    said = []
    existing = await fake.get_instance(NAME)
    await daemon.make_reusable(
        spec(mem_limit=2**30),
        existing,
        Source(image="jupyter-base"),
        stop_timeout=5,
        say=lambda m, p: said.append(m),
    )
    assert said == [f"Stopping the kept container {NAME} (it was Running)"]
    assert kept.status == "Stopped"
    assert kept.config == {**ANA_KEYS, "volatile.uuid": "u1", "limits.memory": str(2**30)}


async def test_a_kept_container_the_daemon_will_not_update_fails_the_spawn_and_stays(daemon, fake):
    fake.add_instance(NAME, config=owned("ana"))
    gone = {"type": "disk", "pool": "default", "source": "no-such-volume", "path": "/data"}
    with pytest.raises(DaemonError) as error:
        await daemon.make_reusable(
            spec(extra_devices={"data": gone}),
            await fake.get_instance(NAME),
            Source(image="jupyter-base"),
            stop_timeout=5,
        )
    assert error.value.message == (
        f"could not give the kept container {NAME} the current settings: Storage volume "
        "'no-such-volume' not found"
    )
    assert fake.instances[NAME].devices == {}
    assert NAME in fake.instances


async def test_the_servers_files_are_pushed_and_its_unit_enabled_or_not(daemon, fake):
    await fake.create_instance(NAME, source=SOURCE, config=owned("ana"))
    files = [("/etc/greeting.txt", b"hello", 0o640)]
    await daemon.push_server_files(spec(), {"JUPYTERHUB_API_TOKEN": "t"}, files, enable_unit=True)
    made = fake.instances[NAME]
    assert made.files[objects.ENV_PATH][1] == 0o600
    assert b"JUPYTERHUB_API_TOKEN" in made.files[objects.ENV_PATH][0]
    assert made.files["/etc/greeting.txt"] == (b"hello", 0o640)
    assert made.links == {objects.UNIT_WANTS_LINK: f"../{objects.UNIT_NAME}"}
    await daemon.push_server_files(spec(), {}, [], enable_unit=False)
    await daemon.push_server_files(spec(), {}, [], enable_unit=False)  # no link: fine
    assert made.links == {}


async def test_pushing_files_fails_saying_which(daemon, fake):
    await fake.create_instance(NAME, source=SOURCE, config=owned("ana"))
    with pytest.raises(DaemonError, match="the server's environment cannot be written"):
        await daemon.push_server_files(spec(), {"BAD KEY": "x"}, [], enable_unit=True)
    push = fake.push_file

    async def read_only_at(name, path, content, **mode):  # a read-only mount there
        if path.startswith("/etc/x"):
            raise LxdError("read-only file system", status=500)
        await push(name, path, content, **mode)

    fake.push_file = read_only_at
    with pytest.raises(DaemonError, match="cannot write '/etc/x' in the container: read-only"):
        await daemon.push_server_files(spec(), {}, [("/etc/x", b"", 0o644)], enable_unit=True)


async def test_the_address_once_dhcp_gave_one(daemon, fake):
    await server(daemon, fake)
    assert await daemon.wait_ipv4(NAME, 5) == fake.instances[NAME].ipv4


async def test_no_address_or_a_container_that_stops_while_booting_is_said(
    daemon, fake, quick_sleeps
):
    quick_sleeps(daemon_module)
    fake.dhcp = False
    await server(daemon, fake)
    with pytest.raises(DaemonError, match=r"got no IPv4 address within 0 s \(start_timeout\)"):
        await daemon.wait_ipv4(NAME, 0)
    fake.instances[NAME].files[objects.SERVER_LOG_PATH] = (b"booting\nKernel panic\n", 0o644)
    fake.power_off(NAME)
    fake.fail("instance_state", LxdError("instance is stopping", status=400))
    with pytest.raises(DaemonError) as error:
        await daemon.wait_ipv4(NAME, 5)
    assert error.value.message == (
        f"container {NAME} stopped while booting (status Stopped); last lines of the "
        "server's log:\nbooting\nKernel panic"
    )
    del fake.instances[NAME].files[objects.SERVER_LOG_PATH]
    assert await daemon.server_log_tail(NAME) == "the server wrote no log"


async def test_commands_to_prepare_run_as_the_user_and_a_failure_shows_exit_code_and_output(
    daemon, fake
):
    ran = []

    def handler(instance, command):
        ran.append(command)
        if command[-1] == "exit 7":
            return ExecResult(7, "preparing-went-wrong", "and this too")
        if command[-1] == "lost":
            raise LxdError("websocket closed", status=500)
        return 0

    fake.exec_handler = handler
    await server(daemon, fake)
    await daemon.run_as_user(spec(), ["echo {USERNAME} > x"], timeout=5)
    assert ran[-1] == ["/bin/sh", "-c", "echo 'ana' > x"]
    with pytest.raises(DaemonError) as error:
        await daemon.run_as_user(spec(), ["true", "exit 7"], timeout=5)
    assert error.value.message == (
        "commands_to_prepare: 'exit 7' failed with exit code 7: preparing-went-wrong\nand this too"
    )
    with pytest.raises(DaemonError, match="commands_to_prepare: 'lost' could not be run: web"):
        await daemon.run_as_user(spec(), ["lost"], timeout=5)
    with pytest.raises(DaemonError, match="commands_to_prepare"):
        await daemon.run_as_user(spec(), ["echo `{USERNAME}`"], timeout=5)


async def test_a_unit_that_does_not_start_is_said(daemon, fake):
    await server(daemon, fake)
    fake.exec_handler = lambda instance, command: ExecResult(1, "", "unit not found")
    with pytest.raises(DaemonError, match="could not start the server's unit: unit not found"):
        await daemon.start_unit(NAME)
    assert await daemon.status(NAME) == "Running"


async def test_the_gateway_of_a_bridge_and_one_without_ipv4(daemon, fake):
    assert await daemon.gateway("incusbr0") == "10.0.0.1"
    fake.networks["plain"] = {"name": "plain", "config": {"ipv4.address": "none"}}
    with pytest.raises(DaemonError, match="set c.LxdSpawner.hub_connect_url"):
        await daemon.gateway("plain")


async def test_a_daemon_says_where_it_is(daemon, fake):
    assert (daemon.where, daemon.product, daemon.clustered) == (str(daemon.remote), "incus", False)
    await daemon.client()
    assert (daemon.where, repr(daemon)) == ("the fake daemon", "Daemon(unix:///fake/unix.socket)")
    with pytest.raises(NotFound):
        await (await daemon.client()).get_instance("nobody")
