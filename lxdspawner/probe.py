"""``lxdspawner doctor``'s probe: a short-lived container that asks the hub's API what a
server would ask, from where a server would ask it.

A hub address can look right in the config and still not work from a container: a firewall
on the host, the bridge's network ACL, a ``hub_connect_url`` naming ``localhost``. The probe
tells these apart from "reachable": it creates an ephemeral container (our keys, a
``lxdspawner-doctor-`` name, the configured profiles; the image ``lxdspawner-tiny`` when the
daemon has it, a 1 MiB busybox, else the configured image), waits for its IPv4 address, and
fetches ``<hub>/hub/api`` from it (busybox ``wget``, else the image's ``python3``). The same
URL is fetched from this host too: the hub answering here and not from the container is a
block on the way (firewall, ACL); answering from neither, the hub is not running there.

The probe's NIC is the profiles' own: on a bridge dedicated to lxdspawner the hub's network
ACL is on the bridge and applies to it as to a server; on a shared bridge (Incus puts the ACL
on each server's NIC) it tests the route, not the ACL. The probe is deleted whatever happens,
and only after its keys are checked: a name is never proof of ownership.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from . import names
from .lxd import LxdClient, LxdError, NotFound, OperationFailed, image_source, ipv4_addresses
from .ownership import KEY_HUB, KEY_MANAGED, MANAGED_BY

#: Config key marking a doctor's probe (it has no user: it is nobody's server).
KEY_PROBE = "user.lxdspawner.doctor-probe"
#: The image the probe prefers: tiny, so the probe costs a second, not an unpack.
TINY_IMAGE = "lxdspawner-tiny"
#: Seconds for the container's IPv4 address, and for the hub's answer.
ADDRESS_TIMEOUT = 20.0
FETCH_TIMEOUT = 5

#: The fetch with the image's python3 when it has no busybox: the URL is an argument, never
#: part of the code; exit 0 with the body for any HTTP answer, 1 with the error otherwise.
_PYTHON_FETCH = """
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read(4096).decode())
except urllib.error.HTTPError as e:
    print("server returned error: HTTP", e.code)
except Exception as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""

#: What the probe found: "hub" (JupyterHub's API answered), "other" (something else
#: answered), "refused", "blocked" (no answer: dropped, unreachable, timed out),
#: "no-address" (the container got no IPv4), "failed" (the probe itself could not run).
HUB, OTHER, REFUSED, BLOCKED, NO_ADDRESS, FAILED = (
    "hub",
    "other",
    "refused",
    "blocked",
    "no-address",
    "failed",
)


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str
    #: The probe container's name, image, and what the same URL gave from this host.
    name: str = ""
    image: str = ""
    from_host: str = ""


def api_url(hub_url: str) -> str:
    """The hub's API under a hub URL: ``http://10.0.0.1:8081`` and ``http://h:8081/hub/``
    both give ``…/hub/api``; a base URL (``/jupyter/``) is kept."""
    parts = urlsplit(hub_url)
    path = parts.path.rstrip("/")
    if not path.endswith("/hub"):
        path += "/hub"
    return urlunsplit(parts._replace(path=path + "/api", query="", fragment=""))


def classify(exit_code: int, stdout: str, stderr: str) -> tuple[str, str]:
    """(kind, detail) of a fetch's result (busybox wget's or the python fallback's)."""
    text = (stderr or stdout).strip().splitlines()
    last = text[-1] if text else f"exit status {exit_code}"
    if exit_code == 0 and "server returned error" not in stdout:
        try:
            version = json.loads(stdout).get("version")
        except (ValueError, AttributeError):
            version = None
        if version:
            return HUB, f"JupyterHub {version} answered"
        return OTHER, "something answered that is not JupyterHub's API: " + stdout.strip()[:80]
    if "server returned error" in stdout + stderr:
        return OTHER, "something answered that is not JupyterHub's API: " + last
    lowered = last.lower()
    if "refused" in lowered:
        return REFUSED, last
    return BLOCKED, last


