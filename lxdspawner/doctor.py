"""``lxdspawner doctor``: why a spawn cannot work, found before a user finds it.

It reads the hub's own ``jupyterhub_config.py`` (with traitlets' PyFileConfigLoader, as
JupyterHub does), takes from it what the spawner would use (the connection settings, the
``remotes``, the remotes a list ``profile_list`` names, the image, the profiles and the hub's
addresses) and checks, for each remote: that the daemon answers and its members are Online;
the storage pool of the profiles' root disk (a ``dir`` pool is a warning: every server is a
full copy of the image, and quotas are not enforced); that the image exists; that the
profiles exist and give ``eth0`` on a managed bridge with an IPv4 gateway; and that the hub's
API is at an address containers can reach (a hub on loopback with no ``hub_connect_url`` is an
error: the container would talk to itself). It also lists our containers by hub, the stopped
ones named. The checks past that (each member's image, shared copies and clock; this host's
subordinate ids and stray bridge ports; what belongs to no server, with the hub's database;
the probe container that fetches the hub's API) are in :mod:`lxdspawner.doctorchecks`.

Each finding is a :class:`~lxdspawner.findings.Result`: a severity (``ok``, ``warning``,
``error``), what was found and the fix (a command or a setting with its value). The checks
are small async functions over an :class:`~lxdspawner.lxd.LxdClient`, so the unit tier runs
them against a fake. Exit status: 0 with no error (warnings allowed: they cost something but
servers start), 1 with an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import doctorchecks, hardening, hubdb, network, ownership, recipes
from .findings import ERROR, OK, WARNING, Result, _tool
from .lxd import LxdClient, LxdError
from .remotes import KEYS, check_remotes, from_settings

__all__ = ["ERROR", "OK", "WARNING", "Result", "Settings", "diagnose", "load_settings"]


@dataclass
class Settings:
    """What the spawner would use, taken from the hub's config (defaults: the local daemon)."""

    default: dict[str, str] = field(default_factory=dict)
    remotes: dict[str, dict[str, str]] = field(default_factory=dict)
    extra_remotes: list[str] = field(default_factory=list)
    image: str = "jupyter-base"
    profiles: list[str] = field(default_factory=lambda: ["default"])
    hub_ip: str | None = None
    hub_port: int = 8081
    hub_bind_url: str = ""
    hub_connect_url: str = ""
    spawner_hub_connect_url: str = ""
    hub_id: str = ""
    #: The config file these come from (absolute), for the fixes' commands.
    config_file: str = ""
    base_url: str = "/"
    shared_directories: list[str] = field(default_factory=lambda: ["/usr", "/opt/jupyterhub"])
    isolated_idmap: bool | None = None
    privileged_containers: bool = False
    #: ``c.JupyterHub.active_server_limit`` (0: none): the servers the uid ranges must hold.
    active_server_limit: int = 0
    #: The hub's database (absolute for SQLite; "" without one): see :mod:`lxdspawner.hubdb`.
    db_url: str = ""
    #: Run the probe container (``--no-probe``: not).
    probe: bool = True
    #: The config file given with ``-f`` ("" without), for the fixes' command lines.
    config_path: str = ""
    #: Where this host's ``/etc`` and ``/sys`` are read (the unit tests: a directory of theirs).
    host_root: Path = Path("/")

    def targets(self) -> list[str]:
        """The remotes to check: "" (the default), every entry of ``remotes``, and the
        remotes a ``profile_list`` names, each once."""
        return list(dict.fromkeys(["", *self.remotes, *self.extra_remotes]))


def _section(config: Any, name: str) -> Mapping[str, Any]:
    return config[name] if name in config else {}


