"""internal_ssl: the server's certificate, for the address its container got.

JupyterHub signs the server's certificate before start() for the names it knows; the hub then
checks it against the address start() returns, which DHCP gives only once the container has
booted. So the certificate is signed again, with that address among its names, and pushed
into the container (LxdSpawner.move_certs says where).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from .lxd import LxdClient


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def install(spawner: Any, client: LxdClient, name: str, gid: int, ip: str) -> None:
    """Sign a certificate for ``ip`` with the hub's CA (``spawner.create_certs``) and push it
    with its key and the CA bundle: root's, readable by the server's group ``gid`` (the key:
    0640; nobody else)."""
    alt_names = spawner.ssl_alt_names
    if callable(alt_names):
        alt_names = alt_names(spawner)
        if inspect.isawaitable(alt_names):
            alt_names = await alt_names
    spawner.ssl_alt_names = [*alt_names, f"IP:{ip}"]
    try:
        made = await spawner.create_certs()
    finally:
        spawner.ssl_alt_names = list(alt_names)
    targets = await spawner.move_certs(made)
    await client.make_directory(name, spawner.SSL_DIR, uid=0, gid=gid, mode=0o750)
    for key, mode in (("keyfile", 0o640), ("certfile", 0o644), ("cafile", 0o644)):
        data = await asyncio.to_thread(_read, made[key])
        await client.push_file(name, targets[key], data, uid=0, gid=gid, mode=mode)
