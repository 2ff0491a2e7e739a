"""The test cluster of scripts/cluster.sh: its API side, through lxdspawner's own client, and
what `scripts/cluster.sh up` says about it (`Cluster`, for the tests).

cluster.sh does the host's plumbing (namespaces, veths, bridge, daemons) in bash. What it
asks of the cluster's API is here instead, with `lxdspawner.lxd.LxdClient`, rather than the
incus CLI's JSON picked apart with sed and grep: whether a member is clustered, the members'
status, waiting until members are Online and requests are forwarded to them again, trusting
the hub's certificate, and copying the images to every member (with `lxdspawner prepull`'s
own function, so the test cluster is prepared the way an operator prepares theirs)::

    python -m testbench.cluster SOCKET clustered          # exit 0 when it is
    python -m testbench.cluster SOCKET members            # "name status" lines
    python -m testbench.cluster SOCKET wait-online SECONDS MEMBER...
    python -m testbench.cluster SOCKET wait-forwarding SECONDS MEMBER
    python -m testbench.cluster SOCKET trust CERT NAME
    python -m testbench.cluster SOCKET images STAMP_DIR IMAGE...

SOCKET is a member's unix socket (``$INCUS_DIR/unix.socket``); cluster.sh puts the
repository's root on PYTHONPATH. Messages go to stderr in cluster.sh's own format (its start
time comes in LXDSP_CLUSTER_T0); the exit status says whether it worked.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lxdspawner.cli import prepull
from lxdspawner.lxd import LxdClient, LxdError, NotFound

from .topology import parse_env

#: How often a copy of an image to the members is tried: a member whose heartbeat lapsed
#: for a moment under load counts as offline, and then the member holding the image is "not
#: available" to the others.
PREPULL_TRIES = 5
#: prepull's own instance names; any left by a failed try are deleted at the end.
PREPULL_PREFIX = "lxdspawner-prepull-"


@dataclass(frozen=True)
class Cluster:
    """The running cluster, as `scripts/cluster.sh up` describes it."""

    endpoint: str
    client_cert: str
    client_key: str
    server_cert: str
    members: tuple[str, ...]
    #: member name -> the HTTPS URL it answers on
    member_urls: dict[str, str]
    #: the hub's address on the cluster's segment, and the containers' subnet there
    hub_ip: str
    subnet: str
    #: the incus command line on member1's socket (for diagnostics; tests use the HTTPS API)
    cli: tuple[str, ...]

    @classmethod
    def from_facts(cls, text: str) -> Cluster:
        """From the KEY=value lines `scripts/cluster.sh up` prints."""
        facts = parse_env(text, "scripts/cluster.sh up")
        members = tuple(facts["LXDSP_CLUSTER_MEMBERS"].split(","))
        urls = facts["LXDSP_CLUSTER_MEMBER_URLS"].split(",")
        return cls(
            endpoint=facts["LXDSP_CLUSTER_ENDPOINT"],
            client_cert=facts["LXDSP_CLUSTER_CLIENT_CERT"],
            client_key=facts["LXDSP_CLUSTER_CLIENT_KEY"],
            server_cert=facts["LXDSP_CLUSTER_SERVER_CERT"],
            members=members,
            member_urls=dict(zip(members, urls, strict=True)),
            hub_ip=facts["LXDSP_CLUSTER_HUB_IP"],
            subnet=facts["LXDSP_CLUSTER_SUBNET"],
            cli=(
                "env",
                f"INCUS_DIR={facts['LXDSP_CLUSTER_INCUS_DIR']}",
                f"INCUS_CONF={facts['LXDSP_CLUSTER_INCUS_CONF']}",
                "incus",
            ),
        )

    def client(self, **kwargs) -> LxdClient:
        """A client over HTTPS, as the hub uses it (not the members' unix sockets)."""
        return LxdClient(
            self.endpoint,
            client_cert=self.client_cert,
            client_key=self.client_key,
            server_cert=self.server_cert,
            **kwargs,
        )

    def spawner_config(self) -> str:
        """jupyterhub_config.py lines pointing LxdSpawner at this cluster."""
        return (
            f"c.LxdSpawner.endpoint = {self.endpoint!r}\n"
            f"c.LxdSpawner.client_cert = {self.client_cert!r}\n"
            f"c.LxdSpawner.client_key = {self.client_key!r}\n"
            f"c.LxdSpawner.server_cert = {self.server_cert!r}\n"
            # The test cluster's containers are macvlan NICs on one L2 segment with the hub
            # (docs/cluster.md), which the daemon cannot isolate.
            'c.LxdSpawner.network_isolation = "open"\n'
        )


def log(message: str) -> None:
    """A line on stderr, stamped like cluster.sh's own (seconds since it started)."""
    t0 = os.environ.get("LXDSP_CLUSTER_T0", "")
    if t0.isdigit():
        ds = int((time.time() * 1e6 - int(t0)) / 1e5)
        print(f"[cluster +{ds // 10}.{ds % 10}s] {message}", file=sys.stderr, flush=True)
    else:
        print(f"[cluster] {message}", file=sys.stderr, flush=True)


async def clustered(client: LxdClient) -> bool:
    info = await client.server_info()
    return bool((info.get("environment") or {}).get("server_clustered"))


async def statuses(client: LxdClient) -> dict[str, str]:
    """Each member's status as this member sees it."""
    return {m["server_name"]: m["status"] for m in await client.cluster_members()}


async def wait_online(client: LxdClient, members: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        with contextlib.suppress(LxdError):  # the cluster may be electing a leader
            seen = await statuses(client)
        waiting = [m for m in members if seen.get(m) != "Online"]
        if not waiting:
            return True
        if time.monotonic() > deadline:
            for m in waiting:
                status = seen.get(m, "unknown")
                log(f"ERROR: {m} is not Online after {timeout:g} s (status: {status})")
            return False
        await asyncio.sleep(0.5)


async def wait_forwarding(client: LxdClient, member: str, timeout: float) -> bool:
    """Right after a member restarts, requests forwarded to it may still get "Server isn't
    ready yet" for a moment: wait until one goes through."""
    deadline = time.monotonic() + timeout
    error = ""
    while time.monotonic() < deadline:
        try:
            await client.request("GET", "/1.0/resources", params={"target": member}, timeout=10)
            return True
        except LxdError as e:
            error = e.message
        await asyncio.sleep(0.5)
    log(f"requests to {member} are not forwarded after {timeout:g} s: {error}")
    return False


async def trust(client: LxdClient, pem: str, name: str) -> None:
    """Trust a client certificate (PEM) unless the cluster does already."""
    der = ssl.PEM_cert_to_DER_cert(pem)
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        await client.request("GET", f"/1.0/certificates/{fingerprint}")
        return
    except NotFound:
        pass
    log(f"trusting the client certificate {name!r} ({fingerprint[:12]})")
    body = {"name": name, "type": "client", "certificate": base64.b64encode(der).decode()}
    await client.request("POST", "/1.0/certificates", json_body=body)


async def copy_images(client: LxdClient, stamps: Path, images: list[str]) -> bool:
    """Every image created once on every member, so each member has it unpacked in its pool
    (the first spawn on a member is then a clone, not a 7-second unpack). A stamp per
    fingerprint in ``stamps`` skips that next time."""

    async def one(image: str) -> bool:
        fingerprint = (await client.image_alias(image))["target"]
        stamp = stamps / f"prepulled-{fingerprint}"
        if stamp.exists():
            return True
        for attempt in range(1, PREPULL_TRIES + 1):
            out = io.StringIO()
            if await prepull(client, image, shared_directories=(), out=out) == 0:
                stamp.touch()
                log(f"{image} ({fingerprint[:12]}) is ready on every member")
                return True
            for line in out.getvalue().splitlines():
                log(f"copying {image}: {line} (try {attempt} of {PREPULL_TRIES})")
            await asyncio.sleep(attempt * 3)
        return False

    try:
        results = await asyncio.gather(*(one(image) for image in images))
    finally:
        await _remove_prepull_leftovers(client)
    return all(results)


async def _remove_prepull_leftovers(client: LxdClient) -> None:
    for url in await client.list_instances(recursion=0):
        name = url.rsplit("/", 1)[-1].split("?")[0]
        if name.startswith(PREPULL_PREFIX):
            with contextlib.suppress(LxdError):
                await client.delete_instance(name)


async def run(args: argparse.Namespace) -> int:
    try:
        async with LxdClient(f"unix://{args.socket}") as client:
            if args.command == "clustered":
                return 0 if await clustered(client) else 1
            if args.command == "members":
                for name, status in (await statuses(client)).items():
                    print(name, status)
                return 0
            if args.command == "wait-online":
                return 0 if await wait_online(client, args.members, args.seconds) else 1
            if args.command == "wait-forwarding":
                return 0 if await wait_forwarding(client, args.member, args.seconds) else 1
            if args.command == "trust":
                await trust(client, args.cert.read_text(), args.name)
                return 0
            return 0 if await copy_images(client, args.stamps, args.images) else 1
    except LxdError as e:
        if args.command != "clustered":  # "no" is an answer there, not an error
            log(f"ERROR: {args.command}: {e.message}")
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("socket", help="a member's unix socket")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("clustered", help="exit 0 if the member is part of a cluster")
    sub.add_parser("members", help="print each member's name and status")
    p = sub.add_parser("wait-online", help="wait until the members are Online")
    p.add_argument("seconds", type=float)
    p.add_argument("members", nargs="+")
    p = sub.add_parser("wait-forwarding", help="wait until requests reach the member")
    p.add_argument("seconds", type=float)
    p.add_argument("member")
    p = sub.add_parser("trust", help="trust a client certificate")
    p.add_argument("cert", type=Path)
    p.add_argument("name")
    p = sub.add_parser("images", help="unpack the images on every member")
    p.add_argument("stamps", type=Path, help="directory of prepulled-<fingerprint> stamps")
    p.add_argument("images", nargs="+")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
