"""What the spawn benchmark measures on each setup, one phase at a time.

- single spawn: REST ``POST`` of the server until the hub reports it ready (progress stream,
  then the user model) and a first request through the proxy (``GET /user/<name>/api/status``
  with a token) answers 200;
- stop: ``DELETE`` until the hub reports the server gone (a 204, else the user model);
- idle memory per server, ~5 s after the first request: LXD's ``memory.usage`` of the
  container (``GET /1.0/instances/<name>/state``) vs the RSS of the local server's process tree;
- burst: 10 (30, 50) users started at once, wall time until all are ready (same criterion),
  then all stopped at once;
- class changeover: a burst of 10, stopped, and 2 s later the next class's 10 (a teacher's
  next lesson), both bursts' wall times;
- idle servers (``idle100``): many servers left idle, their memory, the hub's CPU per
  second, the API requests per poll per server, one more user's spawn, all stopped at once;
- DockerSpawner's containers (docker): memory and CPU from their cgroups, as LXD's figures
  are; lxdpool: its pool filled again before each measurement (`wait_pool`) and the pool's
  idle memory;
- lxd only, home volumes: a spawn without a volume (a ``novol-*`` user), a user's first spawn
  (which creates the volume) and the same user's spawn after a stop (the volume exists);
- lxd only: LXD API requests per poll cycle per server with 20 servers running (a counter
  read from the hub's ``/hub/metrics``), the hub's event-loop lag p99 during the bursts
  (JupyterHub's ``jupyterhub_event_loop_interval_seconds``), and where a spawn's time goes,
  from the spawner's ``(timings {...})`` log line.

Each phase records into its `Setup`'s ``data``; ``report.py`` makes the figures from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from lxdspawner import names
from lxdspawner.lxd import LxdClient, LxdError, NotFound
from lxdspawner.ownership import KEY_HUB, KEY_POOL, KEY_USER
from testbench import hubtools

from . import benchlib as bl
from . import dockerbench, loopwatch
from .setups import (
    LOOP_RESOLUTION,
    NO_VOLUME_PREFIX,
    OUR_PREFIXES,
    POLL_INTERVAL,
    POOL_HUB_ID,
    PREFIX,
    Setup,
    our_volumes,
    say,
)

try:
    import psutil
except ImportError:  # pragma: no cover - jupyterhub depends on it
    psutil = None

IDLE_WAIT = 5.0
SERVER_LOG = "/var/log/jupyterhub-singleuser.log"  # lxdspawner's, in the container
SERVER_UNIT = "jupyterhub-singleuser.service"
BURST_SIZE = 10
POLL_SERVERS = 20
LOOP_METRIC = "jupyterhub_event_loop_interval_seconds"


# -- spawn and stop --------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


async def spawn(setup: Setup, user: str, timeout: float = 300) -> dict:
    """POST the server; return when the hub says ready and a proxied request answers."""
    hub = setup.hub
    path = hubtools.server_api_path(user)
    wall0 = time.time()
    t0 = time.perf_counter()
    status, body = await hub.api("POST", path, json={}, timeout=timeout)
    t_post = time.perf_counter()
    if status not in (201, 202):
        events = await hub.progress_events(user, timeout=10)
        failed = [e.get("message") for e in events if e.get("failed")]
        raise BenchError(f"{setup.key} spawn of {user}: POST {status} {failed or body}")
    events = await hub.progress_events(user, timeout=timeout)
    failed = [e.get("message") for e in events if e.get("failed")]
    if failed:
        raise BenchError(f"{setup.key} spawn of {user} failed: {failed[-1]}")
    while True:
        server = await hub.server_model(user)
        if server and server.get("ready"):
            break
        if server is None or server.get("pending") is None:
            raise BenchError(f"{setup.key} spawn of {user}: not running ({server})")
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"{setup.key} spawn of {user}: not ready in {timeout} s")
        await asyncio.sleep(0.02)
    t_ready = time.perf_counter()
    url = server["url"] + "api/status"
    last = None
    while True:
        try:
            code, text = await hub.get_via_proxy(url, timeout=30)
            if code == 200:
                break
            last = f"{code} {text[:200]}"
        except Exception as e:  # noqa: BLE001 - retried, reported below
            last = repr(e)
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"{setup.key} {user}: {url} through the proxy: {last}")
        await asyncio.sleep(0.02)
    t_end = time.perf_counter()
    return {
        "user": user,
        "wall0": wall0,
        "t0": t0,
        "t_end": t_end,
        "post_s": t_post - t0,
        "ready_s": t_ready - t0,
        "total_s": t_end - t0,
        "state": server.get("state") or {},
    }


async def stop(setup: Setup, user: str, timeout: float = 300) -> dict:
    """DELETE the server; return when the hub reports it gone."""
    hub = setup.hub
    path = hubtools.server_api_path(user)
    t0 = time.perf_counter()
    status, body = await hub.api("DELETE", path, timeout=timeout)
    if status not in (202, 204):
        raise BenchError(f"{setup.key} stop of {user}: DELETE {status} {body}")
    if status == 202:  # still stopping after the hub's slow_stop_timeout
        while (await hub.server_model(user)) is not None:
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"{setup.key} stop of {user}: still there after {timeout} s")
            await asyncio.sleep(0.05)
    t_end = time.perf_counter()
    return {"user": user, "t0": t0, "t_end": t_end, "total_s": t_end - t0, "status": status}


# -- memory and CPU --------------------------------------------------------------------------


def _tree_memory(pids: list[int]) -> dict:
    rss = uss = pss = 0
    cpu = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            full = p.memory_full_info()
            times = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += full.rss
        uss += getattr(full, "uss", 0)
        pss += getattr(full, "pss", 0)
        cpu += times.user + times.system
    return {"rss": rss, "uss": uss, "pss": pss, "processes": len(pids), "cpu_s": cpu}


def _cgroup_stat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line)}


async def memory(setup: Setup, user: str, state: dict) -> dict:
    """Idle memory of one server: the container's (LXD) or the process tree's RSS.

    Also, for the analysis: the CPU time the server (or the whole container, boot included)
    has used so far, which is what it cost to start it.
    """
    if setup.key == "floor":
        pid = state.get("pid")
        if not pid:
            model = await setup.hub.server_model(user)
            pid = ((model or {}).get("state") or {}).get("pid")
        if not pid or psutil is None:
            return {"bytes": None}
        try:
            root = psutil.Process(pid)
            pids = [pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {"bytes": None}
        tree = _tree_memory(pids)
        return {"bytes": tree["rss"], **tree}
    if setup.key == "docker":
        return _docker_memory(state)
    name = state.get("instance") or names.instance_name(user, "", PREFIX)
    st = await setup.lxd.instance_state(name)
    mem = st.get("memory") or {}
    detail: dict[str, Any] = {
        "bytes": mem.get("usage"),
        "usage_peak": mem.get("usage_peak"),
        "instance": name,
        "lxd_processes": st.get("processes"),
    }
    # What the same bytes are made of (cgroup v1 on this machine; v2 names as a fallback),
    # and the RSS of the container's processes as the host sees them, which is the figure
    # comparable with the floor's.
    cg = Path("/sys/fs/cgroup/memory") / f"lxc.payload.{name}"
    with contextlib.suppress(OSError, ValueError):
        stat = _cgroup_stat(cg / "memory.stat")
        detail["cgroup_anon"] = stat.get("total_rss", stat.get("anon", 0))
        detail["cgroup_cache"] = stat.get("total_cache", stat.get("file", 0))
        detail["cgroup_inactive_file"] = stat.get("total_inactive_file", 0)
        # Kubernetes' "working set": usage minus what the kernel can drop first.
        if detail["bytes"] is not None:
            detail["working_set"] = detail["bytes"] - detail["cgroup_inactive_file"]
        with contextlib.suppress(OSError, ValueError):
            detail["cgroup_kmem"] = int((cg / "memory.kmem.usage_in_bytes").read_text())
        pids = []
        for procs in cg.rglob("cgroup.procs"):
            pids += [int(x) for x in procs.read_text().split()]
        if psutil is not None:
            tree = _tree_memory(pids)
            detail.update({f"procs_{k}": v for k, v in tree.items()})
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if "jupyterhub-singleuser" in " ".join(proc.cmdline()):
                        times = proc.cpu_times()
                        detail["server_rss"] = proc.memory_info().rss
                        detail["server_cpu_s"] = times.user + times.system
    with contextlib.suppress(OSError, ValueError):
        usage = Path("/sys/fs/cgroup/cpuacct") / f"lxc.payload.{name}" / "cpuacct.usage"
        detail["cpu_s"] = int(usage.read_text()) / 1e9
    return detail


def _docker_memory(state: dict) -> dict:
    """A DockerSpawner container's memory and CPU from its cgroups (v1, as Incus's): the
    same figures as lxdspawner's container (usage, working set, processes' RSS)."""
    cid = state.get("object_id") or state.get("container_id")
    if not cid:
        return {"bytes": None}
    detail: dict[str, Any] = {"bytes": None, "container": cid[:12]}
    cg = dockerbench.container_cgroup(cid, "memory")
    if cg is not None:
        with contextlib.suppress(OSError, ValueError):
            detail["bytes"] = int((cg / "memory.usage_in_bytes").read_text())
            stat = _cgroup_stat(cg / "memory.stat")
            detail["cgroup_anon"] = stat.get("total_rss", 0)
            detail["cgroup_cache"] = stat.get("total_cache", 0)
            detail["cgroup_inactive_file"] = stat.get("total_inactive_file", 0)
            detail["working_set"] = detail["bytes"] - detail["cgroup_inactive_file"]
            pids = []
            for procs in cg.rglob("cgroup.procs"):
                pids += [int(x) for x in procs.read_text().split()]
            if psutil is not None:
                tree = _tree_memory(pids)
                detail.update({f"procs_{k}": v for k, v in tree.items()})
                detail["server_rss"] = tree["rss"]
    cpu = dockerbench.container_cgroup(cid, "cpuacct")
    if cpu is not None:
        with contextlib.suppress(OSError, ValueError):
            detail["cpu_s"] = int((cpu / "cpuacct.usage").read_text()) / 1e9
    return detail


def cpu_seconds(proc: Any, children: bool = True) -> float | None:
    """User + system CPU seconds of a process (and its reaped children), None if unknown."""
    if proc is None or psutil is None:
        return None
    try:
        if not isinstance(proc, psutil.Process):
            proc = psutil.Process(proc)
        t = proc.cpu_times()
        own = t.user + t.system
        return own + t.children_user + t.children_system if children else own
    except psutil.Error:
        return None


# -- the phases ------------------------------------------------------------------------------


async def container_diagnostics(setup: Setup, user: str, state: dict) -> dict:
    """When the server in the container started listening (its own log), and, once per run,
    how the container booted (systemd-analyze). The benchmark's own client: not counted."""
    name = state.get("instance") or names.instance_name(user, "", PREFIX)
    found: dict[str, Any] = {}
    with contextlib.suppress(LxdError):
        text = (await setup.lxd.read_file(name, SERVER_LOG)).decode(errors="replace")
        found["server_running_at"] = bl.first_running_at(text)
    if "boot_analysis" not in setup.data:
        analysis = {}
        for key, argv in (
            ("summary", ["systemd-analyze"]),
            ("critical_chain", ["systemd-analyze", "critical-chain", "--no-pager", SERVER_UNIT]),
            ("blame", ["sh", "-c", "systemd-analyze blame --no-pager | head -n 12"]),
        ):
            with contextlib.suppress(LxdError):
                r = await setup.lxd.exec(name, argv, timeout=30)
                analysis[key] = r.output
        setup.data["boot_analysis"] = analysis
    return found


