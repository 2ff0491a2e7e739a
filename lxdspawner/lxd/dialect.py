"""What differs between LXD and Incus, decided from the server's own ``GET /1.0``.

Incus is the community continuation of LXD and keeps its REST API; the differences that
matter to us are the product name, the header prefix of the files API, where the local
socket lives and which API extensions exist. Features are detected from ``api_extensions``,
never from version numbers, so backports and forks behave as they announce.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# In the order we look for a local socket: an explicit directory first, then Incus
# (our default daemon), then Debian's and the snap's LXD.
SOCKET_CANDIDATES = (
    "/var/lib/incus/unix.socket",
    "/run/incus/unix.socket",
    "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
)


def local_socket_candidates(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Socket paths to try, honouring ``INCUS_DIR``/``INCUS_SOCKET`` and ``LXD_DIR``."""
    found: list[str] = []
    if environ.get("INCUS_SOCKET"):
        found.append(environ["INCUS_SOCKET"])
    if environ.get("INCUS_DIR"):
        found.append(os.path.join(environ["INCUS_DIR"], "unix.socket"))
    if environ.get("LXD_DIR"):
        found.append(os.path.join(environ["LXD_DIR"], "unix.socket"))
    found.extend(p for p in SOCKET_CANDIDATES if p not in found)
    return found


@dataclass(frozen=True)
class Dialect:
    """The daemon's flavour: ``product`` is ``"incus"`` or ``"lxd"``."""

    product: str
    api_extensions: frozenset[str] = field(default_factory=frozenset)
    server_version: str = ""
    clustered: bool = False

    @classmethod
    def from_server_info(cls, info: Mapping) -> Dialect:
        env = info.get("environment") or {}
        server = str(env.get("server") or "lxd").lower()
        product = "incus" if "incus" in server else "lxd"
        return cls(
            product=product,
            api_extensions=frozenset(info.get("api_extensions") or ()),
            server_version=str(env.get("server_version") or ""),
            clustered=bool(env.get("server_clustered")),
        )

    @property
    def header_prefix(self) -> str:
        return "X-Incus-" if self.product == "incus" else "X-LXD-"

    def file_headers(self, *, uid: int, gid: int, mode: int, kind: str = "file") -> dict[str, str]:
        p = self.header_prefix
        return {
            f"{p}uid": str(uid),
            f"{p}gid": str(gid),
            f"{p}mode": f"{mode:04o}",
            f"{p}type": kind,
            f"{p}write": "overwrite",
        }

    def has(self, extension: str) -> bool:
        return extension in self.api_extensions

    @property
    def create_and_start(self) -> bool:
        """Whether ``POST /1.0/instances`` accepts ``"start": true`` (one request, not two)."""
        return self.has("instance_create_start")
