"""``lxdspawner image build``: build the single-user image, or a custom one, and import it.

    lxdspawner image build [RECIPE.yaml | jupyter-base | lxdspawner-tiny]
                           [-f jupyterhub_config.py [--remote NAME]] [--alias NAME] [--force]

Without RECIPE it builds ``jupyter-base``, our single-user image, for the JupyterHub installed
beside this command (the hub's), with the package's own recipe (``images/build-image.sh``).
With a recipe file (schema in :mod:`lxdspawner.imagerecipe`) it builds a custom image on top of
``jupyter-base``: extra Debian packages, pip requirements in the server's virtualenv, files, a
post-install script. It is the way Zero to JupyterHub users extend the single-user image,
without a Dockerfile.

The build runs on the host, where apt and pip reach their registries (the containers may
not): the base's ``rootfs.squashfs`` is unpacked and changed in a chroot
(``images/build-custom.sh``), packed again, and stored with the base's metadata (new
description and properties) in the image cache, ``${LXDSPAWNER_CACHE:-/var/cache/lxdspawner}/
images/custom-HASH/``, beside the builds of ``build-image.sh``. ``HASH`` is
:func:`lxdspawner.imagerecipe.recipe_hash`: a second run with nothing changed neither builds
nor imports (it hashes, asks the daemon once and says so: about a second).

The import goes through the REST API (:meth:`LxdClient.import_image`) to the daemon the hub's
config names (``-f``: its default remote, or ``--remote NAME`` of its ``remotes``; without
``-f``, ``--endpoint`` and friends as the other commands). The alias is created, or moved in
one request (a spawn never finds it missing); the image it pointed at before is deleted once
no alias is left on it, as ``ensure-image.sh`` does. On a cluster the image is imported once
and then unpacked on every Online member (``prepull``), so that no first spawn waits for it.

Progress: the build's steps as the scripts log them (stderr), the upload in MB (a ``rich``
progress bar on a terminal, a line per quarter otherwise), each member.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from . import imagerecipe, recipes
from .lxd import LxdClient, LxdError
from .lxd.remote import Remote
from .remotes import choose, from_settings

#: What the builds need on the host: Debian package -> a command it provides.
BUILD_TOOLS = {
    "squashfs-tools": "mksquashfs",
    "xz-utils": "xz",
    "mmdebstrap": "mmdebstrap",
    "busybox-static": "busybox",
}


class BuildError(Exception):
    """A build or import that failed; the message says what to look at."""


def cache_root() -> Path:
    return Path(os.environ.get("LXDSPAWNER_CACHE") or "/var/cache/lxdspawner") / "images"


# -- progress ----------------------------------------------------------------------------------


class Reporter:
    """What the command says while it works: plain lines, and on a terminal a progress bar
    (``rich``) for the upload."""

    def __init__(self, out: TextIO = sys.stdout, *, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    @contextlib.contextmanager
    def upload(self, what: str, total: int) -> Iterator[Callable[[int, int], None]]:
        """A callback ``(sent, total)`` for :meth:`LxdClient.import_image`."""
        mb = 1 << 20
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
            with Progress(
                *columns, TransferSpeedColumn(), console=Console(file=self.out)
            ) as progress:
                task = progress.add_task(what, total=total)
                yield lambda sent, _total: progress.update(task, completed=sent)
            return
        quarters = [0]

        def line(sent: int, total: int) -> None:
            quarter = 4 * sent // max(total, 1)
            if quarter > quarters[0]:
                quarters[0] = quarter
                self.say(f"{what}: {sent / mb:.1f} of {total / mb:.1f} MB")

        self.say(f"{what}: {total / mb:.1f} MB")
        yield line


# -- building ----------------------------------------------------------------------------------


def ensure_tools(packages: list[str], say: Callable[[str], None]) -> None:
    """Install the build tools a fresh host lacks (as ensure-image.sh does)."""
    missing = [p for p in packages if shutil.which(BUILD_TOOLS[p]) is None]
    if not missing:
        return
    say(f"installing the image build tools: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, stdout=sys.stderr, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=sys.stderr, check=True)
        subprocess.run(install, env=env, stdout=sys.stderr, check=True)


def jupyterhub_version() -> str:
    """The version of the JupyterHub installed beside this command: the hub's."""
    return importlib.metadata.version("jupyterhub")


