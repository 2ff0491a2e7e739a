"""The setups the spawn benchmark compares: real JupyterHubs, each behind a real
configurable-http-proxy (`testbench.hubtools`, as in the tests), up side by side for the
whole run. Besides the two below, **docker** (DockerSpawner, the peer: `dockerbench`) and
**lxdpool** (lxd with ``warm_pool_size``, its own prefix ``lxdbenchp`` and hub id, so that
its containers and volumes never meet lxd's; `lxd_pool_config`).

- **floor**: ``SimpleLocalProcessSpawner`` running ``jupyterhub-singleuser`` (JupyterLab) as a
  plain process on the host, from a virtualenv (``.cache/floor-venv``, made here when missing)
  that holds exactly the image's pinned packages (the ``requirements.txt`` the image build
  froze, found by the fingerprint of the image the ``jupyter-base`` alias points to), with the
  same Python as the image (Debian's ``/usr/bin/python3``). Hub API on 127.0.0.1.
- **lxd**: the same hub with ``spawner_class = "lxd"``, image ``jupyter-base``, hub API on the
  Incus bridge (its address in scripts/topology.env). Containers are named ``lxdbench-*`` so
  that a run never touches anyone else's; leftovers of an interrupted run are removed at the
  start and at the end (`remove_our_containers`, `final_sweep`). The hub's id is
  ``benchmark-lxdbench`` (``BENCH_HUB_ID``): the users' home volumes it creates carry it, and
  those not in use are deleted at the start and at the end too (`remove_our_volumes`); a test
  run's clean-up (``testbench-*`` hubs) leaves them alone, and ours leaves the tests' alone.
  Users named ``novol-*`` spawn without a home volume (the volume phase's baseline).

What is measured on them is in ``measure.py``; ``spawn.py`` drives the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxdspawner.lxd import LxdClient, LxdError, NotFound
from lxdspawner.ownership import KEY_HUB
from testbench import hubtools, topology

from . import benchlib as bl
from . import dockerbench

try:
    import psutil
except ImportError:  # pragma: no cover - jupyterhub depends on it
    psutil = None

REPO = Path(__file__).resolve().parent.parent
IMAGE = "jupyter-base"
IMAGE_CACHE = Path("/var/cache/lxdspawner/images")
FLOOR_VENV = REPO / ".cache" / "floor-venv"
PREFIX = "lxdbench"  # c.LxdSpawner.name_prefix: our containers only
# c.LxdSpawner.hub_id: stable across runs, so that a run finds what an earlier one left (the
# users' home volumes, which lxdspawner never deletes by itself), and not "testbench-*", whose
# volumes a test run deletes when not in use, which ours are between two spawns.
BENCH_HUB_ID = f"benchmark-{PREFIX}"
# The hub with the warm pool (setup "lxdpool"): its own containers' prefix and hub id, so
# that its users' containers and volumes never meet the other lxd hub's.
POOL_PREFIX = f"{PREFIX}p"
POOL_HUB_ID = f"benchmark-{POOL_PREFIX}"
OUR_PREFIXES = (PREFIX, POOL_PREFIX)
OUR_HUB_IDS = (BENCH_HUB_ID, POOL_HUB_ID)
# Users whose names start with this spawn without a home volume (home_volume_size = "").
NO_VOLUME_PREFIX = "novol-"
LXD_HUB_IP = topology.INCUS.gateway
POLL_INTERVAL = 5.0
# JupyterHub measures event-loop lag by sleeping this long and seeing how late it wakes; it
# logs every lag at or above the threshold. Equal values put every resolvable lag in the log
# (2-decimal precision), so p99 is exact rather than "somewhere in the 0-50 ms bucket".
LOOP_RESOLUTION = 0.02
# --loop-debug: how often the watchdog samples the hub's stack while its loop is held.
LOOPWATCH_INTERVAL = 0.005

T0 = time.monotonic()


def say(message: str) -> None:
    """A line of the run's log (every module of the benchmark writes through this one)."""
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