def cpu_snapshot(setup: Setup) -> dict[str, float | None]:
    """CPU seconds used so far by the hub, the proxy and the container daemon.

    The hub's own time only: the floor's servers are the hub's children and would otherwise
    be counted when reaped. The daemon is shared with whatever else runs on the machine.
    """
    hub = setup.hub
    return {
        "hub": cpu_seconds(hub._hub.pid if hub._hub else None, children=False),
        "proxy": cpu_seconds(hub._proxy.pid if hub._proxy else None, children=False),
        "daemon": cpu_seconds(setup.daemon) if setup.key != "floor" else None,
    }


def cpu_delta(a: dict, b: dict) -> dict[str, float | None]:
    return {k: (b[k] - a[k]) if None not in (a[k], b.get(k)) else None for k in a}


async def _spawn_or_note(setup: Setup, user: str, label: str) -> dict | None:
    """One spawn's figures; a failed spawn is noted in the setup's failures (and its server
    stopped), and gives None."""
    try:
        return await spawn(setup, user)
    except Exception as e:
        setup.add("failures", f"{label}: {e}")
        say(f"{label} {setup.key:5s} {user}: SPAWN FAILED: {e}")
        with contextlib.suppress(Exception):
            await setup.hub.stop_server(user)
        return None


async def single_rep(setup: Setup, user: str, label: str) -> None:
    """One spawn, idle memory, one stop; the hub log segment is kept for the breakdown."""
    await setup.hub.ensure_user(user)
    offset = setup.log_offset()
    is_lxd = setup.key == "lxd"
    req0 = (await setup.api_requests())[0] if is_lxd else None
    load = os.getloadavg()[0]
    cpu0 = cpu_snapshot(setup)
    s = await _spawn_or_note(setup, user, label)
    if s is None:
        return
    cpu1 = cpu_snapshot(setup)
    req1 = (await setup.api_requests())[0] if is_lxd else None
    await asyncio.sleep(IDLE_WAIT)
    try:
        mem = await memory(setup, user, s["state"])
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        mem = {"bytes": None, "error": repr(e)}
    extra = await container_diagnostics(setup, user, s["state"]) if is_lxd else {}
    req2 = (await setup.api_requests())[0] if is_lxd else None
    cpu2 = cpu_snapshot(setup)
    st = await stop(setup, user)
    cpu3 = cpu_snapshot(setup)
    req3 = (await setup.api_requests())[0] if is_lxd else None
    segment = setup.log_since(offset)
    record = {
        "user": user,
        "spawn_s": s["total_s"],
        "ready_s": s["ready_s"],
        "post_s": s["post_s"],
        "wall0": s["wall0"],
        "stop_s": st["total_s"],
        "stop_status": st["status"],
        "memory": mem,
        "cpu_spawn_s": cpu_delta(cpu0, cpu1),
        "cpu_stop_s": cpu_delta(cpu2, cpu3),
        "loadavg1": load,
        "hub_took_s": (bl.hub_took(segment).get(user) or (None, None))[1],
        "hub_stop_took_s": (bl.hub_took(segment, stop=True).get(user) or (None, None))[1],
    }
    if is_lxd:
        record.update(extra)
        record["spawner"] = bl.spawn_timings(segment).get(user)
        if None not in (req0, req1, req2, req3):
            record["api_requests_spawn"] = req1 - req0
            record["api_requests_idle"] = req2 - req1
            record["api_requests_stop"] = req3 - req2
    else:
        record["server_running_at"] = bl.first_running_at(segment)
    setup.add("single", record)
    mib = (mem.get("bytes") or 0) / 2**20
    server_cpu = mem.get("cpu_s")
    say(
        f"{label} {setup.key:5s} {user}: spawn {s['total_s']:.2f} s (ready {s['ready_s']:.2f})"
        f", idle memory {mib:.0f} MiB, server CPU {bl.fmt(server_cpu)} s, stop "
        f"{st['total_s']:.2f} s, load {load:.1f}"
    )


