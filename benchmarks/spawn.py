#!/usr/bin/env python3
"""lxdspawner against the local-process floor: spawn, burst, stop, memory, polling, loop lag.

Run it with the project's venv, as root, on a machine set up by ``make test`` (Incus running,
the ``jupyter-base`` image imported, configurable-http-proxy in ``.cache/node``)::

    .venv/bin/python benchmarks/spawn.py --quick                  # a few minutes
    .venv/bin/python benchmarks/spawn.py --json out.json --plot out.png   # the full run

Two real JupyterHubs, each behind a real configurable-http-proxy (``tests/hubtools.py``),
run side by side for the whole run:

- **floor**: ``SimpleLocalProcessSpawner`` running ``jupyterhub-singleuser`` (JupyterLab) as a
  plain process on the host, from a virtualenv (``.cache/floor-venv``, made here when missing)
  that holds exactly the image's pinned packages (the ``requirements.txt`` the image build
  froze, found by the fingerprint of the image the ``jupyter-base`` alias points to), with the
  same Python as the image (Debian's ``/usr/bin/python3``). Hub API on 127.0.0.1.
- **lxd**: the same hub with ``spawner_class = "lxd"``, image ``jupyter-base``, hub API on the
  Incus bridge (10.117.40.1). Containers are named ``lxdbench-*`` so that a run never touches
  anyone else's; leftovers of an interrupted run are removed at the start and at the end.

Repetitions alternate between the two setups (and alternate which goes first) so that machine
noise hits both. Measured:

- single spawn: REST ``POST`` of the server until the hub reports it ready (progress stream,
  then the user model) and a first request through the proxy (``GET /user/<name>/api/status``
  with a token) answers 200;
- stop: ``DELETE`` until the hub reports the server gone (a 204, else the user model);
- idle memory per server, ~5 s after the first request: LXD's ``memory.usage`` of the
  container (``GET /1.0/instances/<name>/state``) vs the RSS of the local server's process tree;
- burst: 10 users started at once, wall time until all are ready (same criterion), then the
  10 stopped at once;
- lxd only: LXD API requests per poll cycle per server with 20 servers running (a counter
  read from the hub's ``/hub/metrics``), the hub's event-loop lag p99 during the bursts
  (JupyterHub's ``jupyterhub_event_loop_interval_seconds``, see `loop_lag`), and where a
  spawn's time goes, from the spawner's ``(timings {...})`` log line.

Everything (servers, containers, hubs, proxies) is cleaned up at the end, also on Ctrl-C.
The hubs' logs stay in ``.cache/bench/<timestamp>/`` for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - jupyterhub depends on it
    psutil = None


def _load_hubtools():
    spec = importlib.util.spec_from_file_location("hubtools", REPO / "tests" / "hubtools.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hubtools"] = module
    spec.loader.exec_module(module)
    return module


hubtools = _load_hubtools()

from lxdspawner import names  # noqa: E402
from lxdspawner.lxd import LxdClient, LxdError, NotFound  # noqa: E402

IMAGE = "jupyter-base"
IMAGE_CACHE = Path("/var/cache/lxdspawner/images")
FLOOR_VENV = REPO / ".cache" / "floor-venv"
RUNS_DIR = REPO / ".cache" / "bench"
PREFIX = "lxdbench"  # c.LxdSpawner.name_prefix: our containers only
LXD_HUB_IP = hubtools.INCUS_HUB_IP
POLL_INTERVAL = 5.0
# JupyterHub measures event-loop lag by sleeping this long and seeing how late it wakes; it
# logs every lag at or above the threshold. Equal values put every resolvable lag in the log
# (2-decimal precision), so p99 is exact rather than "somewhere in the 0-50 ms bucket".
LOOP_RESOLUTION = 0.02
IDLE_WAIT = 5.0
SERVER_LOG = "/var/log/jupyterhub-singleuser.log"  # lxdspawner's, in the container
SERVER_UNIT = "jupyterhub-singleuser.service"
BURST_SIZE = 10
POLL_SERVERS = 20

TARGETS = {
    "spawn_ratio": ("<=", 1.3),
    "burst_ratio": ("<=", 1.2),
    "stop_ratio": ("<=", 1.0),
    "stop_burst_ratio": ("<=", 1.0),
    "memory_ratio": ("<=", 1.3),
    "api_requests_per_poll_per_server": ("<=", 0.0),
    "loop_lag_p99_s": ("<", 0.050),
}

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", flush=True)


# -- hub configurations ----------------------------------------------------------------------

COMMON_CONFIG = f"""
c.Spawner.poll_interval = {POLL_INTERVAL!r}
# Generous: a burst on 2 busy cores must not fail a run; timeouts do not change speed.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 120
c.PeriodicMetricsCollector.event_loop_interval_resolution = {LOOP_RESOLUTION!r}
c.PeriodicMetricsCollector.event_loop_interval_log_threshold = {LOOP_RESOLUTION!r}
"""

FLOOR_CONFIG = """
c.SimpleLocalProcessSpawner.home_dir_template = {homes!r} + "/{{username}}"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.environment = {{"PATH": {path!r}}}
"""

LXD_CONFIG = f"""
c.JupyterHub.spawner_class = "lxd"
c.LxdSpawner.image = {IMAGE!r}
c.LxdSpawner.name_prefix = {PREFIX!r}
"""

# Exposed by lxdspawner (lxdspawner/metrics.py): LxdClient.request_count per endpoint.
API_COUNTER = "lxdspawner_api_requests_total"
LOOP_METRIC = "jupyterhub_event_loop_interval_seconds"


# -- the floor's virtualenv ------------------------------------------------------------------


def _cached_requirements() -> list[Path]:
    return sorted(
        IMAGE_CACHE.glob(f"{IMAGE}-*/requirements.txt"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )


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


def _python_version(python: Path) -> str:
    return subprocess.run([str(python), "-V"], capture_output=True, text=True).stdout.strip()


async def image_requirements(client: LxdClient) -> tuple[Path, str]:
    """The requirements.txt frozen by the build of the image ``jupyter-base`` points to."""
    fingerprint = ""
    with contextlib.suppress(LxdError):
        fingerprint = (await client.image_alias(IMAGE)).get("target", "")
    candidates = _cached_requirements()
    if not candidates:
        raise SystemExit(
            f"no {IMAGE_CACHE}/{IMAGE}-*/requirements.txt: build the image first "
            f"(images/ensure-image.sh {IMAGE})"
        )
    for path in candidates:
        fp_file = path.parent / "fingerprint"
        if fingerprint and fp_file.exists() and fp_file.read_text().strip() == fingerprint:
            return path, fingerprint
    say(
        f"warning: no cached build matches the image's fingerprint {fingerprint[:12] or '?'}; "
        f"using the newest, {candidates[0]}"
    )
    return candidates[0], fingerprint


def ensure_floor_venv(requirements: Path) -> Path:
    """``.cache/floor-venv`` with exactly the image's packages (rebuilt when they change)."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = FLOOR_VENV / ".requirements.sha256"
    singleuser = FLOOR_VENV / "bin" / "jupyterhub-singleuser"
    if stamp.exists() and stamp.read_text().strip() == digest and singleuser.exists():
        return singleuser
    # The image's Python is Debian bookworm's; so is /usr/bin/python3 on this machine.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    say(f"making the floor's virtualenv {FLOOR_VENV} ({python}, {requirements})")
    if FLOOR_VENV.exists():
        shutil.rmtree(FLOOR_VENV)
    FLOOR_VENV.parent.mkdir(parents=True, exist_ok=True)
    for cmd in (
        [python, "-m", "venv", str(FLOOR_VENV)],
        [str(FLOOR_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         "-r", str(requirements)],
    ):  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    stamp.write_text(digest + "\n")
    return singleuser


# -- one setup -------------------------------------------------------------------------------


@dataclass
class Setup:
    key: str  # "floor" or "lxd"
    hub: Any
    lxd: LxdClient
    daemon: Any = None  # psutil.Process of the daemon, for CPU accounting
    data: dict = field(default_factory=dict)

    def add(self, name: str, value: Any) -> None:
        self.data.setdefault(name, []).append(value)

    def log_offset(self) -> int:
        return self.hub.log_path.stat().st_size if self.hub.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.hub.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    async def metrics(self) -> list[bl.Sample]:
        async with self.hub.session.get(
            hubtools._url(self.hub.public_url + "/hub/metrics"),
            headers=self.hub.auth_headers,
        ) as r:
            if r.status != 200:
                raise hubtools.HubError(f"GET /hub/metrics: {r.status}")
            return bl.parse_prometheus(await r.text())

    async def api_requests(self) -> tuple[float | None, str]:
        value = bl.metric_sum(await self.metrics(), API_COUNTER)
        return value, (API_COUNTER if value is not None else "unavailable")


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


# -- memory ----------------------------------------------------------------------------------


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


def daemon_process() -> Any:
    """The daemon serving /var/lib/incus/unix.socket (there may be others on the machine)."""
    if psutil is None:
        return None
    for p in psutil.process_iter(["name"]):
        if p.info["name"] not in ("incusd", "lxd"):
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.laddr == "/var/lib/incus/unix.socket" for c in p.net_connections("unix")):
                return p
    return None


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
        "daemon": cpu_seconds(setup.daemon) if setup.key == "lxd" else None,
    }


