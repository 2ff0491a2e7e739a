"""instance_patches and extra_objects: rendering, merging, what no patch may change, the
objects' bodies and keys, and errors that name the setting's key."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from traitlets import TraitError

from lxdspawner import extraobjects, objects, patches
from lxdspawner.lxd import LxdError, NotFound
from lxdspawner.objects import ServerSpec
from lxdspawner.overrides import OverrideSettings
from lxdspawner.ownership import KEY_HUB, KEY_SERVER, KEY_USER, Owner

CTX = patches.Context(
    username="alice",
    servername="lab",
    instance_name="jupyter-alice--lab",
    profile="gpu",
    member="node2",
    remote="campus",
)
OWNER = Owner("hub-1", "alice", "lab")


def spec(**overrides) -> ServerSpec:
    values = dict(
        instance="jupyter-alice--lab",
        username="alice",
        server_name="lab",
        hub="hub-1",
        uid=1000,
        gid=1000,
        home="/home/alice",
        cmd=("jupyterhub-singleuser",),
        hardening={"security.idmap.isolated": "true", "security.guestapi": "false"},
        system_devices={
            "root": {"type": "disk", "path": "/", "pool": "default", "size": "10GiB"},
            "eth0": {"type": "nic", "network": "br0", "security.port_isolation": "true"},
        },
    )
    values.update(overrides)
    return ServerSpec(**values)


def patched(patch_map, **spec_overrides) -> dict:
    rendered = patches.render_patches(patch_map, CTX)
    return objects.instance_request(spec(patches=rendered, **spec_overrides))


# -- rendering ------------------------------------------------------------------------------


def test_yaml_patch_renders_every_variable_and_merges_config_and_devices():
    request = patched(
        {
            "10-env": """
config:
  environment.WHO: "{{ username }}/{{ servername }}@{{ member }} on {{ remote }}"
  user.profile-slug: "{{ profile }}"
  limits.processes: 500
devices:
  scratch-{{ username }}:
    type: disk
    source: "tmpfs:"
    path: /scratch
"""
        }
    )
    assert request["config"]["environment.WHO"] == "alice/lab@node2 on campus"
    assert request["config"]["user.profile-slug"] == "gpu"
    assert request["config"]["limits.processes"] == "500"  # the daemon takes strings
    assert request["devices"]["scratch-alice"] == {
        "type": "disk",
        "source": "tmpfs:",
        "path": "/scratch",
    }
    # what was there stays
    assert request["devices"]["root"]["size"] == "10GiB"
    assert request["config"][KEY_USER] == "alice"


def test_dict_patches_apply_in_sorted_key_order_and_null_deletes():
    request = patched(
        {
            "20-later": {"config": {"environment.A": "second"}, "profiles": ["default", "gpu"]},
            "10-first": {"config": {"environment.A": "first", "environment.B": "b"}},
            "30-delete": {"config": {"environment.B": None}, "devices": {"data": None}},
        },
        extra_devices={"data": {"type": "disk", "source": "/srv", "path": "/data"}},
    )
    assert request["config"]["environment.A"] == "second"
    assert "environment.B" not in request["config"]
    assert "data" not in request["devices"]
    assert request["profiles"] == ["default", "gpu"]  # lists replace


def test_mappings_merge_recursively_into_a_device():
    request = patched(
        {"a": {"devices": {"data": {"readonly": True}}}},
        extra_devices={"data": {"type": "disk", "source": "/srv", "path": "/data"}},
    )
    assert request["devices"]["data"] == {
        "type": "disk",
        "source": "/srv",
        "path": "/data",
        "readonly": "true",
    }


def test_extra_instance_config_and_extra_devices_still_work_without_patches():
    request = objects.instance_request(
        spec(extra_config={"boot.autostart": "false"}, extra_devices={"x": {"type": "none"}})
    )
    assert request["config"]["boot.autostart"] == "false"
    assert request["devices"]["x"] == {"type": "none"}
    assert request["profiles"] == ["default"]


NASTY = [
    'a"\nsecurity.privileged: "true',
    "a\nsecurity.privileged: true",
    "{{ 7*7 }}",
    "{% raw %}",
    "x: y",
    "- a",
    "&anchor",
    "*alias",
    "!!python/object:os.system",
    "a' #",
    "null",
    "true",
    "\\",
    "}}",
]


@pytest.mark.parametrize("username", NASTY)
def test_a_username_never_writes_structure(username):
    context = patches.Context(username=username, servername=username, instance_name="j")
    text = 'config:\n  environment.WHO: "{{ username }}"\n  user.x: "pre-{{ servername }}"\n'
    rendered = patches.render_patches({"p": text}, context)
    assert rendered == (
        ("p", {"config": {"environment.WHO": username, "user.x": f"pre-{username}"}}),
    )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=20))
def test_arbitrary_usernames_end_up_as_one_string(username, servername):
    context = patches.Context(username=username, servername=servername, instance_name="j")
    text = """