# -- home volumes (lxd only) -----------------------------------------------------------------

#: The three spawns of a volume repetition, in turns: each kind comes first, second and
#: last once every three repetitions ("existing" always after "first": it is the same user).
VOLUME_ORDERS = (
    ("none", "first", "existing"),
    ("first", "none", "existing"),
    ("first", "existing", "none"),
)
VOLUME_SETTLE = 1.0


async def _home_volume(setup: Setup, user: str) -> dict | None:
    name = names.home_volume_name(user, "", PREFIX)
    for pool, volume in await our_volumes(setup.lxd):
        if volume["name"] == name:
            return {**volume, "pool": pool}
    return None


async def _wait_gone(setup: Setup, user: str, timeout: float = 60) -> float:
    """Wait until the stopped server's container is deleted (it goes in the background after
    stop() returns; a new start of the same server would wait for it). Seconds waited."""
    name = names.instance_name(user, "", PREFIX)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            await setup.lxd.get_instance(name)
        except NotFound:
            break
        await asyncio.sleep(0.1)
    return time.perf_counter() - t0


async def volume_spawn(setup: Setup, user: str, kind: str, rep: int, label: str) -> None:
    """One spawn of the volume phase and its stop; then the container is let go entirely,
    so that every spawn of the phase starts from the same state."""
    await setup.hub.ensure_user(user)
    before = await _home_volume(setup, user)
    expected_before = kind == "existing"
    offset = setup.log_offset()
    load = os.getloadavg()[0]
    s = await _spawn_or_note(setup, user, f"{label} {kind}")
    if s is None:
        return
    after = await _home_volume(setup, user)
    st = await stop(setup, user)
    waited = await _wait_gone(setup, user)
    segment = setup.log_since(offset)
    record = {
        "kind": kind,
        "rep": rep,
        "user": user,
        "spawn_s": s["total_s"],
        "ready_s": s["ready_s"],
        "post_s": s["post_s"],
        "wall0": s["wall0"],
        "stop_s": st["total_s"],
        "deleted_after_stop_s": waited,
        "loadavg1": load,
        "volume_before": before is not None,
        "volume_after": after is not None,
        "volume": (after or {}).get("name"),
        "spawner": bl.spawn_timings(segment).get(user),
    }
    if (before is not None) != expected_before or (after is not None) != (kind != "none"):
        problem = (
            f"{label} {kind} {user}: home volume before/after the spawn: "
            f"{before is not None}/{after is not None}"
        )
        setup.add("failures", problem)
        say(f"UNEXPECTED: {problem}")
    setup.add("volume", record)
    say(
        f"{label} {setup.key:5s} {user} ({kind}): spawn {s['total_s']:.2f} s "
        f"(ready {s['ready_s']:.2f}), stop {st['total_s']:.2f} s, container gone "
        f"{waited:.1f} s later, load {load:.1f}"
    )
    await asyncio.sleep(VOLUME_SETTLE)