def cpu_delta(a: dict, b: dict) -> dict[str, float | None]:
    return {k: (b[k] - a[k]) if None not in (a[k], b.get(k)) else None for k in a}


async def single_rep(setup: Setup, user: str, label: str) -> None:
    """One spawn, idle memory, one stop; the hub log segment is kept for the breakdown."""
    await setup.hub.ensure_user(user)
    offset = setup.log_offset()
    is_lxd = setup.key == "lxd"
    req0 = (await setup.api_requests())[0] if is_lxd else None
    load = os.getloadavg()[0]
    cpu0 = cpu_snapshot(setup)
    try:
        s = await spawn(setup, user)
    except Exception as e:
        setup.add("failures", f"{label}: {e}")
        say(f"{label} {setup.key:5s} {user}: SPAWN FAILED: {e}")
        with contextlib.suppress(Exception):
            await setup.hub.stop_server(user)
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


async def loop_snapshot(setup: Setup) -> dict:
    samples = await setup.metrics()
    return {
        "buckets": bl.histogram_buckets(samples, LOOP_METRIC),
        "count": bl.metric_sum(samples, LOOP_METRIC + "_count") or 0.0,
    }


async def burst_rep(setup: Setup, index: int, label: str) -> None:
    users = [f"b{index}u{j:02d}" for j in range(BURST_SIZE)]
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
    if setup.key == "lxd":
        timings = bl.spawn_timings(segment)
        record["spawner"] = [timings.get(u) for u in users]
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
    setup.add("burst", record)
    lag = "n/a" if p99 is None else f"{'<' if bound else ''}{p99 * 1000:.0f} ms"
    say(
        f"{label} {setup.key:5s}: {len(ok)}/{BURST_SIZE} ready in "
        f"{bl.fmt(record['wall_s'])} s, loop lag p99 {lag}, 10 stops in "
        f"{bl.fmt(record['stop_wall_s'])} s, load {load:.1f}"
        + (f", {len(errors)} FAILED: {errors[0]}" if errors else "")
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


# -- clean-up --------------------------------------------------------------------------------


async def remove_our_containers(client: LxdClient) -> list[str]:
    removed = []
    for inst in await client.list_instances(recursion=0):
        name = inst.rsplit("/", 1)[-1].split("?")[0]
        if not name.startswith(PREFIX + "-"):
            continue
        with contextlib.suppress(LxdError):
            await client.stop_instance(name, force=True)
        try:
            await client.delete_instance(name)
            removed.append(name)
        except NotFound:
            pass
        except LxdError as e:
            say(f"could not delete {name}: {e}")
    return removed


def kill_floor_servers(homes: Path) -> list[int]:
    """Local servers of this run left behind (their cwd is under this run's homes)."""
    killed = []
    if psutil is None:
        return killed
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error, TypeError):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(FLOOR_VENV) in cmd and str(p.info["cwd"] or "").startswith(str(homes)):
                p.send_signal(signal.SIGTERM)
                killed.append(p.pid)
    if killed:
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in killed], timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    return killed


