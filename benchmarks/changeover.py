"""A class changeover: a burst of 10 users, all stopped, and 2 s later a burst of 10 others.

Issue 15 measured the second burst at 38 s against 24 s for the first (floor 20 to 29 s):
the second burst's creates and pushes ran while the daemon was deleting the first burst's
containers. This reproduces it on the same two hubs as ``benchmarks.spawn`` (``setups.py``:
the local-process floor and lxdspawner, each behind its own proxy) and prints, per setup, the
first and the second burst's wall time and the ratios against the floor; for lxdspawner also
each spawn's steps (its ``timings {...}`` log line) and the daemon's lifecycle events of our
containers (``incus monitor --type=lifecycle``), so what overlapped with what can be read::

    .venv/bin/python -m benchmarks.changeover            # 1 changeover per setup, ~4 minutes
    .venv/bin/python -m benchmarks.changeover --reps 2 --json changeover.json
    .venv/bin/python -m benchmarks.changeover --lxd-config 'c.LxdSpawner.removal_delay = 10'

Run as root on a machine set up by ``make test``, like ``benchmarks.spawn``. The setups
alternate (which goes first too); before each changeover the previous containers are gone
(deleted and no longer listed), so every changeover starts alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from lxdspawner.lxd import LxdClient

from . import benchlib as bl
from .measure import spawn, stop
from .setups import (
    PREFIX,
    REPO,
    Setup,
    ensure_floor_venv,
    image_requirements,
    remove_our_containers,
    remove_our_volumes,
    run_swept,
    running_setups,
    say,
)

BURST = 10
GAP_S = 2.0  # between the last stop's answer and the second burst's POSTs
RUNS_DIR = REPO / ".cache" / "bench"


async def _ensure_user(setup: Setup, user: str) -> None:
    """The proxy closes a keep-alive connection idle for 5 s (node's default), which the
    waits here can exceed: the first request after one may find it closed."""
    try:
        await setup.hub.ensure_user(user)
    except aiohttp.ServerDisconnectedError:
        await setup.hub.ensure_user(user)


async def _burst(setup: Setup, users: list[str]) -> dict:
    for u in users:
        await _ensure_user(setup, u)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(spawn(setup, u) for u in users), return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    return {
        "wall_s": (max(r["t_end"] for r in ok) - t0) if ok else None,
        "per_user_s": sorted(r["total_s"] for r in ok),
        "failed": errors,
        "users": [r["user"] for r in ok],
    }


async def _stop_all(setup: Setup, users: list[str]) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(stop(setup, u) for u in users), return_exceptions=True)
    return time.perf_counter() - t0


async def _our_instances(client: LxdClient) -> list[str]:
    names = [i.rsplit("/", 1)[-1].split("?")[0] for i in await client.list_instances(recursion=0)]
    return [n for n in names if n.startswith(PREFIX + "-")]


async def _wait_no_instances(client: LxdClient, timeout: float = 180) -> float:
    """Until the daemon lists none of our containers (the background deletions ended)."""
    t0 = time.perf_counter()
    while await _our_instances(client):
        if time.perf_counter() - t0 > timeout:
            say(f"still there after {timeout:.0f} s: {await _our_instances(client)}")
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - t0


def kernel_cpu() -> dict[str, float]:
    """CPU seconds so far of btrfs' kernel threads (the cleaner drops deleted subvolumes, with
    their quota accounting; the transaction thread commits), of the Incus daemon's processes
    alive (their own time), and the time some task waited for I/O
    (``/proc/pressure/io``)."""
    found: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])  # utime stime
            key = {
                "btrfs-cleaner": "btrfs_cleaner",
                "btrfs-transaction": "btrfs_transaction",
                "incusd": "incusd",
            }.get(comm)
            if key:
                found[key] = found.get(key, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError, ValueError):
        some = Path("/proc/pressure/io").read_text().splitlines()[0]
        found["io_wait_some"] = int(some.rsplit("total=", 1)[1]) / 1e6
    return found


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a.get(k, 0.0), 2) for k in b}


def _open_write(path: Path):
    return open(path, "wb")  # the caller's with-block closes it


class Lifecycle:
    """The daemon's lifecycle events, as JSON lines in a file, while the block runs."""

    def __init__(self, path: Path):
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Lifecycle:
        cli = shutil.which("incus")
        if cli:
            with _open_write(self.path) as out:
                self.proc = await asyncio.create_subprocess_exec(
                    cli, "monitor", "--type=lifecycle", "--format=json",
                    stdout=out, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            await asyncio.sleep(0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    def events(self, since: float) -> list[tuple[float, str, str]]:
        """(epoch, action, instance) of our instances' events from ``since`` on."""
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        found = []
        decoder = json.JSONDecoder()
        i = 0
        while i < len(text):
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            try:
                event, i = decoder.raw_decode(text, i)
            except ValueError:
                break
            meta = event.get("metadata") or {}
            source = str(meta.get("source", ""))
            name = source.rsplit("/", 1)[-1].split("?")[0]
            if not name.startswith(PREFIX + "-"):
                continue
            ts = _epoch(str(event.get("timestamp", "")))
            if ts is not None and ts >= since:
                found.append((ts, str(meta.get("action", "")), name))
        return sorted(found)


def _epoch(stamp: str) -> float | None:
    """An event's RFC 3339 timestamp (nanoseconds, Z or an offset) → epoch seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    if m is None:
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    whole = datetime.fromisoformat(m.group(1) + zone).timestamp()
    return whole + float(m.group(2) or 0)


def _overlap(events: list[tuple[float, str, str]], start: float, end: float) -> dict:
    """How many of the first burst's deletions happened inside [start, end]."""
    deleted = [t for t, action, _ in events if action == "instance-deleted"]
    inside = [t for t in deleted if start <= t <= end]
    return {
        "deleted_total": len(deleted),
        "deleted_during_second_burst": len(inside),
        "last_deletion_after_second_post_s": (max(deleted) - start) if deleted else None,
    }


async def changeover(
    setup: Setup, client: LxdClient, rep: int, lifecycle: Lifecycle, sync: bool = False
) -> dict:
    first = [f"c{rep}a{j:02d}" for j in range(BURST)]
    second = [f"c{rep}b{j:02d}" for j in range(BURST)]
    offset = setup.log_offset()
    k0 = kernel_cpu()
    a = await _burst(setup, first)
    k1 = kernel_cpu()
    a["stop_s"] = await _stop_all(setup, a["users"])
    if sync:  # the experiment: the first burst's dirty data written out before the second
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("sync")
        await proc.wait()
        a["sync_s"] = time.perf_counter() - t
    await asyncio.sleep(GAP_S)
    wall_b = time.time()
    k2 = kernel_cpu()
    b = await _burst(setup, second)
    k3 = kernel_cpu()
    wall_b_end = time.time()
    a["kernel_cpu_s"] = _delta(k0, k1)
    b["kernel_cpu_s"] = _delta(k2, k3)
    b["stop_s"] = await _stop_all(setup, b["users"])
    record: dict[str, Any] = {"first": a, "second": b}
    if setup.key == "lxd":
        log = setup.log_since(offset)
        timings = bl.spawn_timings(log)
        for burst, users in ((a, first), (b, second)):
            steps = [timings[u]["timings"] for u in users if u in timings]
            burst["steps_max_s"] = {
                k: max(s.get(k, 0.0) for s in steps) for k in ("create", "push", "start", "ipv4")
            }
            burst["steps_median_s"] = {
                k: bl.median([s[k] for s in steps if k in s])
                for k in ("create", "push", "start", "ipv4", "server")
            }
        record["lifecycle"] = _overlap(lifecycle.events(wall_b - 120), wall_b, wall_b_end)
        k4 = kernel_cpu()
        record["all_deleted_after_s"] = await _wait_no_instances(client)
        await asyncio.sleep(5)  # the cleaner drops the last subvolumes after their deletion
        record["kernel_cpu_after_s"] = _delta(k4, kernel_cpu())
    return record


def _line(key: str, rec: dict) -> str:
    a, b = rec["first"], rec["second"]
    text = (
        f"{key:5s}: first burst {bl.fmt(a['wall_s'])} s, second {bl.fmt(b['wall_s'])} s "
        f"(x{bl.fmt(bl.ratio(b['wall_s'], a['wall_s']), '')}), stops {bl.fmt(a['stop_s'])} s"
        + (f", sync {bl.fmt(a['sync_s'])} s" if "sync_s" in a else "")
    )
    if "steps_max_s" in b:
        text += (
            f"\n       max create/push/start/ipv4: first {_steps(a['steps_max_s'])}, "
            f"second {_steps(b['steps_max_s'])}"
            f"\n       median create/push/start/ipv4/server: first {_steps(a['steps_median_s'])}, "
            f"second {_steps(b['steps_median_s'])}"
            f"\n       deletions of the first burst during the second: "
            f"{rec['lifecycle']['deleted_during_second_burst']}"
            f"\n       CPU during the first burst {a['kernel_cpu_s']}"
            f"\n       CPU during the second burst {b['kernel_cpu_s']}"
        )
    failed = a["failed"] + b["failed"]
    if failed:
        text += f"\n       FAILED: {failed[:3]}"
    return text


def _steps(steps: dict) -> str:
    return "/".join(bl.fmt(v, "") for v in steps.values())


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    client = await LxdClient.connect()
    try:
        await remove_our_containers(client)
        await remove_our_volumes(client)
        requirements, _ = await image_requirements(client)
        singleuser = ensure_floor_venv(requirements)
        results: dict[str, list] = {"floor": [], "lxd": []}
        async with (
            running_setups(client, workdir, singleuser, args.lxd_config) as (floor, lxd),
            Lifecycle(workdir / "lifecycle.jsonl") as lifecycle,
        ):
            # Untimed warm-up: the first spawn of a hub (and of an image) is not a class's.
            for s in (floor, lxd):
                await _ensure_user(s, "warmup")
                await spawn(s, "warmup")
                await stop(s, "warmup")
            await _wait_no_instances(client)
            for rep in range(args.reps):
                order = (floor, lxd) if rep % 2 == 0 else (lxd, floor)
                for s in order:
                    rec = await changeover(s, client, rep, lifecycle, args.sync)
                    results[s.key].append(rec)
                    say(f"changeover {rep}: " + _line(s.key, rec))
        return results
    finally:
        await client.close()


def summary(results: dict) -> str:
    lines = []
    for which in ("first", "second"):
        f = bl.median([r[which]["wall_s"] for r in results["floor"] if r[which]["wall_s"]])
        x = bl.median([r[which]["wall_s"] for r in results["lxd"] if r[which]["wall_s"]])
        lines.append(
            f"{which} burst of {BURST}: floor {bl.fmt(f)} s, lxd {bl.fmt(x)} s, "
            f"lxd/floor {bl.fmt(bl.ratio(x, f), '')}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1, help="changeovers per setup (default 1)")
    parser.add_argument("--lxd-config", default="", help="extra lines for lxdspawner's hub")
    parser.add_argument(
        "--sync",
        action="store_true",
        help="an experiment: sync(1) after the first burst's stops, before the 2 s gap",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the Incus socket, and the floor's servers run as root)")
        return 2
    workdir = RUNS_DIR / ("changeover-" + time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"logs in {workdir}")
    results = run_swept(lambda: run(args, workdir), workdir)
    if results is None:
        return 130
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
