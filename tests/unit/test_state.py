"""A server's state names the daemon its container is on, and round-trips: a hub restarted
with another endpoint still asks the daemon that holds each server (the real-daemon version is
tests/integration/test_spawner.py::test_a_hub_moved_to_another_daemon_...)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_spawner_config import spawner

from lxdspawner.daemon import Daemon
from lxdspawner.lxd import Remote

OLD = Remote("https://old:8443", "jupyter", "/etc/hub/c.crt", "/etc/hub/c.key", "/etc/hub/o.crt")


def test_a_remote_is_a_value_and_round_trips():
    assert Remote.from_state(OLD.to_state()) == OLD
    assert hash(Remote.from_state(OLD.to_state())) == hash(OLD)
    assert Remote().to_state() == {}  # the local daemon: nothing to record
    assert Remote.from_state({}) == Remote()
    assert str(OLD) == "https://old:8443 (project jupyter)"
    assert str(Remote()) == "the local daemon"


def test_the_state_records_where_the_container_is_and_a_new_config_does_not_move_it():
    first = spawner(endpoint=OLD.endpoint, project=OLD.project, client_cert=OLD.client_cert,
                    client_key=OLD.client_key, server_cert=OLD.server_cert)  # fmt: skip
    first.instance_name, first.member = "jupyter-ann", "node2"
    state = first.get_state()
    assert state["instance"] == "jupyter-ann" and state["member"] == "node2"
    assert Remote.from_state(state) == OLD

    # The hub restarts configured for another daemon.
    later = spawner(endpoint="unix:///var/lib/incus/unix.socket")
    later.load_state(state)
    assert (later.instance_name, later.member) == ("jupyter-ann", "node2")
    assert later.daemon().remote == OLD  # poll, stop and delete go where the container is
    assert later.configured_remote == Remote(
        "unix:///var/lib/incus/unix.socket"
    )  # new servers go here
    assert Remote.from_state(later.get_state()) == OLD  # and it stays recorded


def test_a_state_of_version_1_gets_the_configured_certificates():
    state = {"lxd_state_version": 1, "instance": "jupyter-ann", "member": "",
             "endpoint": OLD.endpoint, "project": "jupyter"}  # fmt: skip
    same = spawner(endpoint=OLD.endpoint, client_cert="/c.crt", client_key="/c.key",
                   server_cert="/s.crt")  # fmt: skip
    same.load_state(state)
    assert same.daemon().remote == Remote(OLD.endpoint, "jupyter", "/c.crt", "/c.key", "/s.crt")
    moved = spawner(endpoint="https://new:8443", client_cert="/c.crt", client_key="/c.key",
                    server_cert="/new.crt")  # fmt: skip
    moved.load_state(state)
    # The old daemon's certificate is not the new one's: not pinned to the wrong one.
    assert moved.daemon().remote == Remote(OLD.endpoint, "jupyter", "/c.crt", "/c.key", "")


def test_no_container_no_remote_in_the_state():
    s = spawner(endpoint=OLD.endpoint)
    assert "endpoint" not in s.get_state()
    assert s.daemon().remote == s.configured_remote


@pytest.mark.parametrize("remove, where", [(True, "configured"), (False, "recorded")])
def test_a_start_goes_to_the_configured_daemon_unless_a_kept_container_waits_elsewhere(
    remove, where
):
    s = spawner(endpoint="unix:///var/lib/lxd/unix.socket", remove=remove)
    s.user = SimpleNamespace(name="ann")
    s.load_state({"lxd_state_version": 2, "instance": "jupyter-ann", **OLD.to_state()})
    expected = OLD if where == "recorded" else s.configured_remote
    assert s._daemon_to_start_on().remote == expected


def test_one_daemon_per_remote():
    assert Daemon.of(OLD) is Daemon.of(Remote.from_state(OLD.to_state()))
    assert Daemon.of(OLD) is not Daemon.of(Remote())
