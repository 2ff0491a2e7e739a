"""The fake daemon behaves as Incus does where the tier relies on it."""

from __future__ import annotations

import pytest
from fakes import IMAGE, SOURCE, FakeLxd

from lxdspawner.lxd import (
    Conflict,
    ExecResult,
    FileHelperFailed,
    LxdError,
    NotFound,
    OperationFailed,
    Unreachable,
)
from lxdspawner.lxd.client import CONNECTED


async def test_missing_objects_are_404s(fake):
    for call in (
        fake.get_instance("nobody"),
        fake.delete_instance("nobody"),
        fake.profile("nobody"),
        fake.get_volume("default", "nobody"),
        fake.image_alias("nobody"),
        fake.network("nobody"),
        fake.create_instance("c", source={"type": "image", "alias": "nobody"}),
    ):
        with pytest.raises(NotFound):
            await call


async def test_a_running_instance_is_not_deleted_and_a_stopped_one_not_stopped(fake):
    await fake.create_instance("c", source={"type": "image", "alias": "jupyter-base"}, start=True)
    with pytest.raises(LxdError, match="Instance is running"):
        await fake.delete_instance("c")
    with pytest.raises(Conflict):
        await fake.create_instance("c", source=SOURCE)
    with pytest.raises(LxdError, match="already running"):
        await fake.start_instance("c")
    await fake.stop_instance("c")
    with pytest.raises(LxdError, match="already stopped"):
        await fake.stop_instance("c")
    await fake.delete_instance("c")
    assert fake.lifecycle == [
        ("instance-created", "c"),
        ("instance-started", "c"),
        ("instance-stopped", "c"),
        ("instance-deleted", "c"),
    ]


async def test_one_that_powered_off_is_deleted_only_once_torn_down(fake):
    await fake.create_instance("c", source=SOURCE, start=True)
    fake.power_off("c", teardown=False)
    assert (await fake.get_instance("c"))["status"] == "Stopped"
    with pytest.raises(LxdError, match="Instance is running"):
        await fake.delete_instance("c")
    fake.finish_teardown("c")
    await fake.delete_instance("c")
    assert fake.lifecycle[-2:] == [("instance-shutdown", "c"), ("instance-deleted", "c")]


async def test_client_composites_run_on_the_fake(fake):
    await fake.create_instance("c", source=SOURCE, start=True)
    assert await fake.shut_down("c", timeout=0, force=True) is True
    assert await fake.shut_down("c", timeout=0, force=True) is False
    await fake.remove_instance("c")
    await fake.remove_instance("c")  # gone already: fine
    assert "c" not in fake.instances


async def test_exec_needs_a_running_instance(fake):
    await fake.create_instance("c", source=SOURCE)
    with pytest.raises(LxdError, match="not running"):
        await fake.exec("c", ["true"])
    await fake.start_instance("c")
    fake.exec_handler = lambda instance, command: ExecResult(0, "hi", "")
    assert (await fake.exec("c", ["echo"])).stdout == "hi"


async def test_a_volume_in_use_is_not_deleted_and_empty_config_values_are_dropped(fake):
    await fake.create_volume("default", "v", config={"a": "1", "b": ""})
    assert (await fake.get_volume("default", "v"))["config"] == {"a": "1"}
    device = {"type": "disk", "pool": "default", "source": "v", "path": "/v"}
    await fake.create_instance("c", source=SOURCE, devices={"v": device})
    with pytest.raises(LxdError, match="still in use"):
        await fake.delete_volume("default", "v")
    with pytest.raises(Conflict):
        await fake.create_volume("default", "v")
    await fake.remove_instance("c")
    await fake.delete_volume("default", "v")


async def test_failures_and_hangs_on_demand(fake):
    fake.fail("profile", times=2)
    for _ in range(2):
        with pytest.raises(Unreachable):
            await fake.profile("default")
    assert (await fake.profile("default"))["name"] == "default"
    fake.fail("profile", NotFound("gone", status=404), times=None)
    for _ in range(3):
        with pytest.raises(NotFound):
            await fake.profile("default")
    fake.heal("profile")
    await fake.profile("default")
    fake.down = True
    with pytest.raises(Unreachable):
        await fake.cluster_members()
    assert fake.requests["profile"] == 7
    assert fake.request_count == 8


async def test_clusters_place_by_target_and_a_member_down_does_not_answer():
    fake = FakeLxd(members=["m1", "m2"])
    fake.add_image(IMAGE)
    await fake.create_instance("c", source=SOURCE, target="m2")
    assert (await fake.get_instance("c"))["location"] == "m2"
    fake.members["m2"] = "Offline"
    with pytest.raises(Unreachable):
        await fake.get_instance("c")
    assert [(i["name"], i["status"]) for i in await fake.list_instances()] == [("c", "Error")]