async def final_sweep(homes: Path) -> None:
    client = await LxdClient.connect()
    try:
        removed = await remove_our_containers(client)
    finally:
        await client.close()
    killed = kill_floor_servers(homes)
    if removed or killed:
        say(f"clean-up: removed containers {removed}, killed local servers {killed}")


# -- analysis and output ---------------------------------------------------------------------


# Names of the parts of a spawn, in order, as shown in the report and the plot.
FLOOR_PARTS = (
    ("server start", "POST until the server logs that it listens (hub work, fork, imports)"),
    ("hub notices", "server listening until the hub reports it ready (the hub's back-off)"),
    ("first request", "hub ready until a request through the proxy answers"),
)
LXD_PARTS = (
    ("hub", "POST until start()'s first step (hub work, lookups, hub address)"),
    ("create", "spawner: create the container (POST /1.0/instances, clone)"),
    ("push", "spawner: push the env file and the unit"),
    ("start", "spawner: start the container"),
    ("ipv4", "spawner: boot until it has an IPv4"),
    ("server", "spawner: until the server answers HTTP"),
    ("hub notices", "start() returned until the hub reports it ready"),
    ("first request", "hub ready until a request through the proxy answers"),
)


def _parts_of(key: str, rec: dict) -> tuple[dict[str, float], float | None]:
    """One single spawn cut into its parts (seconds), and when its server said it listens."""
    parts: dict[str, float] = {}
    at = rec.get("server_running_at")
    listening = at - rec["wall0"] if at is not None else None
    if listening is not None and not 0 < listening < rec["spawn_s"] + 5:
        listening = None  # a clock or time zone we cannot compare with
    if key == "floor":
        if listening is not None:
            parts["server start"] = listening
            parts["hub notices"] = rec["ready_s"] - listening
    else:
        sp = rec.get("spawner")
        if sp:
            steps = {k: v for k, v in sp["timings"].items() if k != "total"}
            # The log line is written when start() returns; its steps run back to back.
            parts["hub"] = sp["t"] - sum(steps.values()) - rec["wall0"]
            parts.update(steps)
            parts["hub notices"] = rec["wall0"] + rec["ready_s"] - sp["t"]
    parts["first request"] = rec["spawn_s"] - rec["ready_s"]
    return parts, listening


