"""The distribution a pip user gets: built here, offline, and looked into.

The wheel and the sdist are built from a copy of the tree (the build writes its own
directories, and several test runs share the checkout) through setuptools' PEP 517 backend,
without build isolation, so nothing is downloaded. Then the wheel is unpacked into a directory,
which is what ``pip install`` makes of a pure-Python wheel, and a fresh interpreter that has
that directory first on its path (ahead of the checkout's editable install) is asked what a
user of the installed package would see: the version, the spawner entry points, the recipes.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lxdspawner
from testbench.wheel import build as build_distributions

ROOT = Path(__file__).resolve().parents[2]
DIST = "jupyterhub-lxdspawner"
VERSION = lxdspawner.__version__


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist, the wheel unpacked as pip installs it)."""
    tmp = tmp_path_factory.mktemp("packaging")
    site = tmp / "site"
    try:
        out = build_distributions(tmp)
    except RuntimeError as e:
        pytest.skip(str(e))
    (whl,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = Path(z.extract(info, site))
            mode = info.external_attr >> 16
            if mode & 0o111:  # as pip does: an executable file stays executable
                path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return whl, sdist, site


def installed(site: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports lxdspawner from ``site`` (its working
    directory too, which ``-c`` puts first on the path: never the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_wheel_is_jupyterhub_lxdspawner_with_its_entry_points_and_license(built):
    wheel, _, _ = built
    assert wheel.name == f"jupyterhub_lxdspawner-{VERSION}-py3-none-any.whl"
    info = f"jupyterhub_lxdspawner-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        metadata = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
        # setuptools before 70 writes dist-info/LICENSE, later ones dist-info/licenses/LICENSE.
        (license_file,) = [
            n for n in z.namelist() if n.startswith(f"{info}/") and n.endswith("/LICENSE")
        ]
        license_text = z.read(license_file).decode()
    assert metadata["Name"] == DIST
    assert metadata["Version"] == VERSION
    # Metadata 2.4 (newer setuptools) says it as License-Expression, older as License.
    assert "BSD-3-Clause" in (metadata["License-Expression"], metadata["License"])
    assert license_text.startswith("BSD 3-Clause License")
    assert "the lxdspawner developers" in license_text
    assert dict(entry_points["console_scripts"]) == {"lxdspawner": "lxdspawner.cli:main"}
    assert dict(entry_points["jupyterhub.spawners"]) == {
        "lxd": "lxdspawner:LxdSpawner",
        "incus": "lxdspawner:LxdSpawner",
    }


def test_the_wheel_holds_the_templates_and_every_image_recipe_file(built):
    wheel, _, _ = built
    recipes = {
        p.relative_to(ROOT).as_posix(): p
        for p in (ROOT / "lxdspawner" / "images").rglob("*")
        if p.is_file()
    }
    assert {
        "lxdspawner/images/ensure-image.sh",
        "lxdspawner/images/build-custom.sh",
        "lxdspawner/images/jupyter-base/customize.sh",
    } <= (set(recipes))
    with zipfile.ZipFile(wheel) as z:
        members = {i.filename: i for i in z.infolist()}
    assert "lxdspawner/templates/profiles.html" in members
    assert "lxdspawner/lxdspawner.py" in members
    for name, path in recipes.items():
        assert name in members, f"{name} is not in the wheel"
        # The scripts call each other as programs: their executable bit must survive.
        if os.access(path, os.X_OK):
            assert members[name].external_attr >> 16 & 0o100, f"{name} lost its x bit"


def test_the_sdist_holds_the_license_changelog_and_recipes(built):
    _, sdist, _ = built
    with tarfile.open(sdist) as t:
        names = set(t.getnames())
        # Newer setuptools normalize the sdist's name (jupyterhub_lxdspawner-...).
        (top,) = {n.split("/", 1)[0] for n in names}
        assert top in (f"jupyterhub-lxdspawner-{VERSION}", f"jupyterhub_lxdspawner-{VERSION}")
        pkg_info = t.extractfile(f"{top}/PKG-INFO").read().decode()
    for name in (
        "LICENSE",
        "CHANGELOG.md",
        "pyproject.toml",
        "lxdspawner/templates/profiles.html",
        "lxdspawner/images/ensure-image.sh",
        "lxdspawner/images/jupyter-base/build-rootfs.sh",
    ):
        assert f"{top}/{name}" in names
    assert f"Name: {DIST}\n" in pkg_info
    assert f"Version: {VERSION}\n" in pkg_info


def test_the_installed_package_knows_its_version_entry_points_and_recipes(built):
    _, _, site = built
    out = installed(
        site,
        "import importlib.metadata as m, lxdspawner, lxdspawner.recipes as r;"
        f"d = m.distribution({DIST!r});"
        "eps = {e.name: e.load() for e in d.entry_points if e.group == 'jupyterhub.spawners'};"
        "assert eps == {'lxd': lxdspawner.LxdSpawner, 'incus': lxdspawner.LxdSpawner}, eps;"
        "print(lxdspawner.__file__); print(d.version); print(r.images_dir());"
        "print(r.ensure_image_command('jupyter-base', config='/etc/jupyterhub/c.py'))",
    )
    module, version, images, command = out.splitlines()
    assert Path(module).is_relative_to(site), "lxdspawner was imported from the checkout"
    assert version == VERSION
    assert Path(images) == site / "lxdspawner" / "images"
    assert (Path(images) / "ensure-image.sh").stat().st_mode & stat.S_IXUSR
    assert command.endswith(" image build -f /etc/jupyterhub/c.py")
    # `lxdspawner --version`, from the installed package.
    assert installed(site, "from lxdspawner.cli import main; main(['--version'])") == (
        f"lxdspawner {VERSION}"
    )


def test_the_version_is_written_once():
    """pyproject.toml reads it from the package; nothing else in the tree repeats it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert VERSION not in pyproject
    assert f'__version__ = "{VERSION}"' in (ROOT / "lxdspawner" / "__init__.py").read_text()


def test_lxdspawner_version(capsys):
    from lxdspawner.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"lxdspawner {VERSION}\n"


def test_configs_of_the_original_spawner_keep_importing():
    """The original LXD spawner lived in lxdspawner/lxdspawner.py: its spawner_class resolves."""
    from jupyterhub.app import JupyterHub
    from traitlets.config import Config

    config = Config()
    config.JupyterHub.spawner_class = "lxdspawner.lxdspawner.LxdSpawner"
    hub = JupyterHub(config=config)
    assert hub.spawner_class is lxdspawner.LxdSpawner
    for name in ("lxdspawner.LxdSpawner", "lxd", "incus"):
        config.JupyterHub.spawner_class = name
        assert JupyterHub(config=config).spawner_class is lxdspawner.LxdSpawner


def test_the_build_command_in_messages():
    """Copied into a root shell: the command of the hub's virtualenv, quoted names."""
    from lxdspawner import recipes

    command = recipes.lxdspawner_command()
    assert Path(command) == Path(sys.executable).parent / "lxdspawner"
    assert recipes.ensure_image_command("jupyter-base") == f"sudo {command} image build"
    assert recipes.ensure_image_command("jupyter-base", config="/etc/jupyterhub/c.py") == (
        f"sudo {command} image build -f /etc/jupyterhub/c.py"
    )
    assert recipes.ensure_image_command("lxdspawner-tiny", "lxd") == (
        f"sudo {command} image build lxdspawner-tiny --endpoint unix:///var/lib/lxd/unix.socket"
    )
    # An image the package has no recipe for (an operator's alias, or worse): built from the
    # operator's recipe under that alias, quoted.
    assert recipes.ensure_image_command("x; rm -rf /", config="/h.py", remote="lab") == (
        f"sudo {command} image build RECIPE.yaml --alias 'x; rm -rf /' -f /h.py --remote lab"
    )
