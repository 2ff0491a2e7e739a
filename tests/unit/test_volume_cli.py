"""`lxdspawner volumes` on the fake daemon: what the operator sees (the table, the JSON, the
one-line errors, the exit status) and what is left on the daemon."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import FakeLxd

from lxdspawner import cli, names, volumecli
from lxdspawner.lxd import remote as lxd_remote
from lxdspawner.ownership import KEY_HUB, KEY_MANAGED, MANAGED_BY, Owner
from lxdspawner.volumes import KEY_VOLUME

GiB = 1024**3


def add_volume(
    fake: FakeLxd,
    user: str | None,
    *,
    server: str = "",
    hub: str = "hub-1",
    kind: str = "home",
    name: str | None = None,
    pool: str = "default",
    size: int | None = 10 * GiB,
    location: str | None = None,
):
    """A volume as the spawner makes it: lxdspawner's keys, KEY_VOLUME, a size."""
    if name is None:
        name = names.home_volume_name(user or "shared", server, per_server=bool(server))
    config = (
        Owner(hub, user, server).keys()
        if user is not None
        else {KEY_MANAGED: MANAGED_BY}  # a shared volume: nobody's
    )
    config = {**config, KEY_VOLUME: kind}
    if size:
        config["size"] = str(size)
    return fake.add_volume(pool, name, config=config, location=location)


def attach(fake: FakeLxd, instance: str, volume, *, status: str = "Stopped"):
    """A server's container with the volume as a disk device, as the spawner makes it."""
    made = fake.add_instance(instance, status=status, location=volume.location)
    made.devices["home"] = {
        "type": "disk",
        "pool": volume.pool,
        "source": volume.name,
        "path": "/home/x",
    }
    return made


