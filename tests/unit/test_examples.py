"""The example configurations (examples/, scripts/demo_config.py) load and mean what they say.

Each file is loaded the way JupyterHub loads it (traitlets' PyFileConfigLoader); every
section must be a class JupyterHub knows, every key one of its configurable traits, and the
values must pass the traits' validation (the classes are instantiated with the config).
So renaming or removing an LxdSpawner option breaks this test, not an operator's hub.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.app import JupyterHub
from jupyterhub.auth import Authenticator, PAMAuthenticator
from jupyterhub.authenticators.shared import SharedPasswordAuthenticator
from jupyterhub.proxy import ConfigurableHTTPProxy
from jupyterhub.spawner import Spawner
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from lxdspawner import LxdSpawner
from testbench import topology

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DEMO_CONFIG = REPO / "scripts" / "demo_config.py"

CLASSES = {
    cls.__name__: cls
    for cls in (
        JupyterHub,
        Authenticator,
        PAMAuthenticator,
        SharedPasswordAuthenticator,
        ConfigurableHTTPProxy,
        Spawner,
        LxdSpawner,
    )
}


def load(path: Path) -> Config:
    return PyFileConfigLoader(path.name, path=str(path.parent)).load_config()


def check_names(config: Config) -> None:
    """Every section is a known class and every key a configurable trait of it."""
    for section, values in config.items():
        assert section in CLASSES, f"unexpected config section {section!r}"
        known = set(CLASSES[section].class_trait_names(config=True))
        unknown = sorted(set(values) - known)
        assert not unknown, f"{section} has no option(s) {unknown}"


def make_spawner(config: Config) -> LxdSpawner:
    # Instantiating applies and validates every LxdSpawner/Spawner value from the config.
    user = SimpleNamespace(name="alice", url="/user/alice/", escaped_name="alice")
    return LxdSpawner(config=config, user=user)


def check_values(config: Config) -> LxdSpawner:
    app = JupyterHub(config=config)
    assert app.spawner_class is LxdSpawner, "spawner_class must resolve to LxdSpawner"
    authenticator = app.authenticator_class(config=config)
    assert isinstance(authenticator, Authenticator)
    return make_spawner(config)


def test_host_config():
    config = load(EXAMPLES / "jupyterhub_config.py")
    check_names(config)
    spawner = check_values(config)
    app = JupyterHub(config=config)
    assert app.cleanup_servers is False
    assert app.authenticator_class is PAMAuthenticator
    assert app.active_server_limit > 0 and app.concurrent_spawn_limit > 0
    assert [s["name"] for s in app.services] == ["idle-culler"]
    assert any(r["services"] == ["idle-culler"] for r in app.load_roles)
    assert spawner.image == "jupyter-base"
    assert spawner.mem_limit == 4 * 1024**3 and spawner.cpu_limit == 2.0
    assert spawner.default_url == "/lab"


def test_config_for_original_lxdspawner_operators():
    config = load(EXAMPLES / "from_original_lxdspawner.py")
    check_names(config)
    spawner = check_values(config)
    assert spawner.files_to_push == [["/etc/passwd", "/etc/passwd"], ["/etc/group", "/etc/group"]]
    assert spawner.privileged_containers is True
    assert spawner.filesystems_to_mount == [["home", "/srv/nfs/home", "/home"]]
    assert JupyterHub(config=config).cleanup_servers is False


def test_demo_config(tmp_path, monkeypatch):
    (tmp_path / "password").write_text("demo-password-1234\n")
    (tmp_path / "admin-password").write_text("a" * 40 + "\n")
    monkeypatch.setenv("LXDSPAWNER_DEMO_DIR", str(tmp_path))
    monkeypatch.delenv("LXDSPAWNER_DEMO_URL", raising=False)
    monkeypatch.delenv("LXDSPAWNER_DEMO_HUB_IP", raising=False)
    monkeypatch.delenv("LXDSPAWNER_DAEMON", raising=False)
    config = load(DEMO_CONFIG)
    check_names(config)
    spawner = check_values(config)
    app = JupyterHub(config=config)
    assert app.bind_url == "http://127.0.0.1:8000"
    assert app.hub_bind_url == f"http://{topology.INCUS.gateway}:8081"
    assert app.db_url == f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}"
    assert app.allow_named_servers is True and app.cleanup_servers is True
    culler = next(s for s in app.services if s["name"] == "idle-culler")
    assert "--timeout=3600" in culler["command"] and "--cull-every=300" in culler["command"]
    assert (
        "delete:servers" in next(r for r in app.load_roles if r["name"] == "idle-culler")["scopes"]
    )
    auth = SharedPasswordAuthenticator(config=config)
    assert auth.user_password == "demo-password-1234"
    assert auth.admin_users == {"admin"}
    assert spawner.image == "jupyter-base" and spawner.default_url == "/lab"
    assert spawner.mem_limit == 1024**3 and spawner.cpu_limit == 1.0


def test_demo_config_without_passwords_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LXDSPAWNER_DEMO_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="scripts/demo.sh"):
        load(DEMO_CONFIG)


def test_systemd_unit():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(EXAMPLES / "jupyterhub.service")
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["ExecStart"].split()[:3] == [
        "/opt/jupyterhub/bin/jupyterhub",
        "-f",
        "/etc/jupyterhub/jupyterhub_config.py",
    ]
    assert service["WorkingDirectory"] == "/var/lib/jupyterhub"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The example config keeps its state where the unit gives it a directory.
    host = JupyterHub(config=load(EXAMPLES / "jupyterhub_config.py"))
    assert host.db_url.startswith("sqlite:////var/lib/jupyterhub/")


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(f"\n{heading}\n") :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


def test_readme_campus_example(tmp_path):
    """The Profiles section's complete campus config loads, and every override of every
    profile and choice is a value its setting accepts (what a user's choice would set)."""
    path = tmp_path / "campus_config.py"
    path.write_text(readme_block("## Profiles"))
    config = load(path)
    check_names(config)
    spawner = make_spawner(config)
    assert set(spawner.remotes) == {"campus", "gpu-lab"}
    overrides = []
    for profile in spawner.profile_list:
        overrides.append(profile["spawner_override"])
        for option in (profile.get("profile_options") or {}).values():
            overrides += [c["spawner_override"] for c in option["choices"].values()]
            unlisted = option.get("unlisted_choice") or {}
            if unlisted.get("enabled"):
                overrides.append(
                    {
                        k: v.replace("{value}", "course-x") if isinstance(v, str) else v
                        for k, v in unlisted["spawner_override"].items()
                    }
                )
    assert len(overrides) == 6
    for override in overrides:
        one = make_spawner(config)
        for key, value in override.items():
            setattr(one, key, value)  # the trait's own validation: TraitError if wrong
    # The last is the GPU profile's: it took effect as given.
    assert one.remote == "gpu-lab" and one.gpu and one.image == "jupyter-cuda"
