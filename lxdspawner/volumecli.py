"""``lxdspawner volumes``: users' volumes as the daemon has them, and the operator's work on
them (list, snapshot, restore, resize, delete, move).

A user's volumes are found by lxdspawner's keys (:mod:`ownership`, ``KEY_VOLUME``): the user
key equal to USER, and the hub key when ``--hub-id`` is given; never by name, since a name is
no proof of whose a volume is. A command that would touch the volumes of one USER on two
hubs refuses and asks for ``--hub-id``.

The pure part (selection, rows, the table) is apart from the daemon's work, which
:class:`~lxdspawner.volumes.Volumes` does. A refusal (a running server, no ``--yes``, no such
volume or snapshot, a standalone daemon for ``move``) raises :class:`Refused`: exit status
2, nothing changed; a failure (the daemon or the hub said no) raises :class:`Failed` or
LxdError: exit status 1. Either is one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TextIO

import aiohttp

from .lxd import LxdError
from .ownership import KEY_HUB, KEY_SERVER, KEY_USER
from .volumes import (
    HOME,
    KEY_VOLUME,
    REMOTE_DRIVERS,
    VolumeError,
    Volumes,
    human,
    parse_size,
    target_of,
)

HEADER = (
    "USER",
    "SERVER",
    "VOLUME",
    "KIND",
    "POOL",
    "MEMBER",
    "SIZE",
    "USED",
    "SNAPSHOTS",
    "LAST-ATTACHED",
    "HUB-USER",
    "HUB",
)


class Refused(Exception):
    """The command will not do it (exit status 2); nothing was changed."""


class Failed(Exception):
    """The command tried and the daemon or the hub said no (exit status 1)."""


# -- pure: selection ----------------------------------------------------------------------


def keys(volume: Mapping) -> Mapping[str, str]:
    return volume.get("config") or {}


def select(
    volumes: Iterable[Mapping],
    *,
    user: str | None = None,
    hub: str | None = None,
    server: str | None = None,
) -> list[Mapping]:
    """The volumes whose keys say they are ``user``'s (None: anyone's, shared ones too), of
    ``hub`` (None: any hub's), ``server``'s own (None: any)."""
    return [
        v
        for v in volumes
        if (user is None or (KEY_USER in keys(v) and keys(v)[KEY_USER] == user))
        and (hub is None or keys(v).get(KEY_HUB, "") == hub)
        and (server is None or keys(v).get(KEY_SERVER, "") == server)
    ]


def one_hub(volumes: Sequence[Mapping], user: str) -> None:
    """Refuse volumes of one username on several hubs: they are different people's."""
    hubs = sorted({keys(v).get(KEY_HUB, "") for v in volumes})
    if len(hubs) > 1:
        shown = ", ".join(h or "(no hub key)" for h in hubs)
        raise Refused(
            f"user {user!r} has volumes on {len(hubs)} hubs ({shown}): give --hub-id to say whose"
        )


def _label(user: str, hub: str | None) -> str:
    return f"user {user!r}" + (f" of hub {hub!r}" if hub else "")


def home(
    volumes: Iterable[Mapping], user: str, *, server: str = "", hub: str | None = None
) -> Mapping:
    """The home volume of ``user`` (with ``server``, that named server's own)."""
    theirs = select(volumes, user=user, hub=hub)
    homes = [v for v in theirs if keys(v).get(KEY_VOLUME) == HOME]
    found = [v for v in homes if keys(v).get(KEY_SERVER, "") == server]
    if not found:
        if server and any(not keys(v).get(KEY_SERVER) for v in homes):
            raise Refused(
                f"{_label(user, hub)} has no home volume of server {server!r} of its own (the "
                "user's servers share one home volume): leave out --server"
            )
        what = f"home volume of server {server!r}" if server else "home volume"
        others = ", ".join(sorted(str(v["name"]) for v in theirs))
        raise Refused(
            f"{_label(user, hub)} has no {what} on this daemon"
            + (f" (their other volumes: {others})" if others else "")
        )
    one_hub(found, user)
    return found[0]


def owned_by(
    volumes: Iterable[Mapping], user: str, *, server: str | None, hub: str | None
) -> list[Mapping]:
    """``user``'s volumes (``server``: only that server's own), refused when there are none
    or they are of several hubs."""
    found = select(volumes, user=user, hub=hub, server=server)
    if not found:
        what = f"no volumes of server {server!r}" if server is not None else "no volumes"
        raise Refused(f"{_label(user, hub)} has {what} on this daemon")
    one_hub(found, user)
    return sorted(found, key=lambda v: (v["pool"], v["name"]))


def where(volume: Mapping) -> str:
    """``jupyter-home-alice (pool default on member2)``."""
    member = target_of(volume)
    return f"{volume['name']} (pool {volume['pool']}" + (f" on {member})" if member else ")")


def snapshot_name(now: datetime) -> str:
    """``manual-20250101T120000Z``: a manual snapshot, by its UTC time."""
    return f"manual-{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


# -- pure: the listing --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    user: str  # "" for a shared volume
    server: str
    volume: str
    kind: str  # "home" or the ``volumes`` template
    pool: str
    member: str  # "" on a standalone daemon
    size: int | None  # its quota in bytes (None: none set)
    used: int | None  # None: the daemon cannot tell
    snapshots: int | None
    last_attached: str  # "" when the daemon does not tell
    hub_user: bool | None  # None: no hub asked, or a shared volume
    hub: str
    used_by: tuple[str, ...] = field(default_factory=tuple)


def _size(value: object) -> int | None:
    try:
        return parse_size(value, "size") if value not in (None, "") else None
    except ValueError:
        return None


def _time(value: object) -> str:
    """An API timestamp to the second, UTC; "" for none or the zero time."""
    text = str(value or "")
    if not text or text.startswith("0001-01-01"):
        return ""
    return text[:19].replace("T", " ")


def row(
    volume: Mapping,
    *,
    state: Mapping | None,
    snapshots: int | None,
    instances: Mapping[str, Mapping],
    hub_users: set[str] | None,
) -> Row:
    """One volume's row: ``state`` from ``GET …/state`` (None: not known), ``instances``
    the daemon's instances by name (for their last start: when they last attached it)."""
    config = keys(volume)
    users = tuple(
        url.split("?")[0].rsplit("/", 1)[-1]
        for url in volume.get("used_by") or []
        if url.startswith("/1.0/instances/")
    )
    used = None
    if state is not None and state.get("usage") is not None:
        used = int(state["usage"].get("used") or 0)  # Incus leaves a 0 out
    # The volume's own time when the daemon keeps one, else the last start of an instance
    # using it: that start attached it.
    last = _time(volume.get("last_used_at"))
    if not last:
        last = max((_time(instances.get(u, {}).get("last_used_at")) for u in users), default="")
    user = config.get(KEY_USER, "")
    return Row(
        user=user,
        server=config.get(KEY_SERVER, ""),
        volume=str(volume["name"]),
        kind=config.get(KEY_VOLUME, ""),
        pool=str(volume["pool"]),
        member=target_of(volume) or "",
        size=_size(config.get("size")),
        used=used,
        snapshots=snapshots,
        last_attached=last,
        hub_user=None if hub_users is None or KEY_USER not in config else user in hub_users,
        hub=config.get(KEY_HUB, ""),
        used_by=users,
    )


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if value is True or value is False:
        return "yes" if value else "no"
    text = str(value)
    # Usernames may hold tabs or newlines: one line per row.
    return text if text.isprintable() else text.encode("unicode_escape").decode()


def table(rows: Iterable[Row]) -> str:
    cells = [HEADER] + [
        tuple(
            _cell(v)
            for v in (
                r.user,
                r.server,
                r.volume,
                r.kind,
                r.pool,
                r.member,
                human(r.size) if r.size is not None else None,
                human(r.used) if r.used is not None else None,
                r.snapshots,
                r.last_attached,
                r.hub_user,
                r.hub,
            )
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def as_json(rows: Iterable[Row]) -> str:
    return json.dumps([{**asdict(r), "used_by": list(r.used_by)} for r in rows], indent=2)


# -- the hub's users ----------------------------------------------------------------------


def hub_base(url: str) -> str:
    """``https://hub.example.org`` from it, or from ``…/hub`` or ``…/hub/api``."""
    base = url.rstrip("/")
    for suffix in ("/hub/api", "/hub"):
        base = base.removesuffix(suffix)
    return base


async def hub_usernames(url: str, token: str, *, timeout: float = 30.0) -> set[str]:
    """Every user the hub has, from ``GET {hub}/hub/api/users``, page by page (JupyterHub 2+
    gives at most ``api_page_max_limit`` a page; an older one, all at once)."""
    base, limit = hub_base(url), 200
    headers = {
        "Authorization": f"token {token}",
        "Accept": "application/jupyterhub-pagination+json",
    }
    found: set[str] = set()
    offset = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            while True:
                params = {"offset": str(offset), "limit": str(limit)}
                async with s.get(f"{base}/hub/api/users", params=params, headers=headers) as r:
                    if r.status in (401, 403):
                        raise Failed(
                            f"the hub at {base} refused the token (HTTP {r.status}): give an "
                            "API token with the scope list:users (--hub-token or "
                            "JUPYTERHUB_API_TOKEN)"
                        )
                    if r.status >= 400:
                        raise Failed(f"GET {base}/hub/api/users answered HTTP {r.status}")
                    body = await r.json(content_type=None)
                items = body if isinstance(body, list) else body.get("items") or []
                before = len(found)
                found |= {u["name"] for u in items}
                following = None if isinstance(body, list) else body.get("_pagination")
                following = (following or {}).get("next")
                if isinstance(body, list) and len(items) == limit and len(found) > before:
                    offset += len(items)  # a list a page long: maybe more
                elif following and len(found) > before:
                    offset = int(following.get("offset", offset + len(items)))
                else:
                    return found
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
        raise Failed(f"cannot read the users of the hub at {base}: {e or type(e).__name__}") from e


# -- the commands -------------------------------------------------------------------------


async def _quiet(call):
    try:
        return await call
    except LxdError:
        return None


async def list_volumes(
    client,
    *,
    user: str | None = None,
    hub: str | None = None,
    hub_users: set[str] | None = None,
    fmt: str = "table",
    out: TextIO,
    err: TextIO,
    hub_url: str = "",
) -> int:
    keeper = Volumes(client)
    volumes = select(await keeper.ours(), user=user, hub=hub)
    hubs = {keys(v).get(KEY_HUB, "") for v in volumes if KEY_USER in keys(v)}
    if hub_users is not None and hub is None and len(hubs) > 1:
        print(
            f"note: volumes of {len(hubs)} hubs are listed; HUB-USER answers for the hub at "
            f"{hub_url} alone: give --hub-id to list only its volumes",
            file=err,
        )
    semaphore = asyncio.Semaphore(16)

    async def facts(v: Mapping) -> tuple[Mapping | None, int | None]:
        async with semaphore:
            target = target_of(v)
            state = await _quiet(client.volume_state(v["pool"], v["name"], target=target))
            snaps = await _quiet(client.volume_snapshots(v["pool"], v["name"], target=target))
            return state, None if snaps is None else len(snaps)

    found = await asyncio.gather(*(facts(v) for v in volumes))
    instances: dict[str, Mapping] = {}
    if any(v.get("used_by") for v in volumes):
        instances = {i["name"]: i for i in await client.list_instances(recursion=1)}
    rows = sorted(
        (
            row(v, state=state, snapshots=snaps, instances=instances, hub_users=hub_users)
            for v, (state, snaps) in zip(volumes, found, strict=True)
        ),
        key=lambda r: (r.user, r.server, r.kind, r.pool, r.volume),
    )
    print(as_json(rows) if fmt == "json" else table(rows), file=out)
    return 0


async def _running(keeper: Volumes, volume: Mapping, doing: str) -> list[dict]:
    """The instances using ``volume``; refused when one is running."""
    using = await keeper.instances_using(volume)
    running = [i["name"] for i in using if i.get("status") == "Running"]
    if running:
        them = ", ".join(running)
        raise Refused(
            f"cannot {doing} {volume['name']}: container {them} is running and uses it; stop "
            "the user's server first (the hub's admin page, or the user's own)"
        )
    return using


async def snapshot(
    client,
    user: str,
    *,
    server: str = "",
    hub: str | None = None,
    name: str = "",
    now: datetime | None = None,
    out: TextIO,
) -> int:
    keeper = Volumes(client)
    volume = home(await keeper.ours(), user, server=server, hub=hub)
    name = name or snapshot_name(now or datetime.now(timezone.utc))
    if "/" in name or not name.strip():
        raise Refused(f"--name {name!r}: a snapshot name cannot be empty or hold '/'")
    await _do(f"snapshot {name} of {where(volume)}", keeper.snapshot(volume, name))
    print(f"created snapshot {name} of {where(volume)}", file=out)
    return 0


async def _do(action: str, work) -> None:
    """Await the daemon's ``work``; its refusal is a failure saying what ``action`` was."""
    try:
        await work
    except LxdError as e:
        raise Failed(f"{action} failed: {e.message}") from e


async def restore(
    client,
    user: str,
    snapshot_: str,
    *,
    server: str = "",
    hub: str | None = None,
    out: TextIO,
) -> int:
    keeper = Volumes(client)
    volume = home(await keeper.ours(), user, server=server, hub=hub)
    taken = [str(s["name"]).rsplit("/", 1)[-1] for s in await keeper.snapshots(volume)]
    if snapshot_ not in taken:
        listed = f"its snapshots: {', '.join(taken)}" if taken else "it has none"
        raise Refused(f"{where(volume)} has no snapshot {snapshot_!r} ({listed})")
    await _running(keeper, volume, "restore")
    await _do(f"restoring {where(volume)} to {snapshot_}", keeper.restore(volume, snapshot_))
    print(f"restored {where(volume)} to snapshot {snapshot_}", file=out)
    return 0


async def resize(
    client,
    user: str,
    size: str,
    *,
    server: str = "",
    hub: str | None = None,
    out: TextIO,
) -> int:
    try:
        wanted = parse_size(size, "SIZE")
    except ValueError as e:
        raise Refused(str(e)) from e
    keeper = Volumes(client)
    volume = home(await keeper.ours(), user, server=server, hub=hub)
    before = _size(keys(volume).get("size"))
    await _do(f"resizing {where(volume)} to {human(wanted)}", keeper.resize(volume, wanted))
    was = human(before) if before is not None else "no quota"
    print(f"resized {where(volume)} from {was} to {human(wanted)}", file=out)
    return 0


async def delete(
    client,
    user: str,
    *,
    server: str | None = None,
    hub: str | None = None,
    yes: bool = False,
    out: TextIO,
) -> int:
    keeper = Volumes(client)
    volumes = owned_by(await keeper.ours(), user, server=server, hub=hub)
    if not yes:
        listed = ", ".join(where(v) for v in volumes)
        raise Refused(
            f"would delete {len(volumes)} volume(s) of {_label(user, hub)} for good, with their "
            f"snapshots: {listed}; run again with --yes to delete them"
        )
    for v in volumes:
        using = [i["name"] for i in await keeper.instances_using(v)]
        if using:
            raise Refused(
                f"cannot delete {v['name']}: container {', '.join(using)} uses it; delete the "
                "user's server first (nothing was deleted)"
            )
    for v in volumes:
        await _do(f"deleting {where(v)}", keeper.delete([v]))
        print(f"deleted {where(v)}", file=out)
    return 0


async def move(
    client,
    user: str,
    member: str,
    *,
    server: str | None = None,
    hub: str | None = None,
    out: TextIO,
) -> int:
    dialect = client.dialect
    if dialect is None or not dialect.clustered:
        raise Refused(
            f"moving a volume needs a cluster: the daemon at {client.where} is standalone, "
            "and every volume is on it already"
        )
    members = {m["server_name"]: m.get("status", "") for m in await client.cluster_members()}
    if member not in members:
        raise Refused(f"--to {member}: no such cluster member (members: {', '.join(members)})")
    if members[member] != "Online":
        raise Refused(f"--to {member}: the member is {members[member]}, not Online")
    keeper = Volumes(client)
    volumes = owned_by(await keeper.ours(), user, server=server, hub=hub)
    drivers: dict[str, str] = {}
    moving = []
    for v in volumes:
        if v["pool"] not in drivers:
            drivers[v["pool"]] = await keeper.pool_driver(v["pool"])
        if drivers[v["pool"]] in REMOTE_DRIVERS:
            print(
                f"{v['name']}: pool {v['pool']} ({drivers[v['pool']]}) is reached from every "
                "member: nothing to move",
                file=out,
            )
        elif target_of(v) == member:
            print(f"{v['name']}: on {member} already", file=out)
        else:
            moving.append(v)
    if not moving:
        return 0
    stopped = []
    for v in moving:
        using = await _running(keeper, v, "move")
        stopped += [(i["name"], v["name"]) for i in using]
    for instance, name in stopped:
        print(
            f"note: the stopped container {instance} uses {name}; once the volume is on "
            f"{member} it starts only there",
            file=out,
        )
    for v in moving:
        try:
            await keeper.move(v["pool"], v["name"], member)
        except VolumeError as e:
            raise Failed(f"moving {where(v)} to {member}: {e.message}") from e
        except LxdError as e:
            raise Failed(f"moving {where(v)} to {member} failed: {e.message}") from e
        print(f"moved {v['name']} (pool {v['pool']}) from {target_of(v)} to {member}", file=out)
    return 0


async def run(
    client,
    args: argparse.Namespace,
    *,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """One ``lxdspawner volumes`` command on ``client``: its exit status (0, 1 or 2)."""
    action = args.action
    hub = args.hub_id or None
    try:
        if action == "list":
            hub_users = None
            if args.hub_url:
                token = args.hub_token or environ.get("JUPYTERHUB_API_TOKEN", "")
                if not token:
                    raise Refused(
                        "--hub-url needs an API token: --hub-token or JUPYTERHUB_API_TOKEN"
                    )
                hub_users = await hub_usernames(args.hub_url, token)
            return await list_volumes(
                client,
                user=args.user,
                hub=hub,
                hub_users=hub_users,
                fmt=args.format,
                out=out,
                err=err,
                hub_url=args.hub_url,
            )
        if action == "snapshot":
            return await snapshot(
                client, args.username, server=args.server or "", hub=hub, name=args.name, out=out
            )
        if action == "restore":
            return await restore(
                client, args.username, args.snapshot, server=args.server or "", hub=hub, out=out
            )
        if action == "resize":
            return await resize(
                client, args.username, args.size, server=args.server or "", hub=hub, out=out
            )
        if action == "delete":
            return await delete(
                client, args.username, server=args.server, hub=hub, yes=args.yes, out=out
            )
        return await move(client, args.username, args.to, server=args.server, hub=hub, out=out)
    except Refused as e:
        print(f"lxdspawner volumes {action}: {e}", file=err)
        return 2
    except Failed as e:
        print(f"lxdspawner volumes {action}: {e}", file=err)
        return 1
    except LxdError as e:
        print(f"lxdspawner volumes {action}: {e.message}", file=err)
        return 1


EXAMPLES = """\
examples:
  lxdspawner volumes list
  lxdspawner volumes list --user alice --format json
  lxdspawner volumes list --hub-url https://hub.example.org --hub-id physics-hub
      (with JUPYTERHUB_API_TOKEN set: HUB-USER says whether each owner is still a user)
  lxdspawner volumes snapshot alice
  lxdspawner volumes snapshot alice --server lab --name before-upgrade
  lxdspawner volumes restore alice manual-20250101T120000Z
  lxdspawner volumes resize alice 20GiB
  lxdspawner volumes delete alice            (says what it would delete)
  lxdspawner volumes delete alice --yes
  lxdspawner volumes move alice --to member2 --endpoint https://member1:8443 --cert ...

A user's volumes are those whose keys name the user (and the hub, with --hub-id), never
those that merely hold a name. Exit status: 0 done, 2 refused (nothing changed), 1 failed.
"""


def add_parser(sub, add_connection) -> argparse.ArgumentParser:
    """``volumes`` and its actions, under the ``lxdspawner`` parser's subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser(
        "volumes",
        help="users' volumes: list, snapshot, restore, resize, delete, move",
        description="Users' persistent volumes, found by lxdspawner's keys.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, text: str, example: str) -> argparse.ArgumentParser:
        p = actions.add_parser(
            name, help=text, description=text, epilog=example, formatter_class=formatter
        )
        add_connection(p)
        p.add_argument("--hub-id", default="", help="only the volumes of this hub (its hub_id)")
        return p

    listing = action(
        "list",
        "every volume lxdspawner made: user, server, size, use, snapshots",
        "examples:\n  lxdspawner volumes list --user alice\n"
        "  JUPYTERHUB_API_TOKEN=... lxdspawner volumes list --hub-url https://hub.example.org",
    )
    listing.add_argument("--user", default=None, help="only this user's")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.add_argument("--hub-url", default="", help="the hub, to tell who is still a user")
    listing.add_argument(
        "--hub-token", default="", help="its API token (default: $JUPYTERHUB_API_TOKEN)"
    )
    snap = action(
        "snapshot",
        "snapshot a user's home volume (with --server: a named server's own)",
        "examples:\n  lxdspawner volumes snapshot alice\n"
        "  lxdspawner volumes snapshot alice --server lab --name before-upgrade",
    )
    snap.add_argument("username")
    snap.add_argument("--server", default="", help="the named server whose own home it is")
    snap.add_argument("--name", default="", help="default: manual-<UTC time>")
    rest = action(
        "restore",
        "give a user's home volume a snapshot's content (the server must be stopped)",
        "example:\n  lxdspawner volumes restore alice manual-20250101T120000Z",
    )
    rest.add_argument("username")
    rest.add_argument("snapshot")
    rest.add_argument("--server", default="", help="the named server whose own home it is")
    size = action(
        "resize",
        "set the size (quota) of a user's home volume",
        "examples:\n  lxdspawner volumes resize alice 20GiB\n"
        "  lxdspawner volumes resize alice 500GB --server lab",
    )
    size.add_argument("username")
    size.add_argument("size", help="10GiB, 500MiB, 2GB, or bytes")
    size.add_argument("--server", default="", help="the named server whose own home it is")
    gone = action(
        "delete",
        "delete a user's volumes for good, with their snapshots (needs --yes)",
        "examples:\n  lxdspawner volumes delete alice          (says what it would delete)\n"
        "  lxdspawner volumes delete alice --server lab --yes",
    )
    gone.add_argument("username")
    gone.add_argument("--server", default=None, help="only this named server's own volumes")
    gone.add_argument("--yes", action="store_true", help="really delete them")
    moved = action(
        "move",
        "move a user's volumes to another member of the cluster (same pool)",
        "example:\n  lxdspawner volumes move alice --to member2 --endpoint https://member1:8443 "
        "--cert client.crt --key client.key --server-cert cluster.crt",
    )
    moved.add_argument("username")
    moved.add_argument("--to", required=True, metavar="MEMBER", help="the cluster member")
    moved.add_argument("--server", default=None, help="only this named server's own volumes")
    return parser