async def volume_rep(setup: Setup, index: int, label: str) -> None:
    """A spawn without a volume, a first spawn (creates the volume) and a spawn with the
    volume there (the same user after a stop), in the order of VOLUME_ORDERS[index % 3]."""
    users = {
        "none": f"{NO_VOLUME_PREFIX}v{index:02d}",
        "first": f"vol-v{index:02d}",
        "existing": f"vol-v{index:02d}",
    }
    for kind in VOLUME_ORDERS[index % len(VOLUME_ORDERS)]:
        await volume_spawn(setup, users[kind], kind, index, label)


async def loop_snapshot(setup: Setup) -> dict:
    samples = await setup.metrics()
    return {
        "buckets": bl.histogram_buckets(samples, LOOP_METRIC),
        "count": bl.metric_sum(samples, LOOP_METRIC + "_count") or 0.0,
    }


async def burst_rep(
    setup: Setup,
    index: int,
    label: str,
    size: int = BURST_SIZE,
    *,
    users: list[str] | None = None,
    record_as: str | None = None,
    measure_memory: bool = True,
) -> dict:
    """``size`` users POSTed at once, until all are ready; their idle memory; then all
    stopped at once. Recorded under ``record_as`` (default ``burst`` for 10 users, else
    ``burst<size>``); returns the record."""
    users = users or [f"b{size}x{index}u{j:02d}" for j in range(size)]
    size = len(users)
    for u in users:
        await setup.hub.ensure_user(u)
    offset = setup.log_offset()
    before = await loop_snapshot(setup)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(spawn(setup, u) for u in users), return_exceptions=True)
    t_all = time.perf_counter()
    after = await loop_snapshot(setup)
    segment = setup.log_since(offset)
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if not isinstance(r, dict)]
    for e in errors:
        setup.add("failures", f"{label}: {e}")
    observations = int(after["count"] - before["count"])
    lags = bl.loop_lags(segment)
    p99, bound = bl.exact_p99_from_log(observations, lags, LOOP_RESOLUTION)
    hist_p99, hist_le = bl.histogram_quantile(
        0.99, before["buckets"], after["buckets"], lowest=LOOP_RESOLUTION
    )
    record: dict[str, Any] = {
        "wall_s": (max(r["t_end"] for r in ok) - t0) if ok else None,
        "wall_incl_failures_s": t_all - t0,
        "per_user_s": sorted(r["total_s"] for r in ok),
        "failed": len(errors),
        "loadavg1": load,
        "loop": {
            "observations": observations,
            "logged_lags_s": lags,
            "max_lag_s": max(lags) if lags else None,
            "p99_s": p99,
            "p99_is_upper_bound": bound,
            "hist_p99_s": hist_p99,
            "hist_p99_bucket_le": hist_le,
        },
    }
    # Empty unless the hubs run with --loop-debug (the watchdog's samples of a held loop).
    record["loop_samples"] = loopwatch.parse(segment)
    record["size"] = size
    if setup.key.startswith("lxd"):
        timings = bl.spawn_timings(segment)
        record["spawner"] = [timings.get(u) for u in users]
    record["memory_bytes"] = []
    if measure_memory:
        await asyncio.sleep(IDLE_WAIT)
        mems = await asyncio.gather(
            *(memory(setup, r["user"], r["state"]) for r in ok), return_exceptions=True
        )
        record["memory_bytes"] = [m.get("bytes") for m in mems if isinstance(m, dict)]
    t1 = time.perf_counter()
    running = [r["user"] for r in ok]
    stops = await asyncio.gather(*(stop(setup, u) for u in running), return_exceptions=True)
    record["stop_wall_s"] = (time.perf_counter() - t1) if running else None
    record["stop_per_user_s"] = sorted(s["total_s"] for s in stops if isinstance(s, dict))
    for e in stops:
        if not isinstance(e, dict):
            setup.add("failures", f"{label} stop: {e}")
    if errors or any(not isinstance(s, dict) for s in stops):
        with contextlib.suppress(Exception):
            await setup.hub.stop_all_servers()
    setup.add(record_as or ("burst" if size == BURST_SIZE else f"burst{size}"), record)
    lag = "n/a" if p99 is None else f"{'<' if bound else ''}{p99 * 1000:.0f} ms"
    say(
        f"{label} {setup.key:6s}: {len(ok)}/{size} ready in "
        f"{bl.fmt(record['wall_s'])} s, loop lag p99 {lag}, {size} stops in "
        f"{bl.fmt(record['stop_wall_s'])} s, load {load:.1f}"
        + (f", {len(errors)} FAILED: {errors[0]}" if errors else "")
    )
    return record