def load_settings(path: str | Path | None) -> Settings:
    """The settings of the hub config at ``path`` (None: the defaults). The ``LxdSpawner``
    section overrides ``Spawner``, as for the hub. A ValueError names the setting at fault."""
    settings = Settings()
    if path is None:
        return settings
    from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

    path = Path(path)
    settings.config_path = str(path)
    try:
        config = PyFileConfigLoader(path.name, path=str(path.parent.resolve())).load_config()
    except ConfigFileNotFound as e:
        raise ValueError(f"-f {path}: no such config file") from e
    settings.config_file = str(path.resolve())
    merged: dict[str, Any] = {}
    for section in ("Spawner", "LxdSpawner"):
        merged.update(dict(_section(config, section)))
    settings.default = {k: str(merged.get(k, "") or "") for k in KEYS}
    settings.remotes = check_remotes(merged.get("remotes", {}) or {})
    if "image" in merged:
        settings.image = str(merged["image"])
    if "profiles" in merged:
        settings.profiles = [str(p) for p in merged["profiles"]]
    settings.hub_id = str(merged.get("hub_id", "") or "")
    if "shared_directories" in merged:
        settings.shared_directories = [str(p) for p in merged["shared_directories"]]
    if merged.get("isolated_idmap") is not None:
        settings.isolated_idmap = bool(merged["isolated_idmap"])
    settings.privileged_containers = bool(merged.get("privileged_containers", False))
    settings.spawner_hub_connect_url = str(merged.get("hub_connect_url", "") or "")
    profile_list = merged.get("profile_list")
    if isinstance(profile_list, list):
        for entry in profile_list:
            override = entry.get("spawner_override", {}) if isinstance(entry, Mapping) else {}
            remote = override.get("remote") if isinstance(override, Mapping) else None
            if isinstance(remote, str) and remote:
                settings.extra_remotes.append(remote)
    hub = _section(config, "JupyterHub")
    if "hub_ip" in hub:
        settings.hub_ip = str(hub["hub_ip"])
    if "hub_port" in hub:
        settings.hub_port = int(hub["hub_port"])
    settings.hub_bind_url = str(hub.get("hub_bind_url", "") or "")
    settings.hub_connect_url = str(hub.get("hub_connect_url", "") or "")
    settings.base_url = str(hub.get("base_url", "/") or "/")
    settings.active_server_limit = int(hub.get("active_server_limit", 0) or 0)
    if hub.get("db_url"):
        settings.db_url = hubdb.absolute(str(hub["db_url"]), path.parent.resolve())
    if not settings.hub_id:
        # As the spawner's default: from the database's URL (JupyterHub's default file is
        # relative to where the hub runs: taken here as the config's directory).
        default_db = settings.db_url or hubdb.absolute(
            "sqlite:///jupyterhub.sqlite", path.parent.resolve()
        )
        settings.hub_id = ownership.default_hub_id(default_db)
    return settings


# -- the checks --------------------------------------------------------------------------------


async def check_daemon(client: LxdClient, name: str) -> list[Result]:
    """The daemon answers; its product, version, and the members' status on a cluster."""
    info = await client.server_info()
    env = info.get("environment") or {}
    product = "Incus" if client.dialect and client.dialect.product == "incus" else "LXD"
    version = env.get("server_version", "?")
    members = await client.cluster_members()
    found = [
        Result(
            OK,
            name,
            "daemon",
            f"{product} {version} at {client.where}"
            + (f", clustered ({len(members)} members)" if members else ", standalone"),
        )
    ]
    for m in members:
        if m.get("status") != "Online":
            found.append(
                Result(
                    WARNING,
                    name,
                    "member",
                    f"member {m.get('server_name')} is {m.get('status')}: no server starts there",
                    f"bring it back ({m.get('message') or 'see its daemon log'}), or "
                    f"evacuate it: {_tool(client)} cluster evacuate {m.get('server_name')}",
                )
            )
    return found


async def _expanded(client: LxdClient, name: str, profiles: list[str]) -> tuple[dict, list]:
    """The devices the profiles give, in order (later ones win), and the findings."""
    devices: dict[str, dict] = {}
    found: list[Result] = []
    for profile in profiles:
        try:
            devices.update((await client.profile(profile)).get("devices") or {})
        except LxdError as e:
            if e.status != 404:
                raise
            found.append(
                Result(
                    ERROR,
                    name,
                    "profile",
                    f"profile {profile!r} does not exist on {client.where}",
                    f"create it ({_tool(client)} profile create {profile}) or remove it from "
                    "c.LxdSpawner.profiles",
                )
            )
    return devices, found