def breakdown(floor: Setup, lxd: Setup) -> dict:
    """Where single spawns' time goes: per part, the median over spawns; and the parts of
    the typical spawn (the one with the median duration), which add up to its duration."""
    result: dict[str, Any] = {"listening": {}, "typical": {}}
    for key, setup, names_ in (("floor", floor, FLOOR_PARTS), ("lxd", lxd, LXD_PARTS)):
        recs = setup.data.get("single", [])
        cut = [_parts_of(key, r) for r in recs]
        values: dict[str, list] = {name: [] for name, _ in names_}
        for parts, _ in cut:
            for k, v in parts.items():
                values.setdefault(k, []).append(v)
        result[key] = {k: {"median": bl.median(v), "values": v} for k, v in values.items()}
        result["listening"][key] = bl.median([at for _, at in cut if at is not None])
        if recs:
            mid = bl.median([r["spawn_s"] for r in recs])
            i = min(range(len(recs)), key=lambda j: abs(recs[j]["spawn_s"] - mid))
            result["typical"][key] = {
                "user": recs[i]["user"],
                "spawn_s": recs[i]["spawn_s"],
                "parts": cut[i][0],
                "listening": cut[i][1],
            }
    return result


def burst_steps(lxd: Setup) -> dict:
    """Medians of the spawner's steps across all spawns of lxdspawner's bursts."""
    steps: dict[str, list] = {}
    for b in lxd.data.get("burst", []):
        for sp in b.get("spawner") or []:
            for k, v in ((sp or {}).get("timings") or {}).items():
                steps.setdefault(k, []).append(v)
    return {k: bl.median(v) for k, v in steps.items()}