config:
  environment.WHO: "{{ username }}"
devices:
  d-{{ servername }}:
    type: disk
    path: "/srv/{{ username }}"
"""
    ((_, patch),) = patches.render_patches({"p": text}, context)
    assert patch == {
        "config": {"environment.WHO": username},
        "devices": {f"d-{servername}": {"type": "disk", "path": f"/srv/{username}"}},
    }


def test_the_sandbox_refuses_python_internals():
    with pytest.raises(patches.PatchError, match=r"instance_patches\['evil'\]"):
        patches.render_patches(
            {"evil": {"config": {"x": "{{ username.__class__.__mro__[1].__subclasses__() }}"}}},
            CTX,
        )


# -- errors name the key --------------------------------------------------------------------


def test_bad_yaml_names_the_patch():
    with pytest.raises(patches.PatchError, match=r"instance_patches\['broken'\]: not valid YAML"):
        patches.check_patches({"broken": "config: [unclosed"})


def test_an_unquoted_template_is_bad_yaml_with_a_hint():
    with pytest.raises(patches.PatchError, match="quote a value"):
        patches.check_patches({"p": "config:\n  environment.A: {{ username }}\n"})


def test_template_syntax_error_names_the_patch_at_config_time():
    with pytest.raises(patches.PatchError, match=r"instance_patches\['p'\]: template error"):
        patches.check_patches({"p": {"config": {"a": "{{ username "}}})


def test_undefined_variable_names_the_patch_and_the_variable():
    message = r"instance_patches\['p'\].*'usrname' is undefined"
    with pytest.raises(patches.PatchError, match=message):
        patches.render_patches({"p": {"config": {"a": "{{ usrname }}"}}}, CTX)


def test_a_patch_of_an_unknown_part_of_the_request_is_refused():
    with pytest.raises(patches.PatchError, match=r"instance_patches\['p'\]: 'source'"):
        patches.check_patches({"p": {"source": {"type": "none"}}})


def test_a_patch_must_be_a_mapping_and_values_strings():
    with pytest.raises(patches.PatchError, match=r"instance_patches\['p'\]: must be a mapping"):
        patches.check_patches({"p": "- a\n- b\n"})
    with pytest.raises(patches.PatchError, match=r"instance_patches\['p'\] config 'a'"):
        patches.render_patches({"p": {"config": {"a": [1, 2]}}}, CTX)


def test_config_time_errors_are_trait_errors_naming_the_key():
    settings_ = OverrideSettings()
    with pytest.raises(TraitError, match=r"instance_patches\['bad'\]"):
        settings_.instance_patches = {"bad": "config: {"}
    with pytest.raises(TraitError, match=r"extra_objects\['acl'\]"):
        settings_.extra_objects = {"acl": {"kind": "firewall", "body": {"name": "x"}}}
    settings_.instance_patches = {"ok": 'config:\n  environment.A: "{{ username }}"\n'}


# -- what no patch may change ---------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY_USER, KEY_HUB, KEY_SERVER, "user.jupyterhub.other"])
def test_no_patch_touches_the_ownership_keys(key):
    message = rf"instance_patches\['p'\] sets config key '{key}'"
    with pytest.raises(patches.PatchError, match=message):
        patched({"p": {"config": {key: "bob"}}})
    with pytest.raises(patches.PatchError, match=r"instance_patches\['p'\]"):
        patched({"p": {"config": {key: None}}})


def test_no_patch_changes_or_drops_the_isolation():
    with pytest.raises(patches.PatchError, match="security.idmap.isolated.*isolated_idmap"):
        patched({"p": {"config": {"security.idmap.isolated": "false"}}})
    with pytest.raises(patches.PatchError, match="security.guestapi"):
        patched({"p": {"config": {"security.guestapi": None}}})
    with pytest.raises(patches.PatchError, match=r"device 'eth0' \(security.port_isolation\)"):
        patched({"p": {"devices": {"eth0": {"security.port_isolation": "false"}}}})
    with pytest.raises(patches.PatchError, match=r"device 'root'"):
        patched({"p": {"devices": {"root": None}}})
    with pytest.raises(patches.PatchError, match=r"device 'root' \(size\)"):
        patched({"p": {"devices": {"root": {"size": "1TiB"}}}})


def test_a_patch_may_add_to_a_system_device():
    request = patched({"p": {"devices": {"eth0": {"security.acls": "extra"}}}})
    assert request["devices"]["eth0"]["security.acls"] == "extra"
    assert request["devices"]["eth0"]["security.port_isolation"] == "true"


# -- extra_objects --------------------------------------------------------------------------

ACL_YAML = """
kind: network-acl
body:
  name: "acl-{{ instance_name }}"
  description: "for {{ username }}"
  egress:
    - action: reject
      state: enabled
      destination: 10.0.0.0/8
