"""The wheel a pip user gets, built here offline, and a virtualenv that has it installed.

The wheel is built from a copy of the tree (the build writes its own directories, and several
test runs share the checkout) through setuptools' PEP 517 backend without build isolation, so
nothing is downloaded. :func:`venv_with_wheel` installs it with pip into a fresh virtualenv;
the dependencies (JupyterHub, aiohttp...) come from this interpreter's site-packages through a
``.pth`` line, which adds that directory to the path but runs none of its own ``.pth`` files:
the checkout's editable install (a ``.pth`` finder there) stays out, so ``lxdspawner`` is
imported from the wheel and nothing else. Installing the dependencies from PyPI would test
PyPI, not us, and the containers' network rules forbid it anyway.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAN_BUILD = (
    "import setuptools.build_meta;"
    "from importlib.metadata import version;"
    "import importlib.util as u;"
    "v = tuple(int(x) for x in version('setuptools').split('.')[:2]);"
    "assert v >= (70, 1) or u.find_spec('wheel')"
)


def builder() -> str | None:
    """An interpreter whose setuptools can build a wheel without downloading anything: the
    venv's own when it can (setuptools 70.1 or later, or the wheel package), else Debian's."""
    for python in (sys.executable, "/usr/bin/python3"):
        if shutil.which(python) and subprocess.run([python, "-c", CAN_BUILD]).returncode == 0:
            return python
    return None


def build(tmp: Path, hooks: tuple[str, ...] = ("build_wheel", "build_sdist")) -> Path:
    """Build the distributions of the checkout in ``tmp``; the directory that holds them.
    Raises RuntimeError when no interpreter here can build offline."""
    python = builder()
    if python is None:
        raise RuntimeError(
            "no interpreter here has setuptools>=70.1 or wheel: pip install 'setuptools>=70.1'"
        )
    src, out = tmp / "src", tmp / "dist"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "lxdspawner", src / "lxdspawner", ignore=shutil.ignore_patterns("__pycache__")
    )
    for hook in hooks:  # one process each, as build frontends do
        subprocess.run(
            [python, "-c", f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])", out],
            cwd=src,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out


def venv_with_wheel(tmp: Path) -> Path:
    """A virtualenv in ``tmp/venv`` with the freshly built wheel pip-installed (and this
    interpreter's dependencies, see the module's docstring); its directory."""
    (wheel,) = build(tmp / "build", ("build_wheel",)).glob("*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return venv