def analyse(floor: Setup, lxd: Setup, poll: dict | None, meta: dict) -> dict:
    def singles(s: Setup, key: str) -> list:
        return [r[key] for r in s.data.get("single", [])]

    def mem(s: Setup, key: str = "bytes") -> list:
        return [r["memory"].get(key) for r in s.data.get("single", [])]

    def bursts(s: Setup, key: str) -> list:
        return [b[key] for b in s.data.get("burst", []) if b.get(key) is not None]

    def cpu(s: Setup, phase: str, who: str) -> list:
        return [r[phase][who] for r in s.data.get("single", []) if r[phase].get(who) is not None]

    metrics = {
        "spawn_s": (singles(floor, "spawn_s"), singles(lxd, "spawn_s")),
        "burst_s": (bursts(floor, "wall_s"), bursts(lxd, "wall_s")),
        "stop_s": (singles(floor, "stop_s"), singles(lxd, "stop_s")),
        "stop_burst_s": (bursts(floor, "stop_wall_s"), bursts(lxd, "stop_wall_s")),
        "memory_bytes": (mem(floor), mem(lxd)),
        "memory_in_burst_bytes": (
            [m for b in floor.data.get("burst", []) for m in b["memory_bytes"]],
            [m for b in lxd.data.get("burst", []) for m in b["memory_bytes"]],
        ),
        # Not targets; what explains the figures above.
        "memory_working_set_bytes": (mem(floor), mem(lxd, "working_set")),
        "memory_processes_rss_bytes": (mem(floor), mem(lxd, "procs_rss")),
        "memory_server_rss_bytes": (mem(floor), mem(lxd, "server_rss")),
        "server_cpu_s": (mem(floor, "cpu_s"), mem(lxd, "cpu_s")),
        "hub_cpu_per_spawn_s": (cpu(floor, "cpu_spawn_s", "hub"), cpu(lxd, "cpu_spawn_s", "hub")),
        "daemon_cpu_per_spawn_s": ([], cpu(lxd, "cpu_spawn_s", "daemon")),
        "hub_cpu_per_stop_s": (cpu(floor, "cpu_stop_s", "hub"), cpu(lxd, "cpu_stop_s", "hub")),
        "daemon_cpu_per_stop_s": ([], cpu(lxd, "cpu_stop_s", "daemon")),
    }
    summary = {}
    for name, (f, x) in metrics.items():
        fs, xs = bl.summary(f), bl.summary(x)
        summary[name] = {"floor": fs, "lxd": xs, "ratio": bl.ratio(xs["median"], fs["median"])}

    def loop_p99(s: Setup) -> tuple[float | None, bool]:
        """p99 over all bursts of a setup: every observation and logged lag pooled."""
        obs = sum(b["loop"]["observations"] for b in s.data.get("burst", []))
        lags = [x for b in s.data.get("burst", []) for x in b["loop"]["logged_lags_s"]]
        return bl.exact_p99_from_log(obs, lags, LOOP_RESOLUTION)

    lxd_p99, lxd_bound = loop_p99(lxd)
    floor_p99, floor_bound = loop_p99(floor)
    result = {
        "spawn_ratio": summary["spawn_s"]["ratio"],
        "burst_ratio": summary["burst_s"]["ratio"],
        "stop_ratio": summary["stop_s"]["ratio"],
        "stop_burst_ratio": summary["stop_burst_s"]["ratio"],
        "memory_ratio": summary["memory_bytes"]["ratio"],
        "api_requests_per_poll_per_server": (poll or {}).get("per_poll_per_server"),
        "api_requests_per_poll_per_server_net": (poll or {}).get("per_poll_per_server_net"),
        "api_requests_source": (poll or {}).get("source", "not measured"),
        "loop_lag_p99_s": lxd_p99,
        "loop_lag_p99_is_upper_bound": lxd_bound,
        "loop_lag_p99_floor_s": floor_p99,
        "loop_lag_p99_floor_is_upper_bound": floor_bound,
        "summary": summary,
        "breakdown": breakdown(floor, lxd),
        "burst_steps_median_s": burst_steps(lxd),
        "poll": poll,
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "failures": {"floor": floor.data.get("failures", []), "lxd": lxd.data.get("failures", [])},
        "meta": meta,
        "raw": {"floor": floor.data, "lxd": lxd.data},
    }
    lx = lxd.data.get("single", [])
    for key in ("api_requests_spawn", "api_requests_stop", "api_requests_idle"):
        vals = [r[key] for r in lx if key in r]
        result[key + "_median"] = bl.median(vals)
    result["targets_met"] = {k: target_met(k, result.get(k)) for k in TARGETS}
    return result


def target_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value < target


