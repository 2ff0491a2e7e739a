"""LxdSpawner.start(), stop() and poll() in process, on an in-memory Incus: what a user sees on
the spawn page when a spawn fails (the message names the setting or value at fault), and what
is left behind (nothing, or a kept container, never deleted).

The hub is JupyterHub's own ``Hub`` object; the user a stand-in with what the spawner reads.
Only the readiness check is replaced: it is a request over the network to the server, tested
for real in tests/integration.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from fakes import IMAGE, FakeLxd, eventually, owned, server_unit
from jupyterhub.objects import Hub
from traitlets.config import Config

from lxdspawner import LxdSpawner, names, objects, readiness, removals, sharing
from lxdspawner import daemon as daemon_module
from lxdspawner.daemon import Daemon, DaemonError
from lxdspawner.lxd import ExecResult, LxdError, Remote, Unreachable
from lxdspawner.sharing import KEY_READY
from lxdspawner.spawner import SpawnError

HUB = "hub-1"
NAME = "jupyter-ana"
#: The spawners' hub log: no handler, so what they log reaches pytest's caplog.
HUB_LOG = logging.getLogger("test-hub")


def spawner(fake: FakeLxd, user: str = "ana", **settings) -> LxdSpawner:
    """ana's spawner on ``fake``; without shared directories unless asked (their copies are
    made by helper containers in the background: see test_sharing.py)."""
    config = Config()
    config.LxdSpawner.endpoint = fake.endpoint
    config.LxdSpawner.hub_id = HUB
    config.LxdSpawner.get_uid_gid = lambda spawner: (1000, 1000)
    config.LxdSpawner.stop_timeout = 5
    config.LxdSpawner.start_timeout = 5
    config.LxdSpawner.shared_directories = []
    for key, value in settings.items():
        setattr(config.LxdSpawner, key, value)
    return LxdSpawner(
        config=config,
        user=SimpleNamespace(name=user, escaped_name=user, url=f"/user/{user}/"),
        hub=Hub(ip="", port=8081, base_url="/hub/"),
        api_token="a-token",
        log=HUB_LOG,
    )


@pytest.fixture
def hub_daemon(fake, make_daemon, monkeypatch) -> Daemon:
    """The hub's Daemon for the spawners' endpoint: the in-memory one's."""
    fake.exec_handler = server_unit(fake)
    daemon = make_daemon(fake)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    return daemon


@pytest.fixture(autouse=True)
def server_answers(monkeypatch) -> list[str]:
    """The server answers as soon as it is asked: the URLs asked, in order."""
    asked = []

    async def answers(daemon, name, url, *, tls, timeout):
        asked.append(url)

    monkeypatch.setattr(readiness, "wait_http", answers)
    return asked


async def start(s: LxdSpawner) -> tuple[tuple[str, int], list[str]]:
    """The server's address, and the progress messages the spawn page showed."""
    address = await s.start()
    return address, [event["message"] async for event in s.progress()]


async def fails(s: LxdSpawner) -> tuple[SpawnError, list[str]]:
    with pytest.raises(SpawnError) as failed:
        await s.start()
    assert "Traceback" not in str(failed.value)
    return failed.value, [event["message"] async for event in s.progress()]


def kept(fake: FakeLxd, name: str = NAME, **config) -> dict:
    """A container kept from an earlier server of ana's (remove = False), stopped; the state
    the hub recorded for it."""
    fake.add_instance(name, config={**owned("ana"), **config}, image=IMAGE)
    return {"lxd_state_version": 2, "instance": name, **Remote(fake.endpoint).to_state()}


# -- a server's life --------------------------------------------------------------------------


async def test_a_server_starts_answers_polls_for_free_and_its_container_goes_at_stop(
    hub_daemon, fake, server_answers
):
    s = spawner(fake)
    (ip, port), said = await start(s)
    container = fake.instances[NAME]
    assert (ip, port) == (container.ipv4, 8888)
    assert container.status == "Running"
    assert server_answers == [f"http://{ip}:8888/api"]
    assert said[0] == f"Placing server {NAME}"
    assert f"Creating container {NAME} from image jupyter-base" in said
    assert said[-1] == f"Waiting for the server at {ip}:8888"
    env = container.files[objects.ENV_PATH][0].decode()
    # The hub binds on all addresses: the container reaches it at its bridge's gateway.
    assert "JUPYTERHUB_API_URL='http://10.0.0.1:8081/hub/api'" in env
    assert "JUPYTERHUB_API_TOKEN='a-token'" in env
    assert container.links == {objects.UNIT_WANTS_LINK: f"../{objects.UNIT_NAME}"}
    assert s.get_state()["instance"] == NAME

    before = fake.request_count
    assert [await s.poll() for _ in range(100)] == [None] * 100
    assert fake.request_count == before

    await s.stop()
    assert container.status == "Stopped"  # the server has exited
    fake.finish_teardown(NAME)
    await eventually(lambda: NAME not in fake.instances)
    assert await s.poll() == 0
    assert s.get_state()["instance"] == NAME  # the name is used again next time


