"""The spawn benchmark's peer: DockerSpawner on Debian's ``docker.io``, the same server.

Issue 15 asks for lxdspawner measured beside DockerSpawner in the same run, so that the
README's table has the peer's column next to the floor's. This module makes that setup:

- **the daemon**: Debian's ``docker.io`` (installed with apt when ``dockerd`` is missing),
  started by the benchmark when its socket does not answer, with a configuration of our own
  (`daemon_config`, written next to the run's logs and passed with ``--config-file``; the
  host's ``/etc/docker`` is not touched) that keeps it off the host's firewall and off the
  other bridges: no iptables or ip6tables rules, no IP forwarding or masquerading changes,
  its bridge ``docker0`` on a subnet of ours (``LXDSP_DOCKER_BRIDGE_ADDRESS`` in
  scripts/topology.env). Containers on it reach the hub's API on the bridge's address
  without NAT; nothing of theirs leaves the machine. A daemon the benchmark started is
  stopped at the end (and the bridge it made removed); one that was running is left as it
  was.
- **the image**: the root file system of the Incus image ``jupyter-base`` (the squashfs the
  image build cached, found by the image's fingerprint, else exported from Incus), imported
  with ``docker import`` and the settings a Dockerfile would give it (`import_changes`:
  the server as the command, the image's virtualenv on PATH, the image's ``jupyter`` user
  and home). Tagged by the Incus image's fingerprint (`image_tag`), so a run imports it
  only when the Incus image changed; the image stays cached after the run.
- **the hub**: JupyterHub with ``DockerSpawner`` (PyPI ``dockerspawner``; the ``bench``
  extra, else installed by the benchmark into ``.cache/bench-site``), containers on the
  default bridge reached at their own address (``use_internal_ip``), removed at stop as
  lxdspawner removes its containers, labelled ``LABEL`` so that the clean-up takes only ours.

The first half is pure (unit-tested in tests/unit/test_bench_docker.py); the rest drives
apt-get, dockerd and the docker command line.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbench import topology

REPO = Path(__file__).resolve().parent.parent
#: The label every container of the benchmark's DockerSpawner carries (and its value).
LABEL = "org.lxdspawner.benchmark"
LABEL_VALUE = "lxdbench"
#: The label the imported image carries: the Incus image's full fingerprint.
FINGERPRINT_LABEL = "org.lxdspawner.incus-fingerprint"
REPOSITORY = "lxdspawner-bench/jupyter-base"
#: DockerSpawner's container names: ``<prefix>-<user>``.
CONTAINER_PREFIX = "lxdbenchdk"
SOCKET = "/var/run/docker.sock"
BRIDGE = topology.read().get("LXDSP_DOCKER_BRIDGE", "docker0")
BRIDGE_ADDRESS = topology.read().get("LXDSP_DOCKER_BRIDGE_ADDRESS", "10.117.60.1/24")
#: The docker command line from Debian's docker.io (another ``docker`` may be earlier on PATH).
DOCKER_CLI = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
#: Where the benchmark installs dockerspawner when the venv has not got it (the bench extra).
BENCH_SITE = REPO / ".cache" / "bench-site"
BENCH_PACKAGES = ("dockerspawner>=13", "docker>=7", "escapism>=1")

# What the image build put in jupyter-base (lxdspawner/images/jupyter-base/customize.sh).
SERVER_VENV = "/opt/jupyterhub"
IMAGE_USER = "jupyter"
IMAGE_HOME = "/home/jupyter"
SERVER_PORT = 8888


# -- pure ----------------------------------------------------------------------------------------


def daemon_config(bridge_address: str = BRIDGE_ADDRESS) -> dict:
    """dockerd's configuration: nothing on the host's firewall, its bridge on our subnet.

    ``bip`` is the bridge's own address and prefix (the hub listens there). Without iptables
    rules no port can be published and no container reaches beyond the bridge; the hub's
    proxy reaches the containers by their own address on the bridge, which needs neither.
    """
    iface = ipaddress.ip_interface(bridge_address)
    if iface.version != 4 or iface.ip == iface.network.network_address:
        raise ValueError(
            f"LXDSP_DOCKER_BRIDGE_ADDRESS={bridge_address}: an IPv4 host address/prefix"
        )
    for taken in (topology.INCUS.subnet, topology.LXD.subnet):
        if iface.network.overlaps(ipaddress.ip_network(taken, strict=False)):
            raise ValueError(f"LXDSP_DOCKER_BRIDGE_ADDRESS={bridge_address} overlaps {taken}")
    return {
        "bip": str(iface),
        "iptables": False,
        "ip6tables": False,
        "ip-forward": False,
        "ip-masq": False,
        "ipv6": False,
        "userland-proxy": False,
        "log-level": "warn",
    }


def image_tag(fingerprint: str) -> str:
    """The imported image's name: one per Incus image (its fingerprint's first 12 digits)."""
    fp = fingerprint.strip().lower()
    if len(fp) < 12 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"not an image fingerprint: {fingerprint!r}")
    return f"{REPOSITORY}:{fp[:12]}"


def import_changes(fingerprint: str) -> list[str]:
    """The Dockerfile instructions ``docker import --change`` gives the root file system:
    what lxdspawner's unit gives the same server (its command, PATH, user, home)."""
    path = f"{SERVER_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return [
        f'CMD ["{SERVER_VENV}/bin/jupyterhub-singleuser"]',
        f"ENV PATH={path}",
        f"ENV HOME={IMAGE_HOME}",
        "ENV LANG=C.UTF-8",
        f"USER {IMAGE_USER}",
        f"WORKDIR {IMAGE_HOME}",
        f"EXPOSE {SERVER_PORT}",
        f"LABEL {FINGERPRINT_LABEL}={fingerprint}",
    ]


