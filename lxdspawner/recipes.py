"""Where the image recipes and their build scripts are, in the checkout or the installed package.

The recipes (``jupyter-base``, ``lxdspawner-tiny``) and the scripts that build and import them
(``build-image.sh``, ``build-custom.sh``, ``ensure-image.sh``, ``lib.sh``) are package data under
``lxdspawner/images/``, so a pip user has them without the checkout; error messages and the
command line find them through :func:`images_dir` rather than a path relative to a checkout
the operator may not have. Messages name the command that builds them,
``lxdspawner image build`` (:func:`ensure_image_command`).
"""

from __future__ import annotations

import shlex
import sys
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


def ensure_image_command(
    image: str = "jupyter-base", daemon: str = "incus", *, config: str = "", remote: str = ""
) -> str:
    """The shell command an operator runs to build and import ``image``, for messages:
    ``lxdspawner image build`` (:mod:`lxdspawner.imagebuild`).

    ``config`` is the hub's config file: the command then imports where the hub looks (its
    default remote, or ``remote`` of its ``remotes``). Without it, a LXD daemon (``daemon``)
    is named by its socket. An image the package has no recipe for is built from the
    operator's own recipe file, under that alias. The build runs as root (``sudo``, which
    resets PATH, so the command is named by its path in the hub's virtualenv).
    """
    args = ["sudo", lxdspawner_command(), "image", "build"]
    if image not in IMAGE_NAMES:
        args += ["RECIPE.yaml", "--alias", image]
    elif image != "jupyter-base":
        args.append(image)
    if config:
        args += ["-f", config] + (["--remote", remote] if remote else [])
    elif daemon == "lxd":
        args += ["--endpoint", "unix:///var/lib/lxd/unix.socket"]
    return shlex.join(args)


def lxdspawner_command() -> str:
    """The ``lxdspawner`` command beside this Python (the hub's virtualenv), else its name."""
    beside = Path(sys.executable).parent / "lxdspawner"
    return str(beside) if beside.is_file() else "lxdspawner"


def hub_config_file() -> str:
    """The running hub's config file (absolute), or "" outside a hub or when it has none."""
    try:
        from jupyterhub.app import JupyterHub

        if JupyterHub.initialized():
            path = Path(JupyterHub.instance().config_file)
            if path.is_file():
                return str(path.resolve())
    except Exception:  # noqa: S110 (a hint for a message: never worth failing it)
        pass
    return ""