async def test_a_server_that_ended_by_itself_is_reported_and_removed_unless_a_spawn_is_pending(
    hub_daemon, fake
):
    s = spawner(fake)
    await s.start()
    fake.power_off(NAME)
    await (await hub_daemon.cache()).wait_for(NAME, lambda e: e.status == "Stopped", 1)
    s._spawn_pending = True  # JupyterHub's flag while a start is under way
    assert await s.poll() == 0
    for _ in range(20):
        await asyncio.sleep(0)
    assert NAME in fake.instances
    s._spawn_pending = False
    assert await s.poll() == 0
    await eventually(lambda: NAME not in fake.instances)
    assert await spawner(fake).poll() == 0  # a spawner that never started


async def test_a_new_start_waits_for_the_deletion_an_earlier_stop_left(hub_daemon, fake):
    s = spawner(fake)
    await s.start()
    await s.stop()
    starting = asyncio.ensure_future(start(s))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not starting.done()
    fake.finish_teardown(NAME)
    _, said = await asyncio.wait_for(starting, 2)
    assert said[0] == "Waiting for the previous container to be deleted"
    assert fake.instances[NAME].status == "Running"


async def test_a_stopped_server_is_deleted_only_once_the_spawns_in_flight_have_ended(
    hub_daemon, fake
):
    ana = spawner(fake)
    await ana.start()
    gate = fake.hang("create_instance")
    bob = asyncio.ensure_future(start(spawner(fake, "bob")))
    await fake.wait_calls("create_instance", 2)  # ana's, and bob's, held
    await ana.stop()
    fake.finish_teardown(NAME)
    for _ in range(100):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Stopped"  # torn down, not deleted beside bob's spawn
    assert hub_daemon.removals.spawns_in_flight == 1
    gate.set()
    await asyncio.wait_for(bob, 2)
    assert hub_daemon.removals.spawns_in_flight == 0
    await eventually(lambda: NAME not in fake.instances)


async def test_a_kept_container_is_started_again_with_the_current_settings(hub_daemon, fake):
    state = kept(fake, **{"limits.cpu": "8", "volatile.uuid": "u1"})
    s = spawner(fake, remove=False, mem_limit="1G")
    s.load_state(state)
    (ip, _), said = await start(s)
    container = fake.instances[NAME]
    assert container.status == "Running" and ip == container.ipv4
    assert container.config["limits.memory"] == str(2**30)
    assert "limits.cpu" not in container.config and container.config["volatile.uuid"] == "u1"
    assert not any(m.startswith("Creating container") for m in said)
    await s.stop()
    assert container.status == "Stopped"
    for _ in range(20):
        await asyncio.sleep(0)
    assert NAME in fake.instances  # kept


async def test_a_leftover_container_is_replaced_when_containers_are_not_kept(hub_daemon, fake):
    fake.add_instance(NAME, status="Running", config={**owned("ana"), "user.old": "yes"})
    _, said = await start(spawner(fake))
    assert "Removing a leftover container of an earlier server" in said
    assert "user.old" not in fake.instances[NAME].config


async def test_a_name_held_by_an_instance_that_is_not_the_users_is_left_alone(hub_daemon, fake):
    fake.add_instance(NAME, status="Running", config={"user.note": "someone's own"})
    s = spawner(fake)
    await s.start()
    alternative = names.instance_name("ana", "", "jupyter", 1)
    assert s.instance_name == alternative and s.get_state()["instance"] == alternative
    assert fake.instances[alternative].status == "Running"
    assert fake.instances[NAME].config == {"user.note": "someone's own"}
    assert fake.instances[NAME].status == "Running"


async def test_an_admin_deleting_the_server_deletes_its_kept_container(hub_daemon, fake):
    state = kept(fake)
    s = spawner(fake, remove=False)
    s.load_state(state)
    await s.delete_forever()
    assert fake.instances == {}
    assert s.instance_name == ""
    await s.delete_forever()  # nothing recorded: nothing to do


