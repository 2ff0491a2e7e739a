"""lxdspawner: a JupyterHub spawner running each user's server in an Incus or LXD container."""

from .spawner import LxdSpawner

__all__ = ["LxdSpawner"]
__version__ = "0.1.0"
