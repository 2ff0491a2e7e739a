"""Where the image recipes and their build scripts are, in the checkout or the installed package.

The recipes (``jupyter-base``, ``lxdspawner-tiny``) and the scripts that build and import them
(``ensure-image.sh``, ``build-image.sh``, ``lib.sh``) are package data under
``lxdspawner/images/``, so a pip user has them without the checkout; error messages and the
command line name them through :func:`images_dir` rather than a path relative to a checkout
the operator may not have.
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

#: The images the package has recipes for.
IMAGE_NAMES = ("jupyter-base", "lxdspawner-tiny")


def images_dir() -> Path:
    """The directory holding the recipes and scripts, as a real path.

    The scripts run as programs, so they must be files on disk: an installation whose package
    is not a directory (imported from a zip) has no such path and gets a clear error.
    """
    where = resources.files("lxdspawner").joinpath("images")
    path = Path(str(where))
    if not (path / "ensure-image.sh").is_file():
        raise FileNotFoundError(
            f"the image recipes are not on disk at {path} (is lxdspawner installed from a zip?): "
            "install the jupyterhub-lxdspawner package with pip"
        )
    return path


def ensure_image_command(image: str = "jupyter-base", daemon: str = "incus") -> str:
    """The shell command an operator runs to build and import ``image``, for messages.

    An image the package has no recipe for gets the command for the default ``jupyter-base``.
    The build runs as root (``sudo``, which drops the environment), and ``jupyter-base`` is
    built for the hub's JupyterHub version, so the command carries ``JUPYTERHUB_VERSION``: a
    pip user's hub is in a virtualenv the script cannot guess.
    """
    if image not in IMAGE_NAMES:
        image = "jupyter-base"
    try:
        script = str(images_dir() / "ensure-image.sh")
    except FileNotFoundError:
        script = "lxdspawner/images/ensure-image.sh"
    args = ["sudo"]
    if image == "jupyter-base":
        args += ["env", f"JUPYTERHUB_VERSION={_jupyterhub_version()}"]
    args += [script, image] + ([daemon] if daemon != "incus" else [])
    return shlex.join(args)


def _jupyterhub_version() -> str:
    """The version of the JupyterHub installed beside us (the hub's)."""
    import jupyterhub

    return jupyterhub.__version__
