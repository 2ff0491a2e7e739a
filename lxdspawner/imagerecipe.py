"""Custom image recipes for ``lxdspawner image build RECIPE.yaml``: parsing, checking, hashing.

Zero to JupyterHub users extend the single-user image with a Dockerfile ``FROM`` it; here an
operator writes a small YAML file instead, and ``lxdspawner image build`` (see
:mod:`lxdspawner.imagebuild`) builds it on top of our ``jupyter-base`` image. The schema (every
key optional; no other key is accepted)::

    alias: datascience          # the image alias to import under (default: the file's name
                                # without .yaml; --alias overrides both)
    description: Data science   # the image's description (default: made from the recipe)
    base: jupyter-base          # the image built upon; jupyter-base is the only one so far:
                                # the single-user server matching the hub's JupyterHub
    packages: [jq, graphviz]    # Debian packages (bookworm, no Recommends), apt-get install
    pip:                        # requirements, pip-installed into /opt/jupyterhub (the
      - tabulate                # single-user server's virtualenv), as requirements.txt lines
      - pandas>=2.2
    files:                      # copied into the image, in this order
      - src: motd.txt           # relative to the recipe's directory, inside it (no .., no
        dest: /etc/motd         # symbolic link leading out); a file or a directory
        mode: "0644"            # optional, octal (default: the source's permission bits)
    script: post-install.sh     # run last, as root, in the image's root (a chroot, on the
                                # host), with #! on its first line; relative as ``src``

Everything is checked before anything is built: an unknown key, a value of the wrong type, a
package name apt would read as an option, a requirement pip cannot parse, a source path that
leaves the recipe's directory or a destination that is not absolute are each refused with a
message naming the key and the value (:class:`RecipeError`).

The build is cached by :func:`recipe_hash`: the recipe's meaning (not its formatting or
comments), the content and mode of every file it adds and of the script, the base image's
fingerprint (so a rebuilt base rebuilds what is on it), the build script and the machine's
architecture. The alias is not part of it: the same image may be imported under two names.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The keys of a recipe, and of one entry of its ``files``.
KEYS = ("alias", "description", "base", "packages", "pip", "files", "script")
FILE_KEYS = ("src", "dest", "mode")
#: Top directories a file may not go to: mounted at run time (and during the build) or,
#: for /tmp, emptied at boot and used by the build itself.
RUNTIME_DIRS = ("proc", "sys", "dev", "run", "tmp")
#: The bases a recipe may build on.
BASES = ("jupyter-base",)

#: A Debian package, optionally with ``=version`` or ``/release`` (never an apt option).
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+|/[a-z0-9-]+)?")
#: An image alias: what the daemons accept in a URL path without surprises.
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class RecipeError(ValueError):
    """A recipe that cannot be built; the message names the file, the key and the value."""


@dataclass(frozen=True)
class FileEntry:
    """One file or directory to add: ``source`` is resolved, inside the recipe's directory."""

    src: str
    dest: str
    source: Path
    mode: int | None = None


@dataclass(frozen=True)
class Recipe:
    path: Path
    alias: str
    description: str = ""
    base: str = "jupyter-base"
    packages: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    script: Path | None = None
    #: The recipe as given, normalised (for the hash and the cache's copy).
    data: dict[str, Any] = field(default_factory=dict, compare=False)


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _string_list(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{_where(path, key)} = {value!r}: must be a list of strings")
    return value


def inside(recipe_dir: Path, key: str, src: Any, path: Path) -> Path:
    """``src`` (relative to the recipe's directory) resolved, refused unless it stays inside
    that directory: no absolute path, no ``..`` and no symbolic link leading out."""
    if not isinstance(src, str) or not src:
        raise RecipeError(f"{_where(path, key)} = {src!r}: must be a non-empty relative path")
    if os.path.isabs(src) or ".." in Path(src).parts:
        raise RecipeError(
            f"{_where(path, key)} = {src!r}: must be a path inside the recipe's directory "
            f"{recipe_dir} (relative, without ..)"
        )
    base = recipe_dir.resolve()
    resolved = (base / src).resolve()
    if not resolved.is_relative_to(base):
        raise RecipeError(
            f"{_where(path, key)} = {src!r}: leads out of the recipe's directory {base} "
            f"(to {resolved}, through a symbolic link)"
        )
    if not resolved.exists():
        raise RecipeError(f"{_where(path, key)} = {src!r}: {resolved} does not exist")
    if resolved.is_dir():
        for sub in resolved.rglob("*"):
            if sub.is_symlink() or not (sub.is_file() or sub.is_dir()):
                raise RecipeError(
                    f"{_where(path, key)} = {src!r}: {sub} is not a regular file or directory "
                    "(symbolic links and special files inside a directory are not copied)"
                )
    elif not resolved.is_file():
        raise RecipeError(f"{_where(path, key)} = {src!r}: not a regular file or directory")
    return resolved


def _destination(path: Path, key: str, dest: Any) -> str:
    if not isinstance(dest, str) or not dest.startswith("/") or "\0" in dest:
        raise RecipeError(f"{_where(path, key)} = {dest!r}: must be an absolute path (/etc/motd)")
    if ".." in dest.split("/"):
        raise RecipeError(f"{_where(path, key)} = {dest!r}: must not contain ..")
    if any(c in dest for c in "\n\r\t"):
        raise RecipeError(f"{_where(path, key)} = {dest!r}: must not contain control characters")
    normal = posixpath.normpath(dest)
    if normal == "/" or normal.split("/")[1] in RUNTIME_DIRS:
        raise RecipeError(
            f"{_where(path, key)} = {dest!r}: the image's / and "
            + ", ".join(f"/{d}" for d in RUNTIME_DIRS)
            + " are the container's at run time (mounted over, or the build's own): "
            "choose another destination"
        )
    return normal


def _mode(path: Path, key: str, mode: Any) -> int | None:
    if mode is None:
        return None
    if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3,4}", mode):
        return int(mode, 8)
    raise RecipeError(
        f'{_where(path, key)} = {mode!r}: must be an octal mode in quotes, e.g. "0644"'
    )