def build_builtin(name: str, *, force: bool = False) -> Path:
    """Build the package's recipe ``name`` (jupyter-base for this JupyterHub) unless the cache
    has it; its cache directory. ``build-image.sh`` logs its steps on stderr."""
    if name not in recipes.IMAGE_NAMES:
        raise BuildError(f"no recipe {name!r} in the package (known: {recipes.IMAGE_NAMES})")
    script = recipes.images_dir() / "build-image.sh"
    env = {**os.environ, "JUPYTERHUB_VERSION": jupyterhub_version()}
    env.pop("VENV", None)
    if force:
        env["FORCE"] = "1"
    done = subprocess.run(
        [str(script), name], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"building {name} failed (exit {done.returncode}): see the lines above")
    return Path(done.stdout.strip().splitlines()[-1])


def pip_environment() -> list[str]:
    """``PIP_*=value`` lines for pip in the chroot: the host's index settings (http(s) only:
    a ``file://`` index or find-links directory exists on the host, not in the chroot), in
    pip's precedence (the environment over the config files)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            env={k: v for k, v in os.environ.items() if k != "PIP_CONFIG_FILE"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    wanted = ("index-url", "extra-index-url", "trusted-host", "default-timeout", "retries", "proxy")
    found: dict[str, tuple[bool, str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        source, _, key = key.partition(".")
        key = "default-timeout" if key == "timeout" else key
        value = value.strip().strip("'\"")
        if key not in wanted:
            continue
        from_env = source == ":env:"
        if key not in found or (from_env and not found[key][0]):
            found[key] = (from_env, value)
    lines = []
    for key, (_, value) in sorted(found.items()):
        if key in ("index-url", "extra-index-url"):
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value and "\n" not in value:
            lines.append(f"PIP_{key.upper().replace('-', '_')}={value}")
    return lines


def ca_bundle() -> str:
    return os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"


def write_spec(recipe: imagerecipe.Recipe, spec: Path) -> None:
    """The recipe as files for build-custom.sh: values are data there, never shell syntax."""
    spec.mkdir(parents=True)
    (spec / "packages").write_text("".join(f"{p}\n" for p in recipe.packages))
    (spec / "requirements.txt").write_text("".join(f"{r}\n" for r in recipe.pip))
    for i, entry in enumerate(recipe.files):
        where = spec / "files" / f"{i:04d}"
        where.mkdir(parents=True)
        if entry.source.is_dir():
            shutil.copytree(entry.source, where / "src", symlinks=True)
        else:
            shutil.copy2(entry.source, where / "src")
        (where / "dest").write_text(entry.dest)
        (where / "mode").write_text("" if entry.mode is None else f"{entry.mode:04o}")
    if recipe.script:
        shutil.copy2(recipe.script, spec / "script")


def custom_metadata(base_meta: Path, out: Path, properties: dict[str, str]) -> None:
    """``out``: the base's meta.tar.xz with ``properties`` added to its metadata.yaml (a new
    description, our recipe's hash) and a new creation date; its templates kept."""
    with tarfile.open(base_meta, "r:xz") as src, tarfile.open(out, "w:xz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            if member.name.lstrip("./") == "metadata.yaml" and data is not None:
                meta = yaml.safe_load(data.read()) or {}
                meta["creation_date"] = int(time.time())
                serial = time.strftime("%Y%m%d_%H%M", time.gmtime())
                properties = {**properties, "serial": serial}
                meta.setdefault("properties", {}).update(properties)
                content = yaml.safe_dump(meta, sort_keys=False).encode()
                member.size = len(content)
                member.mtime = int(time.time())
                data = io.BytesIO(content)
            dst.addfile(member, data)


def fingerprint_of(meta: Path, rootfs: Path) -> str:
    """What the daemon will call the split image: sha256 of meta then rootfs."""
    h = hashlib.sha256()
    for path in (meta, rootfs):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One build per recipe hash at a time: a second caller waits, then finds the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another build of this recipe is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_custom(
    recipe: imagerecipe.Recipe, *, force: bool = False, say: Callable[[str], None] = print
) -> Path:
    """Build ``recipe`` unless the cache has its hash; its cache directory."""
    base = build_builtin(recipe.base)
    base_fingerprint = (base / "fingerprint").read_text().strip()
    builder = recipes.images_dir() / "build-custom.sh"
    digest = imagerecipe.recipe_hash(recipe, base_fingerprint, builder.read_bytes())
    dest = cache_root() / f"custom-{digest}"
    if (dest / "fingerprint").is_file() and not force:
        say(f"cached: {dest} (recipe {digest}, nothing to build)")
        return dest
    with locked(cache_root() / f".custom-{digest}.lock", say):
        if (dest / "fingerprint").is_file() and not force:
            say(f"cached (built meanwhile): {dest}")
            return dest
        work = cache_root() / f".build-custom-{digest}.{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            return _build(recipe, base, base_fingerprint, digest, builder, work, dest, say)
        finally:
            if work.exists():
                subprocess.run(
                    [
                        "bash",
                        "-c",
                        '. "$1"; safe_rm_tree "$2"',
                        "-",
                        builder.parent / "lib.sh",
                        work,
                    ],
                    check=False,
                )


def _build(recipe, base, base_fingerprint, digest, builder, work, dest, say) -> Path:
    say(f"building {recipe.path.name} (recipe {digest}) on {recipe.base} {base_fingerprint[:12]}")
    started = time.monotonic()
    out = work / "out"
    out.mkdir(parents=True)
    write_spec(recipe, work / "spec")
    env = {
        **os.environ,
        "LXDSPAWNER_PIP_ENV": "\n".join(pip_environment()),
        "LXDSPAWNER_CA_BUNDLE": ca_bundle(),
    }
    done = subprocess.run([str(builder), str(base), str(work / "spec"), str(out)], env=env)
    if done.returncode != 0:
        raise BuildError(
            f"building {recipe.path} failed (exit {done.returncode}): see the lines above "
            "(apt-get, pip or the script's own output)"
        )
    what = [*recipe.packages, *recipe.pip, *(f.dest for f in recipe.files)]
    description = recipe.description or (
        f"{recipe.base} with " + (", ".join(what) if what else "a post-install script")
    )
    custom_metadata(
        base / "meta.tar.xz",
        out / "meta.tar.xz",
        {
            "description": description[:200],
            "variant": "custom",
            "lxdspawner.recipe": digest,
            "lxdspawner.base": base_fingerprint,
        },
    )
    fingerprint = fingerprint_of(out / "meta.tar.xz", out / "rootfs.squashfs")
    (out / "fingerprint").write_text(fingerprint + "\n")
    shutil.copy2(recipe.path, out / "recipe.yaml")
    took = time.monotonic() - started
    sizes = (out / "sizes").read_text() if (out / "sizes").exists() else ""
    (out / "sizes").unlink(missing_ok=True)
    (out / "info").write_text(
        f"name=custom\nhash={digest}\nfingerprint={fingerprint}\nrecipe={recipe.path}\n"
        f"base={base_fingerprint}\nbuild_seconds={took:.0f}\n{sizes}"
        f"rootfs_bytes={(out / 'rootfs.squashfs').stat().st_size}\n"
    )
    shutil.rmtree(dest, ignore_errors=True)  # an old --force build
    out.rename(dest)
    size = (dest / "rootfs.squashfs").stat().st_size / (1 << 20)
    say(f"built in {took:.0f} s: {dest} ({size:.0f} MB squashfs, fingerprint {fingerprint[:12]})")
    return dest


# -- importing ---------------------------------------------------------------------------------


def daemon_name(client: LxdClient) -> str:
    """Which daemon the messages speak of, e.g. "LXD 5.0.2 at unix socket /var/lib/lxd/...":
    the product and version the daemon announced, beside the endpoint (a host may run both)."""
    dialect = client.dialect
    if dialect is None:
        return client.where
    product = "Incus" if dialect.product == "incus" else "LXD"
    version = f" {dialect.server_version}" if dialect.server_version else ""
    return f"{product}{version} at {client.where}"


async def import_image(
    client: LxdClient, cache_dir: Path, alias: str, reporter: Reporter, description: str = ""
) -> bool:
    """Point ``alias`` on the daemon at the image in ``cache_dir``, importing it if the daemon
    lacks it; an image the alias left with no alias is deleted. True when anything changed."""
    fingerprint = (cache_dir / "fingerprint").read_text().strip()
    where = daemon_name(client)
    current = await client.image_fingerprint(alias)
    if current == fingerprint:
        reporter.say(f"nothing to do: {alias} -> {fingerprint[:12]} on {where}")
        return False
    if await client.image_fingerprint(fingerprint) is not None:
        reporter.say(f"image {fingerprint[:12]} is already on {where}")
    else:
        meta, rootfs = cache_dir / "meta.tar.xz", cache_dir / "rootfs.squashfs"
        total = meta.stat().st_size + rootfs.stat().st_size
        started = time.monotonic()
        with reporter.upload(f"uploading to {where}", total) as progress:
            got = await client.import_image(meta, rootfs, on_progress=progress)
        if got != fingerprint:
            raise BuildError(f"{where} reports fingerprint {got}, expected {fingerprint}")
        reporter.say(f"imported {fingerprint[:12]} in {time.monotonic() - started:.1f} s")
    await client.set_image_alias(alias, fingerprint, description)
    if current is None:
        reporter.say(f"created alias {alias} -> {fingerprint[:12]}")
        return True
    reporter.say(f"moved alias {alias}: {current[:12]} -> {fingerprint[:12]}")
    try:
        old = await client.image(current)
    except LxdError:
        return True
    if old.get("aliases"):
        reporter.say(f"kept old image {current[:12]}: other aliases point at it")
    else:
        await client.delete_image(current)
        reporter.say(f"deleted old image {current[:12]} (no alias left on it)")
    return True


async def import_everywhere(
    remote: Remote, cache_dir: Path, alias: str, reporter: Reporter, description: str
) -> int:
    """Import into the daemon of ``remote``; on a cluster unpack on every Online member.
    The number of members that failed."""
    from .cli import prepull

    async with remote.client() as client:
        changed = await import_image(client, cache_dir, alias, reporter, description)
        members = await client.cluster_members()
        if not members or not changed:
            return 0
        reporter.say(f"unpacking {alias} on the cluster's {len(members)} members")
        return await prepull(client, alias, shared_directories=(), out=reporter.out)


# -- the command -------------------------------------------------------------------------------


def add_parser(sub: Any, add_connection: Callable[[argparse.ArgumentParser], None]) -> None:
    """``lxdspawner image build ...`` on the command line's subparsers."""
    image = sub.add_parser("image", help="build and import the single-user image, or a custom one")
    actions = image.add_subparsers(dest="image_command", required=True)
    build = actions.add_parser(
        "build",
        help="build an image (jupyter-base, or from a recipe file) and import it",
        description=__doc__.split("\n\n")[2],
        epilog="examples: lxdspawner image build -f /etc/jupyterhub/jupyterhub_config.py; "
        "lxdspawner image build datascience.yaml -f /etc/jupyterhub/jupyterhub_config.py "
        "(recipe format: lxdspawner/images/README.md). Exit status: 0 done, 1 failed, "
        "2 bad recipe or usage.",
    )
    build.add_argument(
        "recipe",
        nargs="?",
        default="jupyter-base",
        help="a recipe file (.yaml), or a recipe of the package: jupyter-base (default), "
        "lxdspawner-tiny",
    )
    build.add_argument("--alias", default="", help="the alias (default: the recipe's)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    add_connection(build)  # -f, --remote (where to import), --endpoint and friends


def _remote(args: argparse.Namespace) -> Remote:
    connection = {
        "endpoint": args.endpoint or "",
        "client_cert": args.cert or "",
        "client_key": args.key or "",
        "server_cert": args.server_cert or "",
        "project": args.project or "",
    }
    if args.config is None:
        if args.remote:
            return choose(args.remote, {}, connection)
        return from_settings(connection)
    if any(connection.values()):
        raise ValueError("give either -f (the hub's config) or --endpoint and friends, not both")
    from .doctor import load_settings

    settings = load_settings(args.config)
    return choose(args.remote, settings.remotes, settings.default)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``lxdspawner image build``: 0 done, 1 the build or import failed, 2 bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    reporter = Reporter(out)
    try:
        builtin = args.recipe in recipes.IMAGE_NAMES and not Path(args.recipe).is_file()
        if builtin:
            recipe = None
            alias = imagerecipe.check_alias(args.alias, "--alias") if args.alias else args.recipe
        else:
            recipe = imagerecipe.load(args.recipe, args.alias)
            alias = recipe.alias
        remote = _remote(args)
    except (ValueError, LxdError) as e:  # RecipeError, a bad config, an unknown remote
        print(f"lxdspawner image build: {getattr(e, 'message', e)}", file=err)
        return 2
    if os.geteuid() != 0:
        print("lxdspawner image build: must run as root (sudo): the build uses chroot", file=err)
        return 2
    try:
        if recipe is None:
            tools = ["squashfs-tools", "xz-utils"]
            tools += ["busybox-static"] if args.recipe == "lxdspawner-tiny" else ["mmdebstrap"]
            ensure_tools(tools, reporter.say)
            reporter.say(
                f"building {args.recipe} (unless cached) for JupyterHub {jupyterhub_version()}"
            )
            cache_dir = build_builtin(args.recipe, force=args.force)
            reporter.say(f"image: {cache_dir}")
            description = f"lxdspawner {args.recipe} (recipe {cache_dir.name.rsplit('-', 1)[-1]})"
        else:
            ensure_tools(["squashfs-tools", "xz-utils", "mmdebstrap"], reporter.say)
            cache_dir = build_custom(recipe, force=args.force, say=reporter.say)
            description = f"lxdspawner {recipe.path.name} (recipe {cache_dir.name[7:]})"
        failed = asyncio.run(import_everywhere(remote, cache_dir, alias, reporter, description))
    except (BuildError, subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"lxdspawner image build: {e}", file=err)
        return 1
    except LxdError as e:
        print(f"lxdspawner image build: {e.message}", file=err)
        return 1
    if failed:
        print(f"lxdspawner image build: {failed} member(s) could not unpack the image", file=err)
        return 1
    return 0