async def from_host(url: str, timeout: float = FETCH_TIMEOUT) -> str:
    """The same URL fetched from this host: "hub", "other", or why it failed."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return str(e) or e.__class__.__name__
    try:
        return HUB if json.loads(body).get("version") else OTHER
    except (ValueError, AttributeError):
        return OTHER


async def _address(client: LxdClient, name: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        found = ipv4_addresses(await client.instance_state(name))
        if found:
            return found[0]
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)


#: busybox wget under ``timeout`` when there is one (this busybox's ``wget -T`` crashes: exit
#: 139, measured on lxdspawner-tiny); the URL and the seconds are arguments, never code.
_WGET = (
    'if command -v timeout >/dev/null; then exec timeout "$0" wget -q -O - "$1"; fi; '
    'exec wget -q -O - "$1"'
)


async def _fetch(client: LxdClient, name: str, url: str) -> tuple[str, str]:
    wget = ["sh", "-c", _WGET, str(FETCH_TIMEOUT), url]
    try:
        result = await client.exec(name, wget, timeout=FETCH_TIMEOUT + 20)
    except OperationFailed:
        result = None
    except LxdError as e:
        return BLOCKED, f"no answer: {e.message}"
    if result is None or result.exit_code == 127:
        command = ["python3", "-c", _PYTHON_FETCH, url, str(FETCH_TIMEOUT)]
        try:
            result = await client.exec(name, command, timeout=FETCH_TIMEOUT + 20)
        except OperationFailed as e:
            return FAILED, f"the image has neither wget nor python3 ({e.message})"
    if result.exit_code in (124, 143):  # timeout's own, or killed by it
        return BLOCKED, f"no answer within {FETCH_TIMEOUT} s"
    return classify(result.exit_code, result.stdout, result.stderr)


async def remove(client: LxdClient, name: str, hub_id: str) -> None:
    """Delete the probe ``name`` when its keys say it is a probe of this hub."""
    try:
        config = (await client.get_instance(name)).get("config") or {}
        if config.get(KEY_PROBE) != "true" or config.get(KEY_HUB, "") != hub_id:
            return
        await client.remove_instance(name, timeout=60)
    except NotFound:
        pass  # ephemeral: gone with its stop


async def probe(
    client: LxdClient,
    hub_url: str,
    *,
    hub_id: str,
    profiles: list[str],
    image: str,
) -> Outcome:
    """Fetch the hub's API at ``hub_url`` from a probe container, and from this host."""
    url = api_url(hub_url)
    chosen = TINY_IMAGE if await client.image_fingerprint(TINY_IMAGE) else image
    name = names.probe_name(uuid.uuid4().hex[:8])
    config = {KEY_MANAGED: MANAGED_BY, KEY_HUB: hub_id, KEY_PROBE: "true"}
    here = asyncio.ensure_future(from_host(url))
    try:
        try:
            await client.create_instance(
                name,
                source=image_source(chosen),
                profiles=profiles,
                config=config,
                start=True,
                ephemeral=True,
                timeout=120,
            )
        except LxdError as e:
            return Outcome(FAILED, f"could not start a probe from {chosen!r}: {e.message}")
        address = await _address(client, name, ADDRESS_TIMEOUT)
        if address is None:
            return Outcome(
                NO_ADDRESS,
                f"the probe got no IPv4 address within {ADDRESS_TIMEOUT:g} s",
                name,
                chosen,
                await here,
            )
        kind, detail = await _fetch(client, name, url)
        return Outcome(kind, detail, name, chosen, await here)
    except LxdError as e:
        return Outcome(FAILED, f"the probe {name} failed: {e.message}", name, chosen)
    finally:
        if not here.done():
            here.cancel()
        try:
            await remove(client, name, hub_id)
        except LxdError:
            pass  # reported by the leftovers check next time: it carries our keys