def _files(path: Path, value: Any) -> tuple[FileEntry, ...]:
    if not isinstance(value, list):
        raise RecipeError(
            f"{_where(path, 'files')} = {value!r}: must be a list of {{src, dest, mode}}"
        )
    entries = []
    for i, entry in enumerate(value):
        key = f"files[{i}]"
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{_where(path, key)} = {entry!r}: must be a mapping src, dest")
        for k in entry:
            if k not in FILE_KEYS:
                raise RecipeError(
                    f"{_where(path, f'{key}.{k}')}: unknown key (known: {', '.join(FILE_KEYS)})"
                )
        for k in ("src", "dest"):
            if k not in entry:
                raise RecipeError(f"{_where(path, key)}: {k} is missing")
        entries.append(
            FileEntry(
                src=entry["src"],
                dest=_destination(path, f"{key}.dest", entry["dest"]),
                source=inside(path.parent, f"{key}.src", entry["src"], path),
                mode=_mode(path, f"{key}.mode", entry.get("mode")),
            )
        )
    return tuple(entries)


def check_alias(alias: Any, where: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise RecipeError(
            f"{where} = {alias!r}: an image alias is 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return alias


def parse(path: Path, data: Any, alias: str = "") -> Recipe:
    """The recipe ``data`` read from ``path``; ``alias`` (--alias) overrides the recipe's."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: must be a YAML mapping with keys {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            raise RecipeError(f"{_where(path, str(key))}: unknown key (known: {', '.join(KEYS)})")
    for key in ("alias", "description", "base", "script"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{_where(path, key)} = {data[key]!r}: must be a string")
    if alias:
        alias = check_alias(alias, "--alias")
    elif "alias" in data:
        alias = check_alias(data["alias"], _where(path, "alias"))
    else:
        alias = check_alias(path.stem, f"{path}: alias (from the file's name)")
    base = data.get("base", "jupyter-base")
    if base not in BASES:
        raise RecipeError(
            f"{_where(path, 'base')} = {base!r}: unknown base (known: {', '.join(BASES)})"
        )
    packages = _string_list(path, "packages", data.get("packages", []))
    for i, name in enumerate(packages):
        if not _PACKAGE.fullmatch(name):
            raise RecipeError(
                f"{_where(path, f'packages[{i}]')} = {name!r}: not a Debian package name "
                "(lowercase letters, digits, + - .; optionally =VERSION or /RELEASE)"
            )
    requirements = _string_list(path, "pip", data.get("pip", []))
    for i, line in enumerate(requirements):
        _requirement(path, f"pip[{i}]", line)
    script = None
    if "script" in data:
        script = inside(path.parent, "script", data["script"], path)
        if not script.is_file():
            raise RecipeError(f"{_where(path, 'script')} = {data['script']!r}: must be a file")
        if not script.read_bytes().startswith(b"#!"):
            raise RecipeError(
                f"{_where(path, 'script')} = {data['script']!r}: must start with a #! line "
                "(e.g. #!/bin/sh), it is run as a program"
            )
    return Recipe(
        path=path,
        alias=alias,
        description=data.get("description", ""),
        base=base,
        packages=tuple(packages),
        pip=tuple(requirements),
        files=_files(path, data.get("files", [])),
        script=script,
        data={k: data[k] for k in KEYS if k in data},
    )


def _requirement(path: Path, key: str, line: str) -> None:
    """A requirement pip reads as one: never an option (``-r``, ``--index-url``)."""
    from packaging.requirements import InvalidRequirement, Requirement

    if line.strip().startswith("-") or "\n" in line:
        raise RecipeError(
            f"{_where(path, key)} = {line!r}: a requirement (name and version), not a pip option"
        )
    try:
        Requirement(line)
    except InvalidRequirement as e:
        raise RecipeError(f"{_where(path, key)} = {line!r}: not a pip requirement: {e}") from e


def load(path: str | Path, alias: str = "") -> Recipe:
    """Read and check the recipe file at ``path``."""
    path = Path(path).absolute()
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    return parse(path, data, alias)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(source: Path) -> list[tuple[str, int, str]]:
    """(relative path, mode, sha256) of a file, or of every file and directory below one."""
    if source.is_file():
        return [(".", stat.S_IMODE(source.stat().st_mode), _digest(source))]
    found = [(".", stat.S_IMODE(source.stat().st_mode), "dir")]
    for sub in sorted(source.rglob("*")):
        mode = stat.S_IMODE(sub.stat().st_mode)
        found.append(
            (sub.relative_to(source).as_posix(), mode, _digest(sub) if sub.is_file() else "dir")
        )
    return found


def recipe_hash(recipe: Recipe, base_fingerprint: str, builder: bytes) -> str:
    """16 hex digits naming the build of ``recipe`` on the base ``base_fingerprint`` with the
    build script ``builder`` (its content): equal inputs, equal hash; any change, a new one."""
    data = {k: v for k, v in recipe.data.items() if k != "alias"}
    inputs = {
        "recipe": data,
        "files": [file_digests(f.source) for f in recipe.files],
        "script": _digest(recipe.script) if recipe.script else None,
        "base": base_fingerprint,
        "builder": hashlib.sha256(builder).hexdigest(),
        "arch": platform.machine(),
    }
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