async def volumes(fake, *argv: str, environ=None) -> tuple[int, str, str]:
    """Run `lxdspawner volumes ARGV` on ``fake``: (exit status, stdout, stderr)."""
    args = cli.build_parser().parse_args(["volumes", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await volumecli.run(fake, args, out=out, err=err, environ=environ or {})
    return code, out.getvalue(), err.getvalue()


def rows(text: str) -> dict[str, list[str]]:
    """The table's rows by volume name (the third column)."""
    lines = text.splitlines()
    assert lines[0].split() == list(volumecli.HEADER)
    return {line.split()[2]: line.split() for line in lines[1:]}


# -- list ---------------------------------------------------------------------------------


async def test_list_shows_ours_with_size_use_snapshots_and_last_attach(fake):
    alice = add_volume(fake, "alice")
    alice.used, alice.snapshots = 3 * GiB, {"s1": set(), "s2": set()}
    attach(fake, "jupyter-alice", alice)
    await fake.start_instance("jupyter-alice")
    add_volume(fake, "bob", kind="scratch-{username}", name="scratch-bob", size=None)
    add_volume(fake, None, kind="course-data", name="course-data")
    # A volume holding a name lxdspawner would compute, without its keys: not ours.
    fake.add_volume("default", "jupyter-home-carol", config={"size": "1GiB"})

    code, out, err = await volumes(fake, "list")

    assert (code, err) == (0, "")
    listed = rows(out)
    assert set(listed) == {"jupyter-home-alice", "scratch-bob", "course-data"}
    assert listed["jupyter-home-alice"] == [
        "alice",
        "-",
        "jupyter-home-alice",
        "home",
        "default",
        "-",
        "10",
        "GiB",
        "3",
        "GiB",
        "2",
        "2025-01-02",
        "03:04:05",
        "-",
        "hub-1",
    ]
    assert listed["scratch-bob"][3:9] == ["scratch-{username}", "default", "-", "-", "0", "B"]
    assert listed["scratch-bob"][9:] == ["0", "-", "-", "hub-1"]  # never attached
    assert listed["course-data"][:2] == ["-", "-"]  # shared: no user


async def test_list_filters_by_user_and_hub_by_keys_and_gives_json(fake):
    add_volume(fake, "alice")
    add_volume(fake, "alice", hub="hub-2", name="other-home-alice", location=None)
    add_volume(fake, "alice2", name="jupyter-home-alice2")

    code, out, _ = await volumes(fake, "list", "--user", "alice", "--format", "json")
    assert code == 0
    assert {(v["volume"], v["hub"]) for v in json.loads(out)} == {
        ("jupyter-home-alice", "hub-1"),
        ("other-home-alice", "hub-2"),
    }

    code, out, _ = await volumes(
        fake, "list", "--user", "alice", "--hub-id", "hub-2", "--format", "json"
    )
    [only] = json.loads(out)
    assert only == {
        "user": "alice",
        "server": "",
        "volume": "other-home-alice",
        "kind": "home",
        "pool": "default",
        "member": "",
        "size": 10 * GiB,
        "used": 0,
        "snapshots": 0,
        "last_attached": "",
        "hub_user": None,
        "hub": "hub-2",
        "used_by": [],
    }


async def test_list_shows_the_member_of_each_volume_in_a_cluster():
    fake = FakeLxd(members=["m1", "m2"])
    add_volume(fake, "alice", location="m2")
    code, out, _ = await volumes(fake, "list")
    assert code == 0
    assert rows(out)["jupyter-home-alice"][5] == "m2"


@contextlib.asynccontextmanager
async def hub(users: list[str], *, token: str = "secret", page: int = 2):
    """A hub's /hub/api/users, paginated as JupyterHub 2+ answers with the pagination
    Accept header."""
    seen: list[dict] = []

    async def handler(request):
        seen.append(dict(request.query))
        if request.headers.get("Authorization") != f"token {token}":
            return web.json_response({"status": 403, "message": "no"}, status=403)
        offset = int(request.query.get("offset", 0))
        limit = min(int(request.query.get("limit", page)), page)
        items = [{"name": u, "kind": "user"} for u in users[offset : offset + limit]]
        more = offset + limit < len(users)
        return web.json_response(
            {
                "items": items,
                "_pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": len(users),
                    "next": {"offset": offset + limit, "limit": limit} if more else None,
                },
            }
        )

    app = web.Application()
    app.router.add_get("/hub/api/users", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/")).rstrip("/"), seen
    finally:
        await server.close()


async def test_list_tells_whose_owner_is_still_a_hub_user_reading_every_page(fake):
    add_volume(fake, "alice")
    add_volume(fake, "gone", name="jupyter-home-gone")
    add_volume(fake, "zed", name="jupyter-home-zed")
    add_volume(fake, None, kind="course-data", name="course-data")
    async with hub(["alice", "bob", "carl", "zed"]) as (url, seen):
        code, out, err = await volumes(
            fake, "list", "--hub-url", url, environ={"JUPYTERHUB_API_TOKEN": "secret"}
        )
    assert (code, err) == (0, "")
    assert len(seen) == 2  # two pages of two
    listed = rows(out)
    assert listed["jupyter-home-alice"][-2] == "yes"
    assert listed["jupyter-home-zed"][-2] == "yes"  # on the second page
    assert listed["jupyter-home-gone"][-2] == "no"
    assert listed["course-data"][-2] == "-"


async def test_list_with_a_hub_needs_a_token_the_hub_takes(fake):
    add_volume(fake, "alice")
    code, out, err = await volumes(fake, "list", "--hub-url", "http://127.0.0.1:9")
    assert (code, out) == (2, "")
    assert err == (
        "lxdspawner volumes list: --hub-url needs an API token: --hub-token or "
        "JUPYTERHUB_API_TOKEN\n"
    )
    async with hub(["alice"]) as (url, _):
        code, out, err = await volumes(fake, "list", "--hub-url", url, "--hub-token", "wrong")
    assert (code, out) == (1, "")
    assert "refused the token (HTTP 403)" in err and "list:users" in err
    assert err.count("\n") == 1


# -- snapshot, restore, resize --------------------------------------------------------------


async def test_snapshot_of_the_home_volume_is_named_by_its_utc_time(fake, monkeypatch):
    volume = add_volume(fake, "alice")
    volume.content = {"thesis.tex"}
    code, out, err = await volumes(fake, "snapshot", "alice")
    assert (code, err) == (0, "")
    [taken] = volume.snapshots
    assert taken.startswith("manual-") and taken.endswith("Z")
    assert datetime.strptime(taken, "manual-%Y%m%dT%H%M%SZ").year >= 2025
    assert volume.snapshots[taken] == {"thesis.tex"}
    assert out == f"created snapshot {taken} of jupyter-home-alice (pool default)\n"
    assert volumecli.snapshot_name(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "manual-20250102T030405Z"
    )


async def test_snapshot_of_a_named_servers_own_home(fake):
    add_volume(fake, "alice")
    own = add_volume(fake, "alice", server="lab")
    code, _, _ = await volumes(fake, "snapshot", "alice", "--server", "lab", "--name", "pre")
    assert code == 0
    assert list(own.snapshots) == ["pre"]
    assert not fake.volume("default", "jupyter-home-alice").snapshots


async def test_snapshot_refuses_a_server_without_its_own_home_and_a_user_without_one(fake):
    add_volume(fake, "alice")
    code, _, err = await volumes(fake, "snapshot", "alice", "--server", "lab")
    assert code == 2
    assert "has no home volume of server 'lab' of its own" in err
    # The name alone is not the user's: a volume holding it without the keys.
    fake.add_volume("default", "jupyter-home-bob")
    code, _, err = await volumes(fake, "snapshot", "bob")
    assert (code, err) == (
        2,
        "lxdspawner volumes snapshot: user 'bob' has no home volume on this daemon\n",
    )
    assert not fake.volume("default", "jupyter-home-bob").snapshots


async def test_restore_gives_back_the_snapshots_content(fake):
    volume = add_volume(fake, "alice")
    volume.content = {"good"}
    await volumes(fake, "snapshot", "alice", "--name", "before")
    volume.content = {"broken"}
    attach(fake, "jupyter-alice", volume)  # stopped: fine
    code, out, err = await volumes(fake, "restore", "alice", "before")
    assert (code, err) == (0, "")
    assert out == "restored jupyter-home-alice (pool default) to snapshot before\n"
    assert volume.content == {"good"}


async def test_restore_refuses_while_the_server_runs_naming_its_container(fake):
    volume = add_volume(fake, "alice")
    volume.snapshots["before"] = {"good"}
    volume.content = {"now"}
    attach(fake, "jupyter-alice", volume, status="Running")
    code, out, err = await volumes(fake, "restore", "alice", "before")
    assert (code, out) == (2, "")
    assert err.startswith(
        "lxdspawner volumes restore: cannot restore jupyter-home-alice: container "
        "jupyter-alice is running and uses it;"
    )
    assert volume.content == {"now"}
    assert fake.requests["restore_volume"] == 0


async def test_restore_of_an_unknown_snapshot_lists_those_there_are(fake):
    volume = add_volume(fake, "alice")
    volume.snapshots = {"a": set(), "b": set()}
    code, _, err = await volumes(fake, "restore", "alice", "c")
    assert code == 2
    assert err == (
        "lxdspawner volumes restore: jupyter-home-alice (pool default) has no snapshot 'c' "
        "(its snapshots: a, b)\n"
    )


async def test_resize_sets_the_quota(fake):
    volume = add_volume(fake, "alice")
    code, out, err = await volumes(fake, "resize", "alice", "20GiB")
    assert (code, err) == (0, "")
    assert volume.config["size"] == str(20 * GiB)
    assert volume.config[KEY_HUB] == "hub-1"  # the keys stay
    assert out == "resized jupyter-home-alice (pool default) from 10 GiB to 20 GiB\n"


async def test_resize_refuses_what_is_not_a_size_and_reports_the_daemons_refusal(fake):
    volume = add_volume(fake, "alice")
    code, _, err = await volumes(fake, "resize", "alice", "lots")
    assert code == 2
    assert "SIZE = 'lots' is not a size" in err
    from lxdspawner.lxd import LxdError

    fake.fail("update_volume_config", LxdError("Volume size cannot be shrunk", status=400))
    code, _, err = await volumes(fake, "resize", "alice", "1GiB")
    assert code == 1
    assert err == (
        "lxdspawner volumes resize: resizing jupyter-home-alice (pool default) to 1 GiB "
        "failed: Volume size cannot be shrunk\n"
    )
    assert volume.config["size"] == str(10 * GiB)


# -- delete -------------------------------------------------------------------------------


async def test_delete_without_yes_says_what_it_would_delete_and_deletes_nothing(fake):
    add_volume(fake, "alice")
    add_volume(fake, "alice", kind="scratch-{username}", name="scratch-alice")
    code, out, err = await volumes(fake, "delete", "alice")
    assert (code, out) == (2, "")
    assert err == (
        "lxdspawner volumes delete: would delete 2 volume(s) of user 'alice' for good, with "
        "their snapshots: jupyter-home-alice (pool default), scratch-alice (pool default); "
        "run again with --yes to delete them\n"
    )
    assert fake.volume("default", "jupyter-home-alice") is not None
    assert fake.volume("default", "scratch-alice") is not None


async def test_delete_yes_deletes_only_the_users_volumes_by_their_keys(fake):
    add_volume(fake, "alice")
    add_volume(fake, "alice", server="lab")
    add_volume(fake, "bob", name="jupyter-home-bob")
    add_volume(fake, None, kind="course-data", name="course-data")
    fake.add_volume("default", "scratch-alice")  # the name, not the keys
    code, out, err = await volumes(fake, "delete", "alice", "--yes")
    assert (code, err) == (0, "")
    left = {name for _, name, _ in fake.volumes}
    assert left == {"jupyter-home-bob", "course-data", "scratch-alice"}
    assert out.splitlines()[0] == "deleted jupyter-home-alice (pool default)"
    assert len(out.splitlines()) == 2


async def test_delete_of_one_servers_own_volumes(fake):
    add_volume(fake, "alice")
    own = add_volume(fake, "alice", server="lab")
    code, _, _ = await volumes(fake, "delete", "alice", "--server", "lab", "--yes")
    assert code == 0
    assert fake.volume("default", own.name) is None
    assert fake.volume("default", "jupyter-home-alice") is not None


async def test_delete_refuses_while_a_container_uses_one_and_deletes_none(fake):
    add_volume(fake, "alice", kind="scratch-{username}", name="scratch-alice")
    home = add_volume(fake, "alice")
    attach(fake, "jupyter-alice", home)  # stopped, but attached: the daemon would refuse
    code, _, err = await volumes(fake, "delete", "alice", "--yes")
    assert code == 2
    assert "cannot delete jupyter-home-alice: container jupyter-alice uses it" in err
    assert len(fake.volumes) == 2


async def test_a_username_on_two_hubs_needs_the_hub_id(fake):
    add_volume(fake, "alice", hub="hub-1")
    add_volume(fake, "alice", hub="hub-2", name="other-home-alice")
    code, _, err = await volumes(fake, "delete", "alice", "--yes")
    assert code == 2
    assert err == (
        "lxdspawner volumes delete: user 'alice' has volumes on 2 hubs (hub-1, hub-2): give "
        "--hub-id to say whose\n"
    )
    code, _, err = await volumes(fake, "snapshot", "alice")
    assert code == 2 and "--hub-id" in err
    assert len(fake.volumes) == 2
    code, _, _ = await volumes(fake, "delete", "alice", "--hub-id", "hub-2", "--yes")
    assert code == 0
    assert {name for _, name, _ in fake.volumes} == {"jupyter-home-alice"}


# -- move ---------------------------------------------------------------------------------


async def test_move_needs_a_cluster(fake):
    add_volume(fake, "alice")
    code, _, err = await volumes(fake, "move", "alice", "--to", "m2")
    assert code == 2
    assert err.startswith("lxdspawner volumes move: moving a volume needs a cluster:")


async def test_move_takes_the_users_volumes_with_snapshots_and_keys_to_the_member():
    fake = FakeLxd(members=["m1", "m2", "m3"])
    home = add_volume(fake, "alice", location="m1")
    home.snapshots["s1"] = {"x"}
    add_volume(fake, "alice", kind="scratch-{username}", name="scratch-alice", location="m1")
    add_volume(fake, "bob", name="jupyter-home-bob", location="m1")
    code, out, err = await volumes(fake, "move", "alice", "--to", "m2")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "moved jupyter-home-alice (pool default) from m1 to m2",
        "moved scratch-alice (pool default) from m1 to m2",
    ]
    moved = fake.volume("default", "jupyter-home-alice", "m2")
    assert moved.snapshots == {"s1": {"x"}}
    assert moved.config[KEY_VOLUME] == "home"
    assert fake.volume("default", "jupyter-home-alice", "m1") is None
    assert fake.volume("default", "jupyter-home-bob", "m1") is not None
    # Again: nothing left to move.
    code, out, _ = await volumes(fake, "move", "alice", "--to", "m2")
    assert code == 0
    assert out.splitlines()[0] == "jupyter-home-alice: on m2 already"
    assert fake.requests["copy_volume_to_member"] == 2


async def test_move_refuses_a_running_server_and_a_member_that_cannot_take_it():
    fake = FakeLxd(members=["m1", "m2", "m3"])
    home = add_volume(fake, "alice", location="m1")
    attach(fake, "jupyter-alice", home, status="Running")
    code, _, err = await volumes(fake, "move", "alice", "--to", "m2")
    assert code == 2
    assert "cannot move jupyter-home-alice: container jupyter-alice is running" in err
    code, _, err = await volumes(fake, "move", "alice", "--to", "m9")
    assert (code, err) == (
        2,
        "lxdspawner volumes move: --to m9: no such cluster member (members: m1, m2, m3)\n",
    )
    fake.members["m3"] = "Offline"
    code, _, err = await volumes(fake, "move", "alice", "--to", "m3")
    assert code == 2 and "the member is Offline, not Online" in err
    assert fake.volume("default", "jupyter-home-alice", "m1") is not None
    assert fake.requests["copy_volume_to_member"] == 0


async def test_move_on_a_remote_pool_has_nothing_to_do():
    fake = FakeLxd(members=["m1", "m2"])
    fake.pool_driver = "ceph"
    add_volume(fake, "alice", location="m1")
    code, out, _ = await volumes(fake, "move", "alice", "--to", "m2")
    assert code == 0
    assert "reached from every member: nothing to move" in out
    assert fake.requests["copy_volume_to_member"] == 0


async def test_a_failed_move_is_one_line_and_status_1():
    fake = FakeLxd(members=["m1", "m2"])
    add_volume(fake, "alice", location="m1")
    from lxdspawner.lxd import OperationFailed

    fake.fail("copy_volume_to_member", OperationFailed("Failed to connect to destination server"))
    code, _, err = await volumes(fake, "move", "alice", "--to", "m2")
    assert code == 1
    assert err == (
        "lxdspawner volumes move: moving jupyter-home-alice (pool default on m1) to m2: "
        "copying jupyter-home-alice (pool default) from m1 to m2 failed: Failed to connect to "
        "destination server; it stays on m1\n"
    )
    assert fake.volume("default", "jupyter-home-alice", "m1") is not None


# -- the command line ---------------------------------------------------------------------


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["volumes", "restore", "--help"])
    assert "lxdspawner volumes restore alice manual-" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["volumes", "--help"])
    text = capsys.readouterr().out
    assert "lxdspawner volumes delete alice --yes" in text
    assert "lxdspawner volumes move alice --to member2" in text


