"""The unit tier runs in process: no daemon, no hub, no network, seconds in all.

- Every test fails that reaches a daemon's local socket (the tier has fakes for that:
  ``tests/unit/fakes.py``); every test carries the marker ``nodaemon``, so
  ``scripts/run-tests.sh`` runs the tier beside the daemon tiers.
- ``fake``: an in-memory Incus daemon (``FakeLxd``) with one image.
- ``quick_sleeps(module)``: the module's ``asyncio.sleep`` returns at once, and records the
  delays asked for (retry loops and backoffs are tested without waiting them out).
- ``make_daemon(fake)``: a :class:`~lxdspawner.daemon.Daemon` whose client is ``fake``; its
  background work (deletions, stops retried, the orphan reaper, the cache) ends with the
  test, and no deletion cut short is left to the hub's exit handler.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import IMAGE, FakeLxd  # noqa: E402

from lxdspawner import removals  # noqa: E402
from lxdspawner.cache import InstanceCache  # noqa: E402
from lxdspawner.daemon import Daemon  # noqa: E402
from lxdspawner.lxd import Remote  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if f"{Path(__file__).parent}" in str(item.fspath):
            item.add_marker(pytest.mark.nodaemon)


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch):
    """A test that connects to a local daemon's socket fails, whatever it catches."""
    reached: list[str] = []
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family == socket.AF_UNIX and str(address).endswith("unix.socket"):
            reached.append(str(address))
            raise PermissionError(f"the unit tier may not reach a daemon ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert not reached, f"a unit test reached a daemon: {reached}"


@pytest.fixture
async def cache(fake):
    """The instance cache, following ``fake``."""
    view = InstanceCache(fake)
    await view.start(timeout=5)
    yield view
    await view.stop()


@pytest.fixture
def fake() -> FakeLxd:
    daemon = FakeLxd()
    daemon.add_image(IMAGE, "jupyter-base", directories={"/opt/jupyterhub", "/usr"})
    return daemon


class QuickAsyncio:
    """The asyncio module as one module under test sees it: sleeps return at once."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result=None):
        self.slept.append(delay)
        await asyncio.sleep(0)
        return result


@pytest.fixture
def quick_sleeps(monkeypatch):
    def patch(module) -> QuickAsyncio:
        quick = QuickAsyncio()
        monkeypatch.setattr(module, "asyncio", quick)
        return quick

    return patch


@pytest.fixture
async def make_daemon(monkeypatch):
    monkeypatch.setattr(removals._finish_at_exit, "register", lambda: None)
    made: list[Daemon] = []

    def make(fake: FakeLxd, **settings) -> Daemon:
        settings.setdefault("timeout", fake.timeout)
        daemon = Daemon(Remote(fake.endpoint), connect=fake.connect, **settings)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        tasks = [*daemon.removals._tasks.values(), *daemon.stops._tasks.values()]
        if daemon.members._reaper is not None:
            tasks.append(daemon.members._reaper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await daemon.close()
        removals._unfinished.difference_update(
            {key for key in removals._unfinished if key[0] == daemon.remote}
        )
