"""Is the server up: its HTTP(S) answer, checked from the hub host as the proxy will reach it.

JupyterHub checks the server's URL itself after start() with a growing back-off; when we know
the moment it answers, that check succeeds at once. And a server that dies on start is
reported with its own last words (the end of its log) instead of a bare timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp

from .daemon import Daemon, DaemonError

#: One connection pool for every readiness check of the hub.
_session: aiohttp.ClientSession | None = None


async def wait_http(
    daemon: Daemon, name: str, url: str, *, tls: ssl.SSLContext | bool, timeout: float
) -> None:
    """Return once ``url`` answers (any status below 500); DaemonError with the server's log
    when its container stops meanwhile, or after ``timeout`` seconds (http_timeout)."""
    global _session
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    next_check = loop.time() + 1
    delay = 0.05
    while True:
        if await _answers(_session, url, tls):
            return
        now = loop.time()
        if now >= next_check:
            next_check = now + 1
            if await daemon.status(name) != "Running":
                raise DaemonError(
                    f"the server in {name} exited while starting; "
                    + await daemon.server_log_tail(name)
                )
        if now > deadline:
            raise DaemonError(
                f"the server in {name} did not answer at {url} within {timeout:g} s "
                "(http_timeout); " + await daemon.server_log_tail(name)
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.1)


async def _answers(session: aiohttp.ClientSession, url: str, tls: Any) -> bool:
    try:
        async with session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=2), ssl=tls
        ) as response:
            return response.status < 500
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


def hub_client_ssl() -> ssl.SSLContext | bool:
    """TLS for the readiness check under internal_ssl: the hub's own client certificate and
    CA, as JupyterHub's check uses (the server asks for a client certificate)."""
    from jupyterhub.app import JupyterHub
    from jupyterhub.utils import make_ssl_context

    app = JupyterHub.instance() if JupyterHub.initialized() else None
    if app is None or not app.internal_ssl:
        return False
    return make_ssl_context(app.internal_ssl_key, app.internal_ssl_cert, cafile=app.internal_ssl_ca)