async def test_the_operators_files_mounts_and_hub_commands(hub_daemon, fake, tmp_path):
    greeting = tmp_path / "greeting.txt"
    greeting.write_text("hello from the hub host\n")
    greeting.chmod(0o640)
    (tmp_path / "data" / "ana").mkdir(parents=True)
    post = tmp_path / "post.txt"
    s = spawner(
        fake,
        files_to_push=[[str(greeting), "/etc/greeting.txt"]],
        filesystems_to_mount=[["data", str(tmp_path / "data" / "{USERNAME}"), "/mnt/data"]],
        post_hub_commands=[f"echo {{USERNAME}} >> {post}"],
    )
    await s.start()
    container = fake.instances[NAME]
    assert container.files["/etc/greeting.txt"] == (b"hello from the hub host\n", 0o640)
    assert container.devices["data"] == {
        "type": "disk",
        "source": str(tmp_path / "data" / "ana"),
        "path": "/mnt/data",
    }
    for _ in range(200):  # the hub-side command runs in the background
        if post.exists() and post.read_text():
            break
        await asyncio.sleep(0.01)
    assert post.read_text() == "ana\n"


async def test_isolation_by_default_and_what_each_setting_gives(hub_daemon, fake):
    await spawner(fake).start()
    container = fake.instances[NAME]
    assert container.devices["root"]["size"] == "10GiB"
    assert container.devices["eth0"]["security.ipv4_filtering"] == "true"
    assert container.config["security.idmap.isolated"] == "true"  # Incus: its own uid range
    await spawner(fake, "bob", network_isolation="open", disk_limit="").start()
    bob = fake.instances[names.instance_name("bob")]
    assert "eth0" not in bob.devices and "root" not in bob.devices  # the profile's, as it is
    await spawner(fake, "cy", privileged_containers=True).start()
    cy = fake.instances[names.instance_name("cy")].config
    assert cy["security.privileged"] == "true" and "security.idmap.isolated" not in cy
    await spawner(fake, "di", isolated_idmap=False).start()
    assert "security.idmap.isolated" not in fake.instances[names.instance_name("di")].config


async def test_a_hub_connect_url_is_where_the_servers_reach_the_hub(hub_daemon, fake):
    await spawner(fake, hub_connect_url="http://192.0.2.10:8081").start()
    env = fake.instances[NAME].files[objects.ENV_PATH][0].decode()
    assert "JUPYTERHUB_API_URL='http://192.0.2.10:8081/hub/api'" in env


async def test_a_nic_that_cannot_be_isolated_names_the_setting(hub_daemon, fake):
    fake.profiles["default"]["devices"]["eth0"] = {
        "type": "nic",
        "nictype": "bridged",
        "parent": "br0",
    }
    error, _ = await fails(spawner(fake))
    assert str(error).startswith("network isolation: eth0 is a bridged NIC on br0, a bridge ")
    assert 'c.LxdSpawner.network_isolation = "open"' in str(error)
    assert fake.instances == {}


# -- what a failed spawn shows, and leaves ------------------------------------------------------


async def test_a_missing_image_names_the_setting_and_leaves_nothing(hub_daemon, fake):
    error, _ = await fails(spawner(fake, image="no-such-image"))
    assert error.message.startswith(
        "the image 'no-such-image' (c.LxdSpawner.image) does not exist on the fake daemon"
    )
    assert error.status_code == 500
    assert fake.instances == {}


async def test_a_profile_that_does_not_exist_names_the_setting(hub_daemon, fake):
    error, _ = await fails(spawner(fake, profiles=["default", "gpu"]))
    assert str(error) == (
        "the profile 'gpu' (c.LxdSpawner.profiles) does not exist on the fake daemon"
    )
    assert fake.instances == {}


async def test_a_daemon_that_cannot_be_reached_is_said(hub_daemon, fake):
    fake.down = True
    error, _ = await fails(spawner(fake))
    assert str(error) == (
        "the container daemon is not reachable: cannot reach the LXD/Incus daemon at the fake "
        "daemon: down"
    )
    # Once it answers, the next start works; then it goes away again.
    fake.down = False
    await spawner(fake).start()
    fake.down = True
    error, _ = await fails(spawner(fake, "bob"))
    assert str(error).startswith("the container daemon is not reachable: ")
    assert list(fake.instances) == [NAME]