async def check_profiles(client: LxdClient, name: str, profiles: list[str]) -> list[Result]:
    """The profiles exist; their root disk's pool and its driver; eth0 on a managed bridge
    and that bridge's IPv4 gateway."""
    devices, found = await _expanded(client, name, profiles)
    if found:
        return found
    root = next(
        (d for d in devices.values() if d.get("type") == "disk" and d.get("path") == "/"), None
    )
    if root is None or not root.get("pool"):
        found.append(
            Result(
                ERROR,
                name,
                "storage",
                f"the profiles {profiles} give no root disk",
                f"{_tool(client)} profile device add default root disk path=/ pool=default",
            )
        )
    else:
        pool = await client.request("GET", f"/1.0/storage-pools/{root['pool']}")
        driver = pool.get("driver", "?")
        if driver == "dir":
            found.append(
                Result(
                    WARNING,
                    name,
                    "storage",
                    f"pool {root['pool']!r} uses the dir driver: each server is a full copy of "
                    "the image (seconds and its whole size per spawn, not a copy-on-write "
                    "clone) and disk quotas are not enforced",
                    f"use a zfs, btrfs or lvm pool: {_tool(client)} storage create fast zfs, then "
                    "pool=fast in the profile's root disk",
                )
            )
        else:
            found.append(Result(OK, name, "storage", f"pool {root['pool']!r} ({driver})"))
    nic = devices.get("eth0") or {}
    bridge = nic.get("network") or nic.get("parent") or ""
    if nic.get("type") != "nic" or not bridge:
        found.append(
            Result(
                ERROR,
                name,
                "network",
                f"the profiles {profiles} give no eth0 NIC on a managed bridge",
                f"{_tool(client)} profile device add default eth0 nic network=<bridge> name=eth0",
            )
        )
        return found
    if not nic.get("network") and nic.get("nictype", "bridged") != "bridged":
        # macvlan, ipvlan, physical, sriov: the host's own interface, no bridge of the
        # daemon's; the network beyond it (and the hub's address on it) is the operator's.
        found.append(
            Result(
                OK,
                name,
                "network",
                f"eth0 is a {nic['nictype']} NIC on the host's {bridge} (no managed bridge: "
                "the hub's address is hub_connect_url's, and network_isolation cannot apply)",
            )
        )
        return found
    try:
        gateway = network.gateway_of(await client.network(bridge))
    except LxdError as e:
        found.append(
            Result(
                ERROR,
                name,
                "network",
                f"eth0's network {bridge!r}: {e.message}",
                f"{_tool(client)} network list: give eth0 a managed bridge (network=<bridge>)",
            )
        )
    except network.IsolationError as e:
        found.append(
            Result(
                ERROR,
                name,
                "network",
                str(e),
                f"{_tool(client)} network set {bridge} ipv4.address=auto",
            )
        )
    else:
        found.append(Result(OK, name, "network", f"eth0 on {bridge}, gateway {gateway}"))
    return found


async def check_image(
    client: LxdClient, name: str, image: str, product: str, config: str = "", remote: str = ""
) -> list[Result]:
    """The image exists (images are the cluster's: one look answers for every member). The
    fix builds it for the hub's config ``config`` (its ``remote``, "" the default)."""
    fingerprint = await client.image_fingerprint(image)
    if fingerprint is None:
        return [
            Result(
                ERROR,
                name,
                "image",
                f"image {image!r} not found on {client.where}",
                recipes.ensure_image_command(image, product, config=config, remote=remote)
                + ("" if image in recipes.IMAGE_NAMES else ", or set c.LxdSpawner.image"),
            )
        ]
    return [Result(OK, name, "image", f"image {image!r} ({fingerprint[:12]})")]


async def check_leftovers(client: LxdClient, name: str, hub_id: str = "") -> list[Result]:
    """Informational: our containers on this daemon, by hub, and those stopped (kept servers,
    or left by a hub that is gone). Without the hub's database doctor cannot tell which
    belong to no server; it lists, it never deletes (``lxdspawner list`` shows them all)."""
    ours = [
        i
        for i in await client.list_instances(recursion=1)
        if (i.get("config") or {}).get(ownership.KEY_MANAGED) == ownership.MANAGED_BY
    ]
    by_hub: dict[str, list[dict]] = {}
    for instance in ours:
        by_hub.setdefault(instance["config"].get(ownership.KEY_HUB, "?"), []).append(instance)
    found = []
    for hub, instances in sorted(by_hub.items()):
        stopped = [i["name"] for i in instances if i.get("status") != "Running"]
        other = f" (not this hub's: hub_id is {hub_id!r})" if hub_id and hub != hub_id else ""
        found.append(
            Result(
                OK,
                name,
                "servers",
                f"hub {hub!r}{other}: {len(instances)} container(s), {len(stopped)} stopped"
                + (
                    f": {', '.join(stopped[:5])}" + (" ..." if len(stopped) > 5 else "")
                    if stopped
                    else ""
                ),
                ""
                if not stopped
                else "lxdspawner list shows them; kept servers' data is never deleted implicitly",
            )
        )
    return found


