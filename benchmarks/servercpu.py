"""Where the CPU of a server's start goes: in a container against a local process.

Issue 15 read "the server inside the container needed 3.99 s of CPU to start against 2.76 s as
a local process" from ``benchmarks.spawn``. That figure is, for lxdspawner, the container's
whole cgroup (``cpuacct.usage``: its boot, systemd and every unit, and the server), and for
the floor the server's process tree. This gives the container's figure with user and system
time, its cgroups below it if the container's systemd made any in the cpuacct hierarchy
(with cgroup v1 it does not), and its processes alive, each with its own CPU (the server,
systemd, resolved, networkd, journald, udevd; what exited during the boot is the rest),
beside the floor's server; and times the server's imports alone (``python -c "import
..."``, process CPU, 3 runs each after a warm-up) inside a running container (its
``/opt/jupyterhub`` and ``/usr`` being the shared read-only volumes) and on the host (the
floor's virtualenv, the same packages)::

    .venv/bin/python -m benchmarks.servercpu             # 3 spawns per setup, ~2 minutes
    .venv/bin/python -m benchmarks.servercpu --reps 5 --json cpu.json

Same two hubs as ``benchmarks.spawn`` (``setups.py``); run as root on a machine set up by
``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lxdspawner import names
from lxdspawner.lxd import LxdClient

from . import benchlib as bl
from .measure import IDLE_WAIT, spawn, stop
from .setups import (
    FLOOR_VENV,
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

try:
    import psutil
except ImportError:  # pragma: no cover - jupyterhub depends on it
    psutil = None

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
TICK = os.sysconf("SC_CLK_TCK")
RUNS_DIR = REPO / ".cache" / "bench"
# What jupyterhub-singleuser imports before it serves (JupyterLab's app pulls in the rest).
IMPORTS = "import jupyterhub.singleuser, jupyter_server.serverapp, jupyterlab.labapp"
IMPORT_TIMER = (
    "import time, resource; t = time.process_time(); " + IMPORTS + "; "
    "r = resource.getrusage(resource.RUSAGE_SELF); "
    "print(round(time.process_time() - t, 3), round(r.ru_utime, 3), round(r.ru_stime, 3))"
)


def _cgroup_cpu(path: Path) -> dict[str, float]:
    """usage (s), user and system (s) of one cpuacct cgroup."""
    out = {"usage_s": int((path / "cpuacct.usage").read_text()) / 1e9}
    for line in (path / "cpuacct.stat").read_text().splitlines():
        key, value = line.split()
        out[f"{key}_s"] = int(value) / TICK
    return out


def container_cpu(name: str) -> dict[str, Any]:
    """The container's cgroup and its children with their own CPU, the processes alive."""
    root = CPUACCT / f"lxc.payload.{name}"
    if not root.is_dir():
        return {}
    found: dict[str, Any] = {"total": _cgroup_cpu(root), "cgroups": {}}
    for sub in sorted(p for p in root.rglob("*") if (p / "cpuacct.usage").exists()):
        rel = str(sub.relative_to(root))
        cpu = _cgroup_cpu(sub)
        if cpu["usage_s"] >= 0.01:
            found["cgroups"][rel] = cpu
    procs = {}
    if psutil is not None:
        for procs_file in root.rglob("cgroup.procs"):
            for pid in procs_file.read_text().split():
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(int(pid))
                    t = p.cpu_times()
                    procs[f"{pid} {p.name()}"] = (round(t.user, 2), round(t.system, 2))
    found["processes"] = procs
    return found


def tree_cpu(pid: int) -> dict[str, float]:
    """User and system CPU of a local server's process tree."""
    if psutil is None:
        return {}
    root = psutil.Process(pid)
    user = system = 0.0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            user += t.user
            system += t.system
    return {"usage_s": user + system, "user_s": user, "system_s": system}


async def one(setup: Setup, user: str) -> dict:
    await setup.hub.ensure_user(user)
    result = await spawn(setup, user)
    await asyncio.sleep(IDLE_WAIT)
    state = result["state"]
    if setup.key == "floor":
        pid = state.get("pid") or (await setup.hub.server_model(user) or {}).get("state", {})["pid"]
        cpu = tree_cpu(pid)
    else:
        cpu = container_cpu(state.get("instance") or names.instance_name(user, "", PREFIX))
    return {"spawn_s": result["total_s"], "cpu": cpu, "state": state}


