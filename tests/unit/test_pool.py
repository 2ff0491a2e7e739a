"""The warm pool: its key and lineage (pure), who may use it, its members' names and listing,
the preloader's refusals, and in process on an in-memory Incus what a spawn does with it: the
first spawn of a definition takes today's path and fills the pool, the next takes a member
(its user's keys, devices, environment and claim written), the pool is refilled, a spawn of
another definition takes today's path, and an image moved replaces the members."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from fakes import IMAGE, FakeLxd, eventually
from test_spawner_inprocess import HUB, hub_daemon, server_answers, spawner  # noqa: F401

from lxdspawner import listing, names, objects, pool, preload
from lxdspawner.lxd import LxdError
from lxdspawner.ownership import KEY_HUB, KEY_LINEAGE, KEY_POOL, KEY_USER, Owner
from lxdspawner.warmpool import WarmPool

SPEC = objects.ServerSpec(
    instance="jupyter-ana",
    username="ana",
    server_name="",
    hub="hub-1",
    uid=1000,
    gid=1000,
    home="/home/ana",
    cmd=("jupyterhub-singleuser", "--port=8888"),
    mem_limit=2**30,
    volume_devices={"lxdspawner-vol-1": {"type": "disk", "pool": "p", "source": "v", "path": "/h"}},
    home_on_volume=True,
)


def key(spec=SPEC, fingerprint=IMAGE, shared=(), base=None) -> str:
    return pool.key_of(
        pool.definition(
            spec, fingerprint=fingerprint, shared_directories=shared, clone_shifted_base=base
        )
    )


# -- the key and the lineage -----------------------------------------------------------------


def test_the_key_is_the_same_for_every_user_and_changes_with_the_container():
    bob = dataclasses.replace(
        SPEC,
        instance="jupyter-bob",
        username="bob",
        server_name="lab",
        uid=1001,
        gid=1001,
        home="/home/bob",
        cmd=("jupyterhub-singleuser", "--notebook-dir=/home/bob"),
        mounts=(objects.Mount("data", "/srv/bob", "/data"),),
        volume_devices={},
    )
    assert key(bob) == key(SPEC)
    assert key(SPEC) == key(SPEC)  # stable: a restarted hub finds its members
    assert len(key(SPEC)) == 16
    different = [
        key(dataclasses.replace(SPEC, mem_limit=2**31)),
        key(dataclasses.replace(SPEC, profiles=("default", "gpu"))),
        key(dataclasses.replace(SPEC, hub="hub-2")),
        key(dataclasses.replace(SPEC, extra_config={"limits.cpu": "1"})),
        key(dataclasses.replace(SPEC, hardening={"security.idmap.isolated": "true"})),
        key(fingerprint="beef" * 16),
        key(shared=("/usr",)),
        key(base=True),
    ]
    assert len({key(SPEC), *different}) == len(different) + 1


def test_the_lineage_follows_the_alias_and_the_choice_not_the_image():
    one = pool.lineage_of("jupyter-base", "small", {"mem": "2G"})
    assert one == pool.lineage_of("jupyter-base", "small", {"mem": "2G"})
    assert one != pool.lineage_of("jupyter-base", "large", {"mem": "2G"})
    assert one != pool.lineage_of("jupyter-base", "small", {"mem": "4G"})
    assert one != pool.lineage_of("other-image", "small", {"mem": "2G"})


def test_who_takes_todays_path():
    ok = dict(
        size=1,
        kept=False,
        remove=True,
        patched=False,
        prepare=False,
        internal_ssl=False,
        guarantees=False,
        free_value=False,
        clustered=False,
    )
    assert pool.why_not(**ok) is None
    assert pool.why_not(**{**ok, "size": 0}) == "warm_pool_size is 0"
    for setting in ("kept", "patched", "prepare", "internal_ssl", "guarantees", "free_value"):
        assert pool.why_not(**{**ok, setting: True}), setting
    assert "remove = False" in pool.why_not(**{**ok, "remove": False})
    assert "cluster" in pool.why_not(**{**ok, "clustered": True})


# -- names, listing, the claim, the preloader ---------------------------------------------------


def test_member_names():
    name = names.pool_member_name("jupyter", "0123456789abcdef", "a1b2c3d4")
    assert name == "jupyter-pool-01234567-a1b2c3d4"
    assert names.is_valid_instance_name(name)
    assert names.is_pool_member_name(name)
    assert not names.is_pool_member_name(names.instance_name("pool"))
    assert not names.is_pool_member_name("jupyter-alice")
    with pytest.raises(ValueError):
        names.pool_member_name("jupyter", "0123456789abcdef", "../x")


def test_list_shows_waiting_members_as_the_pool():
    member = {"name": "j-pool-1", "config": {**Owner("h", "", "").keys(), KEY_POOL: "k"}}
    claimed = {"name": "j-pool-2", "config": {**Owner("h", "bob").keys(), KEY_POOL: "k"}}
    rows = listing.servers([member, claimed])
    assert [(r.user, r.pool) for r in rows] == [("(pool)", True), ("bob", False)]
    assert "(pool)" in listing.table(rows)


def test_the_claim_has_no_secret_and_the_environment_is_json():
    claim = json.loads(pool.claim_document(SPEC, allow_uid0=False, allow_gid0=False))
    assert claim["uid"] == 1000 and claim["gid"] == 1000 and claim["home"] == "/home/ana"
    assert claim["argv"] == list(SPEC.cmd)
    assert claim["env"] == pool.ENV_JSON_PATH
    assert claim["make_home"] == objects.make_home_command(SPEC)
    assert "token" not in json.dumps(claim).lower()
    env = json.loads(pool.env_document(SPEC, {"JUPYTERHUB_API_TOKEN": "t'$`x"}))
    assert env == {"HOME": "/home/ana", "JUPYTERHUB_API_TOKEN": "t'$`x"}
    with pytest.raises(ValueError):
        pool.env_document(SPEC, {"A": "nul\0"})


@pytest.mark.parametrize(("uid", "gid", "setting"), [(0, 1000, "min_uid"), (1000, 0, "min_gid")])
def test_the_preloader_refuses_root_unless_allowed(uid, gid, setting, monkeypatch):
    ran = []
    monkeypatch.setattr(preload.subprocess, "run", lambda *a, **k: ran.append(a))
    claim = {"uid": uid, "gid": gid, "allow_uid0": False, "allow_gid0": False}
    with pytest.raises(SystemExit, match=setting):
        preload.become(claim)
    assert ran == []  # refused before anything runs as root on the user's behalf


def test_the_preloader_is_the_members_program():
    assert b"def wait_for_claim" in pool.preloader_source()
    unit = pool.member_unit()
    assert f"ExecStart=/usr/bin/env python3 -I {pool.PRELOADER_PATH}" in unit
    assert "User=" not in unit  # root until the claim: the preloader switches itself
    assert "SuccessAction=poweroff" in unit


# -- in process: a spawn and the pool -----------------------------------------------------------


def waiting(fake: FakeLxd) -> list[str]:
    return sorted(
        n
        for n, i in fake.instances.items()
        if i.config.get(KEY_POOL) and not i.config.get(KEY_USER) and i.status == "Running"
    )


async def test_a_spawn_takes_a_member_and_the_pool_is_refilled(hub_daemon, fake):  # noqa: F811
    # The first spawn of a definition: today's path; the pool is made behind it.
    ana = spawner(fake, "ana", warm_pool_size=1)
    await ana.start()
    assert ana.instance_name == "jupyter-ana"
    await eventually(lambda: len(waiting(fake)) == 1)
    (member,) = waiting(fake)
    box = fake.instances[member]
    assert box.config[KEY_HUB] == HUB and KEY_USER not in box.config
    assert KEY_LINEAGE in box.config
    assert names.is_pool_member_name(member)
    assert pool.PRELOADER_PATH in box.files
    assert box.files[objects.UNIT_PATH][0].decode() == pool.member_unit()
    assert objects.ENV_PATH not in box.files and pool.ENV_JSON_PATH not in box.files
    assert box.directories[pool.CLAIM_DIR] == 0o700

    # bob's spawn takes it: his keys, his home volume hot-plugged, his environment, the claim.
    bob = spawner(fake, "bob", warm_pool_size=1)
    said = []
    bob._emit = lambda message, progress=None: said.append(message)
    await bob.start()
    assert bob.instance_name == member
    assert bob.get_state()["instance"] == member
    assert f"Taking the preloaded container {member} from the warm pool" in said
    assert Owner(HUB, "bob").owns(box.config)
    assert box.config[KEY_POOL]  # kept: where the server came from
    assert any(d.get("path") == "/home/bob" for d in box.devices.values())
    env = json.loads(box.files[pool.ENV_JSON_PATH][0])
    assert env["JUPYTERHUB_API_TOKEN"] == "a-token" and env["JUPYTERHUB_USER"] == "bob"
    assert box.files[pool.ENV_JSON_PATH][1] == 0o600
    assert box.owners[pool.ENV_JSON_PATH] == (1000, 1000)
    claim = json.loads(box.files[pool.CLAIM_PATH][0])
    assert (claim["uid"], claim["home"]) == (1000, "/home/bob")

    # Refilled in the background; poll and stop work on the claimed member as on any server.
    await eventually(lambda: len(waiting(fake)) == 1 and member not in waiting(fake))
    assert await bob.poll() is None
    await bob.stop()
    assert box.status == "Stopped"  # its unit, the preloader's, stops as every server's
    fake.finish_teardown(member)
    await eventually(lambda: member not in fake.instances)  # used once

    # Another definition (more memory): today's path, and its own pool.
    carol = spawner(fake, "carol", warm_pool_size=1, mem_limit=2**31)
    await carol.start()
    assert carol.instance_name == "jupyter-carol"


async def test_an_image_moved_replaces_the_members(hub_daemon, fake):  # noqa: F811
    ana = spawner(fake, "ana", warm_pool_size=1)
    await ana.start()
    await eventually(lambda: len(waiting(fake)) == 1)
    (old,) = waiting(fake)
    old_key = fake.instances[old].config[KEY_POOL]
    fake.images[IMAGE].aliases.remove("jupyter-base")
    fake.add_image("beef" * 16, "jupyter-base")
    await hub_daemon.pool.check(HUB)
    await eventually(lambda: old not in fake.instances and len(waiting(fake)) == 1)
    (new,) = waiting(fake)
    assert fake.instances[new].image == "beef" * 16
    assert fake.instances[new].config[KEY_POOL] != old_key
    # The next spawn takes the new one.
    bob = spawner(fake, "bob", warm_pool_size=1)
    await bob.start()
    assert bob.instance_name == new


async def test_a_restarted_hub_uses_the_members_it_finds(hub_daemon, fake):  # noqa: F811
    await spawner(fake, "ana", warm_pool_size=1).start()
    await eventually(lambda: len(waiting(fake)) == 1)
    (member,) = waiting(fake)
    hub_daemon.pool.close()
    hub_daemon.pool = WarmPool(hub_daemon)  # what a new hub process knows: nothing
    bob = spawner(fake, "bob", warm_pool_size=1)
    await bob.start()
    assert bob.instance_name == member


async def test_a_member_that_cannot_be_made_is_tried_again_later_not_at_once(
    hub_daemon,  # noqa: F811
    fake,
    caplog,
):
    await spawner(fake, "ana", warm_pool_size=1).start()
    await eventually(lambda: len(waiting(fake)) == 1)
    fake.fail("create_instance", LxdError("Failed creating instance record"), times=None)
    before = fake.requests["create_instance"]
    bob = spawner(fake, "bob", warm_pool_size=1)
    await bob.start()  # the claim does not wait for the refill, nor fail with it
    await eventually(lambda: fake.requests["create_instance"] == before + 1)
    await eventually(lambda: not hub_daemon.pool._making[next(iter(hub_daemon.pool._failed))])
    assert "the next try in 15 s" in caplog.text
    hub_daemon.pool.refill(HUB)  # a claim or a check right after: no new attempt
    for _ in range(50):
        await asyncio.sleep(0)
    assert fake.requests["create_instance"] == before + 1
    assert waiting(fake) == []


async def test_a_burst_of_first_spawns_fills_the_pool_once(hub_daemon, fake):  # noqa: F811
    users = [spawner(fake, user, warm_pool_size=2) for user in ("ana", "bob", "carol", "dan")]
    await asyncio.gather(*(s.start() for s in users))
    await eventually(
        lambda: (
            len(waiting(fake)) == 2
            and not hub_daemon.pool._making[next(iter(hub_daemon.pool._wanted.values())).wanted.key]
        )
    )
    assert len(waiting(fake)) == 2  # not more: those being made count


async def test_a_member_the_daemon_will_not_hand_over_is_deleted_and_the_usual_path_taken(
    hub_daemon,  # noqa: F811
    fake,
):
    await spawner(fake, "ana", warm_pool_size=1).start()
    await eventually(lambda: len(waiting(fake)) == 1)
    (member,) = waiting(fake)
    fake.fail("PATCH /1.0/instances/{name}", LxdError("Failed to add device"))
    bob = spawner(fake, "bob", warm_pool_size=1)
    await bob.start()
    assert bob.instance_name == "jupyter-bob"
    assert fake.instances["jupyter-bob"].status == "Running"
    await eventually(lambda: member not in fake.instances)


async def test_no_pool_by_default(hub_daemon, fake):  # noqa: F811
    await spawner(fake, "ana").start()
    await spawner(fake, "bob").start()
    assert not [i for i in fake.instances.values() if i.config.get(KEY_POOL)]


async def test_the_pool_is_filled_when_a_spawner_is_made_not_at_the_first_spawn(
    hub_daemon,  # noqa: F811
    fake,
):
    """JupyterHub makes a spawner at the hub's start (servers running) and at a user's first
    page: the pool of its definition is filled then, once, so the first spawn takes a member."""
    spawner(fake, "ana", warm_pool_size=1)
    spawner(fake, "bob", warm_pool_size=1)  # the same definition: filled once
    await eventually(lambda: len(waiting(fake)) == 1)
    (member,) = waiting(fake)
    for _ in range(50):
        await asyncio.sleep(0)
    assert len([i for i in fake.instances.values() if i.config.get(KEY_POOL)]) == 1
    carol = spawner(fake, "carol", warm_pool_size=1)
    await carol.start()
    assert carol.instance_name == member


async def test_with_profile_list_the_pool_waits_for_the_choice(hub_daemon, fake):  # noqa: F811
    spawner(fake, "ana", warm_pool_size=1, profile_list=[{"display_name": "Small"}])
    for _ in range(100):
        await asyncio.sleep(0)
    assert not [i for i in fake.instances.values() if i.config.get(KEY_POOL)]


async def test_members_no_setting_wants_any_more_go_when_the_hub_starts(
    hub_daemon,  # noqa: F811
    fake,
):
    """The operator changed the image setting (to another alias): after the restart, the
    members of the old setting are no one's (without profile_list, one lineage is wanted)."""
    spawner(fake, "ana", warm_pool_size=1)
    await eventually(lambda: len(waiting(fake)) == 1)
    (old,) = waiting(fake)
    await eventually(lambda: not hub_daemon.pool._tasks)  # made, not cut short by the close
    fake.add_image("beef" * 16, "other-image")
    hub_daemon.pool.close()
    hub_daemon.pool = WarmPool(hub_daemon)  # the restarted hub
    spawner(fake, "bob", warm_pool_size=1, image="other-image")
    await eventually(lambda: old not in fake.instances and len(waiting(fake)) == 1)
    (new,) = waiting(fake)
    assert fake.instances[new].image == "beef" * 16
