"""The shared directory's names and devices (pure rules), and how the copies are made and
mounted (against an in-memory daemon)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fakes import IMAGE, FakeInstance, FakeLxd, eventually, owned
from hypothesis import given
from hypothesis import strategies as st

from lxdspawner import names, sharing
from lxdspawner.lxd import ExecResult, OperationFailed
from lxdspawner.names import MAX_LENGTH, is_valid_instance_name

fingerprints = st.text("0123456789abcdef", min_size=64, max_size=64)
paths = st.text(min_size=1, max_size=200).map(lambda p: "/" + p)


@given(fingerprints, paths, st.none() | st.text(max_size=100))
def test_volume_and_helper_names_are_valid_instance_names(fingerprint, path, member):
    helper = names.fill_helper_name(fingerprint, path, member)
    for name in (names.shared_volume_name(fingerprint, path), helper):
        assert len(name) <= MAX_LENGTH
        assert is_valid_instance_name(name)


def test_one_volume_per_image_and_path():
    a, b = "a" * 64, "b" * 64
    assert names.shared_volume_name(a, "/opt/jupyterhub") == names.shared_volume_name(
        a, "/opt/jupyterhub"
    )
    assert names.shared_volume_name(a, "/opt/jupyterhub") != names.shared_volume_name(
        b, "/opt/jupyterhub"
    )
    assert names.shared_volume_name(a, "/opt/jupyterhub") != names.shared_volume_name(
        a, "/opt/conda"
    )


def test_one_helper_per_member_as_instance_names_are_cluster_wide():
    helpers = {names.fill_helper_name("a" * 64, "/usr", m) for m in ("member1", "member2", None)}
    assert len(helpers) == 3


def test_servers_get_it_read_only_and_the_helper_writable():
    shared = sharing.shared_device("pool", "vol", "/opt/jupyterhub")
    assert shared == {
        "type": "disk",
        "pool": "pool",
        "source": "vol",
        "path": "/opt/jupyterhub",
        "readonly": "true",
    }
    assert "readonly" not in sharing.writable_device("pool", "vol", "/mnt/x")


def test_root_pool_later_profiles_win_and_missing_is_none():
    default = {"devices": {"root": {"type": "disk", "path": "/", "pool": "first"}}}
    override = {"devices": {"root": {"type": "disk", "path": "/", "pool": "second"}}}
    nic_only = {"devices": {"eth0": {"type": "nic", "network": "br"}}}
    assert sharing.root_pool([default, nic_only]) == "first"
    assert sharing.root_pool([default, override]) == "second"
    assert sharing.root_pool([nic_only]) is None
    assert sharing.root_pool([]) is None


def test_the_copy_command_keeps_paths_out_of_the_script():
    command = sharing._copy_command("/opt/$(touch /tmp/pwned)")
    assert command[:2] == ["sh", "-c"]
    assert "pwned" not in command[2]
    assert command[4] == "/opt/$(touch /tmp/pwned)"


def test_containing_finds_paths_inside_shared_directories_only():
    shared = ["/usr", "/opt/jupyterhub/"]
    assert sharing.containing(shared, "/usr/local/bin/tool") == "/usr"
    assert sharing.containing(shared, "/usr") == "/usr"
    assert sharing.containing(shared, "/opt/jupyterhub/etc/x.py") == "/opt/jupyterhub/"
    assert sharing.containing(shared, "/usr/../etc/passwd") is None
    assert sharing.containing(shared, "/usrlocal/x") is None
    assert sharing.containing(shared, "/etc/passwd") is None
    assert sharing.containing([], "/usr/x") is None


# -- filling and mounting the copy, against an in-memory daemon -------------------------------

PATH = "/opt/jupyterhub"
VOLUME = names.shared_volume_name(IMAGE, PATH)
POOL = "default"
PROFILES = ("default",)
log = logging.getLogger("test-sharing")


def copies(fake: FakeLxd, output: str = ""):
    """An exec handler doing what the helper's copy command does: a missing directory exits
    3, else the directory lands in the volume mounted at the helper's mount point."""

    def run(instance: FakeInstance, command: list[str]) -> ExecResult:
        assert command[:2] == ["sh", "-c"]
        path, mount = command[4], command[5]
        if path not in fake.images[instance.image].directories:
            return ExecResult(sharing.NO_SUCH_DIRECTORY, "", "")
        (device,) = (d for d in instance.devices.values() if d.get("path") == mount)
        fake.volume(device["pool"], device["source"], instance.location).content.add(path)
        return ExecResult(0, output, "")

    return run


@pytest.fixture
def daemon(fake: FakeLxd) -> FakeLxd:
    fake.exec_handler = copies(fake)
    return fake


async def device(shared: sharing.SharedDirectory, client: FakeLxd, member: str | None = None):
    return await shared.device(client, IMAGE, member, PROFILES)