def check_hub(settings: Settings, gateway: str | None) -> Result:
    """The hub's API at an address containers reach: an operator's ``hub_connect_url``, a
    routable bind address, or a wildcard (then the bridge's gateway is used, as
    :func:`lxdspawner.hardening.hub_api_url` does). Loopback is an error."""
    chosen = settings.spawner_hub_connect_url or settings.hub_connect_url
    if chosen:
        return Result(OK, "", "hub", f"containers reach the hub at {chosen} (hub_connect_url)")
    if settings.hub_bind_url:
        from urllib.parse import urlsplit

        host = urlsplit(settings.hub_bind_url).hostname or ""
        setting = f"c.JupyterHub.hub_bind_url = {settings.hub_bind_url!r}"
    else:
        host = "127.0.0.1" if settings.hub_ip is None else settings.hub_ip
        setting = f"c.JupyterHub.hub_ip = {host!r}"
    if host in ("", "0.0.0.0", "::"):  # noqa: S104
        where = f"{gateway}:{settings.hub_port}" if gateway else "the bridge's gateway"
        return Result(OK, "", "hub", f"the hub listens on all addresses; containers use {where}")
    if hardening.is_loopback(host):
        value = gateway or "the bridge's gateway address"
        return Result(
            ERROR,
            "",
            "hub",
            f"the hub listens on {host} ({setting}): containers cannot reach it",
            f"c.JupyterHub.hub_ip = {value!r} (or '0.0.0.0'), or set "
            "c.JupyterHub.hub_connect_url to an address containers can reach",
        )
    return Result(OK, "", "hub", f"containers reach the hub at {host}:{settings.hub_port}")


async def check_remote(
    name: str,
    remote_settings: Mapping[str, str],
    settings: Settings,
    hub: hubdb.HubServers | None = None,
):
    """Every check of one remote; the gateway of its bridge (or None) for the hub check.
    ``hub``: the hub's users and servers (from its database), for what belongs to none."""
    label = name or "default"
    try:
        remote = from_settings(remote_settings)
    except Exception as e:  # a command-line remote that is not there, unreadable certs
        fix = f"c.LxdSpawner.remotes[{name!r}]" if name else "c.LxdSpawner.endpoint"
        return [Result(ERROR, label, "daemon", str(getattr(e, "message", e)), f"check {fix}")], None
    client = remote.client()
    gateway = None
    try:
        try:
            await client.open()
        except LxdError as e:
            setting = f"c.LxdSpawner.remotes[{name!r}]['endpoint']" if name else "endpoint"
            # A socket of LXD's (/var/lib/lxd/, the snap's /var/snap/lxd/) is LXD's service.
            service = "lxd" if "/lxd/" in remote.endpoint else "incus"
            return [
                Result(
                    ERROR,
                    label,
                    "daemon",
                    e.message,
                    f"start the daemon (systemctl start {service}), or correct "
                    f"{setting if name else 'c.LxdSpawner.endpoint'} = {remote.endpoint!r}",
                )
            ], None
        product = client.dialect.product if client.dialect else "incus"
        found = await check_daemon(client, label)
        found += await check_profiles(client, label, settings.profiles)
        found += await check_image(
            client, label, settings.image, product, settings.config_file, name
        )
        root = await _root_and_bridge(client, settings.profiles)
        pool, driver, bridge = root or (None, "", "")
        found += await doctorchecks.check_members(
            client,
            label,
            image=settings.image,
            pool=pool,
            driver=driver,
            shared_directories=()
            if settings.privileged_containers
            else settings.shared_directories,
            prepull=_command("prepull", settings, name),
        )
        found += await check_leftovers(client, label, settings.hub_id)
        found += await doctorchecks.check_owners(client, label, settings.hub_id, hub)
        if not remote.endpoint.startswith("https://"):  # a local daemon: its host is this one
            isolated = not settings.privileged_containers and (
                settings.isolated_idmap
                if settings.isolated_idmap is not None
                else product == "incus"
            )
            found += await doctorchecks.check_host(
                client,
                label,
                bridge=bridge,
                isolated=isolated,
                needed=settings.active_server_limit,
                root=settings.host_root,
                pool=pool,
                driver=driver,
            )
        for r in found:
            if r.check == "network" and r.severity == OK and "gateway " in r.what:
                gateway = r.what.rsplit("gateway ", 1)[1]
        if settings.probe and root is not None and check_hub(settings, gateway).severity == OK:
            url, hint = doctorchecks.hub_url_for(settings, gateway)
            found.append(
                await doctorchecks.check_probe(
                    client,
                    label,
                    url,
                    hub_id=settings.hub_id,
                    profiles=settings.profiles,
                    image=settings.image,
                    settings_hint=hint,
                    bridge=bridge,
                )
            )
        return found, gateway
    except LxdError as e:
        return [Result(ERROR, label, "daemon", e.message, "see the daemon's log")], gateway
    finally:
        await client.close()