# --loop-debug: a watchdog thread in the hub samples its stack while the loop is held for at
# least the resolution (benchmarks/loopwatch.py), on the hub's stderr, so in its log: it names
# the code behind each lag the metric only counts. The configuration is read inside the hub's
# running loop (initialize()), where the watchdog must start. The repository goes on the
# hub's path so that it imports this checkout's benchmarks package.
LOOP_DEBUG_CONFIG = f"""
# --loop-debug
import sys as _sys

_sys.path.insert(0, {str(REPO)!r})
from benchmarks import loopwatch as _loopwatch

_loopwatch.start(threshold={LOOP_RESOLUTION!r}, interval={LOOPWATCH_INTERVAL!r})
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
c.LxdSpawner.hub_id = {BENCH_HUB_ID!r}


def _bench_pre_spawn_hook(spawner):
    # The volume phase's baseline: these users' homes are in the container's root disk.
    if spawner.user.name.startswith({NO_VOLUME_PREFIX!r}):
        spawner.home_volume_size = ""


c.Spawner.pre_spawn_hook = _bench_pre_spawn_hook
"""


def lxd_pool_config(size: int) -> str:
    """The lxdpool setup's hub: lxd's, with its own prefix and hub id and a warm pool of
    ``size`` (removed when the hub exits: the benchmark's clean-up)."""
    config = LXD_CONFIG.replace(repr(PREFIX), repr(POOL_PREFIX)).replace(
        repr(BENCH_HUB_ID), repr(POOL_HUB_ID)
    )
    return config + (
        f"c.LxdSpawner.warm_pool_size = {int(size)}\nc.LxdSpawner.warm_pool_remove_on_exit = True\n"
    )


# Exposed by lxdspawner (lxdspawner/metrics.py): LxdClient.request_count per endpoint.
API_COUNTER = "lxdspawner_api_requests_total"


# -- the floor's virtualenv ------------------------------------------------------------------


def _cached_requirements() -> list[Path]:
    return sorted(
        IMAGE_CACHE.glob(f"{IMAGE}-*/requirements.txt"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )


async def image_requirements(client: LxdClient) -> tuple[Path, str]:
    """The requirements.txt frozen by the build of the image ``jupyter-base`` points to."""
    fingerprint = ""
    with contextlib.suppress(LxdError):
        fingerprint = (await client.image_alias(IMAGE)).get("target", "")
    candidates = _cached_requirements()
    if not candidates:
        raise SystemExit(
            f"no {IMAGE_CACHE}/{IMAGE}-*/requirements.txt: build the image first "
            f"(lxdspawner/images/ensure-image.sh {IMAGE})"
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
    key: str  # "floor", "lxd", "docker" or "lxdpool"
    hub: Any
    lxd: LxdClient
    daemon: Any = None  # psutil.Process of the daemon, for CPU accounting
    data: dict = field(default_factory=dict)
    pool_size: int = 0  # lxdpool: its warm_pool_size

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


@contextlib.asynccontextmanager
async def running_setups(
    client: LxdClient,
    workdir: Path,
    singleuser: Path,
    lxd_config_extra: str = "",
    *,
    hubdir: Path | None = None,
    db_configs: dict[str, str] | None = None,
    extra_config: str = "",
    docker: Any = None,
    pool_size: int = 0,
) -> AsyncIterator[tuple[Setup, ...]]:
    """The hubs and their proxies, up until the block ends: (floor, lxd), and the peer
    (floor, lxd, docker) when ``docker`` (a `dockerbench.Peer`) is given, and lxdpool last
    when ``pool_size`` is not 0.

    The hubs' directories (configuration, log, sqlite file) are under ``hubdir`` (default
    ``workdir``): a new one per round of ``--db``, so each round's hubs start afresh.
    ``db_configs`` has each setup's database lines (`database.db_config`; none: the
    harness's sqlite file), ``extra_config`` lines for both hubs (``--loop-debug``).
    """
    hubdir = hubdir or workdir
    db_configs = db_configs or {}
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
        + (f"\n# --lxd-config\n{lxd_config_extra}\n" if lxd_config_extra else "")
    )
    floor_config += db_configs.get("floor", "") + extra_config
    lxd_config += db_configs.get("lxd", "") + extra_config
    async with contextlib.AsyncExitStack() as stack:
        say("starting the floor's hub and proxy")
        fhub = await stack.enter_async_context(
            hubtools.running_hub(hubdir / "floor", floor_config, hub_ip="127.0.0.1")
        )
        say("starting lxdspawner's hub and proxy")
        xhub = await stack.enter_async_context(
            hubtools.running_hub(hubdir / "lxd", lxd_config, hub_ip=LXD_HUB_IP)
        )
        setups = [Setup("floor", fhub, client), Setup("lxd", xhub, client, daemon=daemon_process())]
        if docker is not None:
            say("starting DockerSpawner's hub and proxy")
            docker_config = COMMON_CONFIG + dockerbench.hub_config(docker.image)
            docker_config += db_configs.get("docker", "") + extra_config
            dhub = await stack.enter_async_context(
                hubtools.running_hub(hubdir / "docker", docker_config, hub_ip=docker.gateway)
            )
            setups.append(Setup("docker", dhub, client, daemon=dockerbench.dockerd_process()))
        if pool_size:
            say(f"starting the hub with a warm pool of {pool_size} and its proxy")
            pool_config = COMMON_CONFIG + lxd_pool_config(pool_size)
            pool_config += (
                (f"\n# --lxd-config\n{lxd_config_extra}\n" if lxd_config_extra else "")
                + db_configs.get("lxdpool", "")
                + extra_config
            )
            phub = await stack.enter_async_context(
                hubtools.running_hub(hubdir / "lxdpool", pool_config, hub_ip=LXD_HUB_IP)
            )
            setups.append(
                Setup("lxdpool", phub, client, daemon=daemon_process(), pool_size=pool_size)
            )
        yield tuple(setups)
        say("stopping hubs and proxies")


def daemon_process() -> Any:
    """The daemon serving the bench's Incus socket (there may be others on the machine)."""
    if psutil is None:
        return None
    for p in psutil.process_iter(["name"]):
        if p.info["name"] not in ("incusd", "lxd"):
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.laddr == topology.INCUS.socket for c in p.net_connections("unix")):
                return p
    return None


