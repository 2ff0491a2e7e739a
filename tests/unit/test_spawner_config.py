"""LxdSpawner's settings: wrong shapes are refused naming the setting; old names still work."""

from types import SimpleNamespace

import pytest
from traitlets import TraitError
from traitlets.config import Config

from lxdspawner import LxdSpawner, hardening, hostfiles, names
from lxdspawner.accounts import default_get_uid_gid as _default_get_uid_gid


def spawner(**settings) -> LxdSpawner:
    config = Config()
    for key, value in settings.items():
        setattr(config.LxdSpawner, key, value)
    return LxdSpawner(config=config)


def test_a_config_of_the_original_spawner_loads_unchanged():
    s = spawner(
        image="container_image_name",
        files_to_push=[["/etc/passwd", "/etc/passwd"], ["/etc/group", "/etc/group"]],
        filesystems_to_mount=[["name", "directory", "path"]],
        commands_to_prepare=["echo {USERNAME}"],
        post_hub_commands=["echo {USERNAME}"],
        host_weights={"node1": 2, "node2": 1},
        privileged_container=True,
    )
    assert s.image == "container_image_name"
    assert s.files_to_push[1] == ["/etc/group", "/etc/group"]
    assert s.privileged_containers is True


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("files_to_push", ["/etc/passwd"], "files_to_push[0]"),
        ("files_to_push", [["/a", "/b", "/c"]], "files_to_push[0]"),
        ("filesystems_to_mount", [["home", "/srv"]], "filesystems_to_mount[0]"),
        ("host_weights", {"node1": -1}, "host_weights['node1']"),
        ("host_weights", {"node1": "heavy"}, "host_weights['node1']"),
        ("get_uid_gid", 1000, "get_uid_gid"),
        ("name_prefix", "9lives", "prefix"),
    ],
)
def test_wrong_shapes_name_the_setting(setting, value, named):
    with pytest.raises(TraitError) as error:
        spawner(**{setting: value})
    assert named in str(error.value)


def test_defaults():
    s = spawner()
    assert s.image == "jupyter-base"
    assert s.remove is True
    assert s.privileged_containers is False
    assert s.cmd == ["jupyterhub-singleuser"]
    assert (s.default_uid, s.default_gid) == (1000, 1000)


def test_default_uid_gid_looks_up_the_hub_host_then_falls_back(monkeypatch):
    s = spawner(default_uid=2000, default_gid=3000)
    # root, daemon, www-data: accounts of the hub host, not people: never their uids.
    for system in ("root", "daemon", "www-data"):
        s.user = SimpleNamespace(name=system)
        assert _default_get_uid_gid(s) == (2000, 3000), system
    s.user = SimpleNamespace(name="no-such-user-on-this-host")
    assert _default_get_uid_gid(s) == (2000, 3000)
    s.user = SimpleNamespace(name="nul\0byte")
    assert _default_get_uid_gid(s) == (2000, 3000)
    people = {
        "alice": SimpleNamespace(pw_name="alice", pw_uid=1500, pw_gid=1500),
        "bob": SimpleNamespace(pw_name="bob", pw_uid=1501, pw_gid=27),  # primary group sudo
    }
    monkeypatch.setattr("pwd.getpwnam", lambda name: people[name])
    s.user = SimpleNamespace(name="alice")
    assert _default_get_uid_gid(s) == (1500, 1500)
    s.user = SimpleNamespace(name="bob")
    assert _default_get_uid_gid(s) == (1501, 3000)


@pytest.mark.parametrize("uid_gid", [(0, 0), (1000, 0), (999, 1000), (1000, 27)])
async def test_a_get_uid_gid_below_the_floor_fails_the_spawn_naming_the_setting(uid_gid):
    s = spawner(get_uid_gid=lambda spawner: uid_gid)
    s.user = SimpleNamespace(name="alice")
    with pytest.raises(Exception, match="min_[ug]id") as refused:
        await s._resolve_uid_gid()
    assert "get_uid_gid" in str(refused.value)


async def test_the_floor_is_lowered_only_on_purpose():
    s = spawner(get_uid_gid=lambda spawner: (0, 0), min_uid=0, min_gid=0)
    s.user = SimpleNamespace(name="alice")
    assert await s._resolve_uid_gid() == (0, 0)


@pytest.mark.parametrize("setting", ["commands_to_prepare", "post_hub_commands"])
def test_a_username_inside_a_command_substitution_is_refused_when_the_config_loads(setting):
    with pytest.raises(TraitError) as error:
        spawner(**{setting: ["logger `echo {USERNAME}`"]})
    assert setting in str(error.value) and "$JUPYTERHUB_USER" in str(error.value)


@pytest.mark.parametrize(
    "user, home",
    [("alice", "/home/alice"), ("..", "/home/user-"), (".", "/home/user-"), ("a\rb", "/home/a-b-")],
)
def test_the_home_directory_is_one_safe_name(user, home):
    made = names.home_path(spawner().home_dir, user)
    assert made.startswith(home)
    assert made.count("/") == 2


@pytest.mark.parametrize(
    "host, keep",
    [
        ("10.117.40.1", True),
        ("hub.example.org", True),
        ("127.0.0.1", False),
        ("0.0.0.0", False),
        ("localhost", False),
        ("::1", False),
    ],
)
def test_which_hub_addresses_are_replaced_by_the_bridge_gateway(host, keep):
    assert hardening.is_reachable_host(host) is keep


async def test_a_file_pushed_into_a_shared_directory_is_refused_naming_both_settings(tmp_path):
    source = tmp_path / "tool"
    source.write_text("#!/bin/sh\n")
    entries = [[str(source), "/usr/local/bin/tool"]]
    with pytest.raises(ValueError, match="files_to_push.*shared_directories") as refused:
        await hostfiles.files_to_push(entries, spawner().shared_directories)
    assert "/usr/local/bin/tool" in str(refused.value)
    # Without sharing /usr (or in privileged containers, which never share) it is pushed.
    assert await hostfiles.files_to_push(entries, [])
