"""An in-memory Incus daemon behind LxdClient's interface, for the in-process test tier.

``FakeLxd`` answers the client methods that the cache, the removals, the shared directories
and the bases call, with what Incus 6.0 answers: 404s (``NotFound``) for missing objects, a
running instance refuses to be deleted ("Instance is running"), a stop of a stopped one fails
with "The instance is already stopped", empty config values are dropped, a volume in use
cannot be deleted. Volumes have snapshots (listed with the pool's volumes as
``<volume>/<snapshot>``, as the daemons list them), a restore refused while a running instance
uses the volume, ``used_by`` (instances whose devices, their profiles' included, name it), a
usage, and a move between cluster members. State changes emit the lifecycle events Incus
emits, on an ``events()`` stream that the cache subscribes to as it does to ``/1.0/events``.

The composite methods (``shut_down``, ``remove_instance``, ``delete_stopped_instance``) are
LxdClient's own, running on the fake's primitives: a test of a caller also tests them.

A container's stop has two moments, as on the real daemon. Through the API
(``stop_instance``) the operation ends after LXD has torn the container down, then
``instance-stopped`` is sent. By itself (its server exited: :meth:`FakeLxd.power_off`) it reads
"Stopped" at once, is torn down a moment later (:meth:`FakeLxd.finish_teardown`), and only
then is ``instance-shutdown`` sent; a delete in between is refused.

``product="lxd"`` gives LXD's dialect (what the bases and the unshifted copies key on);
``members`` makes a cluster: instances and volumes live on a member (``target``), and one
that is not Online does not answer for them. Every call gives the loop a turn, as a request
over a socket does.

On demand: :meth:`FakeLxd.fail` makes a method raise (once, n times, or until
:meth:`FakeLxd.heal`), :meth:`FakeLxd.hang` holds its calls until a gate opens, ``down``
makes the whole daemon unreachable, :meth:`FakeLxd.drop_events` and
:meth:`FakeLxd.close_events` end the event streams. ``request_count`` and ``requests``
count the API calls (one per REST call; an operation and its wait count as one).

For the Daemon and the spawner it also has what a server's container goes through: its
address from the bridge's DHCP once it runs (``dhcp = False``: none), the files API (files,
directories, symbolic links, a file's tail; :meth:`FakeLxd.stick_file_helper` gives the next
instance of a name Incus 6.0.4's stuck file helper), the raw ``request()`` calls the Daemon
makes (an instance's PUT is an operation, as on Incus: its failure is seen only by waiting
for it), ``connect()`` as ``Remote.connect`` (Unreachable while ``down``), and
:func:`server_unit`, an exec handler that stops the server's unit as the image does.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxdspawner.lxd import (
    Conflict,
    Dialect,
    ExecResult,
    FileHelperFailed,
    LxdClient,
    LxdError,
    NotFound,
    OperationFailed,
    Unreachable,
)
from lxdspawner.lxd.client import CONNECTED
from lxdspawner.objects import UNIT_NAME
from lxdspawner.ownership import Owner

#: The fingerprint of the image the ``fake`` fixture holds, and a create's source of it.
IMAGE = "f00d" * 16
SOURCE = {"type": "image", "fingerprint": IMAGE}
#: Where a standalone daemon says its instances are.
STANDALONE = "none"
DEFAULT_POOL = "default"
DEFAULT_PROFILE = {
    "name": "default",
    "config": {},
    "devices": {
        "root": {"type": "disk", "path": "/", "pool": DEFAULT_POOL},
        "eth0": {"type": "nic", "name": "eth0", "network": "incusbr0"},
    },
}


async def eventually(predicate: Callable[[], bool], rounds: int = 1000) -> None:
    """Let the loop run until ``predicate()`` holds (no clock involved: background tasks whose
    sleeps return at once, see ``quick_sleeps``, get ``rounds`` turns)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    assert predicate(), f"still not so after {rounds} turns of the loop"


def owned(user: str, server: str = "", hub: str = "hub-1") -> dict[str, str]:
    """The config keys lxdspawner writes on a server's container."""
    return Owner(hub, user, server).keys()