async def test_a_daemon_whose_events_do_not_come_is_said(fake, make_daemon, monkeypatch):
    daemon = make_daemon(fake, timeout=0.2)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    fake.fail("events", times=None)
    error, _ = await fails(spawner(fake))
    assert str(error) == (
        "the container daemon is not reachable: the fake daemon sent no event stream and list "
        "of instances within 0.2 s"
    )


async def test_a_cluster_member_failing_during_the_spawn_is_a_503_and_skipped_next_time(
    make_daemon, monkeypatch
):
    cluster = FakeLxd(members=["m1", "m2"])
    cluster.add_image(IMAGE, "jupyter-base")
    daemon = make_daemon(cluster)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    cluster.add_instance("jupyter-old", status="Running", config=owned("old"), location="m2")
    cluster.fail("start_instance", Unreachable("m1: connection reset by peer"))
    error, said = await fails(spawner(cluster))
    assert (error.status_code, error.reason) == (503, "member")
    assert str(error) == (
        f"cluster member m1 failed during the spawn of {NAME}: m1: connection reset by peer. "
        "It is left out of placement for 30 s: start again."
    )
    assert f"Placing server {NAME} on m1" in said
    assert list(cluster.instances) == ["jupyter-old"]  # nothing left on m1
    # LXD still says m1 is Online, and it holds fewer servers: the retry goes to m2 anyway.
    assert cluster.members["m1"] == "Online"
    s = spawner(cluster)
    await s.start()
    assert s.member == "m2" and cluster.instances[NAME].location == "m2"
    assert s.get_state()["member"] == "m2"


async def test_a_file_helper_that_fails_once_gets_a_fresh_container(hub_daemon, fake, caplog):
    fake.stick_file_helper(NAME)
    s = spawner(fake, files_to_push=[])
    (ip, _), said = await start(s)
    assert fake.instances[NAME].status == "Running" and not fake.instances[NAME].file_helper_stuck
    assert "The daemon's file helper failed; creating the container again" in said
    assert "ana: dial unix /proc/self/fd/54/forkfile.sock" in caplog.text
    assert f"creating {NAME} again" in caplog.text
    assert fake.lifecycle.count(("instance-created", NAME)) == 2


async def test_a_file_helper_that_fails_twice_is_reported_and_leaves_nothing(hub_daemon, fake):
    fake.stick_file_helper(NAME, times=2)
    error, _ = await fails(spawner(fake))
    assert "forkfile.sock" in str(error)
    assert fake.instances == {}


async def test_a_failing_prepare_command_shows_exit_code_and_output_and_leaves_nothing(
    hub_daemon, fake
):
    def prepare(instance, command):
        if command[:2] == ["/bin/sh", "-c"]:
            return ExecResult(7, "preparing-went-wrong", "")
        return 0

    fake.exec_handler = prepare
    error, _ = await fails(spawner(fake, commands_to_prepare=["echo preparing-went-wrong; exit 7"]))
    assert str(error) == (
        "commands_to_prepare: 'echo preparing-went-wrong; exit 7' failed with exit code 7: "
        "preparing-went-wrong"
    )
    assert fake.instances == {}


async def test_the_hub_on_loopback_is_said_with_what_to_set(hub_daemon, fake):
    s = spawner(fake)
    s.hub = Hub(ip="127.0.0.1", port=8081, base_url="/hub/")
    error, _ = await fails(s)
    assert str(error).startswith(
        "the hub listens on 127.0.0.1, which containers cannot reach: set c.JupyterHub.hub_bind_url"
    )
    assert fake.instances == {}


async def test_a_nic_the_kernel_cannot_filter_names_the_missing_module(hub_daemon, fake):
    fake.fail(
        "start_instance",
        LxdError(
            'Failed to start device "eth0": Failed adding bridge filter rules: Failed to run: '
            "nft: Error: Could not process rule: Protocol error"
        ),
    )
    error, _ = await fails(spawner(fake))
    assert "lacks nf_conntrack_bridge" in str(error)
    assert fake.instances == {}


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"files_to_push": [["/no/such/file", "/etc/x"]]}, "cannot read '/no/such/file'"),
        (
            {"files_to_push": [["/etc/hostname", "/usr/x"]], "shared_directories": ["/usr"]},
            "files_to_push: '/usr/x' is inside '/usr', which every container shares read-only",
        ),
        (
            {"filesystems_to_mount": [["data", "/no/such/dir", "/data"]]},
            "filesystems_to_mount entry 'data': host directory '/no/such/dir' does not exist",
        ),
        ({"get_uid_gid": lambda spawner: (0, 0)}, "c.LxdSpawner.min_uid = 1000"),
        ({"home_dir": "{username}/.."}, "home_dir = '{username}/..' gives"),
        ({"disk_limit": "5GiB", "profiles": ["bare"]}, "disk_limit = '5GiB': "),
    ],
)
async def test_settings_that_cannot_work_are_named_before_anything_is_made(
    hub_daemon, fake, settings, named
):
    fake.profiles["bare"] = {"name": "bare", "config": {}, "devices": {}}
    error, _ = await fails(spawner(fake, **settings))
    assert named in str(error)
    assert fake.instances == {}