async def import_times(client: LxdClient, name: str, runs: int = 3) -> dict[str, list]:
    """The server's imports alone, inside the container (as the server's uid) and on the
    host (the floor's virtualenv), after one warm-up run each."""
    inside, host = [], []
    uid = 1000  # the server's (the benchmark's users are not the host's: default_uid)
    for i in range(runs + 1):
        r = await client.exec(
            name,
            ["/opt/jupyterhub/bin/python", "-c", IMPORT_TIMER],
            user=uid,
            group=uid,
            cwd="/tmp",
            timeout=120,
        )
        if i:
            inside.append(r.output.strip())
        proc = await asyncio.create_subprocess_exec(
            str(FLOOR_VENV / "bin" / "python"), "-c", IMPORT_TIMER,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/tmp",
        )  # fmt: skip
        out, _ = await proc.communicate()
        if i:
            host.append(out.decode(errors="replace").strip())
    return {"container": inside, "host": host}


def _median(records: list[dict], *path: str) -> float | None:
    values = []
    for r in records:
        v: Any = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(v)
    return bl.median(values)


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    client = await LxdClient.connect()
    try:
        await remove_our_containers(client)
        await remove_our_volumes(client)
        requirements, _ = await image_requirements(client)
        singleuser = ensure_floor_venv(requirements)
        results: dict[str, Any] = {"floor": [], "lxd": []}
        async with running_setups(client, workdir, singleuser, args.lxd_config) as (floor, lxd):
            for s in (floor, lxd):  # untimed warm-up
                await s.hub.ensure_user("warmup")
                await spawn(s, "warmup")
                await stop(s, "warmup")
            for rep in range(args.reps):
                for s in (floor, lxd) if rep % 2 == 0 else (lxd, floor):
                    rec = await one(s, f"cpu{rep}")
                    results[s.key].append(rec)
                    cpu = rec["cpu"].get("total", rec["cpu"])
                    say(
                        f"{s.key:5s} cpu{rep}: {bl.fmt(rec['spawn_s'])} s, CPU "
                        f"{bl.fmt(cpu.get('usage_s'))} s (user {bl.fmt(cpu.get('user_s'))}, "
                        f"system {bl.fmt(cpu.get('system_s'))})"
                    )
                    if s.key == "lxd" and rep == args.reps - 1:
                        name = rec["state"].get("instance")
                        results["imports"] = await import_times(client, name)
                        blame = await client.exec(
                            name,
                            ["sh", "-c", "systemd-analyze; systemd-analyze blame | head -n 15"],
                            timeout=30,
                        )
                        results["systemd_analyze"] = blame.output
                    await stop(s, f"cpu{rep}")
        return results
    finally:
        await client.close()


def summary(results: dict) -> str:
    lines = []
    f, x = results["floor"], results["lxd"]
    lines.append(
        f"floor server tree: {bl.fmt(_median(f, 'cpu', 'usage_s'))} s CPU "
        f"(user {bl.fmt(_median(f, 'cpu', 'user_s'))}, "
        f"system {bl.fmt(_median(f, 'cpu', 'system_s'))})"
    )
    lines.append(
        f"lxd container:     {bl.fmt(_median(x, 'cpu', 'total', 'usage_s'))} s CPU "
        f"(user {bl.fmt(_median(x, 'cpu', 'total', 'user_s'))}, "
        f"system {bl.fmt(_median(x, 'cpu', 'total', 'system_s'))})"
    )
    groups = sorted({g for r in x for g in r["cpu"].get("cgroups", {})})
    for g in groups:
        lines.append(
            f"  {g}: {bl.fmt(_median([r['cpu']['cgroups'] for r in x], g, 'usage_s'))} s "
            f"(user {bl.fmt(_median([r['cpu']['cgroups'] for r in x], g, 'user_s'))}, "
            f"system {bl.fmt(_median([r['cpu']['cgroups'] for r in x], g, 'system_s'))})"
        )
    if "imports" in results:
        lines.append(f"imports, process CPU / user / system (s): {json.dumps(results['imports'])}")
    if "systemd_analyze" in results:
        lines.append(results["systemd_analyze"])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="spawns per setup (default 3)")
    parser.add_argument("--lxd-config", default="", help="extra lines for lxdspawner's hub")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the Incus socket, and the floor's servers run as root)")
        return 2
    workdir = RUNS_DIR / ("servercpu-" + time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_swept(lambda: run(args, workdir), workdir)
    if results is None:
        return 130
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
