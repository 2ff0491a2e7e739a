"""The ``lxdspawner`` command: operator tasks outside the hub.

    lxdspawner prepull [--image jupyter-base] [--endpoint https://node1:8443 --cert ... ]
    lxdspawner gc [--delete] [--endpoint ...]
    lxdspawner list [--endpoint ...]
    lxdspawner doctor [-f jupyterhub_config.py] [--format json]
    lxdspawner volumes list|snapshot|restore|resize|delete|move ... [--endpoint ...]
    lxdspawner install [--domain NAME] [--bundle DIR | --from-bundle DIR] ... (as root)

``prepull`` makes every Online cluster member hold the image unpacked in its storage pool, so
the first spawn on a member is not slowed by copying and unpacking the image (LXD copies
images between members on demand). It creates one stopped container from the image on each
member and deletes it again. On a standalone daemon it does the same once. It also makes the
read-only copies of the image's shared directories (``c.LxdSpawner.shared_directories``, see
:mod:`lxdspawner.sharing`) on each member, so that even the first servers share them.

``gc`` lists the shared copies and LXD 5.0 bases of images that no alias names any more (an
image replaced by a new build), which no instance uses; with ``--delete`` it deletes them
(see :mod:`lxdspawner.gc`).

``list`` shows every server's container on the daemon or cluster: user, server name,
container, status, member and IPv4 (see :mod:`lxdspawner.listing`).

``volumes`` is the operators' work on users' persistent volumes (see
:mod:`lxdspawner.volumes` and :mod:`lxdspawner.volumecli`); a user's volumes are those whose
keys name the user (and the hub, with ``--hub-id``), never those that merely hold a name:

    lxdspawner volumes list [--user alice] [--format json] [--hub-id H]
                            [--hub-url https://hub.example.org [--hub-token T]]
    lxdspawner volumes snapshot alice [--server lab] [--name NAME]
    lxdspawner volumes restore alice manual-20250101T120000Z
    lxdspawner volumes resize alice 20GiB
    lxdspawner volumes delete alice [--server lab] --yes
    lxdspawner volumes move alice --to member2

``list`` shows user, server, volume, kind (home or the ``volumes`` template), pool, member,
size, use, snapshots, when a container last attached it (the last start of a container
using it; blank when none does) and, with ``--hub-url`` and an API token (``--hub-token``
or ``JUPYTERHUB_API_TOKEN``, scope ``list:users``), whether its owner is still one of that
hub's users. Shared volumes are listed with no user. ``snapshot`` snapshots the user's home
volume (``--server``: a named server's own, with ``home_volume_per_server``) as
``manual-<UTC time>``; ``restore`` gives it a snapshot's content, refused while a container
using it runs; ``resize`` sets its quota; ``delete`` deletes the user's volumes (``--server``:
the server's own) with their snapshots, only with ``--yes`` and while no container uses
them; ``move`` moves them to another member of a cluster, in the same pool, refused while a
container using them runs. Exit status 2: refused, nothing changed; 1: failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid

from . import __version__, doctor, installer, names, sharing, volumecli
from .gc import stale
from .listing import servers, table
from .lxd import LxdClient, LxdError, image_source
from .remotes import from_settings


async def prepull(
    client: LxdClient,
    image: str,
    *,
    shared_directories: tuple[str, ...] = ("/usr", "/opt/jupyterhub"),
    profiles: tuple[str, ...] = ("default",),
    out=sys.stdout,
) -> int:
    """Unpack ``image`` on every Online member; return how many members failed."""
    log = logging.getLogger("lxdspawner")
    shares = [sharing.SharedDirectory(path, log) for path in shared_directories]
    fingerprint = await client.image_fingerprint(image)
    members = await client.cluster_members()
    targets = [m["server_name"] for m in members if m.get("status") == "Online"] or [None]
    for m in members:
        if m.get("status") != "Online":
            print(f"{m['server_name']}: skipped ({m.get('status')})", file=out)

    async def one(target: str | None) -> bool:
        name = names.prepull_name(uuid.uuid4().hex[:8])
        where = target or "this server"
        started = time.monotonic()
        try:
            await client.create_instance(
                name, source=image_source(image), target=target, timeout=600
            )
            await client.delete_instance(name)
        except LxdError as e:
            print(f"{where}: failed: {e.message}", file=out)
            return False
        print(f"{where}: {image} ready ({time.monotonic() - started:.1f} s)", file=out)
        for share in shares:
            started = time.monotonic()
            outcome = await share.ensure(client, fingerprint, target, profiles)
            took = time.monotonic() - started
            if outcome == "failed":
                print(f"{where}: shared {share.path}: not made (see the log above)", file=out)
                return False
            if outcome == "absent":
                print(f"{where}: shared {share.path}: not in the image, skipped", file=out)
            else:
                print(f"{where}: shared {share.path} ready ({took:.1f} s)", file=out)
        return True

    results = await asyncio.gather(*(one(t) for t in targets))
    return results.count(False)


async def gc(client: LxdClient, *, delete: bool = False, out=sys.stdout) -> int:
    """List (or with ``delete`` delete) what lxdspawner made for images no alias names any
    more; return how many deletions failed."""
    pools = await client.storage_pools()
    volumes = [(pool, v) for pool in pools for v in await client.list_volumes(pool)]
    found = stale(await client.list_images(), await client.list_instances(recursion=1), volumes)
    if not found:
        print("nothing to delete", file=out)
    failed = 0
    for item in found:
        where = f" on {item.member}" if item.member else ""
        what = f"{item.kind} {item.name}" + (f" (pool {item.pool})" if item.pool else "") + where
        if not delete:
            print(f"would delete {what}: {item.why}", file=out)
            continue
        try:
            if item.kind == "volume":
                await client.delete_volume(item.pool, item.name, target=item.member or None)
            else:
                await client.delete_instance(item.name)
        except LxdError as e:
            print(f"could not delete {what}: {e.message}", file=out)
            failed += 1
        else:
            print(f"deleted {what}", file=out)
    if found and not delete:
        print("run again with --delete to delete these", file=out)
    return failed


async def list_servers(client: LxdClient, *, out=sys.stdout) -> int:
    """Print the servers' containers on the daemon (or cluster); return 0."""
    print(table(servers(await client.list_instances(recursion=2))), file=out)
    return 0


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        default="",
        help="https://member:8443, unix:///path, a remote of the incus/lxc command line "
        "(e.g. campus), or empty for local",
    )
    parser.add_argument("--cert", default="", help="client certificate (PEM) for https")
    parser.add_argument("--key", default="", help="client key (PEM) for https")
    parser.add_argument("--server-cert", default="", help="the server's certificate, pinned")
    parser.add_argument("--project", default="", help="LXD project")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lxdspawner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lxdspawner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepull", help="unpack the image on every cluster member")
    pre.add_argument("--image", default="jupyter-base", help="image alias or fingerprint")
    _add_connection(pre)
    pre.add_argument(
        "--shared-directory",
        action="append",
        help="as c.LxdSpawner.shared_directories (default: /usr and /opt/jupyterhub); "
        "--shared-directory '' for none",
    )
    pre.add_argument(
        "--profile", action="append", help="as c.LxdSpawner.profiles (default: default)"
    )
    collect = sub.add_parser(
        "gc", help="list (--delete: delete) shared copies and bases of images no alias names"
    )
    collect.add_argument("--delete", action="store_true", help="delete what is listed")
    _add_connection(collect)
    _add_connection(sub.add_parser("list", help="the servers' containers, as the daemon has them"))
    volumecli.add_parser(sub, _add_connection)
    doc = sub.add_parser(
        "doctor",
        help="check what the hub's config needs: daemons, storage, image, profiles, hub address",
        epilog="example: lxdspawner doctor -f /etc/jupyterhub/jupyterhub_config.py. "
        "Exit status: 0 no error (warnings allowed), 1 an error, 2 bad usage.",
    )
    doc.add_argument("-f", "--config", default=None, help="the hub's jupyterhub_config.py")
    doc.add_argument("--format", choices=("table", "json"), default="table")
    # Its options are the script's (lxdspawner install --help): main() hands them over as given.
    sub.add_parser(
        "install",
        add_help=False,
        help="production install on this Debian 12 host (as root; --help for its options)",
    )
    return parser


