"""Whose an instance is: the keys, the check, the hub's default name."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lxdspawner.ownership import KEY_HUB, Owner, default_hub_id, describe

names = st.text(max_size=20)


def test_an_owner_owns_what_carries_its_keys():
    owner = Owner("hub-1", "alice", "lab")
    assert owner.owns(owner.keys())
    assert owner.owns({**owner.keys(), "limits.memory": "1"})


@given(names, names, names, names, names, names)
def test_any_other_key_is_not_ours(h1, u1, s1, h2, u2, s2):
    a, b = Owner(h1, u1, s1), Owner(h2, u2, s2)
    assert a.owns(b.keys()) == (a == b)


def test_lxd_drops_empty_values_so_no_server_key_is_the_default_server():
    keys = Owner("h", "alice", "").keys()
    del keys["user.jupyterhub.server"]
    assert Owner("h", "alice", "").owns(keys)
    assert not Owner("h", "alice", "lab").owns(keys)


@pytest.mark.parametrize("config", [None, {}, {"user.jupyterhub.user": "alice"}])
def test_instances_lxdspawner_did_not_make_are_nobodys(config):
    assert not Owner("h", "alice").owns(config)
    assert not Owner("h", "alice").owns_recorded(config)
    assert "did not make" in describe(config)


def test_an_instance_of_version_0_1_is_adopted_only_through_the_hubs_state():
    old = Owner("h", "alice").keys()
    del old[KEY_HUB]
    assert not Owner("h", "alice").owns(old)
    assert Owner("h", "alice").owns_recorded(old)
    other_hub = {**old, KEY_HUB: "h2"}
    assert not Owner("h", "alice").owns_recorded(other_hub)


def test_the_default_hub_id_follows_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = default_hub_id("sqlite:///jupyterhub.sqlite")
    assert a == default_hub_id(f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}")
    assert a != default_hub_id("sqlite:////other/jupyterhub.sqlite")
    pg = default_hub_id("postgresql://hub:secret@db/hub")
    assert pg.startswith("hub-") and "secret" not in pg
    assert pg == default_hub_id("postgresql://hub@db/hub")  # the password is no part of it
    assert pg != default_hub_id("postgresql://hub@db/hub2")
    assert default_hub_id(None)  # outside a hub: still a name