@dataclass
class FakeInstance:
    name: str
    config: dict[str, str]
    devices: dict[str, dict[str, str]]
    profiles: list[str]
    location: str
    status: str = "Stopped"
    #: Stopped by itself, its stop hooks still running (no instance-shutdown yet).
    tearing_down: bool = False
    #: The image it came from (its fingerprint), or "" for a copy of an image-less instance.
    image: str = ""
    #: path -> (content, mode), what push_file wrote.
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    #: path -> (uid, gid) of a pushed file not root's.
    owners: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: path -> mode, and path -> target: what make_directory and make_symlink made.
    directories: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    #: Its IPv4 address from the bridge's DHCP ("" while it has none).
    ipv4: str = ""
    #: Its file helper fails every write (Incus 6.0.4's forkfile race that does not pass).
    file_helper_stuck: bool = False
    #: Its last start (the daemon's zero time until it first starts).
    last_used_at: str = "0001-01-01T00:00:00Z"

    def api(self, profiles: Mapping[str, dict] | None = None) -> dict:
        """As ``GET /1.0/instances/<name>``; with the daemon's ``profiles``, the expanded
        config and devices too (the profiles' in order, then the instance's own)."""
        expanded_config: dict[str, str] = {}
        expanded_devices: dict[str, dict[str, str]] = {}
        for name in self.profiles:
            profile = (profiles or {}).get(name) or {}
            expanded_config.update(profile.get("config") or {})
            expanded_devices.update(copy.deepcopy(profile.get("devices") or {}))
        expanded_config.update(self.config)
        expanded_devices.update(copy.deepcopy(self.devices))
        return {
            "name": self.name,
            "type": "container",
            "status": self.status,
            "status_code": {"Running": 103, "Stopped": 102, "Frozen": 110}.get(self.status, 0),
            "location": self.location,
            "config": dict(self.config),
            "devices": copy.deepcopy(self.devices),
            "expanded_config": expanded_config,
            "expanded_devices": expanded_devices,
            "profiles": list(self.profiles),
            "architecture": "x86_64",
            "ephemeral": False,
            "stateful": False,
            "description": "",
            "last_used_at": self.last_used_at,
        }


@dataclass
class FakeVolume:
    pool: str
    name: str
    location: str
    config: dict[str, str] = field(default_factory=dict)
    #: What was copied into it, for tests to look at (set by their exec handlers).
    content: set[str] = field(default_factory=set)
    #: Its snapshots in the order taken: name -> the content they hold.
    snapshots: dict[str, set[str]] = field(default_factory=dict)
    #: Bytes in use, as ``GET …/state`` tells (``usage.used``).
    used: int = 0

    def api(self, used_by: Iterable[str] = ()) -> dict:
        return {
            "name": self.name,
            "type": "custom",
            "config": dict(self.config),
            "location": self.location,
            "used_by": list(used_by),
            "content_type": "filesystem",
            "description": "",
        }


@dataclass
class FakeImage:
    fingerprint: str
    aliases: list[str] = field(default_factory=list)
    #: Directories the image holds (for exec handlers that look, such as a copy's `test -d`).
    directories: set[str] = field(default_factory=set)


ExecHandler = Callable[[FakeInstance, list[str]], "ExecResult | int | Awaitable[ExecResult | int]"]

_BROKEN = object()  # the stream failed (a daemon restart, a network error)
_CLOSED = object()  # the daemon closed the stream cleanly


