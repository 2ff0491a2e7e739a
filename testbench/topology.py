"""The test bench's sockets, bridges and addresses, read from ``scripts/topology.env``.

That file is the one place they are written: scripts/setup-lxd.sh makes the bridges from
it, scripts/cluster.sh the cluster's network, and the Makefile, the tests, the benchmark and
the demo find them there. Python reads it only through this module, so a bridge that moves
to another subnet moves everywhere at once.

The file is plain ``KEY=value`` lines, which bash's ``source`` and this reader understand
alike; `parse_env` refuses anything else (quotes, spaces, ``$``) rather than read it
differently from bash. ``scripts/cluster.sh up`` prints the facts the cluster tests need in
the same form.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOPOLOGY_FILE = REPO / "scripts" / "topology.env"

_LINE = re.compile(r"([A-Z_][A-Z0-9_]*)=([^\s'\"$`\\]*)")


def parse_env(text: str, source: str = "<text>") -> dict[str, str]:
    """``KEY=value`` lines (blank lines and ``#`` comments skipped) as a dict."""
    values: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise ValueError(
                f"{source}:{n}: {line!r} is not a plain KEY=value line "
                "(no quotes, spaces or $: bash must read it the same way)"
            )
        values[m.group(1)] = m.group(2)
    return values


def read(path: Path = TOPOLOGY_FILE) -> dict[str, str]:
    """Every value of the topology file."""
    return parse_env(path.read_text(), str(path))


@dataclass(frozen=True)
class BenchDaemon:
    """One of the bench's container daemons, as scripts/setup-lxd.sh sets it up."""

    name: str  # "incus" or "lxd", as scripts/setup-lxd.sh and LXDSPAWNER_DAEMON name it
    state_dir: str
    socket: str
    bridge: str
    bridge_address: str  # the bridge's ipv4.address, e.g. "10.117.40.1/24"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: where a test hub's API listens."""
        return str(ipaddress.ip_interface(self.bridge_address).ip)

    @property
    def subnet(self) -> str:
        """The bridge's network, e.g. "10.117.40.0/24": where its containers' addresses are."""
        return str(ipaddress.ip_interface(self.bridge_address).network)

    @property
    def cli(self) -> tuple[str, ...]:
        """The daemon's command line: ``incus``, or Debian's ``lxc`` on its state directory."""
        if self.name == "lxd":
            return ("env", f"LXD_DIR={self.state_dir}", "lxc")
        return ("incus",)


def _daemon(values: dict[str, str], name: str) -> BenchDaemon:
    key = f"LXDSP_{name.upper()}_"
    return BenchDaemon(
        name=name,
        state_dir=values[key + "DIR"],
        socket=values[key + "SOCKET"],
        bridge=values[key + "BRIDGE"],
        bridge_address=values[key + "BRIDGE_ADDRESS"],
    )


_VALUES = read()
INCUS = _daemon(_VALUES, "incus")
LXD = _daemon(_VALUES, "lxd")
DAEMONS: dict[str, BenchDaemon] = {d.name: d for d in (INCUS, LXD)}


def daemon(name: str) -> BenchDaemon:
    """The bench daemon called ``name`` (as in LXDSPAWNER_DAEMON or LXDSPAWNER_TEST_DAEMONS)."""
    try:
        return DAEMONS[name]
    except KeyError:
        raise ValueError(f"unknown daemon {name!r}: choose one of {sorted(DAEMONS)}") from None