# -- a kept container (remove = False) is never deleted ------------------------------------------


def fail_push(fake):
    fake.instances[NAME].file_helper_stuck = True


def fail_start(fake):
    fake.fail("start_instance", LxdError("Failed to start: no space left on device", status=500))


def fail_address(fake):
    fake.dhcp = False


def fail_prepare(fake):
    fake.exec_handler = lambda instance, command: (
        ExecResult(1, "", "nope") if command[:2] == ["/bin/sh", "-c"] else 0
    )


def fail_server(fake):
    async def never(daemon, name, url, *, tls, timeout):
        raise DaemonError(f"the server in {name} exited while starting; the server wrote no log")

    readiness.wait_http = never


@pytest.mark.parametrize(
    "failure, shown",
    [
        (fail_push, "forkfile.sock"),
        (fail_start, "no space left on device"),
        (fail_address, "got no IPv4 address within 1 s"),
        (fail_prepare, "commands_to_prepare: 'true' failed with exit code 1: nope"),
        (fail_server, "exited while starting"),
    ],
)
async def test_a_kept_container_is_never_deleted_whatever_fails(hub_daemon, fake, failure, shown):
    state = kept(fake)
    s = spawner(fake, remove=False, commands_to_prepare=["true"], start_timeout=1)
    s.load_state(state)
    failure(fake)
    error, _ = await fails(s)
    assert shown in str(error)
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.instances[NAME].status == "Stopped"
    assert fake.requests["delete_instance"] == 0
    assert s.instance_name == NAME


async def test_a_kept_container_the_daemon_will_not_update_is_kept_as_it_was(hub_daemon, fake):
    state = kept(fake)
    gone = {"type": "disk", "pool": "default", "source": "no-such-volume", "path": "/data"}
    s = spawner(fake, remove=False, extra_devices={"data": gone})
    s.load_state(state)
    error, _ = await fails(s)
    assert str(error) == (
        f"could not give the kept container {NAME} the current settings: Storage volume "
        "'no-such-volume' not found"
    )
    assert fake.instances[NAME].status == "Stopped" and fake.instances[NAME].devices == {}


async def test_a_kept_container_that_cannot_be_read_is_kept(make_daemon, monkeypatch):
    cluster = FakeLxd(members=["m1", "m2"])
    cluster.add_image(IMAGE, "jupyter-base")
    daemon = make_daemon(cluster)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    state = kept(cluster)
    cluster.instances[NAME].location = "m2"
    cluster.members["m2"] = "Offline"
    s = spawner(cluster, remove=False)
    s.load_state(state)
    error, _ = await fails(s)
    assert str(error).startswith(f"this server's kept container {NAME} cannot be read")
    cluster.members["m2"] = "Online"
    for _ in range(20):
        await asyncio.sleep(0)
    assert cluster.instances[NAME].status == "Stopped"


# -- stop ----------------------------------------------------------------------------------------


async def test_a_stop_the_daemon_refuses_three_times_fails_and_keeps_the_container_recorded(
    hub_daemon, fake, quick_sleeps
):
    attempts = quick_sleeps(daemon_module)
    quick_sleeps(removals)
    fake.exec_handler = server_unit(fake, teardown=True)
    s = spawner(fake)
    await s.start()
    fake.down = True
    with pytest.raises(SpawnError) as error:
        await s.stop()
    assert str(error.value) == (
        f"could not stop {NAME} (cannot reach the LXD/Incus daemon at the fake daemon: down): "
        "it stays recorded and is stopped as soon as the daemon answers"
    )
    assert attempts.slept == [1, 2]
    assert s.instance_name == NAME and s.get_state()["instance"] == NAME
    fake.down = False  # and then it is stopped, and removed, in the background
    await eventually(lambda: NAME not in fake.instances)