async def test_event_streams_announce_their_connection_and_reconnect(fake):
    stream = fake.events(types=("lifecycle",))
    assert (await anext(stream))["type"] == CONNECTED
    fake.emit("instance-created", "c")
    assert (await anext(stream))["metadata"]["source"] == "/1.0/instances/c"
    fake.drop_events()
    assert await anext(stream) == {"type": CONNECTED, "reconnected": True}
    await stream.aclose()
    assert fake.open_streams == 0
    once = fake.events(types=("lifecycle",), reconnect=False)
    await anext(once)
    fake.drop_events()
    with pytest.raises(Unreachable):
        await anext(once)


async def test_connect_is_get_1_0_and_fails_while_down(fake):
    assert await fake.connect() is fake
    fake.down = True
    with pytest.raises(Unreachable):
        await fake.connect()


async def test_image_fingerprints_of_an_alias_or_a_prefix(fake):
    assert await fake.image_fingerprint("jupyter-base") == IMAGE
    assert await fake.image_fingerprint(IMAGE[:12]) == IMAGE
    assert await fake.image_fingerprint("no-such-image") is None


async def test_a_running_instance_has_an_address_from_dhcp_and_its_profiles_devices(fake):
    await fake.create_instance("c", source=SOURCE, devices={"data": {"type": "disk"}})
    assert (await fake.instance_state("c"))["network"] is None
    await fake.start_instance("c")
    state = await fake.instance_state("c")
    assert [a["address"] for a in state["network"]["eth0"]["addresses"]] == ["10.0.0.2", "fe80::1"]
    expanded = (await fake.get_instance("c"))["expanded_devices"]
    assert sorted(expanded) == ["data", "eth0", "root"]
    await fake.stop_instance("c")
    fake.dhcp = False
    await fake.start_instance("c")
    addresses = (await fake.instance_state("c"))["network"]["eth0"]["addresses"]
    assert [a["family"] for a in addresses] == ["inet6"]


async def test_the_files_api_and_a_file_helper_that_stays_stuck_for_one_instance(fake):
    fake.stick_file_helper("c")
    await fake.create_instance("c", source=SOURCE)
    with pytest.raises(FileHelperFailed, match="forkfile"):
        await fake.make_directory("c", "/etc/x")
    await fake.remove_instance("c")
    await fake.create_instance("c", source=SOURCE)  # a new instance: a new helper
    await fake.make_directory("c", "/etc/x", mode=0o700)
    await fake.push_file("c", "/var/log/x.log", b"one\ntwo\n")
    await fake.make_symlink("c", "/etc/link", "/etc/shadow")
    assert await fake.read_file_tail("c", "/var/log/x.log", max_bytes=4) == b"two\n"
    assert await fake.read_file_tail("c", "/etc/link") == b"/etc/shadow"  # not followed
    await fake.request("DELETE", "/1.0/instances/c/files", params={"path": "/etc/link"})
    for call in (
        fake.read_file_tail("c", "/etc/link"),
        fake.request("DELETE", "/1.0/instances/c/files", params={"path": "/etc/link"}),
    ):
        with pytest.raises(NotFound):
            await call
    assert fake.instances["c"].directories == {"/etc/x": 0o700}


async def test_an_instance_put_is_an_operation_whose_failure_shows_only_when_waited_for(fake):
    await fake.create_instance("c", source=SOURCE)
    body = {"config": {"a": "1", "b": ""}, "devices": {}, "profiles": ["default"]}
    await fake.run("PUT", "/1.0/instances/c", json_body=body)
    assert fake.instances["c"].config == {"a": "1"}
    assert fake.lifecycle[-1] == ("instance-updated", "c")
    missing = {"type": "disk", "pool": "default", "source": "gone", "path": "/gone"}
    bad = {**body, "devices": {"gone": missing}}
    operation = await fake.request("PUT", "/1.0/instances/c", json_body=bad)
    assert operation["status"] == "Running"  # accepted: the failure comes later
    with pytest.raises(OperationFailed, match="'gone' not found"):
        await fake.wait(operation)
    assert fake.instances["c"].devices == {}
    with pytest.raises(NotImplementedError):
        await fake.request("POST", "/1.0/instances/c")


async def test_an_instance_patch_merges_at_once_and_an_empty_value_removes(fake):
    await fake.create_instance("c", source=SOURCE, config={"a": "1", "b": "2"})
    disk = {"type": "disk", "source": "/srv", "path": "/srv"}
    answer = await fake.request(
        "PATCH",
        "/1.0/instances/c",
        json_body={"config": {"b": "", "c": "3"}, "devices": {"d": disk}},
    )
    assert answer == {}  # no operation, as Incus answers
    assert fake.instances["c"].config == {"a": "1", "c": "3"}
    assert fake.instances["c"].devices == {"d": disk}
    assert fake.lifecycle[-1] == ("instance-updated", "c")
