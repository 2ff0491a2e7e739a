"""When servers are copies of a shifted base (a pure rule), and how a daemon's bases are made
(against an in-memory daemon)."""

from __future__ import annotations

import asyncio

import pytest
from fakes import IMAGE, FakeLxd, owned

from lxdspawner import bases, names
from lxdspawner.lxd import Dialect, OperationFailed
from lxdspawner.names import is_valid_instance_name

LXD = Dialect(product="lxd")
INCUS = Dialect(product="incus")
LXD_CLUSTER = Dialect(product="lxd", clustered=True)


@pytest.mark.parametrize(
    "dialect, privileged, member, expected",
    [
        (LXD, False, None, True),  # LXD 5.0 shifts every new unprivileged container
        (INCUS, False, None, False),  # idmapped mounts: nothing to shift
        (LXD, True, None, False),  # privileged: nothing shifted
        (LXD_CLUSTER, False, "member1", False),  # one base per member is not made (yet)
        (None, False, None, False),
    ],
)
def test_on_by_default_only_for_unprivileged_containers_on_a_standalone_lxd(
    dialect, privileged, member, expected
):
    assert bases.wanted(None, dialect, privileged, member) is expected


@pytest.mark.parametrize("setting", [True, False])
def test_the_setting_wins(setting):
    assert bases.wanted(setting, INCUS, False, None) is setting
    assert bases.wanted(setting, LXD, False, None) is setting


def test_base_names_are_valid_and_per_image():
    a = names.base_name("jupyter", "a" * 64)
    assert is_valid_instance_name(a)
    assert a != names.base_name("jupyter", "b" * 64)


# -- the bases of a daemon, against an in-memory one ---------------------------------------


@pytest.fixture
def lxd() -> FakeLxd:
    daemon = FakeLxd(product="lxd")
    daemon.add_image(IMAGE, "jupyter-base")
    return daemon


BASE = names.base_name("jupyter", IMAGE)
COPY = {"type": "copy", "source": BASE, "instance_only": True}


async def source(client: FakeLxd, shifted: bases.ShiftedBases, made: list | None = None):
    return await shifted.source(
        client,
        fingerprint=IMAGE,
        prefix="jupyter",
        profiles=("default",),
        timeout=60,
        on_make=(lambda: made.append(1)) if made is not None else (lambda: None),
    )


async def test_a_missing_base_is_made_started_once_stopped_and_without_a_machine_id(lxd):
    made = []
    assert await source(lxd, bases.ShiftedBases(), made) == COPY
    assert made == [1]  # the spawn says "preparing the image" once
    base = lxd.instances[BASE]
    assert base.status == "Stopped"
    assert bases.is_base(base.api(), IMAGE)
    assert base.files["/etc/machine-id"] == (b"", 0o444)  # copies make their own
    assert lxd.lifecycle == [
        ("instance-created", BASE),
        ("instance-started", BASE),  # shifted once, here
        ("instance-stopped", BASE),
    ]
    await lxd.create_instance("ana", source=COPY, config=owned("ana"), start=True)
    assert lxd.instances["ana"].files["/etc/machine-id"] == (b"", 0o444)


async def test_a_burst_of_spawns_makes_one_base(lxd):
    shifted = bases.ShiftedBases()
    made = []
    found = await asyncio.gather(*(source(lxd, shifted, made) for _ in range(10)))
    assert found == [COPY] * 10
    assert made == [1]
    assert lxd.requests["create_instance"] == 1


async def test_a_stopped_base_is_used_as_it_is(lxd):
    lxd.add_instance(BASE, config={bases.KEY_BASE_OF: IMAGE})
    made = []
    assert await source(lxd, bases.ShiftedBases(), made) == COPY
    assert made == []
    assert lxd.request_count == 1  # one look at it


async def test_a_base_left_running_is_made_again(lxd):
    lxd.add_instance(BASE, status="Running", config={bases.KEY_BASE_OF: IMAGE})
    made = []
    assert await source(lxd, bases.ShiftedBases(), made) == COPY
    assert made == [1]
    assert lxd.instances[BASE].status == "Stopped"
    assert lxd.lifecycle[:2] == [("instance-stopped", BASE), ("instance-deleted", BASE)]


@pytest.mark.parametrize(
    "config",
    [owned("base-" + IMAGE[:12]), {bases.KEY_BASE_OF: "0" * 64}, {}],
    ids=["a user's server", "the base of another image", "made by hand"],
)
async def test_a_name_held_by_anything_but_this_images_base_is_left_alone(lxd, config):
    lxd.add_instance(BASE, status="Running", config=config)
    assert await source(lxd, bases.ShiftedBases()) is None  # servers go without a base
    assert lxd.instances[BASE].status == "Running"
    assert lxd.instances[BASE].config == {k: v for k, v in config.items() if v}
    assert lxd.lifecycle == []


async def test_a_base_that_fails_to_start_is_removed_and_the_spawn_told(lxd):
    lxd.fail("start_instance", OperationFailed("Failed to setup idmap"))
    shifted = bases.ShiftedBases()
    with pytest.raises(OperationFailed, match="idmap"):
        await source(lxd, shifted)
    assert BASE not in lxd.instances  # no half-made base is ever copied
    assert await source(lxd, shifted) == COPY  # the next spawn makes it afresh


async def test_a_spawn_cancelled_while_its_base_is_made_leaves_no_half_made_base(lxd):
    gate = lxd.hang("push_file")
    making = asyncio.ensure_future(source(lxd, bases.ShiftedBases()))
    await lxd.wait_calls("push_file")
    making.cancel()
    with pytest.raises(asyncio.CancelledError):
        await making
    assert BASE not in lxd.instances
    gate.set()


@pytest.mark.xfail(
    strict=True,
    reason="a base is taken as made when it is Stopped: one left between its stop and its "
    "machine-id reset (the hub killed there) is copied with its first boot's machine-id",
)
async def test_a_base_stopped_before_its_machine_id_was_reset_is_not_copied(lxd):
    base = lxd.add_instance(BASE, config={bases.KEY_BASE_OF: IMAGE})
    base.files["/etc/machine-id"] = (b"4b0c2d6e9f0a41f3a5c1d2e3f4a5b6c7\n", 0o444)
    await source(lxd, bases.ShiftedBases())
    assert lxd.instances[BASE].files["/etc/machine-id"] == (b"", 0o444)
