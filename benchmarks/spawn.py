"""lxdspawner against the local-process floor and DockerSpawner: spawn, burst, stop, memory,
the class changeover, idle servers, polling, loop lag.

Run it from the repository's root with the project's venv, as root, on a machine set up by
``make test`` (Incus running, the ``jupyter-base`` image imported, configurable-http-proxy in
``.cache/node``)::

    .venv/bin/python -m benchmarks.spawn --quick                  # a few minutes
    .venv/bin/python -m benchmarks.spawn --json out.json --plot out.png   # the full run

Real JupyterHubs, each behind a real configurable-http-proxy (`testbench.hubtools`), run
side by side for the whole run: the **floor** (``SimpleLocalProcessSpawner``, the image's
own server as a local process), **lxd** (``LxdSpawner`` with the ``jupyter-base`` image),
the peer **docker** (``DockerSpawner`` on Debian's docker.io with an image imported from the
same root file system, `dockerbench`) and **lxdpool** (``LxdSpawner`` with a warm pool);
see ``setups.py``. ``--setups`` and ``--scenarios`` pick which run and what is measured
(`benchlib.parse_setups`, `benchlib.parse_scenarios`). Repetitions alternate between the
setups (each goes first in turn) so that machine noise hits all of them. What is measured
is in ``measure.py``; the figures, the report and the plot in ``report.py``. This module is
the driver: the command line and the order of the phases. Between the single spawns and
the bursts, the volume phase (lxd only) spawns a user without a home volume, a user's first
spawn (which creates it) and that user again with the volume there, in turns.

Everything (servers, containers, hubs, proxies) is cleaned up at the end, also on Ctrl-C.
The hubs' logs stay in ``.cache/bench/<timestamp>/`` for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lxdspawner.lxd import LxdClient

from . import benchlib as bl
from . import database, dockerbench
from .measure import (
    BURST_SIZE,
    IDLE_WAIT,
    burst_rep,
    changeover_rep,
    idle_phase,
    other_instances,
    poll_phase,
    pool_memory,
    single_rep,
    spawn,
    stop,
    volume_rep,
    wait_pool,
)
from .report import analyse, loop_by_database, plot, report
from .setups import (
    BENCH_HUB_ID,
    FLOOR_VENV,
    IMAGE,
    LOOP_DEBUG_CONFIG,
    LOOP_RESOLUTION,
    POLL_INTERVAL,
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

RUNS_DIR = REPO / ".cache" / "bench"


def _git_head() -> str:
    """The commit the spawner ran from, with a mark if its files had local changes."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "lxdspawner"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + (" + uncommitted changes in lxdspawner/" if dirty else "")


def _spawner_imported_from(workdir: Path) -> str:
    """Where the hubs' Python imports lxdspawner from, run as hubtools runs the hub (same
    interpreter and environment, another directory): an editable install of another checkout
    would otherwise go unnoticed."""
    return subprocess.run(
        [sys.executable, "-c", "import lxdspawner; print(lxdspawner.__file__)"],
        capture_output=True,
        text=True,
        cwd=workdir,
    ).stdout.strip()


def _python_version(python: Path) -> str:
    return subprocess.run([str(python), "-V"], capture_output=True, text=True).stdout.strip()