#: The class changeover: the next class's burst this long after the previous one's stop.
CHANGEOVER_GAP = 2.0


async def changeover_rep(setup: Setup, index: int, label: str, size: int = BURST_SIZE) -> None:
    """A class changeover: a burst of ``size``, all stopped at once, and CHANGEOVER_GAP s
    after the stops returned, the next ``size`` users' burst (while lxdspawner's previous
    containers may still be being deleted in the background). Both bursts' wall times."""
    first = await burst_rep(
        setup, index, f"{label} first", size,
        users=[f"c{index}a{j:02d}" for j in range(size)], record_as="changeover_first",
        measure_memory=False,
    )  # fmt: skip
    await asyncio.sleep(CHANGEOVER_GAP)
    second = await burst_rep(
        setup, index, f"{label} next", size,
        users=[f"c{index}b{j:02d}" for j in range(size)], record_as="changeover_next",
        measure_memory=False,
    )  # fmt: skip
    setup.add(
        "changeover",
        {
            "first_s": first["wall_s"],
            "next_s": second["wall_s"],
            "gap_s": CHANGEOVER_GAP,
            "stop_first_s": first["stop_wall_s"],
            "failed": first["failed"] + second["failed"],
        },
    )


def _open_write(path: Path):
    return open(path, "wb")  # the caller's with-block closes it