async def test_stopping_a_server_that_never_started_does_nothing(hub_daemon, fake):
    await spawner(fake).stop()
    assert fake.request_count == 0


async def test_the_first_server_of_an_image_goes_without_the_shared_copy_and_later_ones_mount_it(
    hub_daemon, fake
):
    await spawner(fake, shared_directories=["/usr"]).start()
    device = names.shared_device_name("/usr")
    assert device not in fake.instances[NAME].devices  # the copy is made meanwhile
    volume = names.shared_volume_name(IMAGE, "/usr")

    def ready() -> bool:
        copy = fake.volume("default", volume)
        return copy is not None and copy.config.get(KEY_READY) == "true"

    await eventually(ready)
    await spawner(fake, "bob", shared_directories=["/usr"]).start()
    bob = fake.instances[names.instance_name("bob")]
    assert bob.devices[device] == sharing.shared_device("default", volume, "/usr")


# -- the hub's log -------------------------------------------------------------------------------


def test_lxdspawners_log_goes_to_the_hubs_and_a_spawner_outside_a_hub_leaves_it_alone(
    monkeypatch,
):
    ours = logging.getLogger("lxdspawner")
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "propagate", True)
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    LxdSpawner()  # its log is traitlets', which has only a NullHandler
    assert ours.propagate and ours.handlers == []
    hub_log = logging.getLogger("test-hub-with-handler")
    handler = logging.StreamHandler()
    monkeypatch.setattr(hub_log, "handlers", [handler])
    monkeypatch.setattr(hub_log, "level", logging.INFO)
    LxdSpawner(log=hub_log)
    assert ours.handlers == [handler] and not ours.propagate
    assert ours.level == logging.INFO


# -- a user's home volume on a cluster ------------------------------------------------------


async def test_a_users_servers_follow_their_home_volume_and_its_member_down_is_said_at_once(
    make_daemon, monkeypatch
):
    """The second spawn goes to the member holding the home volume, whatever the load says;
    that member not answering (the cluster still calling it Online, or Offline) fails the
    spawn at once naming it and the volume, and nothing is made elsewhere; moved with
    Volumes.move, the home follows."""
    from lxdspawner import volumes

    home = "jupyter-home-ana"
    cluster = FakeLxd(members=["m1", "m2", "m3"])
    cluster.add_image(IMAGE, "jupyter-base")
    cluster.exec_handler = server_unit(cluster, teardown=True)
    daemon = make_daemon(cluster)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    s = spawner(cluster)
    await s.start()
    assert s.member == "m1" and cluster.volume("default", home, "m1") is not None
    await s.stop()
    cluster.volume("default", home, "m1").content.add("notes.txt")
    for i in range(3):  # m1 is now the busiest member
        x = f"x{i}"
        cluster.add_instance(f"jupyter-{x}", status="Running", config=owned(x), location="m1")
    s = spawner(cluster)
    await s.start()
    assert s.member == "m1"
    await s.stop()

    # m1 stops answering before the cluster notices: the volume is found in the pool's list.
    cluster.fail("get_volume", LxdError("Server isn't ready yet", status=500))
    error, _ = await fails(spawner(cluster))
    assert (error.status_code, error.reason) == (503, "placement")
    assert str(error) == (
        f"{home} of user 'ana' is on cluster member m1, which is Unreachable (reading {home} on "
        "it failed 0 s ago), not Online: the server cannot start elsewhere without those "
        "files. Start again once m1 is back, or have an admin move the data with `lxdspawner "
        "volumes move ana --to MEMBER`"
    )
    daemon.members._suspects.clear()
    cluster.members["m1"] = "Offline"
    error, _ = await fails(spawner(cluster))
    assert str(error).startswith(f"{home} of user 'ana' is on cluster member m1, which is Offline")
    assert NAME not in cluster.instances
    assert [key for key in cluster.volumes if key[1] == home] == [("default", home, "m1")]

    cluster.members["m1"] = "Online"
    await volumes.Volumes(await daemon.client()).move("default", home, "m3")
    s = spawner(cluster)
    await s.start()
    assert s.member == "m3"
    assert cluster.volume("default", home, "m3").content == {"notes.txt"}
    with pytest.raises(volumes.VolumeError, match=f"used by {NAME}"):
        await volumes.Volumes(await daemon.client()).move("default", home, "m2")
    await s.stop()
