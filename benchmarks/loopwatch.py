"""A watchdog of the hub's event loop, for ``--loop-debug``: which code holds the loop.

JupyterHub's loop-lag metric (and its "Event loop was unresponsive" log line) says how long
the loop was held, not by what. This runs inside the hub (its configuration imports it): a
callback on the loop writes a heartbeat every few milliseconds, and a thread samples the main
thread's stack (``sys._current_frames``) every few milliseconds while the heartbeat is older
than the threshold. Each sample is a line on the hub's standard error, so in its log::

    loopwatch: held 0.034 s: engine/default.py:922 do_commit < jupyterhub/app.py:2705 f

(the innermost frame, then the innermost frame of JupyterHub's or lxdspawner's own code on
the stack: the work, and who asked for it). A sample stands for one interval of a held loop,
so counting the samples of a place estimates how long it held the loop. A sampler thread
costs far less than asyncio's debug mode (which records a traceback at every task's
creation), so the lags of a run with it stay close to those of a run without.

`where` and `parse` are pure (unit-tested); `start` is what the hub runs.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence

PREFIX = "loopwatch: "
#: Code of the hub's own that a sample is attributed to (the innermost frame from one of
#: these directories), besides the innermost frame itself.
APP_PACKAGES = ("jupyterhub", "lxdspawner")

_LINE = re.compile(r"^" + PREFIX + r"held ([\d.]+) s: (.*)$", re.M)


def _short(filename: str, lineno: int | None, name: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    return f"{'/'.join(parts[-2:])}:{lineno} {name}"


def where(stack: Sequence[tuple[str, int | None, str]]) -> str:
    """One sample's place: ``leaf < app`` from a stack of (filename, line, function),
    outermost first (as `traceback.extract_stack` lists them)."""
    if not stack:
        return "?"
    leaf = _short(*stack[-1])
    for filename, lineno, name in reversed(stack):
        directories = filename.replace("\\", "/").split("/")[:-1]
        if any(d in APP_PACKAGES for d in directories):
            app = _short(filename, lineno, name)
            return leaf if app == leaf else f"{leaf} < {app}"
    return leaf


def parse(log: str) -> list[tuple[str, float]]:
    """``(place, held s)`` of every sample line in a hub's log."""
    return [(m.group(2).strip(), float(m.group(1))) for m in _LINE.finditer(log)]


def top(samples: Iterable[tuple[str, float]], interval: float, n: int = 10) -> list[dict]:
    """The places that held the loop most: samples, the time they stand for, and the
    longest hold they were seen in."""
    by: dict[str, list[float]] = {}
    for place, held in samples:
        by.setdefault(place, []).append(held)
    rows = [
        {"where": p, "samples": len(v), "held_s": len(v) * interval, "longest_s": max(v)}
        for p, v in by.items()
    ]
    return sorted(rows, key=lambda r: -r["samples"])[:n]


def start(threshold: float = 0.02, interval: float = 0.005) -> threading.Thread:
    """Watch the running loop from a daemon thread (call it in the loop: the hub's config
    is read inside ``initialize()``)."""
    import traceback

    loop = asyncio.get_running_loop()
    main = threading.get_ident()
    beat = [time.monotonic()]

    def tick() -> None:
        beat[0] = time.monotonic()
        loop.call_later(interval, tick)

    def watch() -> None:
        while not loop.is_closed():  # the hub's loop closes as it exits (a test's sooner)
            time.sleep(interval)
            held = time.monotonic() - beat[0]
            if held < threshold:
                continue
            frame = sys._current_frames().get(main)
            if frame is None:
                return
            stack = [(f.filename, f.lineno, f.name) for f in traceback.extract_stack(frame)]
            print(f"{PREFIX}held {held:.3f} s: {where(stack)}", file=sys.stderr, flush=True)

    tick()
    thread = threading.Thread(target=watch, name="loopwatch", daemon=True)
    thread.start()
    return thread
