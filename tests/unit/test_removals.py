"""Deleting a stopped server's container only once LXD has torn it down, and stops that
failed tried again, against an in-memory daemon."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fakes import SOURCE, FakeLxd, eventually, owned

from lxdspawner import removals
from lxdspawner.cache import InstanceCache
from lxdspawner.lxd import LxdError, Remote, Unreachable
from lxdspawner.removals import PendingStops, Removals, remove_once_torn_down

log = logging.getLogger("test-removals")


async def server(fake: FakeLxd, cache: InstanceCache, name: str = "ana") -> None:
    """A server's container, running, as the cache has seen it start."""
    await fake.create_instance(name, source=SOURCE, config=owned(name), start=True)
    await cache.wait_for(name, lambda e: e is not None and e.status == "Running", 1)


# -- remove_once_torn_down -----------------------------------------------------------------


async def test_a_running_container_is_stopped_then_deleted_without_waiting(fake, cache):
    await server(fake, cache)
    # Its stop's operation ends after the teardown: no event to wait for (the timeout is long).
    await asyncio.wait_for(remove_once_torn_down(fake, cache, "ana", timeout=60), 1)
    assert "ana" not in fake.instances
    assert fake.lifecycle[-2:] == [("instance-stopped", "ana"), ("instance-deleted", "ana")]
    assert cache.get("ana") is None


async def test_one_that_powered_off_is_deleted_only_after_its_teardown_event(fake, cache):
    await server(fake, cache)
    fake.power_off("ana", teardown=False)  # "Stopped", its stop hooks still running
    removal = asyncio.ensure_future(remove_once_torn_down(fake, cache, "ana", timeout=60))
    await fake.wait_calls("stop_instance")  # refused: already stopped
    await asyncio.sleep(0.01)
    assert not removal.done()
    assert "ana" in fake.instances
    fake.finish_teardown("ana")
    await asyncio.wait_for(removal, 1)
    assert "ana" not in fake.instances
    assert fake.lifecycle[-2:] == [("instance-shutdown", "ana"), ("instance-deleted", "ana")]
    assert fake.requests["delete_instance"] == 1  # never tried before the teardown


async def test_one_already_gone_is_fine_and_leaves_the_view(fake, cache):
    await server(fake, cache)
    del fake.instances["ana"]  # deleted, and its event lost
    await remove_once_torn_down(fake, cache, "ana", timeout=60)
    assert cache.get("ana") is None


async def test_without_a_teardown_event_it_stops_through_the_api_and_says_so(fake, cache):
    await server(fake, cache)
    fake.power_off("ana", event=False)  # torn down, but the stream lost the event
    said = []
    await remove_once_torn_down(fake, cache, "ana", 0.02, lambda *a: said.append(a[0] % a[1:]))
    assert "ana" not in fake.instances
    assert said == ["no teardown of ana seen within 0 s; stopping it through the API"]


async def test_one_that_vanished_meanwhile_is_not_an_error(fake, cache):
    await server(fake, cache)
    fake.power_off("ana", event=False)

    def deleted_by_hand(*args) -> None:  # while no teardown was seen; its event lost too
        del fake.instances["ana"]

    await asyncio.wait_for(remove_once_torn_down(fake, cache, "ana", 0.01, deleted_by_hand), 1)
    assert fake.requests["delete_instance"] == 0


async def test_a_delete_refused_during_a_slow_teardown_is_retried_until_it_works(fake, cache):
    await server(fake, cache)
    fake.power_off("ana", teardown=False, event=False)
    removal = asyncio.ensure_future(remove_once_torn_down(fake, cache, "ana", 0.01))
    await fake.wait_calls("delete_instance", 2)  # "Instance is running": hooks still run
    assert "ana" in fake.instances
    fake.finish_teardown("ana", event=False)
    await asyncio.wait_for(removal, 2)
    assert "ana" not in fake.instances