"""


def test_object_bodies_carry_our_keys():
    (acl, vol) = patches.render_objects(
        {
            "acl": ACL_YAML,
            "scratch": {
                "kind": "volume",
                "pool": "default",
                "keep": True,
                "body": {"name": "scratch-{{ username }}", "config": {"size": "1GiB"}},
            },
        },
        CTX,
        OWNER,
    )
    assert acl.kind == "network-acl" and acl.name == "acl-jupyter-alice--lab"
    assert acl.body["description"] == "for alice"
    assert acl.body["egress"] == [
        {"action": "reject", "state": "enabled", "destination": "10.0.0.0/8"}
    ]
    assert acl.body["config"] == {**OWNER.keys(), patches.KEY_OBJECT: "acl"}
    assert not acl.keep and "extra_objects['acl']" in acl.label
    assert vol.kind == "volume" and vol.pool == "default" and vol.keep
    assert vol.body["config"] == {
        "size": "1GiB",
        **OWNER.keys(),
        patches.KEY_OBJECT: "scratch",
        patches.KEY_KEEP: "true",
    }


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kind": "network-acl", "body": {}}, "body must be a mapping with a name"),
        ({"kind": "volume", "body": {"name": "v"}}, "needs its pool"),
        ({"kind": "network-acl", "body": {"name": "a", "rules": []}}, "'rules'"),
        ({"kind": "network-acl", "body": {"name": "a"}, "keep": "yes"}, "keep must be"),
        ({"kind": "network-acl", "body": {"name": "a", "config": {KEY_USER: "b"}}}, KEY_USER),
        ({"kind": "network-acl", "body": {"name": "{{ username }}/x"}}, "not a valid object"),
    ],
)
def test_bad_objects_name_the_key(entry, message):
    context = patches.Context(username="..", servername="", instance_name="j")
    with pytest.raises(patches.PatchError, match=rf"extra_objects\['o'\].*{message}"):
        patches.render_objects({"o": entry}, context, OWNER)


def test_which_objects_go_with_the_server():
    keys = patches.object_keys(OWNER, "acl", keep=False)
    assert patches.goes_with_server(keys, OWNER)
    assert not patches.goes_with_server({**keys, patches.KEY_KEEP: "true"}, OWNER)
    assert not patches.goes_with_server(keys, Owner("hub-1", "alice", ""))
    assert not patches.goes_with_server(keys, Owner("hub-2", "alice", "lab"))
    # a home volume carries the server's keys but is no extra object: never deleted here
    assert not patches.goes_with_server(OWNER.keys(), OWNER)


class StubClient:
    """What extraobjects asks of a client: network ACLs and custom volumes in memory."""

    def __init__(self) -> None:
        self.acls: dict[str, dict] = {}
        self.volumes: dict[tuple[str, str], dict] = {}
        self.refuse = ""

    async def request(self, method, path, *, params=None, json_body=None):
        parts = path.removeprefix("/1.0/").split("/")
        if parts[0] == "network-acls":
            if method == "GET" and len(parts) == 1:
                return list(self.acls.values())
            if method == "GET":
                if parts[1] not in self.acls:
                    raise NotFound("Network ACL not found", status=404)
                return self.acls[parts[1]]
            if method == "POST":
                if self.refuse:
                    raise LxdError(self.refuse, status=400)
                self.acls[json_body["name"]] = json_body
                return {}
            if method == "DELETE":
                del self.acls[parts[1]]
                return {}
        raise NotImplementedError(method, path)

    async def create_volume(self, pool, name, *, config=None, target=None, **fields):
        self.volumes[(pool, name)] = {
            **fields,
            "name": name,
            "config": dict(config or {}),
            "pool": pool,
        }

    async def get_volume(self, pool, name, *, target=None):
        if (pool, name) not in self.volumes:
            raise NotFound("Storage volume not found", status=404)
        return self.volumes[(pool, name)]

    async def storage_pools(self):
        return sorted({p for p, _ in self.volumes})

    async def list_volumes(self, pool):
        return [v for (p, _), v in self.volumes.items() if p == pool]

    async def delete_volume(self, pool, name, *, target=None):
        del self.volumes[(pool, name)]


async def test_objects_are_made_reused_refused_and_deleted_by_their_keys():
    client = StubClient()
    wanted = patches.render_objects(
        {
            "acl": ACL_YAML,
            "tmp": {"kind": "volume", "pool": "p", "body": {"name": "tmp-{{ username }}"}},
            "kept": {"kind": "volume", "pool": "p", "keep": True, "body": {"name": "k"}},
        },
        CTX,
        OWNER,
    )
    made = await extraobjects.ensure(client, wanted, OWNER, None)
    assert len(made) == 3
    assert client.acls["acl-jupyter-alice--lab"]["config"][KEY_USER] == "alice"
    # a restart reuses them
    assert await extraobjects.ensure(client, wanted, OWNER, None) == []
    # another server's object of that name is refused, naming the entry
    other = patches.render_objects({"acl": ACL_YAML}, CTX, Owner("hub-1", "bob", "lab"))
    with pytest.raises(extraobjects.ObjectError, match=r"extra_objects\['acl'\].*bob|alice"):
        await extraobjects.ensure(client, other, Owner("hub-1", "bob", "lab"), None)
    # a foreign ACL (none of our keys) stays, and the spawn fails naming it
    client.acls["hand-made"] = {"name": "hand-made", "config": {}}
    hand = patches.render_objects(
        {"x": {"kind": "network-acl", "body": {"name": "hand-made"}}}, CTX, OWNER
    )
    with pytest.raises(extraobjects.ObjectError, match="hand-made.*lxdspawner did not make"):
        await extraobjects.ensure(client, hand, OWNER, None)
    # the daemon's refusal names the entry and says why
    client.refuse = "Invalid ingress rule 0"
    refused = patches.render_objects(
        {"r": {"kind": "network-acl", "body": {"name": "r"}}}, CTX, OWNER
    )
    with pytest.raises(extraobjects.ObjectError, match=r"extra_objects\['r'\].*Invalid ingress"):
        await extraobjects.ensure(client, refused, OWNER, None)
    # deletion: ours not kept; the kept volume and the foreign ACL stay
    done = await extraobjects.delete_owned(client, OWNER, ["network-acl", "volume"])
    assert sorted(done) == ["network ACL acl-jupyter-alice--lab", "volume p/tmp-alice"]
    assert set(client.acls) == {"hand-made"}
    assert set(client.volumes) == {("p", "k")}


def test_yaml_round_trip_of_rendered_patch_is_plain_data():
    ((_, patch),) = patches.render_patches({"p": 'config:\n  a: "{{ username }}"\n'}, CTX)
    assert yaml.safe_load(yaml.safe_dump(patch)) == patch


def test_a_refused_create_blames_the_patch_the_daemon_names():
    rendered = patches.render_patches(
        {"a": {"config": {"limits.memory": "lots"}}, "b": {"config": {"user.x": "y"}}}, CTX
    )
    message = 'Invalid config: Invalid value for "limits.memory": lots'
    assert patches.blame(rendered, message) == " (instance_patches 'a' merged into the request)"
    incus = "Failed creating instance record: Invalid value: lots"
    assert patches.blame(rendered, incus) == " (instance_patches 'a' merged into the request)"
    assert "'a', 'b'" in patches.blame(rendered, "something else")
    assert patches.blame((), message) == ""


def test_the_kinds_to_look_for_are_the_recorded_and_the_configured_ones():
    settings_ = OverrideSettings()
    assert settings_._object_kinds() == []
    settings_.extra_objects = {"v": {"kind": "volume", "pool": "p", "body": {"name": "x"}}}
    settings_.object_kinds = ["network-acl"]
    assert settings_._object_kinds() == ["network-acl", "volume"]


# -- through LxdSpawner.start(), in process (the in-memory daemon of fakes.py) ---------------


@pytest.fixture
def inprocess(fake, make_daemon, monkeypatch):
    """The spawner of test_spawner_inprocess on the in-memory daemon, its server answering."""
    from fakes import server_unit
    from test_spawner_inprocess import spawner

    from lxdspawner import readiness
    from lxdspawner.daemon import Daemon

    async def answers(daemon, name, url, *, tls, timeout):
        pass

    monkeypatch.setattr(readiness, "wait_http", answers)
    fake.exec_handler = server_unit(fake)
    daemon = make_daemon(fake)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    return lambda **settings: spawner(fake, **settings)


async def test_a_spawn_creates_the_container_with_the_patches(inprocess, fake):
    s = inprocess(
        instance_patches={
            "env": 'config:\n  environment.WHO: "{{ username }} in {{ instance_name }}"\n',
            "dev": {"devices": {"extra": {"type": "none"}}},
        }
    )
    await s.start()
    container = fake.instances["jupyter-ana"]
    assert container.config["environment.WHO"] == "ana in jupyter-ana"
    assert container.devices["extra"] == {"type": "none"}
    assert container.config[KEY_USER] == "ana"


async def test_the_profile_variable_is_the_profile_the_spawn_runs_with(inprocess, fake):
    """The default profile counts too: the user chose none, the operator's default applies."""
    s = inprocess(
        profile_list=[
            {"display_name": "Small", "slug": "small", "default": True},
            {"display_name": "Big", "slug": "big"},
        ],
        instance_patches={"p": 'config:\n  user.profile: "{{ profile }}"\n'},
    )
    s.user_options = {}
    await s.start()
    assert fake.instances["jupyter-ana"].config["user.profile"] == "small"