async def _root_and_bridge(client: LxdClient, profiles: list[str]) -> tuple[str, str, str] | None:
    """(root pool, its driver, eth0's bridge) of the profiles; None when they give no root
    disk or a profile is missing (check_profiles says which)."""
    devices: dict[str, dict] = {}
    try:
        for profile in profiles:
            devices.update((await client.profile(profile)).get("devices") or {})
    except LxdError:
        return None
    root = next(
        (d for d in devices.values() if d.get("type") == "disk" and d.get("path") == "/"), None
    )
    if root is None or not root.get("pool"):
        return None
    pool = await client.request("GET", f"/1.0/storage-pools/{root['pool']}")
    nic = devices.get("eth0") or {}
    if not nic.get("network") and nic.get("nictype", "bridged") != "bridged":
        return root["pool"], pool.get("driver", ""), ""  # the host's interface, no bridge
    return root["pool"], pool.get("driver", ""), nic.get("network") or nic.get("parent") or ""


def _command(command: str, settings: Settings, remote: str) -> str:
    """``lxdspawner <command>`` with the options that reach what doctor checked."""
    parts = ["lxdspawner", command]
    if settings.config_path:
        parts += ["-f", settings.config_path]
    else:
        parts += ["--image", settings.image]
    if remote:
        parts += ["--remote", remote]
    return " ".join(parts)


def _hub_servers(settings: Settings) -> tuple[hubdb.HubServers | None, list[Result]]:
    """The hub's users and servers from its database, when there is one to read."""
    if not settings.db_url:
        return None, []
    try:
        return hubdb.read(settings.db_url), []
    except ValueError as e:
        return None, [
            Result(
                WARNING,
                "",
                "database",
                f"{e}: which containers and volumes belong to no server is not checked",
                "run doctor where the hub's database is readable, or give it: --db-url URL",
            )
        ]


async def diagnose(settings: Settings) -> list[Result]:
    """Every finding, remote by remote, then the hub's address."""
    hub, results = _hub_servers(settings)
    gateway = None
    for name in settings.targets():
        entry = settings.remotes.get(name) if name else settings.default
        if entry is None:  # a profile_list remote that is no entry: a command-line remote
            entry = {"endpoint": name}
        found, bridge_gateway = await check_remote(name, entry, settings, hub)
        results += found
        gateway = gateway or bridge_gateway
    results.append(check_hub(settings, gateway))
    return results


def exit_status(results: list[Result]) -> int:
    """0 when no result is an error (warnings allowed), else 1."""
    return 1 if any(r.severity == ERROR for r in results) else 0


def as_json(results: list[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def print_rich(results: list[Result], file: Any = None) -> None:
    """The findings as a rich table (colours on a terminal only; rich decides), the fix
    under each finding, and the count of errors and warnings."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    table = Table(show_header=True, header_style="bold", expand=False)
    for column in ("", "remote", "check", "what was found / fix"):
        table.add_column(column, overflow="fold")
    style = {OK: "green", WARNING: "yellow", ERROR: "bold red"}
    for r in results:
        table.add_row(
            f"[{style[r.severity]}]{r.severity.upper()}[/]",
            _escape(r.remote or "-"),
            r.check,
            _escape(r.what) + (f"\n[cyan]fix:[/cyan] {_escape(r.fix)}" if r.fix else ""),
        )
    console.print(table)
    errors = sum(r.severity == ERROR for r in results)
    warnings = sum(r.severity == WARNING for r in results)
    console.print(f"{errors} error(s), {warnings} warning(s)", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def as_table(results: list[Result]) -> str:
    """Aligned plain text: severity, remote, check, what; the fix on its own line below."""
    rows = [(r.severity.upper(), r.remote or "-", r.check, r.what) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = []
    for r, row in zip(results, rows, strict=True):
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        )
        if r.fix:
            lines.append(" " * (sum(widths) + 6) + "fix: " + r.fix)
    errors = sum(r.severity == ERROR for r in results)
    warnings = sum(r.severity == WARNING for r in results)
    lines.append(f"{errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
