"""Deleting a server's container after stop() has returned, so users do not wait for it.

Once the server has exited, the container still has to power off and LXD has to tear it down
(about half a second) before it can be deleted. stop() returns when the server has exited, as
JupyterHub's local-process spawner does once the process is gone, and the rest goes on here.
A new start of the same server waits for it. JupyterHub cancels every task when it exits, so
an exit handler finishes whatever is left: no container is left behind stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
from collections.abc import Callable

from .lxd import LxdClient, LxdError, NotFound

#: An endpoint as the spawner keys it: (endpoint, project, client cert, client key, server cert).
EndpointKey = tuple[str, str, str, str, str]


class Removals:
    """The deletions in progress, for all the spawners of a hub."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[EndpointKey, str], asyncio.Task] = {}

    def start(
        self,
        client: LxdClient,
        endpoint: EndpointKey,
        name: str,
        *,
        stop_timeout: float,
        log: logging.Logger,
        on_deleted: Callable[[], None] = lambda: None,
    ) -> None:
        key = (endpoint, name)
        self._tasks[key] = asyncio.ensure_future(
            self._run(client, key, stop_timeout, log, on_deleted)
        )

    def pending(self, endpoint: EndpointKey, name: str) -> bool:
        return (endpoint, name) in self._tasks

    async def wait(self, endpoint: EndpointKey, name: str) -> None:
        """Until the deletion of ``name`` has ended (whether it worked or not)."""
        task = self._tasks.get((endpoint, name))
        if task is not None:
            with contextlib.suppress(Exception):  # a container left over is deleted anyway
                await asyncio.shield(task)

    async def _run(
        self,
        client: LxdClient,
        key: tuple[EndpointKey, str],
        stop_timeout: float,
        log: logging.Logger,
        on_deleted: Callable[[], None],
    ) -> None:
        _unfinished.add(key)
        _finish_at_exit.register()
        try:
            await delete_once_stopped(client, key[1], stop_timeout)
        except asyncio.CancelledError:
            raise  # left in _unfinished for the exit handler
        except LxdError as e:
            _unfinished.discard(key)
            log.warning("deleting %s after its server stopped: %s", key[1], e.message)
        else:
            _unfinished.discard(key)
            on_deleted()
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]


async def delete_once_stopped(client: LxdClient, name: str, stop_timeout: float) -> None:
    """Wait for the container to power off (by force after stop_timeout), then delete it."""
    try:
        await client.shut_down(name, timeout=stop_timeout)
    except NotFound:
        return
    await client.delete_stopped_instance(name)


#: (endpoint, instance name) of deletions that have not finished yet.
_unfinished: set[tuple[EndpointKey, str]] = set()


class _FinishAtExit:
    registered = False

    def register(self) -> None:
        if not self.registered:
            atexit.register(self)
            self.registered = True

    def __call__(self, timeout: float = 60.0) -> None:
        pending = sorted(_unfinished)
        if pending:
            with contextlib.suppress(Exception):
                asyncio.run(asyncio.wait_for(_finish(pending), timeout))


async def _finish(pending: list[tuple[EndpointKey, str]]) -> None:
    for endpoint in {e for e, _ in pending}:
        address, project, cert, key, server_cert = endpoint
        async with LxdClient(
            address, project=project, client_cert=cert, client_key=key, server_cert=server_cert
        ) as client:
            names = [name for e, name in pending if e == endpoint]
            results = await asyncio.gather(
                *(client.remove_instance(n) for n in names), return_exceptions=True
            )
            for name, result in zip(names, results, strict=True):
                if isinstance(result, BaseException):
                    # The hub's log is closed by now: say it where its output goes.
                    print(f"lxdspawner: could not delete {name} on exit: {result}", file=sys.stderr)


_finish_at_exit = _FinishAtExit()