async def test_the_remote_variable_is_the_named_remote_the_spawn_uses(inprocess, fake):
    s = inprocess(
        remotes={"campus": {"endpoint": fake.endpoint}},
        remote="campus",
        instance_patches={"p": 'config:\n  user.remote: "{{ remote }}"\n'},
    )
    await s.start()
    assert fake.instances["jupyter-ana"].config["user.remote"] == "campus"


async def test_a_template_error_fails_the_spawn_naming_the_patch_and_makes_nothing(inprocess, fake):
    from lxdspawner.spawner import SpawnError

    s = inprocess(instance_patches={"oops": {"config": {"a": "{{ nope }}"}}})
    with pytest.raises(SpawnError) as failed:
        await s.start()
    assert "instance_patches['oops']" in failed.value.jupyterhub_message
    assert "'nope' is undefined" in failed.value.jupyterhub_message
    assert fake.instances == {}


async def test_a_patch_on_our_keys_fails_the_spawn_before_anything_is_made(inprocess, fake):
    from lxdspawner.spawner import SpawnError

    s = inprocess(instance_patches={"steal": {"config": {KEY_USER: "{{ 'bob' }}"}}})
    with pytest.raises(SpawnError, match=r"instance_patches\['steal'\] sets config key"):
        await s.start()
    assert fake.instances == {}


async def test_a_kept_container_gets_the_current_patches(inprocess, fake):
    from fakes import IMAGE, owned

    from lxdspawner.lxd import Remote

    fake.add_instance("jupyter-ana", config={**owned("ana"), "environment.OLD": "x"}, image=IMAGE)
    s = inprocess(
        remove=False,
        instance_patches={"env": {"config": {"environment.NEW": "{{ username }}"}}},
    )
    s.load_state(
        {"lxd_state_version": 2, "instance": "jupyter-ana", **Remote(fake.endpoint).to_state()}
    )
    await s.start()
    config = fake.instances["jupyter-ana"].config
    assert config["environment.NEW"] == "ana" and "environment.OLD" not in config


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_an_object_named_after_any_username_is_one_safe_name_or_refused(username):
    context = patches.Context(username=username, servername="", instance_name="j")
    entry = {"kind": "network-acl", "body": {"name": "acl-{{ username }}"}}
    try:
        (obj,) = patches.render_objects({"o": entry}, context, OWNER)
    except patches.PatchError as e:
        assert "extra_objects['o']: name" in e.message
        return
    assert obj.name == f"acl-{username}" and "/" not in obj.name
    assert obj.body["config"][KEY_USER] == "alice"  # the owner's keys, whatever the name