def report(result: dict) -> str:
    s = result["summary"]
    met = result["targets_met"]

    def mark(key: str) -> str:
        return {True: "yes", False: "NO", None: "?"}[met.get(key)]

    def row(label: str, name: str, unit: str, key: str | None) -> list[str]:
        f, x = s[name]["floor"], s[name]["lxd"]
        r = s[name]["ratio"]
        op, target = TARGETS[key] if key else ("", None)
        return [
            label,
            bl.fmt(f["median"], unit), bl.fmt(f["p95"], unit),
            bl.fmt(x["median"], unit), bl.fmt(x["p95"], unit),
            (bl.fmt(r) + "x") if r is not None else "",
            f"{op} {target}x" if key else "", mark(key) if key else "",
            f"{f['n']}/{x['n']}",
        ]  # fmt: skip

    rows = [
        row("single spawn (s)", "spawn_s", "s", "spawn_ratio"),
        row("burst of 10, all ready (s)", "burst_s", "s", "burst_ratio"),
        row("stop (s)", "stop_s", "s", "stop_ratio"),
        row("10 stops at once (s)", "stop_burst_s", "s", "stop_burst_ratio"),
        row("idle memory per server (MiB)", "memory_bytes", "MiB", "memory_ratio"),
    ]
    api = result["api_requests_per_poll_per_server"]
    rows.append([
        "LXD API requests/poll/server", "", "", bl.fmt(api), "", "", "0",
        mark("api_requests_per_poll_per_server"), "",
    ])  # fmt: skip

    def lag(v: float | None, bound: bool) -> str:
        return "n/a" if v is None else ("<" if bound else "") + bl.fmt(v, "ms")

    rows.append([
        "loop lag p99 in bursts (ms)",
        lag(result["loop_lag_p99_floor_s"], result["loop_lag_p99_floor_is_upper_bound"]), "",
        lag(result["loop_lag_p99_s"], result["loop_lag_p99_is_upper_bound"]), "", "",
        "< 50 ms", mark("loop_lag_p99_s"), "",
    ])  # fmt: skip
    header = ["metric", "floor med", "p95", "lxd med", "p95", "ratio", "target", "met", "n"]
    out = [bl.table(rows, header)]

    out.append("\nwhat explains them (not targets):")
    rows = [
        row("memory, 10 running (MiB/server)", "memory_in_burst_bytes", "MiB", None),
        row("memory: working set (MiB)", "memory_working_set_bytes", "MiB", None),
        row("memory: processes' RSS (MiB)", "memory_processes_rss_bytes", "MiB", None),
        row("memory: the server's RSS (MiB)", "memory_server_rss_bytes", "MiB", None),
        row("CPU to start a server (s)", "server_cpu_s", "s", None),
        row("hub CPU per spawn (s)", "hub_cpu_per_spawn_s", "s", None),
        row("daemon CPU per spawn (s)", "daemon_cpu_per_spawn_s", "s", None),
        row("hub CPU per stop (s)", "hub_cpu_per_stop_s", "s", None),
        row("daemon CPU per stop (s)", "daemon_cpu_per_stop_s", "s", None),
    ]
    out.append(bl.table(rows, header))
    poll = result.get("poll") or {}
    if result["api_requests_source"] != API_COUNTER:
        out.append(f"  API requests: {API_COUNTER} is not on /hub/metrics: figure unavailable")
    elif poll.get("requests") is not None:
        idle = poll.get("no_servers") or {}
        out.append(
            f"  polling: {poll['requests']:.0f} LXD API requests in {poll['window_s']:.0f} s with "
            f"{poll.get('running')} servers (poll_interval {POLL_INTERVAL:g} s); "
            f"{idle.get('requests', 'n/a')} in the same time with none; the daemon logged "
            f"{poll.get('daemon_saw_for_our_instances')} naming our instances"
            + (f": {sample[:4]}" if (sample := poll.get("daemon_requests_sample")) else "")
        )
    for k, what in (("api_requests_spawn_median", "spawn"), ("api_requests_stop_median", "stop")):
        if result.get(k) is not None:
            out.append(f"  LXD API requests per {what} (median): {result[k]:.0f}")
    out.append("\nwhere a single spawn's time goes (medians, s):")
    for key in ("floor", "lxd"):
        b = result["breakdown"][key]
        parts = ", ".join(f"{n} {v['median']:.2f}" for n, v in b.items() if v["median"] is not None)
        out.append(f"  {key:5s}: {parts}")
    listening = result["breakdown"]["listening"]
    if listening.get("lxd") is not None:
        out.append(
            f"  the server itself logged that it listens {listening['lxd']:.2f} s after the "
            f"POST in a container, {bl.fmt(listening.get('floor'))} s as a local process "
            "(medians)"
        )
    steps = result.get("burst_steps_median_s") or {}
    if steps:
        out.append("  lxd in the bursts: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    boot = result["raw"]["lxd"].get("boot_analysis") or {}
    if boot.get("critical_chain"):
        chain = [
            ln
            for ln in boot["critical_chain"].splitlines()
            if ("@" in ln or "+" in ln) and not ln.startswith("The time")
        ]
        out.append(
            "  container boot (first single spawn): "
            + (boot.get("summary") or "").splitlines()[0]
            + "\n    "
            + "\n    ".join(chain[:8])
        )
    meta = result["meta"]
    out.append(
        f"\nnoise: load average {meta['loadavg_start'][0]:.1f} at the start, "
        f"{meta.get('loadavg_end', [float('nan')])[0]:.1f} at the end, on {meta['cpus']} CPUs; "
        f"{meta['other_running_instances_start']} / {meta.get('other_running_instances_end')} "
        "other running instances on this daemon at start / end"
    )
    for key in ("floor", "lxd"):
        for f in result["failures"][key]:
            out.append(f"  FAILURE ({key}): {f}")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        say("--plot: matplotlib is not installed in this venv (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = result["raw"]
    colors = {"floor": "#4c72b0", "lxd": "#dd8452"}
    labels = {"floor": "floor (local process)", "lxd": "lxdspawner (Incus)"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1.2, 1.5]})

    ax = axes[0]
    data = [[r["spawn_s"] for r in raw[k].get("single", [])] for k in ("floor", "lxd")]
    ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
    for i, (k, values) in enumerate(zip(("floor", "lxd"), data, strict=True), start=1):
        xs = [i + (j % 7 - 3) * 0.04 for j in range(len(values))]
        ax.scatter(xs, values, color=colors[k], zorder=3, s=24, alpha=0.85)
    ax.set_xticks([1, 2], [labels["floor"], labels["lxd"]])
    ax.set_ylabel("seconds")
    ax.set_title("single spawn: POST → ready → first request")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    for k in ("floor", "lxd"):
        per_user = sorted(t for b in raw[k].get("burst", []) for t in b["per_user_s"])
        if per_user:
            ys = [0.0] + [(i + 1) / len(per_user) for i in range(len(per_user))]
            ax.step([0.0, *per_user], ys, where="post", color=colors[k], label=labels[k])
        for b in raw[k].get("burst", []):
            if b.get("wall_s"):
                ax.axvline(b["wall_s"], color=colors[k], alpha=0.3, ls="--")
    ax.set_xlabel("seconds after the 10 POSTs (all bursts pooled)")
    ax.set_ylabel("fraction of users ready")
    ax.set_title("burst of 10: users ready over time (dashed: all ready)")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")

    ax = axes[2]
    part_colors = {
        "hub": "#b0b0b0", "create": "#55a868", "push": "#8172b2", "start": "#c44e52",
        "ipv4": "#ccb974", "server": "#64b5cd", "server start": "#64b5cd",
        "hub notices": "#937860", "first request": "#da8bc3",
    }  # fmt: skip
    typical = result["breakdown"]["typical"]
    seen = set()
    for row, key in enumerate(("floor", "lxd")):
        t = typical.get(key)
        if not t:
            continue
        left = 0.0
        for name, v in t["parts"].items():
            width = max(v, 0.0)
            color = part_colors.get(name, "#4c72b0")
            ax.barh(
                row, width, left=left, color=color, edgecolor="white",
                label=None if name in seen else name,
            )  # fmt: skip
            seen.add(name)
            left += width
        ax.text(left + 0.05, row, f"{t['spawn_s']:.2f} s", va="center", fontsize=9)
        if t.get("listening") is not None:
            at = t["listening"]
            ax.plot([at, at], [row - 0.42, row + 0.42], color="black", lw=1.5)
            ax.text(at, row + 0.45, "server listens", ha="center", fontsize=8)
    ax.set_yticks([0, 1], [labels["floor"], labels["lxd"]])
    ax.set_xlabel("seconds (the spawn of median duration of each setup)")
    ax.set_title("where a single spawn's time goes")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8)

    meta = result["meta"]
    title = (
        f"lxdspawner vs local-process floor: {meta['mode']} run {meta['started']}, "
        f"{meta['cpus']} CPUs, load {meta['loadavg_start'][0]:.1f}; spawn "
        f"{bl.fmt(result['spawn_ratio'])}×, burst {bl.fmt(result['burst_ratio'])}×, stop "
        f"{bl.fmt(result['stop_ratio'])}×, memory {bl.fmt(result['memory_ratio'])}× the floor"
    )
    if meta.get("lxd_config_extra"):
        title += f"\nlxdspawner's hub with: {meta['lxd_config_extra']}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    say(f"plot written to {path}")


