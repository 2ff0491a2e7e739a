"""A spawn's progress events, as JupyterHub's ``Spawner.progress()`` streams them to the spawn
page: each event once, in order, and the stream ends when the spawn has."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class Progress:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._done = False

    def emit(self, message: str, progress: int | None = None) -> None:
        event: dict[str, Any] = {"message": message}
        if progress is not None:
            event["progress"] = progress
        self._events.append(event)
        self._changed.set()

    def finish(self) -> None:
        self._done = True
        self._changed.set()

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if self._done:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass
