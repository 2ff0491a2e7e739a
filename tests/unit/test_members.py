"""What the hub knows of cluster members that LXD does not tell it yet: spawns in flight,
members a spawn just failed on, and containers left on a member that went down."""

from __future__ import annotations

import logging

import pytest
from fakes import IMAGE, FakeLxd, eventually

from lxdspawner import members, placement
from lxdspawner.lxd import LxdError, NotFound
from lxdspawner.members import SUSPECT_FOR, MemberBook
from lxdspawner.removals import remove_once_torn_down

log = logging.getLogger("test-members")


class Clock:
    """time as members.py reads it, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(members, "time", clock)
    return clock


def cluster(*statuses: str) -> list[dict]:
    return [{"server_name": f"m{i}", "status": s} for i, s in enumerate(statuses, 1)]


def test_spawns_in_flight_are_counted_until_they_land():
    book = MemberBook(log)
    book.placed("m1")
    book.placed("m1")
    book.placed("m2")
    assert book.in_flight == {"m1": 2, "m2": 1}
    book.landed("m1")
    book.landed(None)  # a spawn that failed before it was placed
    assert book.in_flight == {"m1": 1, "m2": 1}


def test_a_member_a_spawn_failed_on_is_left_out_for_a_while(clock):
    book = MemberBook(log)
    book.suspect("m2")
    clock.now += 12
    found = cluster("Online", "Online", "Online")
    book.mark_suspects(found)
    assert found[0]["status"] == found[2]["status"] == placement.ONLINE
    assert found[1]["status"] == "Unreachable (a spawn on it failed 12 s ago)"
    clock.now += SUSPECT_FOR - 12
    found = cluster("Online", "Online")
    book.mark_suspects(found)
    assert [m["status"] for m in found] == [placement.ONLINE] * 2


def test_a_suspect_that_is_offline_anyway_keeps_what_lxd_says(clock):
    book = MemberBook(log)
    book.suspect("m1")
    found = cluster("Offline")
    book.mark_suspects(found)
    assert found[0]["status"] == "Offline"


async def test_an_orphan_is_deleted_once_its_member_answers_again(quick_sleeps):
    sleeps = quick_sleeps(members)
    fake = FakeLxd(members=["m1", "m2"])
    fake.add_image(IMAGE)
    await fake.create_instance(
        "ana", source={"type": "image", "fingerprint": IMAGE}, target="m2", start=True
    )
    fake.members["m2"] = "Offline"
    book = MemberBook(log)
    book.orphan("ana", lambda name: remove_once_torn_down(fake, None, name, 60))
    assert book.is_orphan("ana")  # its name is not used meanwhile
    await fake.wait_calls("stop_instance", 3)  # tried, and tried again
    assert "ana" in fake.instances and book.is_orphan("ana")
    fake.members["m2"] = "Online"
    await eventually(lambda: not book.is_orphan("ana"))
    assert "ana" not in fake.instances
    assert set(sleeps.slept) == {5.0}  # tried every 5 s


async def test_each_orphan_is_retried_on_its_own_and_a_new_one_restarts_the_reaper(quick_sleeps):
    quick_sleeps(members)
    failing = {"a": 3, "b": 0}
    deleted = []

    async def delete(name: str) -> None:
        if failing[name] > 0:
            failing[name] -= 1
            raise LxdError(f"member of {name} does not answer")
        deleted.append(name)

    book = MemberBook(log)
    book.orphan("a", delete)
    book.orphan("b", delete)
    await eventually(lambda: len(deleted) == 2)
    assert deleted == ["b", "a"]
    assert not book.is_orphan("a")
    # The reaper ended with nothing left; a later orphan gets one again.
    failing["c"] = 0
    book.orphan("c", delete)
    await eventually(lambda: len(deleted) == 3)
    assert deleted == ["b", "a", "c"]


async def test_an_orphan_already_gone_is_forgotten(quick_sleeps):
    quick_sleeps(members)
    fake = FakeLxd(members=["m1"])

    async def delete(name: str) -> None:
        try:
            await fake.get_instance(name)
        except NotFound:
            return

    book = MemberBook(log)
    book.orphan("ana", delete)
    await eventually(lambda: not book.is_orphan("ana"))