def run_doctor(args: argparse.Namespace) -> int:
    """``lxdspawner doctor``: the findings as a table or JSON; 2 for a config it cannot use."""
    try:
        settings = doctor.load_settings(args.config)
    except Exception as e:  # the config's own errors: the operator's file, named
        print(f"lxdspawner doctor: {args.config}: {e}", file=sys.stderr)
        return 2
    results = asyncio.run(doctor.diagnose(settings))
    print(doctor.as_json(results) if args.format == "json" else doctor.as_table(results))
    return doctor.exit_status(results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        return installer.run(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "doctor":
        return run_doctor(args)

    async def run() -> int:
        try:
            remote = from_settings(
                {
                    "endpoint": args.endpoint,
                    "client_cert": args.cert,
                    "client_key": args.key,
                    "server_cert": args.server_cert,
                    "project": args.project,
                }
            )
            async with LxdClient(
                remote.endpoint,
                client_cert=remote.client_cert,
                client_key=remote.client_key,
                server_cert=remote.server_cert,
                project=remote.project,
            ) as client:
                if args.command == "gc":
                    return await gc(client, delete=args.delete)
                if args.command == "list":
                    return await list_servers(client)
                if args.command == "volumes":
                    return await volumecli.run(client, args, out=sys.stdout, err=sys.stderr)
                return await prepull(
                    client,
                    args.image,
                    shared_directories=tuple(
                        p for p in (args.shared_directory or ["/usr", "/opt/jupyterhub"]) if p
                    ),
                    profiles=tuple(args.profile or ["default"]),
                )
        except LxdError as e:
            print(f"lxdspawner: {e.message}", file=sys.stderr)
            return 1

    status = asyncio.run(run())
    if args.command == "volumes":
        return status  # 0 done, 1 failed, 2 refused
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
