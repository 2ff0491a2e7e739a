"""The ``incus``/``lxc`` command line's remotes, read from the tool's own configuration.

What an operator set up with ``incus remote add campus https://...`` (or ``lxc remote add``)
is a remote of the hub too: ``endpoint = "campus"``. The tools keep, in one directory, a
``config.yml`` (``remotes: {name: {addr, protocol, project, public, auth_type}}``), the client
certificate and key (``client.crt``, ``client.key``; Incus also per remote,
``clientcerts/<name>.crt`` and ``.key``) and the certificate each remote presented when it
was added (``servercerts/<name>.crt``), as lxc/incus ``shared/cliconfig`` and canonical/lxd
``lxc/config`` read them.

Where we look, in this order (:func:`config_dirs`): ``$INCUS_CONF``, ``$LXD_CONF``,
``~/.config/incus``, ``~/.config/lxc``, ``~/snap/lxd/common/config``. Every directory of
these that holds a ``config.yml`` is read, and the first that names the remote wins: so
with both an Incus and an LXD configuration, a name both define is Incus', and a name only
``lxc`` knows is still found. ``local`` is, as in the tools, the tool's own unix socket (the
first directory's tool). The system-wide configurations (``/etc/incus``, ``/etc/lxd``) are
not read.

The result is a :class:`~.remote.Remote` holding file paths, not contents: the hub reads the
certificates when it connects, and a server's state names the files, never a secret. A
remote with no ``servercerts/<name>.crt`` is checked against the system's CAs, as the tools
do. Every error names the file it is about. Reading is small local file I/O (a few hundred
bytes of YAML), done when a spawn needs it: no cache to go stale.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import LxdError
from .remote import Remote

#: The tools' default local sockets (``unix://`` with no path).
INCUS_SOCKETS = ("/var/lib/incus/unix.socket", "/run/incus/unix.socket")
LXD_SOCKETS = ("/var/snap/lxd/common/lxd/unix.socket", "/var/lib/lxd/unix.socket")

#: Protocols of remotes that are daemons; others (simplestreams, oci) are image servers.
DAEMON_PROTOCOLS = ("incus", "lxd")


class CliRemoteError(LxdError):
    """A command-line remote that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ConfigDir:
    """A directory of the tool ``tool`` (``"incus"`` or ``"lxc"``)."""

    path: Path
    tool: str

    @property
    def config(self) -> Path:
        return self.path / "config.yml"


def config_dirs(
    environ: Mapping[str, str] | None = None, home: str | None = None
) -> list[ConfigDir]:
    """The directories looked at, in order (whether they exist or not)."""
    environ = os.environ if environ is None else environ
    home = home if home is not None else environ.get("HOME") or os.path.expanduser("~")
    found = []
    if environ.get("INCUS_CONF"):
        found.append(ConfigDir(Path(environ["INCUS_CONF"]), "incus"))
    if environ.get("LXD_CONF"):
        found.append(ConfigDir(Path(environ["LXD_CONF"]), "lxc"))
    found += [
        ConfigDir(Path(home, ".config", "incus"), "incus"),
        ConfigDir(Path(home, ".config", "lxc"), "lxc"),
        ConfigDir(Path(home, "snap", "lxd", "common", "config"), "lxc"),
    ]
    unique: list[ConfigDir] = []
    for d in found:
        if d.path not in [u.path for u in unique]:
            unique.append(d)
    return unique