async def test_a_daemon_that_does_not_answer_fails_the_removal_and_keeps_the_container(fake, cache):
    await server(fake, cache)
    fake.fail("delete_instance")
    with pytest.raises(Unreachable):
        await remove_once_torn_down(fake, cache, "ana", timeout=60)
    assert fake.instances["ana"].status == "Stopped"  # stopped at least; the caller retries


async def test_without_a_cache_it_stops_and_deletes_at_once(fake):
    await fake.create_instance("ana", source=SOURCE, start=True)
    await remove_once_torn_down(fake, None, "ana", timeout=60)
    assert "ana" not in fake.instances
    await remove_once_torn_down(fake, None, "ana", timeout=60)  # gone already: fine


# -- Removals: the deletions in progress on one daemon ----------------------------------------

REMOTE = Remote("unix:///fake/unix.socket")


@pytest.fixture
def no_exit_handler(monkeypatch):
    """A removal cut short here must not be finished against a real daemon at exit."""
    monkeypatch.setattr(removals._finish_at_exit, "register", lambda: None)
    yield
    assert not {k for k in removals._unfinished if k[0] == REMOTE}


async def test_a_removal_runs_in_the_background_and_a_new_start_can_wait_for_it(
    fake, cache, no_exit_handler, caplog
):
    await server(fake, cache)
    fake.power_off("ana", teardown=False)
    pending = Removals(REMOTE)
    pending.start(fake, cache, "ana", teardown_timeout=60, log=log)
    assert pending.pending("ana")
    waiting = asyncio.ensure_future(pending.wait("ana"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    fake.finish_teardown("ana")
    await asyncio.wait_for(waiting, 1)
    assert "ana" not in fake.instances
    assert not pending.pending("ana")
    # A failure is logged, and waiting for it ends.
    await server(fake, cache, "bob")
    await fake.stop_instance("bob")
    fake.fail("delete_instance", LxdError("disk on fire", status=500))
    pending.start(fake, cache, "bob", teardown_timeout=60, log=log)
    await asyncio.wait_for(pending.wait("bob"), 1)
    assert "deleting bob after its server stopped: disk on fire" in caplog.text


# -- PendingStops ------------------------------------------------------------------------------


def stopper(fake: FakeLxd, name: str, done: asyncio.Event):
    async def stop() -> None:
        await fake.shut_down(name, timeout=0, force=True)
        done.set()

    return stop


async def test_a_failed_stop_is_tried_again_less_and_less_often_until_it_works(
    fake, quick_sleeps, caplog
):
    sleeps = quick_sleeps(removals)
    caplog.set_level(logging.INFO)
    await fake.create_instance("ana", source=SOURCE, start=True)
    fake.fail("stop_instance", times=5)
    done = asyncio.Event()
    PendingStops(first_delay=5, max_delay=60).retry("ana", stopper(fake, "ana", done), log)
    await asyncio.wait_for(done.wait(), 1)
    assert fake.instances["ana"].status == "Stopped"
    assert sleeps.slept == [5, 10, 20, 40, 60, 60]
    messages = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert (
        messages[0] == "stopping ana again: stop_instance: cannot reach the fake daemon (injected)"
    )
    assert len(messages) == 6
    assert messages[-1] == "stopped ana, whose stop had failed"


async def test_a_stop_that_timed_out_is_tried_again(quick_sleeps, caplog):
    quick_sleeps(removals)
    attempts = []

    async def stop() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise asyncio.TimeoutError

    stops = PendingStops()
    stops.retry("ana", stop, log)
    await eventually(lambda: len(attempts) == 2)
    assert "stopping ana again: " in caplog.text


async def test_one_retry_per_container_and_a_new_start_takes_over(fake, quick_sleeps):
    quick_sleeps(removals)
    await fake.create_instance("ana", source=SOURCE, start=True)
    fake.fail("stop_instance", times=None)
    stops = PendingStops()
    done = asyncio.Event()
    stops.retry("ana", stopper(fake, "ana", done), log)
    stops.retry("ana", stopper(fake, "ana", done), log)  # already retried
    await fake.wait_calls("stop_instance", 3)
    stops.cancel("ana")  # a new start of the server stops it itself
    stops.cancel("nobody")
    tried = fake.requests["stop_instance"]
    for _ in range(10):
        await asyncio.sleep(0)
    assert fake.requests["stop_instance"] == tried
    assert fake.instances["ana"].status == "Running"
    # A later failure of the same container is tried again afresh.
    fake.heal("stop_instance")
    stops.retry("ana", stopper(fake, "ana", done), log)
    await asyncio.wait_for(done.wait(), 1)
    assert fake.instances["ana"].status == "Stopped"


# -- Removals: deletions wait for the spawns in flight, a few at a time -----------------------


async def stopped(fake: FakeLxd, cache: InstanceCache, name: str) -> None:
    """A server's container that has powered off and been torn down."""
    await server(fake, cache, name)
    fake.power_off(name)
    await cache.wait_torn_down(name, 1)


async def test_a_deletion_waits_while_a_spawn_is_in_flight_and_goes_when_it_ends(
    fake, cache, no_exit_handler
):
    await stopped(fake, cache, "ana")
    pending = Removals(REMOTE, defer_max=60)
    with pending.spawning():
        pending.start(fake, cache, "ana", teardown_timeout=60, log=log)
        with pending.spawning():  # a second spawn, ending first
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.02)
        assert "ana" in fake.instances
        assert fake.requests["delete_instance"] == 0
    await asyncio.wait_for(pending.wait("ana"), 1)
    assert "ana" not in fake.instances


async def test_a_deletion_waits_no_longer_than_defer_max(fake, cache, no_exit_handler):
    await stopped(fake, cache, "ana")
    pending = Removals(REMOTE, defer_max=0)  # removal_defer_max = 0: as before, at once
    with pending.spawning():
        pending.start(fake, cache, "ana", teardown_timeout=60, log=log)
        await eventually(lambda: "ana" not in fake.instances)
        assert pending.spawns_in_flight == 1


async def test_a_new_start_of_the_server_does_not_wait_for_the_others(fake, cache, no_exit_handler):
    await stopped(fake, cache, "ana")
    await stopped(fake, cache, "bob")
    pending = Removals(REMOTE, defer_max=60)
    with pending.spawning():  # other users' spawns, and ana's own new one
        pending.start(fake, cache, "ana", teardown_timeout=60, log=log)
        pending.start(fake, cache, "bob", teardown_timeout=60, log=log)
        await asyncio.wait_for(pending.wait("ana"), 1)
        assert "ana" not in fake.instances
        assert "bob" in fake.instances  # still waiting for the spawns
    await asyncio.wait_for(pending.wait("bob"), 1)


async def test_no_more_than_parallel_deletions_are_sent_at_once(fake, cache, no_exit_handler):
    names = ["ana", "bob", "cyd", "dan", "eve"]
    for name in names:
        await stopped(fake, cache, name)
    gate = fake.hang("delete_instance")
    pending = Removals(REMOTE, parallel=2)
    for name in names:
        pending.start(fake, cache, name, teardown_timeout=60, log=log)
    await fake.wait_calls("delete_instance", 2)
    await asyncio.sleep(0.02)
    assert fake.requests["delete_instance"] == 2  # the other three wait their turn
    gate.set()
    for name in names:
        await asyncio.wait_for(pending.wait(name), 1)
    assert not set(names) & set(fake.instances)


async def test_a_delayed_deletion_waits_its_delay_unless_the_server_starts_again(
    fake, cache, no_exit_handler
):
    await stopped(fake, cache, "ana")
    pending = Removals(REMOTE, delay=60)  # removal_delay: no spawn in flight, yet it waits
    pending.start(fake, cache, "ana", teardown_timeout=60, log=log)
    for _ in range(100):
        await asyncio.sleep(0)
    assert fake.requests["delete_instance"] == 0
    await asyncio.wait_for(pending.wait("ana"), 1)  # a new start of ana's server
    assert "ana" not in fake.instances
