"""The instance cache against an in-memory daemon: what it shows, what it costs, how it
recovers when the event stream fails, and when it says a container is torn down."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fakes import IMAGE, SOURCE, FakeLxd, owned

from lxdspawner import cache as cache_module
from lxdspawner.cache import InstanceCache
from lxdspawner.ownership import KEY_MANAGED
from lxdspawner.sharing import KEY_HELPER


def running(entry):
    return entry is not None and entry.status == "Running"


def stopped(entry):
    return entry is not None and entry.status == "Stopped"


def gone(entry):
    return entry is None


async def create(fake: FakeLxd, name: str, user: str = "ana", **kwargs) -> None:
    await fake.create_instance(name, source=SOURCE, config=owned(user), **kwargs)


# -- what it shows, and what reading it costs -----------------------------------------------


async def test_shows_our_instances_only_and_reading_costs_no_request(fake):
    fake.add_instance("ana", status="Running", config=owned("ana"))
    fake.add_instance("bob-lab", config=owned("bob", "lab"))
    fake.add_instance("by-hand", status="Running", config={"user.note": "mine"})
    fake.add_instance("share-fill", status="Running", config={KEY_HELPER: IMAGE})
    view = InstanceCache(fake)
    await view.start(timeout=5)
    try:
        before = fake.request_count
        for _ in range(500):  # poll() of 500 users
            assert view.get("ana").status == "Running"
        assert fake.request_count == before
        assert sorted(i.name for i in view.instances()) == ["ana", "bob-lab"]
        lab = view.get("bob-lab")
        assert (lab.user, lab.server, lab.status) == ("bob", "lab", "Stopped")
        assert lab.config == owned("bob", "lab")
        assert view.get("by-hand") is None
        assert view.count_by_location() == {"none": 2}
        assert view.healthy
    finally:
        await view.stop()
    assert not view.healthy


async def test_follows_the_life_of_a_container_from_its_events_alone(fake, cache):
    await create(fake, "ana")
    assert (await cache.wait_for("ana", stopped, 1)).user == "ana"
    asked = fake.requests["get_instance"]
    await fake.start_instance("ana")
    await cache.wait_for("ana", running, 1)
    await fake.stop_instance("ana")
    await cache.wait_for("ana", stopped, 1)
    await fake.start_instance("ana")
    fake.emit("instance-paused", "ana")
    await cache.wait_for("ana", lambda e: e.status == "Frozen", 1)
    fake.emit("instance-resumed", "ana")
    await cache.wait_for("ana", running, 1)
    fake.power_off("ana")
    await cache.wait_for("ana", stopped, 1)
    await fake.delete_instance("ana")
    await cache.wait_for("ana", gone, 1)
    # Start, stop and delete say all there is to know: the instance is not asked for.
    assert fake.requests["get_instance"] == asked
    assert cache.count_by_location() == {}


async def test_a_container_that_is_not_ours_stays_out_of_it(fake, cache):
    await fake.create_instance("by-hand", source=SOURCE, config={"user.note": "mine"}, start=True)
    await create(fake, "ana")  # events are applied in order: once ana is in, by-hand was seen
    await cache.wait_for("ana", stopped, 1)
    assert cache.get("by-hand") is None


async def test_what_the_daemon_did_between_connecting_and_listing_is_not_missed():
    class SlowList(FakeLxd):
        """Its list is taken, then answered late."""

        listed = asyncio.Event()
        answer = asyncio.Event()

        async def list_instances(self, **kwargs):
            found = await super().list_instances(**kwargs)
            self.listed.set()
            await self.answer.wait()
            return found

    fake = SlowList()
    fake.add_image(IMAGE)
    view = InstanceCache(fake)
    starting = asyncio.ensure_future(view.start(timeout=5))
    await fake.listed.wait()
    await create(fake, "ana", start=True)  # after the list was taken, before it arrives
    fake.answer.set()
    await starting
    try:
        assert running(await view.wait_for("ana", running, 1))
    finally:
        await view.stop()


async def test_a_renamed_container_is_shown_under_its_new_name(fake, cache):
    await create(fake, "old")
    await cache.wait_for("old", stopped, 1)
    instance = fake.instances.pop("old")
    instance.name = "new"
    fake.instances["new"] = instance
    fake.emit("instance-renamed", "new", context={"old_name": "old"})
    await cache.wait_for("new", stopped, 1)
    assert cache.get("old") is None
    assert cache.count_by_location() == {"none": 1}


async def test_a_container_whose_keys_are_no_longer_ours_leaves_the_view(fake, cache):
    await create(fake, "ana")
    await cache.wait_for("ana", stopped, 1)
    del fake.instances["ana"].config[KEY_MANAGED]
    fake.emit("instance-updated", "ana")
    # Otherwise a stop or a delete would trust keys the container no longer has.
    await cache.wait_for("ana", gone, 1)


async def test_a_status_event_of_an_unknown_container_asks_for_it_once(fake, cache):
    fake.add_instance("ana", status="Running", config=owned("ana"))  # no event of its own
    asked = fake.requests["get_instance"]
    fake.emit("instance-restarted", "ana")
    await cache.wait_for("ana", running, 1)
    assert fake.requests["get_instance"] == asked + 1
    # One that is gone by the time it is asked for is not shown.
    fake.emit("instance-started", "ghost")
    await create(fake, "marker")
    await cache.wait_for("marker", stopped, 1)
    assert cache.get("ghost") is None


async def test_other_projects_and_other_objects_are_ignored():
    fake = FakeLxd(project="team")
    fake.add_image(IMAGE)
    view = InstanceCache(fake)
    await view.start(timeout=5)
    try:
        fake.add_instance("elsewhere", status="Running", config=owned("ana"))
        fake.emit("instance-started", "elsewhere", project="default")
        fake.emit("image-created", IMAGE, source=f"/1.0/images/{IMAGE}")
        fake.emit("instance-log-retrieved", "elsewhere")
        await create(fake, "here")
        await view.wait_for("here", stopped, 1)
        assert [i.name for i in view.instances()] == ["here"]
        assert fake.requests["get_instance"] == 1  # for "here" only
    finally:
        await view.stop()


async def test_wait_for_gives_up_after_its_timeout(cache):
    with pytest.raises(asyncio.TimeoutError):
        await cache.wait_for("nobody", running, 0.01)


# -- what a spawner notes before the event arrives --------------------------------------------


async def test_notes_change_the_view_at_once(fake, cache):
    fake.add_instance("ana", status="Running", config=owned("ana"))
    cache.note_instance(await fake.get_instance("ana"))
    assert cache.get("ana").status == "Running"
    cache.note("ana", status="Stopped")
    assert cache.get("ana").status == "Stopped"
    cache.note("nobody", status="Running")  # unknown: not made up
    assert cache.get("nobody") is None
    cache.note("ana", deleted=True)
    assert cache.get("ana") is None
    assert cache.count_by_location() == {}
    cache.note_instance({"name": "by-hand", "status": "Running", "config": {}})
    assert cache.get("by-hand") is None


# -- torn down: when a stopped container may be deleted ---------------------------------------


async def test_torn_down_only_once_the_shutdown_event_came(fake, cache):
    await create(fake, "ana", start=True)
    await cache.wait_for("ana", running, 1)
    fake.power_off("ana", teardown=False)  # reads "Stopped"; its stop hooks still run
    waiting = asyncio.ensure_future(cache.wait_torn_down("ana", 5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    fake.finish_teardown("ana")
    assert await waiting is True


async def test_torn_down_is_false_when_the_event_never_comes(fake, cache):
    await create(fake, "ana", start=True)
    await cache.wait_for("ana", running, 1)
    fake.power_off("ana", event=False)  # the stream lost it
    assert await cache.wait_torn_down("ana", 0.02) is False


async def test_a_stop_through_the_api_counts_as_torn_down(fake, cache):
    fake.add_instance("ana", status="Running", config=owned("ana"))
    cache.expect_teardown("ana")
    assert await cache.wait_torn_down("ana", 0.01) is False
    cache.note_torn_down("ana")  # its operation ended: that is after the teardown
    assert await cache.wait_torn_down("ana", 0.01) is True
    # One never seen running has nothing to wait for.
    assert await cache.wait_torn_down("other", 0.01) is True


async def test_a_relist_takes_a_stopped_container_as_torn_down(fake, cache):
    await create(fake, "ana", start=True)
    await create(fake, "bob", user="bob", start=True)
    await cache.wait_for("bob", running, 1)
    fake.power_off("ana", event=False)
    await cache.resync()
    assert await cache.wait_torn_down("ana", 0.01) is True
    assert await cache.wait_torn_down("bob", 0.01) is False


# -- when the event stream fails -----------------------------------------------------------


async def test_a_failed_stream_is_reconnected_and_what_it_missed_relisted(
    fake, cache, quick_sleeps, caplog
):
    slept = quick_sleeps(cache_module)
    await create(fake, "ana", start=True)
    await cache.wait_for("ana", running, 1)
    reconnect = fake.hang("events")
    fake.drop_events()
    await fake.wait_calls("events", 2)
    assert not cache.healthy  # reading it now means confirming with the daemon
    # Meanwhile, with nobody following: ana stops and is deleted, bob is made.
    await fake.stop_instance("ana")
    await fake.delete_instance("ana")
    await create(fake, "bob", user="bob")
    reconnect.set()
    await cache.wait_for("bob", stopped, 1)
    assert cache.get("ana") is None
    assert cache.healthy
    assert slept.slept == [1]
    assert "events stream from the fake daemon failed: reset; relisting" in caplog.text


async def test_a_stream_the_daemon_closed_is_relisted_with_a_reason(
    fake, cache, quick_sleeps, caplog
):
    quick_sleeps(cache_module)
    fake.close_events()
    await fake.wait_calls("events", 2)
    await cache.start(timeout=1)
    await create(fake, "ana")
    await cache.wait_for("ana", stopped, 1)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == ["instance cache for the fake daemon: the event stream closed; relisting"]


async def test_a_quiet_stream_is_replaced(fake, quick_sleeps, caplog):
    quick_sleeps(cache_module)
    view = InstanceCache(fake, quiet_timeout=0.02)
    await view.start(timeout=1)
    try:
        await fake.wait_calls("events", 2)
        assert "no event for 0.02 s; relisting" in caplog.text
        await fake.wait_streams(1)
    finally:
        await view.stop()


async def test_what_happened_without_an_event_shows_at_the_next_periodic_relist(fake):
    view = InstanceCache(fake, resync_interval=0.02)
    await view.start(timeout=1)
    try:
        fake.add_instance("ana", config=owned("ana"))  # no event
        await view.wait_for("ana", stopped, 1)
    finally:
        await view.stop()


async def test_a_daemon_that_does_not_answer_at_first_is_followed_once_it_does(fake, quick_sleeps):
    quick_sleeps(cache_module)
    fake.down = True
    view = InstanceCache(fake)
    with pytest.raises(asyncio.TimeoutError):
        await view.start(timeout=0.05)
    assert not view.healthy
    fake.down = False
    fake.add_instance("ana", config=owned("ana"))
    await view.start(timeout=1)
    try:
        assert view.get("ana") is not None
        assert view.healthy
    finally:
        await view.stop()


async def test_a_stream_that_does_not_start_with_its_connection_is_refused(quick_sleeps, caplog):
    quick_sleeps(cache_module)

    class Garbled(FakeLxd):
        connections = 0

        async def events(self, types=("lifecycle",), *, reconnect=True, retry_delay=1.0):
            Garbled.connections += 1
            if Garbled.connections == 1:
                yield {"type": "lifecycle", "metadata": {}}
                return
            async for event in super().events(types, reconnect=reconnect):
                yield event

    view = InstanceCache(Garbled())
    await view.start(timeout=1)
    await view.stop()
    assert "unexpected first event" in caplog.text


async def test_stopping_it_closes_its_event_stream(fake):
    view = InstanceCache(fake)
    await view.start(timeout=1)
    assert fake.open_streams == 1
    await view.stop()
    await fake.wait_streams(0, timeout=1)


async def test_a_failed_relist_closes_the_stream_it_was_following(fake, quick_sleeps):
    quick_sleeps(cache_module)
    view = InstanceCache(fake, resync_interval=0.01)
    await view.start(timeout=1)
    try:
        fake.fail("list_instances")
        await fake.wait_calls("events", 2)  # it gave up on that stream and connected again
        await fake.wait_streams(1, timeout=1)
    finally:
        await view.stop()


# -- cluster members ------------------------------------------------------------------------


async def test_a_member_is_down_for_as_long_as_it_stays_neither_online_nor_evacuated():
    fake = FakeLxd(members=["m1", "m2", "m3"])
    fake.add_image(IMAGE)
    view = InstanceCache(fake, member_interval=0.01)
    await view.start(timeout=1)
    try:
        await create(fake, "ana", target="m2")
        await view.wait_for("ana", stopped, 1)
        assert view.count_by_location() == {"m2": 1}
        assert view.member_down_for("m2") == 0
        fake.members["m2"] = "Offline"
        fake.members["m3"] = "Evacuated"
        calls = fake.requests["cluster_members"]
        await fake.wait_calls("cluster_members", calls + 1)
        await fake.wait_calls("cluster_members", calls + 2)
        assert view.member_down_for("m2") > 0
        assert view.member_down_for("m3") == 0
        fake.members["m2"] = "Online"
        await view.refresh_members()
        assert view.member_down_for("m2") == 0
    finally:
        await view.stop()


async def test_a_standalone_daemon_is_not_asked_for_members(fake, cache):
    await create(fake, "ana")
    await cache.wait_for("ana", stopped, 1)
    assert fake.requests["cluster_members"] == 0
    assert cache.member_down_for("none") == 0