class DaemonRequestLog:
    """The daemon's own log of API requests (``incus monitor``, debug level), kept for a
    while: it names each request's URL, so the requests the hub's counter counts can be
    attributed. Only requests naming one of our instances are ours for certain (the benchmark
    itself makes none while it listens)."""

    def __init__(self, path: Path):
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> DaemonRequestLog:
        cli = shutil.which("incus")
        if cli:
            with _open_write(self.path) as out:
                self.proc = await asyncio.create_subprocess_exec(
                    cli, "monitor", "--type=logging", "--pretty", "--loglevel=debug",
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            await asyncio.sleep(0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    def ours(self) -> list[str]:
        if self.proc is None or not self.path.exists():
            return []
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            if "Handling API request" in line and f"/{PREFIX}-" in line:
                method = line.split("method=")[1].split()[0] if "method=" in line else "?"
                url = line.split("url=")[1].split()[0].strip('"') if "url=" in line else "?"
                found.append(f"{method} {url}")
        return found


async def count_requests(setup: Setup, seconds: float, monitor: Path) -> dict:
    """The hub's LXD API requests over a window, with the daemon's view of them."""
    async with DaemonRequestLog(monitor) as daemon_log:
        a, source = await setup.api_requests()
        ta = time.monotonic()
        await asyncio.sleep(seconds)
        b, _ = await setup.api_requests()
        tb = time.monotonic()
    result: dict[str, Any] = {"source": source, "window_s": tb - ta}
    if a is not None and b is not None:
        result["requests"] = b - a
    seen = daemon_log.ours()
    result["daemon_saw_for_our_instances"] = len(seen)
    result["daemon_requests_sample"] = sorted(set(seen))[:20]
    return result


async def poll_phase(setup: Setup, cycles: int, workdir: Path) -> dict:
    """LXD API requests per poll cycle per server with POLL_SERVERS servers running.

    The same window is first counted with no server running: whatever the hub asks the daemon
    regardless of servers (a cache's resync, say) is not a per-server poll cost.
    """
    users = [f"p{j:02d}" for j in range(POLL_SERVERS)]
    for u in users:
        await setup.hub.ensure_user(u)
    window = POLL_INTERVAL * cycles
    say(f"poll phase: counting the hub's LXD API requests over {window:.0f} s, no server running")
    idle = await count_requests(setup, window, workdir / "monitor-idle.log")
    result: dict[str, Any] = {
        "servers": POLL_SERVERS,
        "poll_interval_s": POLL_INTERVAL,
        "no_servers": idle,
    }
    try:
        ok = 0
        for group in range(0, POLL_SERVERS, BURST_SIZE):
            chunk = users[group : group + BURST_SIZE]
            say(f"poll phase: starting {len(chunk)} servers ({group + len(chunk)}/{POLL_SERVERS})")
            res = await asyncio.gather(*(spawn(setup, u) for u in chunk), return_exceptions=True)
            ok += sum(isinstance(r, dict) for r in res)
            for r in res:
                if not isinstance(r, dict):
                    setup.add("failures", f"poll phase: {r}")
        result["running"] = ok
        # Let every server's PeriodicCallback get going before counting.
        await asyncio.sleep(POLL_INTERVAL * 1.2)
        say(f"poll phase: {ok} servers running; counting requests over {window:.0f} s")
        busy = await count_requests(setup, window, workdir / "monitor-poll.log")
        result.update(busy)
        if busy.get("requests") is None or ok == 0:
            result["per_poll_per_server"] = None
        else:
            n_cycles = busy["window_s"] / POLL_INTERVAL
            result["cycles"] = n_cycles
            result["per_poll_per_server"] = busy["requests"] / (ok * n_cycles)
            if idle.get("requests") is not None:
                background = idle["requests"] / idle["window_s"] * busy["window_s"]
                result["per_poll_per_server_net"] = (busy["requests"] - background) / (
                    ok * n_cycles
                )
        say(
            f"poll phase: {busy.get('requests', 'n/a')} requests in {busy['window_s']:.1f} s "
            f"with {ok} servers (none running: {idle.get('requests', 'n/a')}); the daemon saw "
            f"{busy['daemon_saw_for_our_instances']} for our instances: "
            f"{busy['daemon_requests_sample'][:3]}"
        )
    finally:
        say(f"poll phase: stopping {POLL_SERVERS} servers at once")
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            await setup.hub.stop_all_servers()
        result["stop_all_s"] = time.perf_counter() - t0
    return result


# -- many idle servers ------------------------------------------------------------------------


async def idle_phase(setup: Setup, servers: int, cycles: int) -> None:
    """``servers`` servers started (in bursts of BURST_SIZE) and left idle: each one's idle
    memory, the CPU the hub (and the daemon) use per second while they idle over ``cycles``
    poll intervals, lxdspawner's API requests per poll per server in that window, then the
    spawn time of one more user with all of them running, and all stopped at once."""
    users = [f"i{j:03d}" for j in range(servers + 1)]
    for u in users:
        await setup.hub.ensure_user(u)
    started: list[dict] = []
    try:
        for group in range(0, servers, BURST_SIZE):
            chunk = users[group : min(group + BURST_SIZE, servers)]
            res = await asyncio.gather(*(spawn(setup, u) for u in chunk), return_exceptions=True)
            started += [r for r in res if isinstance(r, dict)]
            for r in res:
                if not isinstance(r, dict):
                    setup.add("failures", f"idle phase: {r}")
            say(f"idle {setup.key:6s}: {len(started)}/{servers} servers running")
        await asyncio.sleep(POLL_INTERVAL * 1.2)
        mems = await asyncio.gather(
            *(memory(setup, r["user"], r["state"]) for r in started), return_exceptions=True
        )
        window = POLL_INTERVAL * cycles
        is_lxd = setup.key.startswith("lxd")
        req0 = (await setup.api_requests())[0] if is_lxd else None
        cpu0, t0 = cpu_snapshot(setup), time.perf_counter()
        await asyncio.sleep(window)
        cpu1, t1 = cpu_snapshot(setup), time.perf_counter()
        req1 = (await setup.api_requests())[0] if is_lxd else None
        used = cpu_delta(cpu0, cpu1)
        nxt = await _spawn_or_note(setup, users[-1], f"idle {setup.key}: server {servers + 1}")
        record: dict[str, Any] = {
            "servers": len(started),
            "memory_bytes": [m.get("bytes") for m in mems if isinstance(m, dict)],
            "window_s": t1 - t0,
            "hub_cpu_per_s": None if used["hub"] is None else used["hub"] / (t1 - t0),
            "daemon_cpu_per_s": None if used["daemon"] is None else used["daemon"] / (t1 - t0),
            "next_spawn_s": nxt["total_s"] if nxt else None,
        }
        if None not in (req0, req1) and started:
            polls = (t1 - t0) / POLL_INTERVAL
            record["api_requests_per_poll_per_server"] = (req1 - req0) / (len(started) * polls)
    finally:
        t2 = time.perf_counter()
        with contextlib.suppress(Exception):
            await setup.hub.stop_all_servers(timeout=600)
        stop_all_s = time.perf_counter() - t2
    record["stop_all_s"] = stop_all_s
    setup.add("idle", record)
    say(
        f"idle {setup.key:6s}: {record['servers']} idle servers, "
        f"{bl.fmt(bl.median(record['memory_bytes']), 'MiB')} MiB each, hub CPU "
        f"{bl.fmt(record['hub_cpu_per_s'])} s/s, server {servers + 1} spawned in "
        f"{bl.fmt(record['next_spawn_s'])} s, all stopped in {stop_all_s:.1f} s"
    )


# -- the warm pool (lxdpool) ------------------------------------------------------------------


async def pool_members(setup: Setup) -> list[str]:
    """The pool hub's members running and not taken (as the daemon lists them)."""
    found = []
    for i in await setup.lxd.list_instances(recursion=1):
        config = i.get("config") or {}
        if (
            config.get(KEY_HUB) == POOL_HUB_ID
            and config.get(KEY_POOL)
            and not config.get(KEY_USER)
            and i.get("status") == "Running"
        ):
            found.append(i["name"])
    return found


async def pool_memory(setup: Setup) -> list[int]:
    """The idle memory (LXD's ``memory.usage``) of each of lxdpool's waiting members."""
    sizes = []
    for name in await pool_members(setup):
        with contextlib.suppress(LxdError):
            usage = ((await setup.lxd.instance_state(name)).get("memory") or {}).get("usage")
            if usage:
                sizes.append(usage)
    return sizes


async def wait_pool(setup: Setup, timeout: float = 600) -> float | None:
    """For lxdpool: wait until its pool is full again (after a claim it refills in the
    background), so that every measurement of it starts with a full pool and its refill
    does not run during another setup's measurement. Seconds waited (None: not lxdpool)."""
    if setup.key != "lxdpool" or not setup.pool_size:
        return None
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < timeout:
        n = len(await pool_members(setup))
        if n >= setup.pool_size:
            # A member just started may still be importing its server's code.
            await asyncio.sleep(2.0)
            waited = time.perf_counter() - t0
            setup.add("pool_refill_s", waited)
            return waited
        await asyncio.sleep(0.5)
    say(f"lxdpool: only {n}/{setup.pool_size} pool members after {timeout:.0f} s")
    return time.perf_counter() - t0


# -- machine noise ---------------------------------------------------------------------------


async def other_instances(client: LxdClient) -> int:
    with contextlib.suppress(LxdError):
        insts = await client.list_instances(recursion=1)
        return sum(
            1
            for i in insts
            if i.get("status") == "Running"
            and not i.get("name", "").startswith(tuple(f"{p}-" for p in OUR_PREFIXES))
        )
    return -1