def hub_config(image: str) -> str:
    """The docker setup's hub configuration (after the benchmark's common lines)."""
    labels = {LABEL: LABEL_VALUE}
    return f"""
c.JupyterHub.spawner_class = "docker"
c.DockerSpawner.image = {image!r}
c.DockerSpawner.pull_policy = "never"
c.DockerSpawner.prefix = {CONTAINER_PREFIX!r}
c.DockerSpawner.network_name = "bridge"
# The proxy reaches a container at its own address on the bridge (no published port).
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.port = {SERVER_PORT}
# Deleted at stop, as lxdspawner deletes its containers.
c.DockerSpawner.remove = True
c.DockerSpawner.notebook_dir = {IMAGE_HOME!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {labels!r}}}
"""


def missing_packages(importable: Callable[[str], bool]) -> list[str]:
    """The bench packages (requirement strings) whose module is not importable."""
    modules = {
        "dockerspawner>=13": "dockerspawner",
        "docker>=7": "docker",
        "escapism>=1": "escapism",
    }
    return [req for req in BENCH_PACKAGES if not importable(modules[req])]


# -- dockerspawner in the benchmark's environment ------------------------------------------------


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def ensure_dockerspawner(say) -> None:
    """dockerspawner importable here and in the hubs: the ``bench`` extra, else installed into
    ``.cache/bench-site`` (without dependencies: JupyterHub and requests are the venv's), which
    goes on PYTHONPATH for the hubs this process starts."""
    if BENCH_SITE.is_dir():
        sys.path.insert(0, str(BENCH_SITE))
    missing = missing_packages(_importable)
    if missing:
        say(f"installing {', '.join(missing)} into {BENCH_SITE} (pip install .[bench] avoids this)")
        BENCH_SITE.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--no-deps", "--upgrade", "--target", str(BENCH_SITE), *missing])  # fmt: skip
        if str(BENCH_SITE) not in sys.path:
            sys.path.insert(0, str(BENCH_SITE))
        importlib.invalidate_caches()
    if BENCH_SITE.is_dir():
        paths = [str(BENCH_SITE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


# -- the daemon ------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/", **kw)
    if p.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
        )
    return p


def docker(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [DOCKER_CLI, "--host", f"unix://{SOCKET}", *args]
    if check:
        return _run(cmd, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/", **kw)


def _answers() -> bool:
    return Path(SOCKET).exists() and docker("version", check=False).returncode == 0


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


@dataclass
class Daemon:
    """The docker daemon the run uses, and what the benchmark did to have it."""

    started_here: bool = False
    installed_here: bool = False
    bridge_made_here: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)
    pid: int | None = None
    gateway: str = ""
    version: str = ""


def ensure_dockerd(workdir: Path, say) -> Daemon:
    """A docker daemon answering on its socket: installed and started when missing."""
    d = Daemon()
    if not Path(DOCKERD).exists() or not Path(DOCKER_CLI).exists():
        say("docker.io is not installed: apt-get install docker.io")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker.io"], env=env)
        d.installed_here = True
    if not _answers():
        config = workdir / "dockerd.json"
        config.write_text(json.dumps(daemon_config(), indent=1) + "\n")
        d.bridge_made_here = not _link_exists(BRIDGE)
        say(f"starting dockerd ({config}: bridge {BRIDGE_ADDRESS}, no iptables)")
        log = open(workdir / "dockerd.log", "ab")  # noqa: SIM115 - the daemon's, closed by it
        d.proc = subprocess.Popen(
            [DOCKERD, "--config-file", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
        )  # fmt: skip
        log.close()
        d.started_here = True
        deadline = time.monotonic() + 60
        while not _answers():
            if d.proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "dockerd.log").read_text(errors="replace")[-3000:]
                stop_dockerd(d, say)
                raise SystemExit(f"dockerd did not come up:\n{tail}")
            time.sleep(0.2)
    info = json.loads(docker("info", "--format", "{{json .}}").stdout)
    d.version = f"{info.get('ServerVersion', '?')}, {info.get('Driver', '?')}"
    with contextlib.suppress(OSError):
        d.pid = int(Path("/var/run/docker.pid").read_text())
    net = json.loads(docker("network", "inspect", "bridge").stdout)[0]
    configs = (net.get("IPAM") or {}).get("Config") or [{}]
    d.gateway = configs[0].get("Gateway", "")
    if not d.started_here and d.gateway != str(ipaddress.ip_interface(BRIDGE_ADDRESS).ip):
        say(f"warning: the running dockerd's bridge is at {d.gateway}, not {BRIDGE_ADDRESS}")
    return d


def stop_dockerd(d: Daemon, say) -> None:
    """Stop the daemon if the benchmark started it (and the bridge it made)."""
    if not d.started_here or d.proc is None:
        return
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    say("stopped dockerd (the benchmark had started it)")
    if d.bridge_made_here and _link_exists(BRIDGE):
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)


# -- the image and the containers ----------------------------------------------------------------


def ensure_image(fingerprint: str, squashfs: Path | None, workdir: Path, say) -> str:
    """The imported image of the Incus image ``fingerprint`` (cached by its tag)."""
    tag = image_tag(fingerprint)
    found = docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag, check=False)
    if found.returncode == 0 and fingerprint in found.stdout:
        return tag
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if squashfs is None or not squashfs.exists():
            say(f"exporting the Incus image {fingerprint[:12]}")
            _run(["incus", "image", "export", fingerprint, f"{tmp}/export"])
            candidates = [p for p in Path(tmp).iterdir() if p.suffix == ".squashfs"]
            if not candidates:
                raise SystemExit(
                    f"incus image export {fingerprint[:12]}: no squashfs root file system"
                )
            squashfs = candidates[0]
        say(f"docker import of {squashfs} as {tag}")
        changes = [a for c in import_changes(fingerprint) for a in ("--change", c)]
        tar = subprocess.Popen(
            ["sqfs2tar", str(squashfs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        imp = subprocess.run(
            [DOCKER_CLI, "--host", f"unix://{SOCKET}", "import", *changes, "-", tag],
            stdin=tar.stdout, capture_output=True, text=True, check=False,
        )  # fmt: skip
        tar.stdout.close()
        tar_err = tar.stderr.read().decode(errors="replace")
        if tar.wait() != 0 or imp.returncode != 0:
            raise SystemExit(f"docker import failed:\n{tar_err[-2000:]}{imp.stdout}{imp.stderr}")
    say(f"imported {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def our_containers() -> list[str]:
    """Ids of every container (running or not) carrying the benchmark's label."""
    p = docker("ps", "-aq", "--filter", f"label={LABEL}={LABEL_VALUE}", check=False)
    return p.stdout.split() if p.returncode == 0 else []


def remove_our_containers() -> list[str]:
    ids = our_containers()
    if ids:
        docker("rm", "-f", *ids, check=False)
    return ids


def container_cgroup(container_id: str, controller: str) -> Path | None:
    """The container's cgroup (v1, cgroupfs driver) of one controller, if there."""
    for parent in ("docker", "system.slice"):
        for name in (container_id, f"docker-{container_id}.scope"):
            path = Path("/sys/fs/cgroup") / controller / parent / name
            if path.is_dir():
                return path
    return None


def dockerd_process():
    """psutil.Process of the daemon (for CPU accounting), or None."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - jupyterhub depends on it
        return None
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "dockerd":
            return p
    return None


@dataclass
class Peer:
    """What the docker setup's hub needs: the image, the bridge's address, the daemon."""

    image: str
    gateway: str
    daemon: Daemon


def prepare(workdir: Path, fingerprint: str, squashfs: Path | None, say) -> Peer:
    """The daemon up, dockerspawner importable, the image imported, no leftover container."""
    ensure_dockerspawner(say)
    daemon = ensure_dockerd(workdir, say)
    try:
        image = ensure_image(fingerprint, squashfs, workdir, say)
        removed = remove_our_containers()
        if removed:
            say(f"removed leftover docker containers of an earlier run: {len(removed)}")
    except BaseException:
        stop_dockerd(daemon, say)
        raise
    return Peer(image, daemon.gateway, daemon)


def finish(peer: Peer, say) -> None:
    """Our containers removed; the daemon stopped if the benchmark started it."""
    removed = remove_our_containers()
    if removed:
        say(f"clean-up: removed {len(removed)} docker containers")
    stop_dockerd(peer.daemon, say)
