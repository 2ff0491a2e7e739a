"""Request bodies and in-container files, built without a daemon."""

import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lxdspawner import objects
from lxdspawner.objects import Mount, ServerSpec


def spec(**overrides):
    values = dict(
        instance="jupyter-alice",
        username="alice",
        server_name="",
        hub="hub-1",
        uid=1000,
        gid=1000,
        home="/home/alice",
        cmd=("jupyterhub-singleuser",),
    )
    values.update(overrides)
    return ServerSpec(**values)


@pytest.mark.parametrize(
    "cpu, allowance",
    [(0.5, "50ms/100ms"), (1, "100ms/100ms"), (2, "200ms/100ms"), (0.001, "1ms/100ms")],
)
def test_cpu_limit_is_a_time_quota(cpu, allowance):
    assert objects.cpu_allowance(cpu) == allowance


def test_instance_config_records_owner_and_limits():
    config = objects.instance_config(
        spec(
            username="ana.maria@uni.es",
            server_name="lab",
            mem_limit=2**30,
            cpu_limit=0.5,
            process_limit=200,
            privileged=True,
        )
    )
    assert config == {
        "user.jupyterhub.managed-by": "lxdspawner",
        "user.jupyterhub.hub": "hub-1",
        "user.jupyterhub.user": "ana.maria@uni.es",
        "user.jupyterhub.server": "lab",
        "limits.memory": str(2**30),
        "limits.cpu.allowance": "50ms/100ms",
        "limits.processes": "200",
        "security.privileged": "true",
    }


def test_no_setting_can_change_whose_instance_it_is():
    config = objects.instance_config(
        spec(extra_config={"user.jupyterhub.user": "bob", "user.jupyterhub.hub": "other"})
    )
    assert config["user.jupyterhub.user"] == "alice"
    assert config["user.jupyterhub.hub"] == "hub-1"


def test_no_limits_no_keys():
    config = objects.instance_config(spec())
    assert not any(k.startswith(("limits.", "security.")) for k in config)


def test_mounts_become_disk_devices():
    devices = objects.instance_devices(spec(mounts=(Mount("home", "/srv/home/alice", "/home"),)))
    assert devices == {"home": {"type": "disk", "source": "/srv/home/alice", "path": "/home"}}


def test_username_in_paths_must_stay_one_component():
    assert objects.expand_username_in_path("/srv/{USERNAME}/data", "ana.maria@uni.es") == (
        "/srv/ana.maria@uni.es/data"
    )
    for bad in ("..", ".", "a\rb", "a\nb", "x" * 300):
        with pytest.raises(ValueError):
            objects.expand_username_in_path("/srv/{USERNAME}", bad)


def _systemd_env(text: str, tmp_path) -> dict:
    """How a shell that honours systemd's rules would read it: we check with systemd itself
    in the integration tests; here, single-quoted values must be literal for a POSIX shell too."""
    path = tmp_path / "env"
    path.write_bytes(text.encode())
    out = subprocess.run(
        ["/bin/sh", "-c", f"set -a; . {path}; env -0"], capture_output=True, check=True
    ).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",))))
def test_env_file_values_survive_quoting(tmp_path_factory, value):
    text = objects.env_file({"V": value})
    assert text.count("\n") == 1
    assert _systemd_env(text, tmp_path_factory.mktemp("env"))["V"] == value


def test_env_file_json_and_specials(tmp_path):
    env = {
        "JUPYTERHUB_OAUTH_SCOPES": '["access:servers!server=alice/", "x"]',
        "DOLLAR": "$HOME and `cmd` and %n",
        "QUOTE": 'o\'brien "x" \\',
    }
    parsed = _systemd_env(objects.env_file(env), tmp_path)
    assert {k: parsed[k] for k in env} == env


def test_env_file_refuses_bad_names():
    with pytest.raises(ValueError):
        objects.env_file({"A B": "x"})


def test_unit_runs_as_the_user_and_powers_off_when_the_server_ends():
    unit = objects.server_unit(spec(uid=1234, gid=5678, cmd=("jupyterhub-singleuser", "--x=%h $y")))
    assert "User=1234\n" in unit and "Group=5678\n" in unit
    assert "SuccessAction=poweroff" in unit and "FailureAction=poweroff" in unit
    assert 'ExecStart="/usr/bin/env" "jupyterhub-singleuser" "--x=%%h $$y"' in unit
    assert f"EnvironmentFile={objects.ENV_PATH}" in unit
    assert "TOKEN" not in unit


def test_nothing_in_the_unit_starts_a_new_line():
    # systemd ends a line at CR and NUL as well as LF: none may reach the unit raw.
    unit = objects.server_unit(spec(username="a\rb\nc", cmd=("x", "--a=\r[Service]\nUser=0")))
    assert "\r" not in unit
    assert unit.count("\n") == objects.server_unit(spec(cmd=("x", "--a=b"))).count("\n")
    assert '"--a=\\x0d[Service]\\x0aUser=0"' in unit


@pytest.mark.parametrize("home", ["/home/..", "/home/a\rb", "relative", "/home//x", "/"])
def test_the_unit_refuses_a_home_that_is_not_plain_directories(home):
    with pytest.raises(ValueError, match="home directory"):
        objects.server_unit(spec(home=home))


def test_home_is_made_only_where_nothing_is(tmp_path):
    # As root this would chown; here we check what it leaves alone (run as the test's user).
    existing = tmp_path / "link"
    existing.symlink_to(tmp_path / "elsewhere")
    command = objects.make_home_command(spec(home=str(existing), uid=os.getuid(), gid=os.getgid()))
    subprocess.run(command, check=True)
    assert existing.is_symlink() and not (tmp_path / "elsewhere").exists()
    fresh = tmp_path / "new" / "home"
    command = objects.make_home_command(spec(home=str(fresh), uid=os.getuid(), gid=os.getgid()))
    subprocess.run(command, check=True)
    assert fresh.is_dir()


def test_env_file_refuses_nul():
    with pytest.raises(ValueError, match="NUL"):
        objects.env_file({"A": "x\0y"})


@pytest.mark.parametrize(
    "value, error",
    [
        ([["a"]], r"files_to_push\[0\]"),
        (["a"], r"files_to_push\[0\]"),
        ([["a", ""]], "non-empty"),
        ([["a", 1]], "non-empty"),
    ],
)
def test_list_settings_are_checked_naming_the_setting(value, error):
    with pytest.raises(ValueError, match=error):
        objects.as_pairs(value, "files_to_push", 2)
