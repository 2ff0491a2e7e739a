"""The shared directory's names and devices: pure rules, no daemon."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lxdspawner import sharing
from lxdspawner.names import MAX_LENGTH, is_valid_instance_name

fingerprints = st.text("0123456789abcdef", min_size=64, max_size=64)
paths = st.text(min_size=1, max_size=200).map(lambda p: "/" + p)


@given(fingerprints, paths, st.none() | st.text(max_size=100))
def test_volume_and_helper_names_are_valid_instance_names(fingerprint, path, member):
    helper = sharing.helper_name(fingerprint, path, member)
    for name in (sharing.volume_name(fingerprint, path), helper):
        assert len(name) <= MAX_LENGTH
        assert is_valid_instance_name(name)


def test_one_volume_per_image_and_path():
    a, b = "a" * 64, "b" * 64
    assert sharing.volume_name(a, "/opt/jupyterhub") == sharing.volume_name(a, "/opt/jupyterhub")
    assert sharing.volume_name(a, "/opt/jupyterhub") != sharing.volume_name(b, "/opt/jupyterhub")
    assert sharing.volume_name(a, "/opt/jupyterhub") != sharing.volume_name(a, "/opt/conda")


def test_one_helper_per_member_as_instance_names_are_cluster_wide():
    helpers = {sharing.helper_name("a" * 64, "/usr", m) for m in ("member1", "member2", None)}
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
