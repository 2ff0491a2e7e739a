"""The original LXD spawner's module path, ``lxdspawner.lxdspawner``, kept for its configs.

The original ``lxc``-CLI spawner defined ``LxdSpawner`` in ``lxdspawner/lxdspawner.py``, so
configs written for it may say ``c.JupyterHub.spawner_class =
"lxdspawner.lxdspawner.LxdSpawner"``. This module lets them import unchanged: the class is
ours (the same object as ``lxdspawner.LxdSpawner``, so ``c.LxdSpawner`` settings apply), and
its option names keep their meanings (see README.md, "Configs of the original LXD spawner").
"""

from .spawner import LxdSpawner

__all__ = ["LxdSpawner"]