# -- clean-up --------------------------------------------------------------------------------


async def remove_our_containers(client: LxdClient) -> list[str]:
    removed = []
    for inst in await client.list_instances(recursion=0):
        name = inst.rsplit("/", 1)[-1].split("?")[0]
        if not name.startswith(tuple(f"{p}-" for p in OUR_PREFIXES)):
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


async def our_volumes(client: LxdClient) -> list[tuple[str, dict]]:
    """(pool, volume) of every custom volume carrying the benchmark hub's id."""
    found = []
    for pool in await client.storage_pools():
        for volume in await client.list_volumes(pool):
            if (volume.get("config") or {}).get(KEY_HUB) in OUR_HUB_IDS:
                found.append((pool, volume))
    return found


async def remove_our_volumes(client: LxdClient) -> tuple[list[str], list[str]]:
    """Delete the benchmark hub's volumes that no instance uses: (deleted, kept in use).

    Run after `remove_our_containers`, which frees the ones our leftover containers held.
    """
    removed, in_use = [], []
    for pool, volume in await our_volumes(client):
        name = volume["name"]
        if volume.get("used_by"):
            in_use.append(f"{pool}/{name}")
            continue
        location = volume.get("location") or ""
        try:
            await client.delete_volume(
                pool, name, target=None if location in ("", "none") else location
            )
            removed.append(f"{pool}/{name}")
        except NotFound:
            pass
        except LxdError as e:
            say(f"could not delete volume {pool}/{name}: {e}")
    return removed, in_use


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
        volumes, in_use = await remove_our_volumes(client)
    finally:
        await client.close()
    killed = kill_floor_servers(homes)
    if removed or killed or volumes:
        say(
            f"clean-up: removed containers {removed}, {len(volumes)} home volumes, killed "
            f"local servers {killed}"
        )
    if in_use:
        say(f"clean-up: volumes of the benchmark hub still in use, kept: {in_use}")


def run_swept(main: Callable[[], Coroutine[Any, Any, Any]], workdir: Path) -> Any | None:
    """A benchmark driver's run: ``main()`` in an event loop of its own, then (also after an
    error or Ctrl-C) the sweep of what it left and of the floor's homes under ``workdir``.
    Its result; None when interrupted."""
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return None
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(final_sweep(workdir / "floor-homes"))
        shutil.rmtree(workdir / "floor-homes", ignore_errors=True)
