"""`lxdspawner doctor`: the hub's config read as the hub reads it, each check against the fake
daemon, and what the operator sees (the table, the JSON, the exit status)."""

from __future__ import annotations

import json

from lxdspawner import cli, doctor


def write(tmp_path, text: str):
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(text)
    return path


def test_config_is_read_as_the_hub_reads_it(tmp_path):
    path = write(
        tmp_path,
        "c.Spawner.image = 'from-spawner'\n"
        "c.LxdSpawner.image = 'custom'\n"
        "c.LxdSpawner.endpoint = 'unix:///x/unix.socket'\n"
        "c.LxdSpawner.profiles = ['default', 'gpu']\n"
        "c.LxdSpawner.remotes = {'campus': {'endpoint': 'https://lxd1:8443'}}\n"
        "c.LxdSpawner.profile_list = [{'display_name': 'big',"
        " 'spawner_override': {'remote': 'lab'}}, {'display_name': 'small'}]\n"
        "c.JupyterHub.hub_ip = '0.0.0.0'\n"
        "c.JupyterHub.hub_port = 8082\n",
    )
    settings = doctor.load_settings(path)
    assert settings.image == "custom"
    assert settings.default["endpoint"] == "unix:///x/unix.socket"
    assert settings.profiles == ["default", "gpu"]
    assert settings.targets() == ["", "campus", "lab"]
    assert (settings.hub_ip, settings.hub_port) == ("0.0.0.0", 8082)


def test_defaults_without_a_config():
    settings = doctor.load_settings(None)
    assert settings.targets() == [""]
    assert settings.image == "jupyter-base"
    assert doctor.check_hub(settings, "10.0.0.1").severity == doctor.ERROR


def test_a_loopback_hub_names_the_setting_and_the_gateway():
    found = doctor.check_hub(doctor.Settings(hub_ip="127.0.0.1"), "10.117.40.1")
    assert found.severity == doctor.ERROR
    assert "c.JupyterHub.hub_ip = '10.117.40.1'" in found.fix
    assert "hub_connect_url" in found.fix
    bound = doctor.Settings(hub_bind_url="http://localhost:8081")
    assert doctor.check_hub(bound, None).severity == doctor.ERROR
    for fine in (
        doctor.Settings(hub_ip="0.0.0.0"),
        doctor.Settings(hub_ip="10.117.40.1"),
        doctor.Settings(hub_ip="127.0.0.1", hub_connect_url="http://hub.example:8081"),
    ):
        assert doctor.check_hub(fine, "10.117.40.1").severity == doctor.OK


async def test_checks_pass_on_a_good_daemon(fake):
    found = await doctor.check_daemon(fake, "default")
    found += await doctor.check_profiles(fake, "default", ["default"])
    found += await doctor.check_image(fake, "default", "jupyter-base", "incus")
    assert [r.severity for r in found] == [doctor.OK] * 4, found
    assert any("gateway 10.0.0.1" in r.what for r in found)


async def test_dir_pool_missing_image_profile_and_offline_member(fake):
    fake.pool_driver = "dir"
    fake.members = {"m1": "Online", "m2": "Offline"}
    storage = await doctor.check_profiles(fake, "d", ["default"])
    assert storage[0].severity == doctor.WARNING and "quotas" in storage[0].what
    missing = await doctor.check_profiles(fake, "d", ["default", "nope"])
    assert missing[0].severity == doctor.ERROR and "'nope'" in missing[0].what
    image = await doctor.check_image(fake, "d", "no-such-image", "incus", "/etc/hub/c.py", "lab")
    assert image[0].severity == doctor.ERROR
    # No recipe in the package for that alias: the operator's own, under that alias.
    assert image[0].fix.endswith(
        "lxdspawner image build RECIPE.yaml --alias no-such-image -f /etc/hub/c.py "
        "--remote lab, or set c.LxdSpawner.image"
    )
    image = await doctor.check_image(fake, "d", "lxdspawner-tiny", "incus", "/etc/hub/c.py")
    assert image[0].fix.endswith(" image build lxdspawner-tiny -f /etc/hub/c.py")
    members = await doctor.check_daemon(fake, "d")
    assert [r.severity for r in members] == [doctor.OK, doctor.WARNING]
    assert "m2" in members[1].what


async def test_a_macvlan_nic_is_the_operators_network_not_an_error(fake):
    """A cluster's members often give instances a macvlan NIC on the host's own interface
    (no managed bridge to ask for a gateway): fine, and no bridge for the later checks."""
    fake.profiles["default"]["devices"]["eth0"] = {
        "type": "nic", "name": "eth0", "nictype": "macvlan", "parent": "eth0"
    }  # fmt: skip
    found = await doctor.check_profiles(fake, "d", ["default"])
    nic = next(r for r in found if r.check == "network")
    assert nic.severity == doctor.OK and "macvlan NIC on the host's eth0" in nic.what, nic
    assert (await doctor._root_and_bridge(fake, ["default"]))[2] == ""