async def db_round(
    args: argparse.Namespace,
    client: LxdClient,
    workdir: Path,
    singleuser: Path,
    db: str,
    full: bool,
    cluster: database.Cluster | None,
    meta: dict,
    peer: dockerbench.Peer | None = None,
) -> tuple[tuple[Any, ...], dict | None]:
    """Both hubs on one database (``--db``), fresh: the warm-up and the bursts, and in the
    first (``full``) round the single spawns, the volume phase and the polling phase too.

    Every round starts alike: no container or home volume of an earlier round left (the
    bursts' users would otherwise find their volumes), new hub directories, and on
    PostgreSQL the hubs' databases dropped and created again. Returns the round and, from
    the full one, the polling phase's figures.
    """
    if not full:
        await remove_our_containers(client)
        await remove_our_volumes(client)
        shutil.rmtree(workdir / "floor-homes", ignore_errors=True)
    poll = None
    db_configs = {}
    if db == "postgresql":
        assert cluster is not None
        db_configs = {
            key: database.db_config(database.reset_database(cluster, key)) for key in meta["setups"]
        }
    reps, volume_reps, bursts = meta["reps"], meta["volume_reps"], meta["bursts"]
    scenarios = meta["scenarios"]
    if not full and peer is not None:
        dockerbench.remove_our_containers()
    hubdir = workdir / db if len(meta["databases"]) > 1 else workdir
    say(f"round on {db}: hubs in {hubdir}")
    async with running_setups(
        client,
        workdir,
        singleuser,
        args.lxd_config,
        hubdir=hubdir,
        db_configs=db_configs,
        extra_config=(LOOP_DEBUG_CONFIG if args.loop_debug else "")
        + (f"\n# --hub-config\n{args.hub_config}\n" if args.hub_config else ""),
        docker=peer,
        pool_size=meta["pool_size"] if "lxdpool" in meta["setups"] else 0,
    ) as setups:
        floor, lxd = setups[:2]

        def turn(i: int) -> list[Setup]:
            """The setups in the order of repetition i: each goes first in turn."""
            k = i % len(setups)
            return [*setups[k:], *setups[:k]]

        say("warm-up (not counted): one spawn and stop each")
        for s in setups:
            await s.hub.ensure_user("warmup")
            w = await spawn(s, "warmup")
            await stop(s, "warmup")
            say(f"warm-up {s.key}: {w['total_s']:.2f} s")
            waited = await wait_pool(s)
            if waited is not None:
                say(f"lxdpool: {s.pool_size} pool members ready {waited:.0f} s after the warm-up")
                await asyncio.sleep(IDLE_WAIT)
                sizes = await pool_memory(s)
                s.data["pool_memory_bytes"] = sizes
                say(
                    f"lxdpool: idle memory of the pool: {bl.fmt(bl.median(sizes), 'MiB')} MiB "
                    f"per member (median of {len(sizes)}), {sum(sizes) / 2**20:.0f} MiB in all"
                )
        if full and "single" in scenarios:
            # The spawner registers its counter with its first client.
            say(f"LXD API request counter: {(await lxd.api_requests())[1]}")
            for i in range(reps):
                for s in turn(i):
                    await single_rep(s, f"s{i:02d}", f"single {i + 1}/{reps}")
                    await wait_pool(s)
        if full and "volumes" in scenarios:
            for i in range(volume_reps):
                await volume_rep(lxd, i, f"volume {i + 1}/{volume_reps}")
        # The other rounds of --db compare the hubs' bursts of 10 only.
        if "burst10" in scenarios or not full:
            for b in range(bursts):
                for s in turn(b):
                    await burst_rep(s, b, f"{db} burst {b + 1}/{bursts}")
                    await wait_pool(s)
        for size in (30, 50):
            if full and f"burst{size}" in scenarios:
                for s in turn(size):
                    await burst_rep(s, 0, f"burst of {size}", size)
                    await wait_pool(s)
        if full and "changeover" in scenarios:
            for b in range(bursts):
                for s in turn(b + 1):
                    await changeover_rep(s, b, f"changeover {b + 1}/{bursts}")
                    await wait_pool(s)
        if full and "idle100" in scenarios:
            for s in setups:  # one at a time: their servers together would not fit
                await idle_phase(s, meta["idle_servers"], max(meta["poll_cycles"], 3))
                await wait_pool(s)
        if full and "poll" in scenarios and meta["poll_cycles"]:
            poll = await poll_phase(lxd, meta["poll_cycles"], workdir)
    return (db, *setups), poll


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    reps = args.reps or (3 if args.quick else 10)
    volume_reps = reps if args.volume_reps is None else args.volume_reps
    bursts = args.bursts or (1 if args.quick else 3)
    poll_cycles = (3 if args.quick else 6) if args.poll_cycles is None else args.poll_cycles
    dbs = database.databases(args.db)
    scenarios = bl.parse_scenarios(args.scenarios, args.quick)
    setup_keys = bl.parse_setups(args.setups, args.quick)
    pool_size = bl.pool_size_for(scenarios, args.pool_size)
    if not pool_size and "lxdpool" in setup_keys:
        setup_keys.remove("lxdpool")
    peer = None
    cluster = None
    if "postgresql" in dbs:
        cluster = database.ensure_postgresql(say)
        database.ensure_role(cluster)
        say(f"PostgreSQL {cluster.version}/{cluster.name}, port {cluster.port}: {database.ROLE}")
    client = await LxdClient.connect()
    try:
        removed = await remove_our_containers(client)
        if removed:
            say(f"removed leftover containers of an earlier run: {removed}")
        volumes, in_use = await remove_our_volumes(client)
        if volumes:
            say(f"removed {len(volumes)} home volumes of an earlier run (hub {BENCH_HUB_ID})")
        if in_use:
            say(f"warning: volumes of hub {BENCH_HUB_ID} in use by someone else, kept: {in_use}")
        imported_from = _spawner_imported_from(workdir)
        if not imported_from.startswith(str(REPO / "lxdspawner")):
            say(
                f"warning: the hub imports lxdspawner from {imported_from or '?'}, not from "
                f"{REPO}: set PYTHONPATH={REPO}"
            )
        requirements, fingerprint = await image_requirements(client)
        singleuser = ensure_floor_venv(requirements)
        if "docker" in setup_keys:
            cached = requirements.parent / "rootfs.squashfs"
            fp_file = requirements.parent / "fingerprint"
            same = fp_file.exists() and fp_file.read_text().strip() == fingerprint
            peer = dockerbench.prepare(workdir, fingerprint, cached if same else None, say)
        info = await client.server_info()
        env = info.get("environment") or {}
        versions = {
            line.split("==")[0].lower(): line.split("==")[1]
            for line in requirements.read_text().splitlines()
            if "==" in line
        }
        meta = {
            "mode": "quick" if args.quick else "full",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "reps": reps,
            "volume_reps": volume_reps,
            "bursts": bursts,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "daemon": f"{env.get('server', '?')} {env.get('server_version', '?')}",
            "storage": env.get("storage"),
            "image": IMAGE,
            "image_fingerprint": fingerprint,
            "requirements": str(requirements),
            "jupyterhub_singleuser": versions.get("jupyterhub"),
            "jupyterlab": versions.get("jupyterlab"),
            "floor_python": _python_version(FLOOR_VENV / "bin" / "python"),
            "workdir": str(workdir),
            "loadavg_start": os.getloadavg(),
            "other_running_instances_start": await other_instances(client),
            "poll_interval_s": POLL_INTERVAL,
            "loop_resolution_s": LOOP_RESOLUTION,
            "lxd_config_extra": args.lxd_config,
            "lxdspawner_commit": _git_head(),
            "lxdspawner_imported_from": imported_from,
            "hub_id": BENCH_HUB_ID,
            "databases": dbs,
            "postgresql": f"{cluster.version}/{cluster.name}" if cluster else None,
            "loop_debug": args.loop_debug,
            "hub_config_extra": args.hub_config,
            "poll_cycles": poll_cycles,
            "scenarios": scenarios,
            "setups": setup_keys,
            "pool_size": pool_size,
            "idle_servers": args.idle_servers,
            "docker": (
                {
                    "image": peer.image,
                    "daemon": peer.daemon.version,
                    "bridge": peer.gateway,
                    "dockerd_started_by_benchmark": peer.daemon.started_here,
                }
                if peer
                else None
            ),
        }
        say(
            f"{meta['mode']} run: {reps} single reps, {volume_reps} volume reps, {bursts} "
            f"burst(s) of {BURST_SIZE} and changeover(s) (as the scenarios say); "
            f"{meta['daemon']}, jupyterhub {meta['jupyterhub_singleuser']}, jupyterlab "
            f"{meta['jupyterlab']}; load {meta['loadavg_start'][0]:.1f}, "
            f"{meta['other_running_instances_start']} other running instances; spawner at "
            f"{meta['lxdspawner_commit']}; logs in {workdir}; setups {', '.join(setup_keys)}; "
            f"scenarios {', '.join(scenarios)}"
        )
        poll = None
        rounds: list[tuple[Any, ...]] = []
        for i, db in enumerate(dbs):
            done, polled = await db_round(
                args, client, workdir, singleuser, db, i == 0, cluster, meta, peer
            )
            rounds.append(done)
            poll = poll or polled
        meta["loadavg_end"] = os.getloadavg()
        meta["other_running_instances_end"] = await other_instances(client)
        _, floor, lxd, *others = rounds[0]
        result = analyse(floor, lxd, poll, meta)
        for s in others:
            result["raw"][s.key] = s.data
            result["failures"][s.key] = s.data.get("failures", [])
        result["peer"] = bl.peer_summary({s.key: s.data for s in rounds[0][1:]})
        result["databases"] = loop_by_database(rounds)
        result["raw_rounds"] = {db: {s.key: s.data for s in ss} for db, *ss in rounds[1:]}
        for db, *ss in rounds[1:]:
            for s in ss:
                result["failures"].setdefault(s.key, [])
                result["failures"][s.key] += [f"{db}: {e}" for e in s.data.get("failures", [])]
        return result
    finally:
        await client.close()
        if peer is not None:
            dockerbench.finish(peer, say)
        if cluster is not None:
            try:
                database.drop_all(cluster, tuple(setup_keys))
            except SystemExit as e:  # the run's own outcome matters more
                say(f"clean-up of PostgreSQL: {e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 reps, 1 burst: a few minutes")
    parser.add_argument("--reps", type=int, help="single spawn/stop repetitions per setup")
    parser.add_argument("--bursts", type=int, help="bursts of 10 per setup")
    parser.add_argument(
        "--volume-reps",
        type=int,
        help="home-volume repetitions (lxd: no volume, first spawn, existing volume); "
        "default: as --reps, 0 skips them",
    )
    parser.add_argument(
        "--lxd-config",
        default="",
        help="extra lines for lxdspawner's hub config, for experiments "
        """(e.g. 'c.LxdSpawner.extra_instance_config = {"limits.cpu.priority": "1"}')""",
    )
    parser.add_argument(
        "--hub-config",
        default="",
        help="extra lines for both hubs' config, after the database's (e.g. database settings "
        "to compare: the config can test c.JupyterHub.db_url)",
    )
    parser.add_argument(
        "--poll-cycles",
        type=int,
        help="poll intervals of the polling phase (20 servers); default 3 (quick) or 6, 0 skips it",
    )
    parser.add_argument(
        "--db",
        choices=database.DB_CHOICES,
        default="sqlite",
        help="the hubs' database: sqlite (a file, the default), postgresql (Debian's, installed "
        "and started when missing) or both (a round of bursts on each; the first round, "
        "PostgreSQL's, also runs the other phases)",
    )
    parser.add_argument(
        "--loop-debug",
        action="store_true",
        help="a watchdog in each hub samples its stack while its event loop is held (20 ms "
        "or more) and the report names the code that held it (benchmarks/loopwatch.py)",
    )
    parser.add_argument(
        "--scenarios",
        help="comma-separated, of: "
        + ", ".join(bl.SCENARIOS)
        + f"; default: all, or with --quick {','.join(bl.QUICK_SCENARIOS)}",
    )
    parser.add_argument(
        "--setups",
        help=f"comma-separated, of: {', '.join(bl.SETUPS)} (default: all, with --quick "
        f"{','.join(bl.QUICK_SETUPS)}; floor and lxd always "
        "run); docker is DockerSpawner on Debian's docker.io, started by the benchmark; lxdpool "
        "is lxdspawner with a warm pool (--pool-size)",
    )
    parser.add_argument(
        "--idle-servers",
        type=int,
        default=100,
        help="servers of the idle100 scenario (default 100; one setup at a time)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        help="lxdpool's warm_pool_size (default: the largest burst of the scenarios; 0 drops "
        "the lxdpool setup)",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--plot", type=Path, help="draw spawn-time distributions to this PNG")
    args = parser.parse_args()
    try:
        bl.parse_scenarios(args.scenarios, args.quick)
        bl.parse_setups(args.setups, args.quick)
        bl.pool_size_for([], args.pool_size)
    except ValueError as e:
        parser.error(str(e))

    if os.geteuid() != 0:
        print("run as root (the Incus socket, and the floor's servers run as root)")
        return 2
    workdir = RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_swept(lambda: run(args, workdir), workdir)
    if result is None:
        return 130
    print()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        say(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
    failed = any(result["failures"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