def test_main_passes_the_exit_status_through(fake, monkeypatch, capsys):
    add_volume(fake, "alice")

    class Connected:
        def __init__(self, *args, **kwargs):
            pass

        async def __aenter__(self):
            return fake

        async def __aexit__(self, *exc):
            return None

    monkeypatch.setattr(lxd_remote, "LxdClient", Connected)  # what Remote.client() makes
    assert cli.main(["volumes", "delete", "alice"]) == 2
    assert "run again with --yes" in capsys.readouterr().err
    assert cli.main(["volumes", "list"]) == 0
    assert "jupyter-home-alice" in capsys.readouterr().out
    assert cli.main(["volumes", "delete", "alice", "--yes"]) == 0
    assert fake.volumes == {}


async def test_snapshots_in_the_pools_list_are_not_volumes(fake):
    """The daemons list each snapshot as a custom volume "<volume>/<snapshot>" with the
    volume's keys: neither the listing nor the hub's own deletion takes it for a volume."""
    from lxdspawner.volumes import Volumes

    volume = add_volume(fake, "alice")
    volume.snapshots["s1"] = set()
    assert [v["name"] for v in await fake.list_volumes("default")] == [
        "jupyter-home-alice",
        "jupyter-home-alice/s1",
    ]
    assert [v["name"] for v in await Volumes(fake).owned_by("hub-1", "alice", None)] == [
        "jupyter-home-alice"
    ]
    code, out, _ = await volumes(fake, "delete", "alice", "--yes")
    assert (code, out) == (0, "deleted jupyter-home-alice (pool default)\n")
    assert fake.volumes == {}