async def test_the_first_spawn_goes_without_and_later_ones_mount_the_copy(daemon, caplog):
    caplog.set_level(logging.INFO)
    shared = sharing.SharedDirectory(PATH, log)
    assert await device(shared, daemon) is None  # never waits for the copy
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"
    volume = daemon.volume(POOL, VOLUME)
    assert volume.config == {sharing.KEY_READY: "true", sharing.SHIFTED: "true"}
    assert volume.content == {PATH}
    helper = names.fill_helper_name(IMAGE, PATH, None)
    assert helper not in daemon.instances
    assert [a for a, name in daemon.lifecycle if name == helper] == [
        "instance-created",
        "instance-started",
        "instance-stopped",
        "instance-deleted",
    ]
    asked = daemon.request_count
    for _ in range(20):
        assert await device(shared, daemon) == sharing.shared_device(POOL, VOLUME, PATH)
    assert daemon.request_count == asked  # a spawn costs no request for it
    assert f"shared {PATH}: volume {VOLUME} ready in" in caplog.text


async def test_a_burst_of_spawns_looks_the_volume_up_once_and_fills_it_once(daemon):
    shared = sharing.SharedDirectory(PATH, log)
    lookup = daemon.hang("get_volume")
    burst = asyncio.gather(*(device(shared, daemon) for _ in range(10)))
    await daemon.wait_calls("get_volume")
    lookup.set()
    assert await burst == [None] * 10
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"
    assert daemon.requests["get_volume"] == 1
    assert daemon.requests["create_instance"] == 1


async def test_a_ready_copy_is_mounted_by_the_first_spawn(daemon):
    daemon.add_volume(POOL, VOLUME, config={sharing.KEY_READY: "true", sharing.SHIFTED: "true"})
    shared = sharing.SharedDirectory(PATH, log)
    assert await device(shared, daemon) == sharing.shared_device(POOL, VOLUME, PATH)
    assert daemon.requests["create_instance"] == 0


@pytest.mark.parametrize(
    "config",
    [{}, {sharing.KEY_READY: "true"}],
    ids=["half made", "unshifted, from before isolated uid ranges"],
)
async def test_a_copy_that_is_not_usable_is_made_again(daemon, config):
    daemon.add_volume(POOL, VOLUME, config=config)
    shared = sharing.SharedDirectory(PATH, log)
    assert await device(shared, daemon) is None  # never mounted as it is
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"
    assert daemon.volume(POOL, VOLUME).config == {
        sharing.KEY_READY: "true",
        sharing.SHIFTED: "true",
    }


async def test_on_lxd_the_copy_is_not_shifted():
    fake = FakeLxd(product="lxd")
    fake.add_image(IMAGE, directories={PATH})
    fake.exec_handler = copies(fake)
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(fake, IMAGE, None, PROFILES) == "ready"
    assert fake.volume(POOL, VOLUME).config == {sharing.KEY_READY: "true"}
    assert await device(shared, fake) is not None


async def test_an_image_without_the_directory_goes_without_and_is_not_tried_again(daemon, caplog):
    caplog.set_level(logging.INFO)
    shared = sharing.SharedDirectory("/srv/nothing", log)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "absent"
    assert daemon.volumes == {}
    assert f"image {IMAGE[:12]} has no such directory; its servers go without" in caplog.text
    asked = daemon.request_count
    assert await shared.device(daemon, IMAGE, None, PROFILES) is None
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "absent"
    assert daemon.request_count == asked


async def test_a_failed_copy_is_logged_removed_and_tried_again_later(daemon, monkeypatch, caplog):
    monkeypatch.setattr(sharing, "RETRY_AFTER", 0.02)
    daemon.exec_handler = lambda instance, command: ExecResult(1, "", "cp: No space left")
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "failed"
    assert names.fill_helper_name(IMAGE, PATH, None) not in daemon.instances
    assert (
        f"shared {PATH}: could not fill volume {VOLUME} (servers go without it, next try in "
        f"0 s): copying {PATH} failed (1): cp: No space left"
    ) in caplog.text
    asked = daemon.request_count
    assert await device(shared, daemon) is None  # not tried again at once
    assert daemon.request_count == asked
    daemon.exec_handler = copies(daemon)
    await asyncio.sleep(0.03)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"


async def test_a_daemon_that_does_not_answer_means_going_without_for_now(
    daemon, monkeypatch, caplog
):
    monkeypatch.setattr(sharing, "RETRY_AFTER", 0.02)
    shared = sharing.SharedDirectory(PATH, log)
    daemon.fail("profile")
    assert await device(shared, daemon) is None
    assert f"shared {PATH}: cannot read the profiles: profile: cannot reach" in caplog.text
    daemon.fail("get_volume")
    assert await device(shared, daemon) is None
    assert f"shared {PATH}: cannot look up {VOLUME}: get_volume: cannot reach" in caplog.text
    daemon.fail("create_instance")
    await asyncio.sleep(0.03)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "failed"
    await asyncio.sleep(0.03)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"


async def test_a_copy_that_fails_to_run_still_removes_its_helper(daemon):
    def broken(instance, command):
        raise OperationFailed("exec of 'sh' in helper: Failed to retrieve PID")

    daemon.exec_handler = broken
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "failed"
    assert names.fill_helper_name(IMAGE, PATH, None) not in daemon.instances