# -- main ------------------------------------------------------------------------------------


async def other_instances(client: LxdClient) -> int:
    with contextlib.suppress(LxdError):
        insts = await client.list_instances(recursion=1)
        return sum(
            1
            for i in insts
            if i.get("status") == "Running" and not i.get("name", "").startswith(PREFIX + "-")
        )
    return -1


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    reps = args.reps or (3 if args.quick else 10)
    bursts = args.bursts or (1 if args.quick else 3)
    poll_cycles = 3 if args.quick else 6
    client = await LxdClient.connect()
    try:
        removed = await remove_our_containers(client)
        if removed:
            say(f"removed leftover containers of an earlier run: {removed}")
        requirements, fingerprint = await image_requirements(client)
        singleuser = ensure_floor_venv(requirements)
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
        }
        say(
            f"{meta['mode']} run: {reps} single reps, {bursts} burst(s) of {BURST_SIZE}; "
            f"{meta['daemon']}, jupyterhub {meta['jupyterhub_singleuser']}, jupyterlab "
            f"{meta['jupyterlab']}; load {meta['loadavg_start'][0]:.1f}, "
            f"{meta['other_running_instances_start']} other running instances; spawner at "
            f"{meta['lxdspawner_commit']}; logs in {workdir}"
        )
        homes = workdir / "floor-homes"
        homes.mkdir(parents=True, exist_ok=True)
        floor_config = (
            COMMON_CONFIG
            + hubtools.LOCAL_SPAWNER_CONFIG
            + FLOOR_CONFIG.format(
                homes=str(homes),
                singleuser=str(singleuser),
                path=f"{singleuser.parent}:/usr/local/bin:/usr/bin:/bin",
            )
        )
        lxd_config = (
            COMMON_CONFIG
            + LXD_CONFIG
            + (f"\n# --lxd-config\n{args.lxd_config}\n" if args.lxd_config else "")
        )
        poll = None
        async with contextlib.AsyncExitStack() as stack:
            say("starting the floor's hub and proxy")
            fhub = await stack.enter_async_context(
                hubtools.running_hub(workdir / "floor", floor_config, hub_ip="127.0.0.1")
            )
            say("starting lxdspawner's hub and proxy")
            xhub = await stack.enter_async_context(
                hubtools.running_hub(workdir / "lxd", lxd_config, hub_ip=LXD_HUB_IP)
            )
            floor = Setup("floor", fhub, client)
            lxd = Setup("lxd", xhub, client, daemon=daemon_process())

            say("warm-up (not counted): one spawn and stop each")
            for s in (floor, lxd):
                await s.hub.ensure_user("warmup")
                w = await spawn(s, "warmup")
                await stop(s, "warmup")
                say(f"warm-up {s.key}: {w['total_s']:.2f} s")
            # The spawner registers its counter with its first client.
            say(f"LXD API request counter: {(await lxd.api_requests())[1]}")

            for i in range(reps):
                order = (floor, lxd) if i % 2 == 0 else (lxd, floor)
                for s in order:
                    await single_rep(s, f"s{i:02d}", f"single {i + 1}/{reps}")
            for b in range(bursts):
                order = (floor, lxd) if b % 2 == 0 else (lxd, floor)
                for s in order:
                    await burst_rep(s, b, f"burst {b + 1}/{bursts}")
            poll = await poll_phase(lxd, poll_cycles, workdir)
            meta["loadavg_end"] = os.getloadavg()
            meta["other_running_instances_end"] = await other_instances(client)
            say("stopping hubs and proxies")
        return analyse(floor, lxd, poll, meta)
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 reps, 1 burst: a few minutes")
    parser.add_argument("--reps", type=int, help="single spawn/stop repetitions per setup")
    parser.add_argument("--bursts", type=int, help="bursts of 10 per setup")
    parser.add_argument(
        "--lxd-config",
        default="",
        help="extra lines for lxdspawner's hub config, for experiments "
        """(e.g. 'c.LxdSpawner.extra_instance_config = {"limits.cpu.priority": "1"}')""",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--plot", type=Path, help="draw spawn-time distributions to this PNG")
    args = parser.parse_args()

    if os.geteuid() != 0:
        print("run as root (the Incus socket, and the floor's servers run as root)")
        return 2
    workdir = RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    result = None
    try:
        result = asyncio.run(run(args, workdir))
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(final_sweep(workdir / "floor-homes"))
        shutil.rmtree(workdir / "floor-homes", ignore_errors=True)
    if result is None:
        return 130
    print()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        say(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
    failed = result["failures"]["floor"] or result["failures"]["lxd"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