def test_output_and_exit_status():
    results = [
        doctor.Result(doctor.OK, "default", "image", "image 'x'"),
        doctor.Result(doctor.WARNING, "default", "storage", "dir", "use zfs"),
    ]
    assert doctor.exit_status(results) == 0
    text = doctor.as_table(results)
    assert "WARNING" in text and "fix: use zfs" in text and "0 error(s), 1 warning(s)" in text
    assert json.loads(doctor.as_json(results))[1]["fix"] == "use zfs"
    results.append(doctor.Result(doctor.ERROR, "", "hub", "loopback", "c.JupyterHub.hub_ip"))
    assert doctor.exit_status(results) == 1


def test_command_line_bad_config_is_usage_error(tmp_path, capsys):
    assert cli.main(["doctor", "-f", str(tmp_path / "missing.py")]) == 2
    assert "no such config file" in capsys.readouterr().err
    bad = write(tmp_path, "c.LxdSpawner.remotes = {'x': 3}\n")
    assert cli.main(["doctor", "-f", str(bad)]) == 2
    assert "remotes['x']" in capsys.readouterr().err


async def test_our_containers_are_listed_by_hub_never_touched(fake):
    from fakes import SOURCE

    from lxdspawner.ownership import KEY_HUB, KEY_MANAGED, KEY_USER, MANAGED_BY

    ours = {KEY_MANAGED: MANAGED_BY, KEY_USER: "ana"}
    await fake.create_instance("jupyter-ana", source=SOURCE, config={**ours, KEY_HUB: "old"})
    await fake.create_instance("someone-else", source=SOURCE)
    found = await doctor.check_leftovers(fake, "d", "new")
    assert len(found) == 1 and found[0].severity == doctor.OK
    assert "hub 'old' (not this hub's" in found[0].what and "jupyter-ana" in found[0].what
    assert set(fake.instances) == {"jupyter-ana", "someone-else"}


def test_every_command_takes_the_hubs_config(tmp_path, capsys):
    """-f gives the connection, the remote, the image; explicit options override it."""
    path = write(
        tmp_path,
        "c.LxdSpawner.endpoint = 'unix:///x/unix.socket'\n"
        "c.LxdSpawner.project = 'jh'\n"
        "c.LxdSpawner.image = 'custom'\n"
        "c.LxdSpawner.remotes = {'campus': {'endpoint': 'https://lxd1:8443'}}\n",
    )
    parser = cli.build_parser()
    for command in ("prepull", "gc", "list", "doctor"):
        assert "examples:" in parser._subparsers._group_actions[0].choices[command].epilog
    chosen, settings = cli.connection(parser.parse_args(["prepull", "-f", str(path)]))
    assert chosen["endpoint"] == "unix:///x/unix.socket" and chosen["project"] == "jh"
    assert settings.image == "custom"
    args = parser.parse_args(["list", "-f", str(path), "--remote", "campus", "--project", "p"])
    chosen, _ = cli.connection(args)
    assert (chosen["endpoint"], chosen["project"]) == ("https://lxd1:8443", "p")
    assert cli.main(["gc", "-f", str(path), "--remote", "nope"]) == 2
    assert "--remote 'nope'" in capsys.readouterr().err


async def test_list_and_gc_as_json(fake):
    import io

    from fakes import SOURCE, owned

    await fake.create_instance("jupyter-ana", source=SOURCE, config=owned("ana"))
    out = io.StringIO()
    await cli.list_servers(fake, as_json=True, out=out)
    listed = json.loads(out.getvalue())
    assert listed[0]["user"] == "ana" and listed[0]["instance"] == "jupyter-ana"
    fake.list_images = lambda: _images(fake)
    out = io.StringIO()
    assert await cli.gc(fake, as_json=True, out=out) == 0
    assert json.loads(out.getvalue()) == []


async def _images(fake):
    return [
        {"fingerprint": f, "aliases": [{"name": a} for a in i.aliases]}
        for f, i in fake.images.items()
    ]


async def test_prepull_prints_the_daemons_progress_as_plain_lines(fake):
    """Not a terminal: each change of the daemon's progress is one line, then "ready"."""
    import io

    async def create(name, *, on_progress=None, **kwargs):
        for step in ("unpack: 10%", "unpack: 10%", "unpack: 90%"):
            on_progress({"create_instance_from_image_unpack_progress": step})
        return await created(name, **kwargs)

    created = fake.create_instance
    fake.create_instance = create
    out = io.StringIO()
    assert await cli.prepull(fake, "jupyter-base", shared_directories=(), out=out) == 0
    assert out.getvalue().splitlines()[:2] == [
        "this server: unpack: 10%",
        "this server: unpack: 90%",
    ]
    assert "this server: jupyter-base ready" in out.getvalue()
