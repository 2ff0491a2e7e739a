"""The ``lxdspawner`` command: operator tasks outside the hub.

    lxdspawner prepull [-f jupyterhub_config.py [--remote NAME]] [--image jupyter-base]
                       [--endpoint https://node1:8443 --cert ... ]
    lxdspawner gc [--delete] [--format json] [-f ...] [--endpoint ...]
    lxdspawner list [--format json] [-f ...] [--endpoint ...]
    lxdspawner doctor [-f jupyterhub_config.py] [--format json] [--no-probe] [--db-url URL]
    lxdspawner image build [RECIPE.yaml] [-f jupyterhub_config.py] [--alias NAME] [--force]
    lxdspawner volumes list|snapshot|restore|resize|delete|move ... [-f ...] [--endpoint ...]
    lxdspawner install [--domain NAME] [--bundle DIR | --from-bundle DIR] ... (as root)

Every command reads the connection (and prepull the image, profiles and shared directories)
from the hub's config with ``-f`` (:func:`connection`); options given explicitly override it.

``prepull`` makes every Online cluster member hold the image unpacked in its storage pool, so
the first spawn on a member is not slowed by copying and unpacking the image (LXD copies
images between members on demand). It creates one stopped container from the image on each
member and deletes it again. On a standalone daemon it does the same once. It also makes the
read-only copies of the image's shared directories (``c.LxdSpawner.shared_directories``, see
:mod:`lxdspawner.sharing`) on each member, so that even the first servers share them.

``image build`` builds the single-user image ``jupyter-base`` for the installed JupyterHub, or
a custom image from a recipe file, and imports it into the hub's daemon (see
:mod:`lxdspawner.imagebuild`).

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
import dataclasses
import json
import logging
import sys
import time
import uuid

from . import __version__, doctor, imagebuild, installer, names, sharing, volumecli
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
    """Unpack ``image`` on every Online member; return how many members failed. On a
    terminal a rich progress line per member follows the daemon's own progress (download,
    unpack); otherwise each change of it is a plain line."""
    if getattr(out, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(file=out),
            transient=True,
        ) as bar:
            return await _prepull(client, image, shared_directories, profiles, out, bar)
    return await _prepull(client, image, shared_directories, profiles, out, None)


def _progress_text(metadata: dict) -> str:
    """The daemon's progress in an operation's metadata (``download_progress``,
    ``create_instance_from_image_unpack_progress``, ...), or ""."""
    return ", ".join(str(v) for k, v in sorted(metadata.items()) if k.endswith("_progress") and v)


async def _prepull(client, image, shared_directories, profiles, out, bar) -> int:
    log = logging.getLogger("lxdspawner")
    shares = [sharing.SharedDirectory(path, log) for path in shared_directories]
    fingerprint = await client.image_fingerprint(image)
    members = await client.cluster_members()
    targets = [m["server_name"] for m in members if m.get("status") == "Online"] or [None]
    for m in members:
        if m.get("status") != "Online":
            print(f"{m['server_name']}: skipped ({m.get('status')})", file=out)

    def say(text: str) -> None:
        if bar is not None:
            bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=out)

    async def one(target: str | None) -> bool:
        name = names.prepull_name(uuid.uuid4().hex[:8])
        where = target or "this server"
        started = time.monotonic()
        task = bar.add_task(f"{where}: {image}") if bar is not None else None
        shown = [""]

        def progress(metadata: dict) -> None:
            text = _progress_text(metadata)
            if not text or text == shown[0]:
                return
            shown[0] = text
            if bar is not None:
                bar.update(task, description=f"{where}: {image}: {text}")
            else:
                say(f"{where}: {text}")

        try:
            await client.create_instance(
                name, source=image_source(image), target=target, timeout=600, on_progress=progress
            )
            await client.delete_instance(name)
        except LxdError as e:
            say(f"{where}: failed: {e.message}")
            return False
        say(f"{where}: {image} ready ({time.monotonic() - started:.1f} s)")
        for share in shares:
            started = time.monotonic()
            outcome = await share.ensure(client, fingerprint, target, profiles)
            took = time.monotonic() - started
            if outcome == "failed":
                say(f"{where}: shared {share.path}: not made (see the log above)")
                return False
            if outcome == "absent":
                say(f"{where}: shared {share.path}: not in the image, skipped")
            else:
                say(f"{where}: shared {share.path} ready ({took:.1f} s)")
        return True

    results = await asyncio.gather(*(one(t) for t in targets))
    return results.count(False)


async def gc(
    client: LxdClient, *, delete: bool = False, out=sys.stdout, as_json: bool = False
) -> int:
    """List (or with ``delete`` delete) what lxdspawner made for images no alias names any
    more; return how many deletions failed. ``as_json``: one object per item, with
    ``deleted`` (true, false when its deletion failed, null when not asked)."""
    pools = await client.storage_pools()
    volumes = [(pool, v) for pool in pools for v in await client.list_volumes(pool)]
    found = stale(await client.list_images(), await client.list_instances(recursion=1), volumes)
    records: list[dict] = []

    def say(text: str) -> None:
        if not as_json:
            print(text, file=out)

    if not found:
        say("nothing to delete")
    failed = 0
    for item in found:
        where = f" on {item.member}" if item.member else ""
        what = f"{item.kind} {item.name}" + (f" (pool {item.pool})" if item.pool else "") + where
        record = {**dataclasses.asdict(item), "deleted": None}
        records.append(record)
        if not delete:
            say(f"would delete {what}: {item.why}")
            continue
        try:
            if item.kind == "volume":
                await client.delete_volume(item.pool, item.name, target=item.member or None)
            else:
                await client.delete_instance(item.name)
        except LxdError as e:
            say(f"could not delete {what}: {e.message}")
            record.update(deleted=False, error=e.message)
            failed += 1
        else:
            say(f"deleted {what}")
            record["deleted"] = True
    if found and not delete:
        say("run again with --delete to delete these")
    if as_json:
        print(json.dumps(records, indent=2), file=out)
    return failed


async def list_servers(client: LxdClient, *, out=sys.stdout, as_json: bool = False) -> int:
    """Print the servers' containers on the daemon (or cluster); return 0."""
    found = servers(await client.list_instances(recursion=2))
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in found], indent=2), file=out)
    else:
        print(table(found), file=out)
    return 0


