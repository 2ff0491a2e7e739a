"""Pure builders: what we send to LXD and what we put inside the container.

Plain data in, plain data out, no I/O, so every rule here is unit-tested without a daemon:
the instance's config keys and devices, the server's environment file and its systemd unit.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import names, patches
from .ownership import KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY, Owner  # noqa: F401

UNIT_NAME = "jupyterhub-singleuser.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
UNIT_WANTS_LINK = f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
CONFIG_DIR = "/etc/lxdspawner"
ENV_PATH = f"{CONFIG_DIR}/singleuser.env"
#: The server's output, as a plain file: readable through the files API even after the
#: container has powered off, so a failed spawn can show why.
SERVER_LOG_PATH = "/var/log/jupyterhub-singleuser.log"
DEFAULT_PATH = "/opt/jupyterhub/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Mount:
    """A host directory mounted into the container (an LXD disk device)."""

    name: str
    source: str
    path: str


@dataclass(frozen=True)
class ServerSpec:
    """Everything that defines one user's server, resolved from the spawner's settings."""

    instance: str
    username: str
    server_name: str
    hub: str
    uid: int
    gid: int
    home: str
    cmd: tuple[str, ...]
    port: int = 8888
    profiles: tuple[str, ...] = ("default",)
    mounts: tuple[Mount, ...] = ()
    mem_limit: int | None = None
    cpu_limit: float | None = None
    process_limit: int | None = None
    privileged: bool = False
    extra_config: Mapping[str, str] = field(default_factory=dict)
    extra_devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Isolation lxdspawner adds (uid map, guest API): the operator's extra_config may
    #: override these keys.
    hardening: Mapping[str, str] = field(default_factory=dict)
    #: Profile devices lxdspawner overrides (the root disk's size, the isolated NIC); the
    #: operator's extra_devices override these.
    system_devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The users' volumes (see volumes.py); the operator's extra_devices override these.
    volume_devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The home is a volume's mount point: handed to the server's uid while still root's.
    home_on_volume: bool = False
    #: The GPUs placement chose (capacity.gpu_devices); the operator's extra_devices override.
    gpu_devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The keys recording its guarantees and GPUs (capacity.instance_keys), after extra_config.
    capacity_config: Mapping[str, str] = field(default_factory=dict)
    #: instance_patches, rendered for this server: (key, fragment), merged in this order.
    patches: tuple[tuple[str, Mapping], ...] = ()


# -- instance -----------------------------------------------------------------------------


def cpu_allowance(cpu_limit: float) -> str:
    """A CPU time quota: 0.5 → ``50ms/100ms`` (half of one CPU), 2 → ``200ms/100ms``.

    A quota rather than ``limits.cpu`` (which pins whole CPUs), so fractional limits mean
    what JupyterHub's ``cpu_limit`` says: a share of CPU time.
    """
    if cpu_limit <= 0:
        raise ValueError(f"cpu_limit must be positive, not {cpu_limit}")
    return f"{max(1, round(cpu_limit * 100))}ms/100ms"


def owner(spec: ServerSpec) -> Owner:
    return Owner(spec.hub, spec.username, spec.server_name)


def instance_config(spec: ServerSpec) -> dict[str, str]:
    config: dict[str, str] = {}
    if spec.mem_limit:
        config["limits.memory"] = str(int(spec.mem_limit))
    if spec.cpu_limit:
        config["limits.cpu.allowance"] = cpu_allowance(spec.cpu_limit)
    if spec.process_limit:
        config["limits.processes"] = str(int(spec.process_limit))
    if spec.privileged:
        config["security.privileged"] = "true"
    config.update(spec.hardening)
    config.update(spec.extra_config)
    config.update(spec.capacity_config)  # placement counts these: what it chose stands
    config.update(owner(spec).keys())  # last: no other setting may change whose it is
    return config


def instance_devices(spec: ServerSpec) -> dict[str, dict[str, str]]:
    devices = {k: dict(v) for k, v in spec.system_devices.items()}
    devices.update(
        {m.name: {"type": "disk", "source": m.source, "path": m.path} for m in spec.mounts}
    )
    devices.update({k: dict(v) for k, v in spec.volume_devices.items()})
    devices.update({k: dict(v) for k, v in spec.gpu_devices.items()})
    devices.update({k: dict(v) for k, v in spec.extra_devices.items()})
    return devices


def instance_request(spec: ServerSpec) -> dict:
    """The instance's ``config``, ``devices`` and ``profiles``, with the instance_patches
    merged in (see patches.py); PatchError when a patch would change the ownership keys or
    the isolation."""
    config = instance_config(spec)
    devices = instance_devices(spec)
    request = {"config": config, "devices": devices, "profiles": list(spec.profiles)}
    if not spec.patches:
        return request
    protected = patches.Protected(
        config={k: config[k] for k in (*spec.hardening, *owner(spec).keys()) if k in config},
        devices={k: devices[k] for k in spec.system_devices if k in devices},
    )
    return patches.apply(request, spec.patches, protected)


def root_disk(profile_devices: Mapping[str, Mapping[str, str]]) -> tuple[str, dict[str, str]]:
    """The profiles' root disk device (name, device): the disk whose path is "/"."""
    for name, device in profile_devices.items():
        if device.get("type") == "disk" and device.get("path") == "/":
            return name, dict(device)
    raise ValueError("the profiles give the containers no root disk (a disk device at /)")


# -- templates: {USERNAME} ----------------------------------------------------------------