@dataclass(eq=False)
class _Stream:
    types: frozenset[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _clean(config: Mapping[str, str] | None) -> dict[str, str]:
    """LXD drops config keys whose value is empty."""
    return {k: str(v) for k, v in (config or {}).items() if v != ""}


def server_unit(fake: FakeLxd, *, teardown: bool = False) -> ExecHandler:
    """An exec handler as a container of lxdspawner's image answers: stopping the server's
    unit ends the server, and the container powers off (the unit's SuccessAction=poweroff):
    "Stopped" at once, torn down at :meth:`FakeLxd.finish_teardown` (or at once with
    ``teardown``). Every other command exits 0."""

    def handle(instance: FakeInstance, command: list[str]) -> int:
        if command == ["systemctl", "stop", UNIT_NAME]:
            fake.power_off(instance.name, teardown=teardown)
        return 0

    return handle


class FakeLxd:
    """An Incus daemon in memory, with LxdClient's methods (see the module docstring)."""

    # LxdClient's own composite methods, on the fake's primitives.
    shut_down = LxdClient.shut_down
    remove_instance = LxdClient.remove_instance
    delete_stopped_instance = LxdClient.delete_stopped_instance
    image_fingerprint = LxdClient.image_fingerprint
    run = LxdClient.run
    wait = LxdClient.wait
    _finished = LxdClient._finished

    def __init__(
        self,
        *,
        product: str = "incus",
        members: Iterable[str] = (),
        project: str = "",
        timeout: float = 5.0,
    ) -> None:
        self.members: dict[str, str] = {m: "Online" for m in members}
        # Of the API extensions, only those the callers ask about and the fake follows.
        extensions = {"cluster_internal_custom_volume_copy"} if product == "incus" else set()
        self.dialect = Dialect(
            product=product, clustered=bool(self.members), api_extensions=frozenset(extensions)
        )
        self.project = project
        self.timeout = timeout
        self.endpoint = "unix:///fake/unix.socket"
        self.instances: dict[str, FakeInstance] = {}
        self.volumes: dict[tuple[str, str, str], FakeVolume] = {}
        #: The storage pool of the default profile's root disk, and its driver.
        self.pool = DEFAULT_POOL
        self.pool_driver = "btrfs"
        self.images: dict[str, FakeImage] = {}
        self.profiles: dict[str, dict] = {"default": copy.deepcopy(DEFAULT_PROFILE)}
        self.networks: dict[str, dict] = {
            "incusbr0": {
                "name": "incusbr0",
                "type": "bridge",
                "managed": True,
                "config": {"ipv4.address": "10.0.0.1/24", "ipv4.nat": "true"},
            }
        }
        #: The time an instance's start records (``last_used_at``).
        self.clock: Callable[[], str] = lambda: "2025-01-02T03:04:05.123456789Z"
        #: False: the bridge gives no address (no DHCP server answers).
        self.dhcp = True
        self._addresses = itertools.count(2)
        self._fingerprints: dict[str, tuple[str | None, float]] = {}
        self._operations: dict[str, asyncio.Task] = {}
        self._stuck_helpers: Counter = Counter()
        #: Runs an exec: (instance, command) -> ExecResult or exit code. Default: exit 0.
        self.exec_handler: ExecHandler = lambda instance, command: 0
        #: Every lifecycle event sent, in order: (action, instance name).
        self.lifecycle: list[tuple[str, str]] = []
        #: ``GET /1.0/resources`` per member (STANDALONE: a standalone daemon's); a member not
        #: here answers ``default_resources``: 24 GiB, 2 CPU threads, no GPU.
        self.resources_of: dict[str, dict] = {}
        self.default_resources: dict = {
            "cpu": {"architecture": "x86_64", "total": 2},
            "memory": {"total": 24 * 2**30, "used": 2 * 2**30},
            "gpu": {"cards": [], "total": 0},
        }
        #: True: nothing answers (a daemon that is down or cut off).
        self.down = False
        #: Seconds each member's clock (STANDALONE: the daemon's) is ahead of the test's.
        self.clock_offsets: dict[str, float] = {}
        #: The fingerprints of images unpacked per member (STANDALONE: standalone), as the
        #: pool's ``volumes/image`` lists them; a member not here has none.
        self.unpacked: dict[str, set[str]] = {}
        self.request_count = 0
        self.requests: Counter = Counter()
        self._failures: dict[str, list] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._streams: list[_Stream] = []
        self._changed = asyncio.Condition()

    # -- seeding and driving (the test's side) ----------------------------------------------

    @property
    def where(self) -> str:
        return "the fake daemon"

    def add_image(
        self, fingerprint: str, *aliases: str, directories: Iterable[str] = ()
    ) -> FakeImage:
        image = self.images[fingerprint] = FakeImage(fingerprint, list(aliases), set(directories))
        return image

    def add_instance(
        self,
        name: str,
        *,
        status: str = "Stopped",
        config: Mapping[str, str] | None = None,
        location: str | None = None,
        profiles: Iterable[str] = ("default",),
        image: str = "",
    ) -> FakeInstance:
        """An instance that was there before the test (no event)."""
        instance = self.instances[name] = FakeInstance(
            name=name,
            config=_clean(config),
            devices={},
            profiles=list(profiles),
            location=location or self._default_location(),
            status=status,
            image=image,
        )
        return instance

    def add_volume(
        self,
        pool: str,
        name: str,
        *,
        config: Mapping[str, str] | None = None,
        location: str | None = None,
    ) -> FakeVolume:
        key = (pool, name, location or self._default_location())
        volume = self.volumes[key] = FakeVolume(pool, name, key[2], _clean(config))
        return volume

    def volume(self, pool: str, name: str, location: str | None = None) -> FakeVolume | None:
        return self.volumes.get((pool, name, location or self._default_location()))

    def power_off(self, name: str, *, teardown: bool = True, event: bool = True) -> None:
        """The container's server exited and it powered off by itself: "Stopped" at once,
        torn down now (``teardown``) or at :meth:`finish_teardown`; then instance-shutdown
        (unless ``event`` is False: an event the stream lost)."""
        instance = self.instances[name]
        assert instance.status == "Running", f"{name} is {instance.status}"
        instance.status = "Stopped"
        instance.ipv4 = ""
        instance.tearing_down = True
        if teardown:
            self.finish_teardown(name, event=event)

    def finish_teardown(self, name: str, *, event: bool = True) -> None:
        instance = self.instances[name]
        assert instance.tearing_down, f"{name} is not being torn down"
        instance.tearing_down = False
        if event:
            self.emit("instance-shutdown", name)

    def emit(
        self,
        action: str,
        name: str,
        *,
        project: str | None = None,
        context: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> dict:
        """Send a lifecycle event to every stream that follows lifecycle events."""
        event = {
            "type": "lifecycle",
            "project": project or self.project or "default",
            "location": STANDALONE,
            "metadata": {
                "action": action,
                "source": source if source is not None else f"/1.0/instances/{name}",
                "context": dict(context or {}),
            },
        }
        self.lifecycle.append((action, name))
        for stream in self._streams:
            if "lifecycle" in stream.types:
                stream.queue.put_nowait(event)
        return event

    def drop_events(self) -> None:
        """Every event stream fails, as when the daemon restarts."""
        for stream in self._streams:
            stream.queue.put_nowait(_BROKEN)

    def close_events(self) -> None:
        """The daemon closes every event stream cleanly."""
        for stream in self._streams:
            stream.queue.put_nowait(_CLOSED)

    @property
    def open_streams(self) -> int:
        """Event streams connected now."""
        return len(self._streams)

    def fail(self, method: str, error: LxdError | None = None, *, times: int | None = 1) -> None:
        """The next ``times`` calls of ``method`` (every one with None, until :meth:`heal`)
        raise ``error`` (by default: the daemon did not answer)."""
        error = error or Unreachable(f"{method}: cannot reach the fake daemon (injected)")
        self._failures[method] = [error, times]

    def heal(self, method: str) -> None:
        self._failures.pop(method, None)

    def stick_file_helper(self, name: str, times: int = 1) -> None:
        """The next ``times`` instances created as ``name`` get a file helper that keeps
        failing: every file write into them raises FileHelperFailed, as LxdClient reports
        Incus 6.0.4's forkfile race once its retries are spent. A later instance of the
        name gets a working helper."""
        self._stuck_helpers[name] += times

    def hang(self, method: str) -> asyncio.Event:
        """Hold every call of ``method`` until the returned gate is set."""
        gate = self._gates[method] = asyncio.Event()
        return gate

    async def wait_calls(self, method: str, count: int = 1, timeout: float = 5.0) -> None:
        """Until ``method`` has been called ``count`` times in all."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.requests[method] >= count), timeout
            )

    async def wait_streams(self, count: int, timeout: float = 5.0) -> None:
        """Until ``count`` event streams are connected."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self._streams) == count), timeout
            )

    # -- the machinery every call goes through ------------------------------------------------

    async def _call(self, method: str) -> None:
        self.request_count += 1
        self.requests[method] += 1
        async with self._changed:
            self._changed.notify_all()
        # A request always gives the loop a turn, as one over a socket does: what the caller
        # runs meanwhile (other spawns, background tasks) runs in between here too.
        await asyncio.sleep(0)
        if self.down:
            raise Unreachable(f"cannot reach the LXD/Incus daemon at {self.where}: down")
        failure = self._failures.get(method)
        if failure is not None:
            error, times = failure
            if times is not None:
                failure[1] -= 1
                if failure[1] <= 0:
                    del self._failures[method]
            raise copy.copy(error)
        gate = self._gates.get(method)
        if gate is not None:
            await gate.wait()

    def _default_location(self) -> str:
        online = [m for m, status in self.members.items() if status == "Online"]
        return online[0] if online else (next(iter(self.members), STANDALONE))

    def _location(self, target: str | None) -> str:
        if target is None:
            return self._default_location()
        if not self.members:
            raise LxdError("Target only allowed when clustered", status=400)
        if target not in self.members:
            raise NotFound(f"Cluster member {target!r} not found", status=404)
        if self.members[target] != "Online":
            raise Unreachable(f"member {target} is {self.members[target]}: no answer")
        return target

    def _instance(self, name: str) -> FakeInstance:
        instance = self.instances.get(name)
        if instance is None:
            raise NotFound(f"GET /1.0/instances/{name}: Instance not found", status=404)
        if self.members.get(instance.location, "Online") != "Online":
            raise Unreachable(f"member {instance.location} of {name} does not answer")
        return instance

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> FakeLxd:
        """As ``Remote.connect``: ``GET /1.0``, then this is the connected client."""
        await self._call("connect")
        return self

    async def close(self) -> None:
        pass

    # -- server -----------------------------------------------------------------------------

    async def server_info(self) -> dict:
        """``GET /1.0``: whether the daemon answers (what of it the tests need)."""
        await self._call("server_info")
        return {"environment": {"server": "incus", "server_clustered": bool(self.members)}}

    async def cluster_members(self) -> list[dict]:
        await self._call("cluster_members")
        return [
            {"server_name": name, "status": status, "url": f"https://{name}:8443"}
            for name, status in self.members.items()
        ]

    async def server_time(self, target: str | None = None) -> float | None:
        """The ``Date`` of ``GET /1.0`` (to the second), on member ``target``."""
        import time

        await self._call("server_time")
        location = self._location(target) if target is not None else STANDALONE
        return float(int(time.time() + self.clock_offsets.get(location, 0.0)))

    async def image_volumes(self, pool: str, *, target: str | None = None) -> list[str]:
        await self._call("image_volumes")
        location = self._location(target) if target is not None else STANDALONE
        return sorted(self.unpacked.get(location, set()))

    async def resources(self, target: str | None = None) -> dict:
        await self._call("resources")
        location = self._location(target) if target is not None else STANDALONE
        return copy.deepcopy(self.resources_of.get(location, self.default_resources))

    async def network(self, name: str) -> dict:
        await self._call("network")
        if name not in self.networks:
            raise NotFound(f"Network not found: {name}", status=404)
        return copy.deepcopy(self.networks[name])

    async def profile(self, name: str) -> dict:
        await self._call("profile")
        if name not in self.profiles:
            raise NotFound(f"GET /1.0/profiles/{name}: Profile not found", status=404)
        return copy.deepcopy(self.profiles[name])

    async def image_alias(self, alias: str) -> dict:
        await self._call("image_alias")
        for image in self.images.values():
            if alias in image.aliases:
                return {"name": alias, "target": image.fingerprint, "type": "container"}
        raise NotFound(f"GET /1.0/images/aliases/{alias}: Image alias not found", status=404)

    def _image(self, source: Mapping[str, Any]) -> FakeImage:
        if "alias" in source:
            found = [i for i in self.images.values() if source["alias"] in i.aliases]
        else:
            wanted = source.get("fingerprint", "")
            found = [i for i in self.images.values() if wanted and i.fingerprint.startswith(wanted)]
        if len(found) != 1:
            raise NotFound("Image not found", status=404)
        return found[0]

    # -- instances --------------------------------------------------------------------------

    async def list_instances(self, *, filter: str | None = None, recursion: int = 1) -> list:
        await self._call("list_instances")
        if recursion:
            listed = [i.api(self.profiles) for i in self.instances.values()]
            for instance in listed:  # the daemon cannot tell how those of a lost member are
                if self.members.get(instance["location"], "Online") != "Online":
                    instance.update(status="Error", status_code=112)
            return listed
        return [f"/1.0/instances/{name}" for name in self.instances]

    async def get_instance(self, name: str) -> dict:
        await self._call("get_instance")
        return self._instance(name).api(self.profiles)

    async def instance_state(self, name: str) -> dict:
        await self._call("instance_state")
        instance = self._instance(name)
        network = None
        if instance.status == "Running":
            addresses = [{"family": "inet6", "address": "fe80::1", "scope": "link"}]
            if instance.ipv4:
                v4 = {"family": "inet", "address": instance.ipv4, "scope": "global"}
                addresses.insert(0, {**v4, "netmask": "24"})
            network = {"eth0": {"addresses": addresses, "state": "up", "type": "broadcast"}}
        return {"status": instance.status, "network": network}

    async def create_instance(
        self,
        name: str,
        *,
        source: Mapping[str, Any],
        profiles: Iterable[str] | None = None,
        config: Mapping[str, str] | None = None,
        devices: Mapping[str, Mapping[str, str]] | None = None,
        target: str | None = None,
        start: bool = False,
        instance_type: str = "container",
        timeout: float = 300.0,
        on_progress: Callable[[dict], Any] | None = None,
        ephemeral: bool = False,
    ) -> dict:
        await self._call("create_instance")
        if name in self.instances:
            raise Conflict(f"Instance {name!r} already exists", status=409)
        location = self._location(target)
        profiles = ["default"] if profiles is None else list(profiles)
        for profile in profiles:
            if profile not in self.profiles:
                raise LxdError(f"Requested profile {profile!r} doesn't exist", status=400)
        devices = {k: dict(v) for k, v in (devices or {}).items()}
        self._check_volumes(devices, location)
        if source.get("type") == "copy":
            origin = self._instance(source["source"])
            image = origin.image
            files = dict(origin.files)
            config = {**origin.config, **(config or {})}
        else:
            image = self._image(source).fingerprint
            files = {}
        self.instances[name] = FakeInstance(
            name=name,
            config=_clean(config),
            devices=devices,
            profiles=profiles,
            location=location,
            image=image,
            files=files,
            file_helper_stuck=self._stuck_helpers[name] > 0,
        )
        if self._stuck_helpers[name] > 0:
            self._stuck_helpers[name] -= 1
        self.emit("instance-created", name)
        if start:
            await self.start_instance(name, timeout=timeout)
        return {"id": f"op-create-{name}", "status": "Success", "status_code": 200}

    async def start_instance(self, name: str, *, timeout: float = 60.0) -> dict:
        await self._call("start_instance")
        instance = self._instance(name)
        if instance.status == "Running":
            raise LxdError("The instance is already running", status=400)
        instance.status = "Running"
        instance.tearing_down = False
        instance.last_used_at = self.clock()
        if self.dhcp:
            instance.ipv4 = f"10.0.0.{next(self._addresses)}"
        self.emit("instance-started", name)
        return {"id": f"op-start-{name}", "status": "Success", "status_code": 200}

    async def stop_instance(self, name: str, *, timeout: float = 30.0, force: bool = False) -> dict:
        """A stop through the API: its operation ends once the container is torn down."""
        await self._call("stop_instance")
        instance = self._instance(name)
        if instance.status != "Running":
            raise LxdError("The instance is already stopped", status=400)
        instance.status = "Stopped"
        instance.ipv4 = ""
        instance.tearing_down = False
        self.emit("instance-stopped", name)
        return {"id": f"op-stop-{name}", "status": "Success", "status_code": 200}

    async def delete_instance(self, name: str, *, timeout: float = 120.0) -> dict:
        await self._call("delete_instance")
        instance = self._instance(name)
        if instance.status != "Stopped" or instance.tearing_down:
            raise LxdError("Instance is running", status=400)
        del self.instances[name]
        self.emit("instance-deleted", name)
        return {"id": f"op-delete-{name}", "status": "Success", "status_code": 200}

    async def push_file(
        self,
        name: str,
        path: str,
        content: bytes | str,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
    ) -> None:
        await self._call("push_file")
        data = content.encode() if isinstance(content, str) else content
        instance = self._writable(name)
        instance.files[path] = (data, mode)
        if uid or gid:
            instance.owners[path] = (uid, gid)

    async def make_directory(
        self, name: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        await self._call("make_directory")
        self._writable(name).directories[path] = mode

    async def make_symlink(self, name: str, path: str, target: str) -> None:
        await self._call("make_symlink")
        self._writable(name).links[path] = target

    async def read_file_tail(self, name: str, path: str, max_bytes: int = 65536) -> bytes:
        """As LxdClient's: the end of a file; a symbolic link is not followed (the answer
        is where it points)."""
        await self._call("read_file_tail")
        instance = self._instance(name)
        if path in instance.links:
            return instance.links[path].encode()[-max_bytes:]
        if path not in instance.files:
            raise NotFound(f"read {path} in {name}: not found", status=404)
        return instance.files[path][0][-max_bytes:]

    def _writable(self, name: str) -> FakeInstance:
        instance = self._instance(name)
        if instance.file_helper_stuck:
            raise FileHelperFailed(
                "dial unix /proc/self/fd/54/forkfile.sock: connect: no such file or directory",
                status=500,
            )
        return instance

    # -- raw requests: the few the Daemon makes itself ---------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``GET /1.0/images/<fingerprint>``, ``PUT /1.0/instances/<name>`` (an operation),
        ``PATCH /1.0/instances/<name>`` (at once, as on Incus), ``DELETE
        /1.0/instances/<name>/files?path=``, and an operation's wait; counted (and
        failed on demand) under the route, e.g. ``"PUT /1.0/instances/{name}"``."""
        parts = path.removeprefix("/1.0/").split("/")
        if method == "GET" and parts[0] == "storage-pools" and len(parts) == 2:
            await self._call("GET /1.0/storage-pools/{name}")
            if parts[1] not in {self.pool, *(p for p, _, _ in self.volumes)}:
                raise NotFound(f"Storage pool not found: {parts[1]}", status=404)
            return {"name": parts[1], "driver": self.pool_driver}
        if method == "GET" and parts == ["instances"]:  # with all-projects: one project here
            return await self.list_instances(recursion=int((params or {}).get("recursion", 0)))
        if method == "GET" and parts[0] == "images" and len(parts) == 2:
            await self._call("GET /1.0/images/{fingerprint}")
            return {"fingerprint": self._image({"fingerprint": parts[1]}).fingerprint}
        if method == "PUT" and parts[0] == "instances" and len(parts) == 2:
            await self._call("PUT /1.0/instances/{name}")
            self._instance(parts[1])
            return self._operation(self._update(parts[1], json_body or {}))
        if method == "PATCH" and parts[0] == "instances" and len(parts) == 2:
            # Incus applies it at once (a running container's user keys and disk devices
            # live) and answers without an operation; an empty value removes a key.
            await self._call("PATCH /1.0/instances/{name}")
            instance = self._instance(parts[1])
            devices = {**instance.devices, **(json_body or {}).get("devices", {})}
            self._check_volumes(devices, instance.location)
            instance.config = _clean({**instance.config, **(json_body or {}).get("config", {})})
            instance.devices = devices
            self.emit("instance-updated", parts[1])
            return {}
        if method == "DELETE" and parts[0] == "instances" and parts[2:] == ["files"]:
            await self._call("DELETE /1.0/instances/{name}/files")
            instance = self._writable(parts[1])
            target = (params or {}).get("path", "")
            for kind in (instance.files, instance.links, instance.directories):
                if target in kind:
                    del kind[target]
                    return {}
            raise NotFound(f"DELETE {path}: not found", status=404)
        if method == "GET" and parts[0] == "operations" and len(parts) in (2, 3):
            await self._call("GET /1.0/operations/{id}")
            task = self._operations.get(parts[1])
            if task is None:
                raise NotFound(f"GET {path}: Operation not found", status=404)
            if parts[2:] == ["wait"]:
                await asyncio.wait({task})
                if task.exception() is not None:
                    # Incus: "200 OK", then the operation's error instead of the operation.
                    raise LxdError(str(task.exception()), status=200)
            return self._operation_state(parts[1], task)
        raise NotImplementedError(f"FakeLxd.request({method!r}, {path!r})")

    def _operation(self, work: Awaitable[None]) -> dict:
        op_id = f"op-{len(self._operations) + 1}"
        task = self._operations[op_id] = asyncio.ensure_future(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waited for or not
        return {"id": op_id, "status": "Running", "status_code": 103}

    @staticmethod
    def _operation_state(op_id: str, task: asyncio.Task) -> dict:
        if not task.done():
            return {"id": op_id, "status": "Running", "status_code": 103}
        error = task.exception()
        if error is None:
            return {"id": op_id, "status": "Success", "status_code": 200, "err": ""}
        return {"id": op_id, "status": "Failure", "status_code": 400, "err": str(error)}

    async def _update(self, name: str, body: Mapping[str, Any]) -> None:
        """An instance's PUT, run as its operation: the profiles and the volumes its devices
        name must exist (it is checked here, in the operation, as Incus does)."""
        await asyncio.sleep(0)
        instance = self._instance(name)
        profiles = list(body.get("profiles") or [])
        for profile in profiles:
            if profile not in self.profiles:
                raise LxdError(f"Requested profile {profile!r} doesn't exist")
        devices = {k: dict(v) for k, v in (body.get("devices") or {}).items()}
        self._check_volumes(devices, instance.location)
        instance.config = _clean(body.get("config"))
        instance.devices = devices
        instance.profiles = profiles
        self.emit("instance-updated", name)

    def _check_volumes(self, devices: Mapping[str, Mapping[str, str]], location: str) -> None:
        for device in devices.values():
            if device.get("type") == "disk" and device.get("pool") and device.get("source"):
                if (device["pool"], device["source"], location) not in self.volumes:
                    raise NotFound(f"Storage volume {device['source']!r} not found", status=404)

    async def exec(
        self,
        name: str,
        command: list[str],
        *,
        environment: Mapping[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
        cwd: str | None = None,
        timeout: float = 300.0,
        record_output: bool = True,
    ) -> ExecResult:
        await self._call("exec")
        instance = self._instance(name)
        if instance.status != "Running":
            raise LxdError("Instance is not running", status=400)
        result = self.exec_handler(instance, list(command))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, int):
            result = ExecResult(result, "", "")
        return result

    # -- storage volumes --------------------------------------------------------------------

    def _volume(self, pool: str, name: str, target: str | None) -> FakeVolume:
        if target is None and self.members:
            # A clustered daemon finds a volume on whichever member holds it, forwarding the
            # request there. Incus 6.0 answers 500 "Server isn't ready yet" while that member
            # is down (stopped or killed), and 500 when several members hold one of the name.
            held = [v for (p, n, _), v in self.volumes.items() if (p, n) == (pool, name)]
            if len(held) > 1:
                raise LxdError(
                    f'More than one cluster member has a volume named "{name}". Please target '
                    "a specific member",
                    status=500,
                )
            if held:
                if self.members.get(held[0].location) != "Online":
                    raise LxdError("Server isn't ready yet", status=500)
                return held[0]
        volume = self.volumes.get((pool, name, self._location(target)))
        if volume is None:
            raise NotFound(f"Storage volume not found: {name}", status=404)
        return volume

    def _users(self, volume: FakeVolume) -> list[FakeInstance]:
        """The instances on the volume's member whose devices (their profiles' too) name it:
        its ``used_by``."""
        return [
            i
            for i in self.instances.values()
            if i.location == volume.location
            and any(
                d.get("type") == "disk"
                and d.get("pool") == volume.pool
                and d.get("source") == volume.name
                for d in i.api(self.profiles)["expanded_devices"].values()
            )
        ]

    def _volume_api(self, volume: FakeVolume) -> dict:
        return volume.api(f"/1.0/instances/{i.name}" for i in self._users(volume))

    async def get_volume(self, pool: str, name: str, *, target: str | None = None) -> dict:
        await self._call("get_volume")
        return self._volume_api(self._volume(pool, name, target))

    async def volume_state(self, pool: str, name: str, *, target: str | None = None) -> dict:
        await self._call("volume_state")
        volume = self._volume(pool, name, target)
        usage = {"total": int(volume.config.get("size", "-1") or -1)}
        if volume.used:  # Incus leaves a 0 out
            usage["used"] = volume.used
        return {"usage": usage}

    async def volume_snapshots(
        self, pool: str, name: str, *, target: str | None = None
    ) -> list[dict]:
        await self._call("volume_snapshots")
        volume = self._volume(pool, name, target)
        return [
            {
                "name": f"{name}/{snap}",  # the full name, as Incus 6 and LXD 5.0 give it
                "config": dict(volume.config),
                "content_type": "",
                "description": "",
                "expires_at": None,
            }
            for snap in volume.snapshots
        ]

    async def create_volume_snapshot(
        self, pool: str, name: str, snapshot: str, *, target: str | None = None
    ) -> None:
        await self._call("create_volume_snapshot")
        volume = self._volume(pool, name, target)
        if snapshot in volume.snapshots:
            raise OperationFailed("Snapshot by that name already exists")
        volume.snapshots[snapshot] = set(volume.content)

    async def restore_volume(
        self, pool: str, name: str, snapshot: str, *, target: str | None = None
    ) -> None:
        """As Incus: refused while a running instance uses the volume."""
        await self._call("restore_volume")
        volume = self._volume(pool, name, target)
        if snapshot not in volume.snapshots:
            raise NotFound("Storage volume snapshot not found", status=404)
        if any(i.status == "Running" for i in self._users(volume)):
            raise LxdError("Cannot restore custom volume used by running instances", status=400)
        volume.content = set(volume.snapshots[snapshot])

    async def copy_volume_to_member(
        self,
        pool: str,
        name: str,
        *,
        source_member: str,
        target: str,
        config: Mapping[str, str],
        description: str = "",
        content_type: str = "filesystem",
        timeout: float = 3600.0,
    ) -> None:
        """Incus' cluster-internal copy: pulled from ``source_member`` (which must answer),
        created on ``target`` with the config given, its content copied."""
        await self._call("copy_volume_to_member")
        source = self.volumes.get((pool, name, self._location(source_member)))
        if source is None:
            raise NotFound(f"Storage volume not found: {name}", status=404)
        key = (pool, name, self._location(target))
        if key in self.volumes:
            raise Conflict("Volume by that name already exists", status=409)
        self.volumes[key] = FakeVolume(
            pool,
            name,
            target,
            _clean(config),
            set(source.content),
            {k: set(v) for k, v in source.snapshots.items()},
        )

    async def create_volume(
        self,
        pool: str,
        name: str,
        *,
        config: Mapping[str, str] | None = None,
        target: str | None = None,
    ) -> None:
        await self._call("create_volume")
        key = (pool, name, self._location(target))
        if key in self.volumes:
            raise Conflict("Volume by that name already exists", status=409)
        self.volumes[key] = FakeVolume(pool, name, key[2], _clean(config))

    async def update_volume_config(
        self, pool: str, name: str, config: Mapping[str, str], *, target: str | None = None
    ) -> None:
        await self._call("update_volume_config")
        volume = self._volume(pool, name, target)
        volume.config = _clean({**volume.config, **config})

    async def storage_pools(self) -> list[str]:
        return sorted({pool for pool, _, _ in self.volumes} | {self.pool})

    async def list_volumes(self, pool: str) -> list[dict]:
        await self._call("list_volumes")
        listed = []
        for (p, _, _), v in self.volumes.items():
            if p == pool:
                listed.append(self._volume_api(v))
                # As the daemons list them: each snapshot too, a custom volume named
                # "<volume>/<snapshot>" holding the volume's config.
                listed += [{**v.api(), "name": f"{v.name}/{snap}"} for snap in v.snapshots]
        return listed

    async def delete_volume(self, pool: str, name: str, *, target: str | None = None) -> None:
        await self._call("delete_volume")
        volume = self._volume(pool, name, target)
        if self._users(volume):
            raise LxdError("The storage volume is still in use", status=400)
        del self.volumes[(volume.pool, volume.name, volume.location)]

    # -- events -----------------------------------------------------------------------------

    async def events(
        self,
        types: Iterable[str] = ("lifecycle", "operation"),
        *,
        reconnect: bool = True,
        retry_delay: float = 1.0,
    ) -> AsyncIterator[dict]:
        """As LxdClient.events: a synthetic CONNECTED event at each (re)connection, then the
        daemon's events; without ``reconnect``, a failed stream raises Unreachable and one the
        daemon closed ends."""
        first = True
        while True:
            await self._call("events")
            stream = _Stream(frozenset(types))
            self._streams.append(stream)
            await self._notify()
            try:
                yield {"type": CONNECTED, "reconnected": not first}
                first = False
                while True:
                    item = await stream.queue.get()
                    if item is _BROKEN:
                        if not reconnect:
                            raise Unreachable(f"events stream from {self.where} failed: reset")
                        break
                    if item is _CLOSED:
                        if not reconnect:
                            return
                        break
                    yield item
            finally:
                self._streams.remove(stream)
                await self._notify()
            await asyncio.sleep(0)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
