"""``lxdspawner install``: the production install, a bash script shipped in the package.

The install is host plumbing (apt, systemd units, PostgreSQL roles, Caddy), so it is a script,
``lxdspawner/install/install.sh``, with the files it installs beside it (the units, the hub's
config, the Caddyfile, Incus' preseed): package data, as the image recipes are, so a pip user
has it. This module finds it and runs it as root with the virtualenv lxdspawner runs from
(``sys.prefix``: ``/opt/jupyterhub`` when installed as the README says), and answers the two
questions the script asks the daemon (does it answer, has it the image) through its REST API:
the host may have no ``incus`` command at all when the daemon is another machine's socket.

    lxdspawner install [--domain hub.example.org] [--daemon-socket PATH] [--upgrade] ...
    lxdspawner install --bundle DIR          (connected machine: an offline bundle)
    bash DIR/install.sh --from-bundle DIR    (the offline host)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from importlib import resources
from pathlib import Path


def script() -> Path:
    """The installer script in the installed package (or the checkout)."""
    path = Path(str(resources.files("lxdspawner").joinpath("install", "install.sh")))
    if not path.is_file():
        raise FileNotFoundError(
            f"the installer is not on disk at {path}: install the jupyterhub-lxdspawner "
            "package with pip (not from a zip)"
        )
    return path


def command(args: list[str], prefix: str = sys.prefix) -> list[str]:
    """The command line that runs the installer for ``lxdspawner install ARGS``."""
    venv = ["--venv", prefix] if "--venv" not in args else []
    return ["bash", str(script()), *venv, *args]


def run(args: list[str]) -> int:
    """``lxdspawner install ARGS``: replace this process with the installer (as root)."""
    if args[:1] not in (["-h"], ["--help"]) and os.geteuid() != 0:
        print(
            "lxdspawner install: run as root, e.g. sudo /opt/jupyterhub/bin/lxdspawner install",
            file=sys.stderr,
        )
        return 2
    argv = command(args)
    os.execvp(argv[0], argv)  # noqa: S606 - the package's own script, arguments as given


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def query(socket_path: str, path: str) -> tuple[int, dict]:
    """GET ``path`` from the daemon on ``socket_path``: (HTTP status, the JSON answer)."""
    conn = _UnixConnection(socket_path)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def daemon_name(socket_path: str) -> str | None:
    """The daemon's name and version (``incus 6.0.4``) answering on ``socket_path``, or None."""
    try:
        status, body = query(socket_path, "/1.0")
    except (OSError, ValueError):
        return None
    if status != 200:
        return None
    env = (body.get("metadata") or {}).get("environment") or {}
    return f"{env.get('server') or 'daemon'} {env.get('server_version', '?')}"


def has_image(socket_path: str, alias: str) -> bool:
    """Whether the daemon on ``socket_path`` has the image alias ``alias``."""
    try:
        status, _ = query(socket_path, f"/1.0/images/aliases/{alias}")
    except (OSError, ValueError):
        return False
    return status == 200


def main(argv: list[str] | None = None) -> int:
    """The script's questions: ``answers SOCKET``, ``has-image SOCKET ALIAS`` (exit 0: yes)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "answers":
        name = daemon_name(argv[1])
        if name:
            print(name)
        return 0 if name else 1
    if len(argv) == 3 and argv[0] == "has-image":
        return 0 if has_image(argv[1], argv[2]) else 1
    print("usage: python -m lxdspawner.installer answers SOCKET | has-image SOCKET ALIAS")
    return 2


if __name__ == "__main__":
    sys.exit(main())