async def test_profiles_without_a_root_disk_mean_no_copy(daemon):
    daemon.profiles["nic-only"] = {"name": "nic-only", "devices": {}}
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.device(daemon, IMAGE, None, ("nic-only",)) is None
    assert await shared.device(daemon, IMAGE, None, ("nic-only",)) is None
    assert daemon.requests["profile"] == 1
    assert daemon.requests["get_volume"] == 0


async def test_a_helper_left_by_an_earlier_fill_is_removed_first(daemon):
    helper = names.fill_helper_name(IMAGE, PATH, None)
    daemon.add_instance(helper, status="Running", config={sharing.KEY_HELPER: IMAGE})
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "ready"
    assert helper not in daemon.instances


async def test_an_instance_holding_the_helpers_name_is_left_alone(daemon, caplog):
    helper = names.fill_helper_name(IMAGE, PATH, None)
    daemon.add_instance(helper, status="Running", config=owned("lxdspawner-shared"))
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(daemon, IMAGE, None, PROFILES) == "failed"
    assert daemon.instances[helper].status == "Running"
    assert f"{helper} exists and is not a fill helper of this image: left alone" in caplog.text
    assert daemon.volumes == {}


async def test_one_copy_per_cluster_member():
    fake = FakeLxd(members=["m1", "m2"])
    fake.add_image(IMAGE, directories={PATH})
    fake.exec_handler = copies(fake)
    shared = sharing.SharedDirectory(PATH, log)
    assert await shared.ensure(fake, IMAGE, "m1", PROFILES) == "ready"
    assert await device(shared, fake, "m2") is None  # m1's copy is not m2's
    assert await shared.ensure(fake, IMAGE, "m2", PROFILES) == "ready"
    assert {(v.location, v.name) for v in fake.volumes.values()} == {
        ("m1", VOLUME),
        ("m2", VOLUME),
    }
    helpers = [name for action, name in fake.lifecycle if action == "instance-created"]
    assert len(set(helpers)) == 2


def helpers_done(fake: FakeLxd) -> int:
    return sum(action == "instance-deleted" for action, _ in fake.lifecycle)


async def test_the_ready_copies_of_several_directories_are_mounted_together(daemon):
    directories = sharing.SharedDirectories(log)
    paths = [PATH, "/usr", "/srv/nothing"]  # the image has the first two
    assert await directories.devices(daemon, IMAGE, None, paths, PROFILES) == {}
    await eventually(lambda: helpers_done(daemon) == 3)  # filled in the background
    assert await directories.devices(daemon, IMAGE, None, paths, PROFILES) == {
        names.shared_device_name(PATH): sharing.shared_device(POOL, VOLUME, PATH),
        names.shared_device_name("/usr"): sharing.shared_device(
            POOL, names.shared_volume_name(IMAGE, "/usr"), "/usr"
        ),
    }


async def test_a_copy_deleted_by_hand_is_looked_up_again_once_forgotten(daemon):
    directories = sharing.SharedDirectories(log)
    paths = [PATH, "/usr"]
    await directories.devices(daemon, IMAGE, None, paths, PROFILES)
    await eventually(lambda: helpers_done(daemon) == 2)
    assert len(await directories.devices(daemon, IMAGE, None, paths, PROFILES)) == 2
    del daemon.volumes[(POOL, VOLUME, "none")]
    directories.forget(IMAGE, None)  # a create with it failed
    asked = daemon.requests["get_volume"]
    again = await directories.devices(daemon, IMAGE, None, paths, PROFILES)
    assert list(again) == [names.shared_device_name("/usr")]
    assert daemon.requests["get_volume"] == asked + 2
    await eventually(lambda: helpers_done(daemon) == 3)  # made again
    assert len(await directories.devices(daemon, IMAGE, None, paths, PROFILES)) == 2


async def test_a_burst_of_spawns_reads_the_profiles_once(daemon):
    shared = sharing.SharedDirectory(PATH, log)
    await asyncio.gather(*(device(shared, daemon) for _ in range(10)))
    assert daemon.requests["profile"] == 1


async def test_forgetting_an_image_does_not_fill_a_directory_it_lacks_again(daemon):
    directories = sharing.SharedDirectories(log)
    paths = [PATH, "/srv/nothing"]
    await directories.devices(daemon, IMAGE, None, paths, PROFILES)
    await eventually(lambda: len(daemon.volumes) == 1)  # the lacking one's deleted
    await eventually(lambda: daemon.volume(POOL, VOLUME).config.get(sharing.KEY_READY) == "true")
    directories.forget(IMAGE, None)  # a create with the shared directories failed
    await directories.devices(daemon, IMAGE, None, paths, PROFILES)
    await eventually(lambda: daemon.requests["get_volume"] == 3)
    for _ in range(50):
        await asyncio.sleep(0)
    assert helpers_done(daemon) == 2  # no helper container started for /srv/nothing again
    assert daemon.requests["get_volume"] == 3  # only the copy that exists is looked at again