def _add_connection(parser: argparse.ArgumentParser) -> None:
    """The connection options every command shares: ``-f`` reads them from the hub's config
    (as doctor does: :func:`lxdspawner.doctor.load_settings`); the explicit ones override."""
    parser.add_argument(
        "-f",
        "--config",
        default=None,
        help="the hub's jupyterhub_config.py: the connection, remotes, image, profiles and "
        "shared directories the hub uses",
    )
    parser.add_argument(
        "--remote",
        default="",
        help="with -f: a name of c.LxdSpawner.remotes (default: the hub's default daemon)",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        help="https://member:8443, unix:///path, a remote of the incus/lxc command line "
        "(e.g. campus), or empty for local",
    )
    parser.add_argument("--cert", default=None, help="client certificate (PEM) for https")
    parser.add_argument("--key", default=None, help="client key (PEM) for https")
    parser.add_argument("--server-cert", default=None, help="the server's certificate, pinned")
    parser.add_argument("--project", default=None, help="LXD project")


def connection(args: argparse.Namespace) -> tuple[dict[str, str], doctor.Settings]:
    """The connection settings (``-f``'s, then ``--remote``'s entry, then the explicit
    options) and the hub's settings (defaults without ``-f``). ValueError names a bad one."""
    settings = doctor.load_settings(getattr(args, "config", None))
    remote = getattr(args, "remote", "")
    if remote and remote not in settings.remotes:
        known = ", ".join(repr(k) for k in settings.remotes) or "none"
        raise ValueError(f"--remote {remote!r}: not in c.LxdSpawner.remotes (known: {known})")
    chosen = dict(settings.remotes[remote] if remote else settings.default)
    for key, option in (
        ("endpoint", "endpoint"),
        ("client_cert", "cert"),
        ("client_key", "key"),
        ("server_cert", "server_cert"),
        ("project", "project"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            chosen[key] = value
    return {
        k: chosen.get(k, "")
        for k in ("endpoint", "client_cert", "client_key", "server_cert", "project")
    }, settings


EXAMPLES = {
    "prepull": """examples:
  lxdspawner prepull -f /etc/jupyterhub/jupyterhub_config.py
  lxdspawner prepull -f /etc/jupyterhub/jupyterhub_config.py --remote campus
  lxdspawner prepull --image jupyter-base --endpoint https://node1:8443 \\
      --cert hub.crt --key hub.key --server-cert cluster.crt""",
    "gc": """examples:
  lxdspawner gc -f /etc/jupyterhub/jupyterhub_config.py            # list only
  lxdspawner gc -f /etc/jupyterhub/jupyterhub_config.py --delete
  lxdspawner gc --format json""",
    "list": """examples:
  lxdspawner list -f /etc/jupyterhub/jupyterhub_config.py
  lxdspawner list --format json | jq '.[] | select(.status != "Running")'""",
    "doctor": """examples:
  lxdspawner doctor -f /etc/jupyterhub/jupyterhub_config.py
  lxdspawner doctor -f jupyterhub_config.py --no-probe       # before the hub's first start
  lxdspawner doctor -f jupyterhub_config.py --format json

exit status: 0 no error (warnings allowed), 1 an error, 2 bad usage.""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lxdspawner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lxdspawner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    examples = {"formatter_class": argparse.RawDescriptionHelpFormatter}
    pre = sub.add_parser(
        "prepull",
        help="unpack the image on every cluster member",
        epilog=EXAMPLES["prepull"],
        **examples,
    )
    pre.add_argument(
        "--image", default=None, help="image alias or fingerprint (default: -f's, jupyter-base)"
    )
    _add_connection(pre)
    pre.add_argument(
        "--shared-directory",
        action="append",
        help="as c.LxdSpawner.shared_directories (default: /usr and /opt/jupyterhub); "
        "--shared-directory '' for none",
    )
    pre.add_argument(
        "--profile", action="append", help="as c.LxdSpawner.profiles (default: -f's, default)"
    )
    collect = sub.add_parser(
        "gc",
        help="list (--delete: delete) shared copies and bases of images no alias names",
        epilog=EXAMPLES["gc"],
        **examples,
    )
    collect.add_argument("--delete", action="store_true", help="delete what is listed")
    collect.add_argument("--format", choices=("table", "json"), default="table")
    _add_connection(collect)
    listing = sub.add_parser(
        "list",
        help="the servers' containers, as the daemon has them",
        epilog=EXAMPLES["list"],
        **examples,
    )
    listing.add_argument("--format", choices=("table", "json"), default="table")
    _add_connection(listing)
    volumecli.add_parser(sub, _add_connection)
    doc = sub.add_parser(
        "doctor",
        help="check what the hub's config needs: daemons, storage, image, profiles, hub address",
        epilog=EXAMPLES["doctor"],
        **examples,
    )
    doc.add_argument("-f", "--config", default=None, help="the hub's jupyterhub_config.py")
    doc.add_argument("--format", choices=("table", "json"), default="table")
    doc.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the probe container that fetches the hub's API (e.g. before the hub's "
        "first start)",
    )
    doc.add_argument(
        "--db-url",
        default=None,
        help="the hub's database (default: the config's c.JupyterHub.db_url), read-only, to "
        "find containers and volumes that belong to no server",
    )
    imagebuild.add_parser(sub, _add_connection)
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
        settings.probe = not args.no_probe
        if args.db_url:
            settings.db_url = args.db_url
    except Exception as e:  # the config's own errors: the operator's file, named
        print(f"lxdspawner doctor: {args.config}: {e}", file=sys.stderr)
        return 2
    results = asyncio.run(doctor.diagnose(settings))
    if args.format == "json":
        print(doctor.as_json(results))
    elif sys.stdout.isatty():
        doctor.print_rich(results)
    else:  # plain aligned lines for pipes, logs and grep
        print(doctor.as_table(results))
    return doctor.exit_status(results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        return installer.run(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "doctor":
        return run_doctor(args)
    if args.command == "image":
        return imagebuild.run(args)

    try:
        chosen, settings = connection(args)
    except Exception as e:  # the config's own errors: the operator's file, named
        print(f"lxdspawner {args.command}: {e}", file=sys.stderr)
        return 2

    async def run() -> int:
        try:
            remote = from_settings(chosen)
            async with remote.client() as client:
                if args.command == "gc":
                    return await gc(client, delete=args.delete, as_json=args.format == "json")
                if args.command == "list":
                    return await list_servers(client, as_json=args.format == "json")
                if args.command == "volumes":
                    return await volumecli.run(client, args, out=sys.stdout, err=sys.stderr)
                shared = (
                    args.shared_directory
                    if args.shared_directory is not None
                    else settings.shared_directories
                )
                return await prepull(
                    client,
                    args.image or settings.image,
                    shared_directories=tuple(p for p in shared if p),
                    profiles=tuple(args.profile or settings.profiles),
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