def read_remotes(conf: ConfigDir) -> dict[str, dict]:
    """The ``remotes`` of one ``config.yml``: name -> its mapping (checked for shape)."""
    try:
        text = conf.config.read_text(encoding="utf-8")
    except OSError as e:
        raise CliRemoteError(f"cannot read {conf.config}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CliRemoteError(f"{conf.config} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise CliRemoteError(f"{conf.config}: expected a mapping at the top, not {data!r}")
    remotes = data.get("remotes") or {}
    if not isinstance(remotes, dict):
        raise CliRemoteError(f"{conf.config}: `remotes` must be a mapping")
    for name, remote in remotes.items():
        if not isinstance(remote, dict):
            raise CliRemoteError(f"{conf.config}: remote {name!r} must be a mapping")
    return {str(name): remote for name, remote in remotes.items()}


def known_names(environ: Mapping[str, str] | None = None, home: str | None = None) -> list[str]:
    """The names of the daemons (not image servers) the readable configurations define,
    for error messages."""
    names: list[str] = []
    for conf in config_dirs(environ, home):
        if conf.config.is_file():
            try:
                names += [
                    n
                    for n, r in read_remotes(conf).items()
                    if n not in names and _is_daemon(r, conf)
                ]
            except CliRemoteError:
                continue
    return names


def resolve(name: str, environ: Mapping[str, str] | None = None, home: str | None = None) -> Remote:
    """The :class:`Remote` the command line's remote ``name`` is (see the module's doc)."""
    dirs = config_dirs(environ, home)
    readable = [d for d in dirs if d.config.is_file()]
    if not readable:
        looked = ", ".join(str(d.config) for d in dirs)
        raise CliRemoteError(
            f"remote {name!r}: no incus/lxc command-line configuration found (looked for "
            f"{looked}); add it with `incus remote add {name} ...`, or set INCUS_CONF"
        )
    everything: list[str] = []
    for conf in readable:
        remotes = read_remotes(conf)
        if name in remotes:
            return _remote(name, remotes[name], conf, environ)
        if name == "local":  # implicit in the tools: their own socket
            return _remote(name, {"addr": "unix://"}, conf, environ)
        everything += [f"{n} ({conf.config})" for n in remotes]
    raise CliRemoteError(
        f"remote {name!r} is in none of "
        + ", ".join(str(c.config) for c in readable)
        + (f"; they have: {', '.join(everything)}" if everything else "; they have no remotes")
    )


def _protocol(entry: Mapping, conf: ConfigDir) -> str:
    return str(entry.get("protocol") or ("incus" if conf.tool == "incus" else "lxd"))


def _is_daemon(entry: Mapping, conf: ConfigDir) -> bool:
    return _protocol(entry, conf) in DAEMON_PROTOCOLS and not entry.get("public")


def _remote(name: str, entry: Mapping, conf: ConfigDir, environ) -> Remote:
    where = f"remote {name!r} of {conf.config}"
    protocol = _protocol(entry, conf)
    if not _is_daemon(entry, conf):
        raise CliRemoteError(
            f"{where} is an image server (protocol {protocol}"
            + (", public" if entry.get("public") else "")
            + "), not an Incus/LXD daemon"
        )
    if entry.get("auth_type") not in (None, "", "tls"):
        raise CliRemoteError(
            f"{where} uses auth_type {entry['auth_type']!r}: only TLS client certificates are "
            "supported (`incus remote add --auth-type tls`)"
        )
    addrs = [a.strip() for a in str(entry.get("addr") or "").split(",") if a.strip()]
    if not addrs:
        raise CliRemoteError(f"{where} has no addr")
    # Incus 7 may list several addresses, remembering the one that last answered.
    addr = str(entry.get("last_working_address") or "") or addrs[0]
    project = str(entry.get("project") or "")
    project = "" if project == "default" else project
    if addr.startswith("unix:"):
        path = addr.removeprefix("unix:").removeprefix("//")
        return Remote(f"unix://{path or _default_socket(conf.tool, environ)}", project)
    if not addr.startswith("https://"):
        raise CliRemoteError(f"{where}: addr {addr!r} is neither https:// nor unix://")
    cert, key = conf.path / "client.crt", conf.path / "client.key"
    own_cert = conf.path / "clientcerts" / f"{name}.crt"
    own_key = conf.path / "clientcerts" / f"{name}.key"
    if own_cert.is_file() and own_key.is_file():
        cert, key = own_cert, own_key
    for path, what in ((cert, "client certificate"), (key, "client key")):
        if not path.is_file():
            raise CliRemoteError(
                f"{where}: its {what} {path} is missing (the tool makes it on its first "
                "`remote add`)"
            )
    server = conf.path / "servercerts" / f"{name}.crt"
    return Remote(
        addr,
        project,
        str(cert),
        str(key),
        str(server) if server.is_file() else "",  # else: the system's CAs, as the tool does
    )


def _default_socket(tool: str, environ: Mapping[str, str] | None) -> str:
    """The tool's own socket: its environment's (INCUS_SOCKET, INCUS_DIR; LXD_DIR) if set,
    else the first of its usual paths that exists."""
    environ = os.environ if environ is None else environ
    if tool == "incus":
        if environ.get("INCUS_SOCKET"):
            return environ["INCUS_SOCKET"]
        if environ.get("INCUS_DIR"):
            return os.path.join(environ["INCUS_DIR"], "unix.socket")
        candidates = INCUS_SOCKETS
    else:
        if environ.get("LXD_DIR"):
            return os.path.join(environ["LXD_DIR"], "unix.socket")
        candidates = LXD_SOCKETS
    return next((c for c in candidates if os.path.exists(c)), candidates[0])


def is_url(endpoint: str) -> bool:
    """Whether an endpoint is a URL (or empty: the local socket), not a CLI remote's name."""
    return not endpoint or endpoint.startswith(("unix:", "https://"))


__all__ = ["CliRemoteError", "ConfigDir", "config_dirs", "is_url", "known_names", "resolve"]
