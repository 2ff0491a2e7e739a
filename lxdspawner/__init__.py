"""lxdspawner: a JupyterHub spawner running each user's server in an Incus or LXD container."""

# The one place the version is written: pyproject.toml reads it (without importing the package)
# and `lxdspawner --version` prints it. Its changes are in CHANGELOG.md.
__version__ = "0.1.0"

from .spawner import LxdSpawner  # noqa: E402  (after __version__, which modules may import)

__all__ = ["LxdSpawner", "__version__"]