def expand_username_in_path(path: str, username: str) -> str:
    """``{USERNAME}``/``{username}`` in a path → the username, which must stay one component."""
    if ("{USERNAME}" in path or "{username}" in path) and not names.is_safe_path_component(
        username
    ):
        raise ValueError(f"username {username!r} cannot be used as a path component in {path!r}")
    expanded = path.replace("{USERNAME}", username).replace("{username}", username)
    return posixpath.normpath(expanded) if expanded else expanded


# -- inside the container -----------------------------------------------------------------


# Inside double quotes in an EnvironmentFile=, and in a quoted word of an Exec line; the
# Exec line also expands "%" specifiers and "$" variables, which must be doubled there.
_ENV_FILE_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "$": "\\$", "`": "\\`", "\n": "\\n"})
_EXEC_LINE_ESCAPES = str.maketrans(
    {"\\": "\\\\", '"': '\\"', "%": "%%", "$": "$$"}
    # Every control character as a C escape: systemd ends a line at CR and NUL as well as LF.
    | {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
)


def env_file(env: Mapping[str, str]) -> str:
    """A systemd ``EnvironmentFile=``: one ``KEY='value'`` per line, taken literally.

    Single quotes make systemd take the value as it is (JSON scopes, ``$``, ``%``, ``\\``);
    a value that holds a single quote is written double-quoted with ``\\`` escapes instead.
    """
    lines = []
    for key, value in env.items():
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"environment variable name {key!r} is not valid")
        value = str(value)
        if "\0" in value:
            raise ValueError(f"environment variable {key} holds a NUL character")
        if "'" not in value:
            lines.append(f"{key}='{value}'")
        else:
            lines.append(f'{key}="{value.translate(_ENV_FILE_ESCAPES)}"')
    return "\n".join(lines) + "\n"


def server_environment(spec: ServerSpec, hub_env: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: HOME, then what the hub gives (which may override it)."""
    return {"HOME": spec.home, **hub_env}


def systemd_quote(arg: str) -> str:
    """Quote one word of a unit's command line so systemd passes it on unchanged."""
    return f'"{arg.translate(_EXEC_LINE_ESCAPES)}"'


def make_home_command(spec: ServerSpec) -> list[str]:
    """Create the home directory, owned by the server's uid/gid, only when nothing is there.

    It runs as root (the unit's ExecStartPre, or an exec before commands_to_prepare): an
    existing path is never touched, so a symlink the user left at their home's place, or a
    name such as ``..``, never makes root hand over a directory that is not the home. The
    path is an argument, never part of the script.

    A home on a volume (its mount point, which the user cannot replace) still owned by root
    is a new volume: it is handed to the server's uid/gid with mode 0700, once.
    """
    script = f'test -e "$1" || test -L "$1" || install -d -o {spec.uid} -g {spec.gid} -m 0755 "$1"'
    if spec.home_on_volume and spec.uid != 0:
        script += (
            f'; if test -d "$1" && ! test -L "$1" && test "$(stat -c %u "$1")" = 0; then '
            f'chown {spec.uid}:{spec.gid} "$1" && chmod 0700 "$1"; fi'
        )
    return ["/bin/sh", "-c", script, "make-home", spec.home]


def server_unit(
    spec: ServerSpec, *, env_path: str = ENV_PATH, log_path: str = SERVER_LOG_PATH
) -> str:
    """The systemd unit that runs the server inside the container.

    HOME comes with the environment file (see :func:`server_environment`). The server belongs
    to the container, not to the hub: the hub may restart at any time. When
    the server exits, for any reason, the container powers off, so "container running" and
    "server running" are one state that the hub can read from LXD.
    """
    command = " ".join(systemd_quote(a) for a in ("/usr/bin/env", *spec.cmd))
    make_home = " ".join(systemd_quote(a) for a in make_home_command(spec))
    if not spec.home.startswith("/") or not all(
        names.is_safe_path_component(part) for part in spec.home.strip("/").split("/")
    ):
        raise ValueError(
            f"home directory {spec.home!r} must be an absolute path of plain directory names "
            "(no '.', '..', control characters)"
        )
    # WorkingDirectory= takes the rest of the line as it is (no quotes), expanding only "%";
    # "-": ExecStartPre, which makes the directory, runs before it exists.
    working_directory = spec.home.replace("%", "%%")
    return f"""\
# Written by lxdspawner; replaced at every start.
[Unit]
Description=Jupyter single-user server (lxdspawner)
After=network.target systemd-networkd.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=simple
User={spec.uid}
Group={spec.gid}
EnvironmentFile={env_path}
Environment=PATH={DEFAULT_PATH}
ExecStartPre=-+{make_home}
WorkingDirectory=-{working_directory}
ExecStart={command}
StandardOutput=append:{log_path}
StandardError=append:{log_path}
Restart=no
KillMode=mixed
TimeoutStopSec=20
OOMPolicy=continue

[Install]
WantedBy=multi-user.target
"""


def wait_for_systemd_and_start_unit() -> list[str]:
    """A command (no user data in it) that starts the unit once the container's systemd
    accepts requests: right after a start, PID 1 may not listen yet."""
    script = (
        f"for i in $(seq 1 100); do systemctl start --no-block {UNIT_NAME} && exit 0; "
        "sleep 0.1; done; exit 1"
    )
    return ["/bin/sh", "-c", script]


def as_pairs(value: Sequence, setting: str, size: int) -> list[tuple[str, ...]]:
    """Check a list-of-lists setting's shape, naming the setting when it is wrong."""
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != size:
            raise ValueError(
                f"{setting}[{i}] = {row!r}: each entry must be a list of {size} strings"
            )
        if not all(isinstance(x, str) and x for x in row):
            raise ValueError(f"{setting}[{i}] = {row!r}: each item must be a non-empty string")
        rows.append(tuple(row))
    return rows
