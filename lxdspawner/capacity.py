"""What a member can still take: guarantees, GPUs and ``/1.0/resources``. Pure, no I/O.

Placement by instance counts (placement.py) spreads servers but knows nothing of their size.
With ``mem_guarantee``, ``cpu_guarantee`` or ``gpu`` set, a member is usable only if what our
servers on it are guaranteed (recorded on each instance in ``user.jupyterhub.*`` keys, so the
hub's event-fed cache can sum them after a restart without asking anybody) plus the spawns in
flight plus this one fit its memory and CPUs as ``/1.0/resources`` reports them, times the
``overcommit`` ratio, and if it shows enough free GPUs that match.

GPUs are exclusive here, though the daemon would pass one card into many containers: a
server asking for a GPU gets one nobody else of this hub holds. Each of the N cards becomes
its own ``gpu`` device pinned by ``pci`` to the card placement chose, and the instance records
the cards it holds (``user.jupyterhub.gpus``, PCI addresses) so the next placement counts them.
MIG devices are not in ``/1.0/resources``: a MIG request names its devices (``mig.uuid``, or a
list to choose from), needs a matching NVIDIA card on the member, and each device is held by
one server at a time.

Only containers are made: ``mdev`` and ``sriov`` GPUs are for virtual machines and refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

KEY_MEM = "user.jupyterhub.mem-guarantee"
KEY_CPU = "user.jupyterhub.cpu-guarantee"
#: The GPUs an instance holds: PCI addresses (``0000:01:00.0``) or ``mig:<uuid>``, by commas.
KEY_GPUS = "user.jupyterhub.gpus"

#: Names accepted for ``vendor``, and their PCI vendor ids.
VENDORS = {"nvidia": "10de", "amd": "1002", "ati": "1002", "intel": "8086"}
NVIDIA = VENDORS["nvidia"]

#: The keys of a ``gpu`` dict. uid, gid and mode are passed to each device as they are.
GPU_KEYS = frozenset(
    {
        "count",
        "vendor",
        "vendorid",
        "productid",
        "pci",
        "id",
        "gputype",
        "mig",
        "mig.uuid",
        "mig.gi",
        "mig.ci",
        "uid",
        "gid",
        "mode",
    }
)
_HEX4 = re.compile(r"[0-9a-f]{4}")
_PCI = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_MIG_UUID = re.compile(r"(?:MIG-)?[0-9A-Za-z./-]{8,80}")  # no commas: KEY_GPUS joins by them


# -- what a member has ----------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One card of ``/1.0/resources`` (``gpu.cards[]``)."""

    pci: str
    vendor_id: str = ""
    product_id: str = ""
    drm_id: str = ""
    label: str = ""


@dataclass(frozen=True)
class Resources:
    """A member's memory (bytes), CPU threads and GPUs, from ``GET /1.0/resources``."""

    memory: int
    cpus: int
    gpus: tuple[Gpu, ...] = ()


def resources_from_api(answer: Mapping) -> Resources:
    """The parts of a ``/1.0/resources`` answer placement uses (LXD 5.0 and Incus alike)."""
    memory = int((answer.get("memory") or {}).get("total") or 0)
    cpus = int((answer.get("cpu") or {}).get("total") or 0)
    gpus = []
    for card in (answer.get("gpu") or {}).get("cards") or ():
        pci = normal_pci(card.get("pci_address") or "")
        if not pci:  # a USB card (usb_address): the gpu device cannot pin it by pci
            continue
        drm = card.get("drm") or {}
        nvidia = card.get("nvidia") or {}
        label = nvidia.get("model") or card.get("product") or card.get("driver") or "GPU"
        gpus.append(
            Gpu(
                pci=pci,
                vendor_id=(card.get("vendor_id") or "").lower(),
                product_id=(card.get("product_id") or "").lower(),
                drm_id="" if drm.get("id") is None else str(drm["id"]),
                label=label,
            )
        )
    return Resources(memory=memory, cpus=cpus, gpus=tuple(gpus))


def normal_pci(address: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` → ``0000:01:00.0``; "" if it is not a PCI address."""
    m = _PCI.fullmatch(address.strip().lower())
    if not m:
        return ""
    domain, bus, slot, function = m.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


# -- what a server asks for -----------------------------------------------------------------


@dataclass(frozen=True)
class GpuRequest:
    """The ``gpu`` setting, checked. ``count`` cards (or MIG devices) matching the filters."""

    count: int = 1
    vendor_id: str = ""
    product_id: str = ""
    pci: str = ""
    drm_id: str = ""
    gputype: str = "physical"
    #: MIG: the devices to choose from (uuids), or one ``gi/ci`` pair.
    mig: tuple[str, ...] = ()
    mig_pair: tuple[int, int] | None = None
    #: uid, gid, mode for each device (container only).
    extra: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        what = "MIG device" if self.gputype == "mig" else "GPU"
        parts = [f"{self.count} {what}{'s' if self.count != 1 else ''}"]
        for label, value in (
            ("vendor", self.vendor_id),
            ("product", self.product_id),
            ("pci", self.pci),
            ("id", self.drm_id),
        ):
            if value:
                parts.append(f"{label} {value}")
        return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")

    def matches(self, gpu: Gpu) -> bool:
        if self.gputype == "mig" and gpu.vendor_id != NVIDIA:
            return False
        return (
            (not self.vendor_id or gpu.vendor_id == self.vendor_id)
            and (not self.product_id or gpu.product_id == self.product_id)
            and (not self.pci or gpu.pci == self.pci)
            and (not self.drm_id or gpu.drm_id == self.drm_id)
        )

    @property
    def tokens(self) -> tuple[str, ...]:
        """What a MIG request may hold (``mig:<uuid>``); empty for physical GPUs."""
        if self.mig_pair is not None:
            gi, ci = self.mig_pair
            return (f"mig:{self.pci or self.drm_id or '*'}/{gi}/{ci}",)
        return tuple(f"mig:{u}" for u in self.mig)


def gpu_request(value: object) -> GpuRequest | None:
    """The ``gpu`` setting as a request (None: no GPU); ValueError naming ``gpu`` if wrong."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError(f"gpu = {value!r}: give a number of GPUs or a dict, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"gpu = {value!r}: the number of GPUs cannot be negative")
        return GpuRequest(count=value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"gpu = {value!r}: must be a number of GPUs or a dict such as "
            '{"vendor": "nvidia", "count": 1}'
        )

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"gpu[{key!r}] = {value[key]!r}: {why}")

    gputype = value.get("gputype", "physical")
    if gputype in ("mdev", "sriov"):
        raise bad("gputype", "that GPU type is for virtual machines; lxdspawner makes containers")
    if gputype not in ("physical", "mig"):
        raise bad("gputype", 'must be "physical" or "mig"')
    unknown = sorted(str(k) for k in value if k not in GPU_KEYS)
    if unknown:
        raise ValueError(
            f"gpu = {dict(value)!r}: unknown key {', '.join(unknown)} (known: "
            f"{', '.join(sorted(GPU_KEYS))})"
        )
    vendor = ""
    for key in ("vendor", "vendorid"):
        if key in value:
            raw = str(value[key]).strip().lower()
            raw = VENDORS.get(raw, raw)
            if not _HEX4.fullmatch(raw):
                raise bad(key, f"a vendor name ({', '.join(sorted(VENDORS))}) or a PCI id (10de)")
            if vendor and raw != vendor:
                raise ValueError(f"gpu = {dict(value)!r}: vendor and vendorid disagree")
            vendor = raw
    product = ""
    if "productid" in value:
        product = str(value["productid"]).strip().lower()
        if not _HEX4.fullmatch(product):
            raise bad("productid", "must be a PCI product id of 4 hex digits, such as 20b0")
    pci = ""
    if "pci" in value:
        pci = normal_pci(str(value["pci"]))
        if not pci:
            raise bad("pci", "must be a PCI address such as 0000:01:00.0")
    drm_id = ""
    if "id" in value:
        drm_id = str(value["id"])
        if not drm_id.isdigit():
            raise bad("id", "must be the DRM card id (a number, as in /dev/dri/card0)")
    extra = []
    for key in ("uid", "gid", "mode"):
        if key in value:
            text = str(value[key])
            if not text.isdigit():
                raise bad(key, "must be a number")
            extra.append((key, text))

    mig: tuple[str, ...] = ()
    pair: tuple[int, int] | None = None
    if gputype == "mig":
        if vendor and vendor != NVIDIA:
            raise ValueError(f"gpu = {dict(value)!r}: MIG devices are NVIDIA's (vendor 10de)")
        listed = value.get("mig", ())
        if isinstance(listed, str):
            listed = [listed]
        if "mig.uuid" in value:
            listed = [value["mig.uuid"], *listed]
        if not isinstance(listed, Sequence) or not all(isinstance(u, str) for u in listed):
            raise bad("mig", "must be a MIG device uuid or a list of them")
        for uuid in listed:
            if not _MIG_UUID.fullmatch(uuid):
                raise ValueError(f"gpu: {uuid!r} is not a MIG device uuid (MIG-...)")
        mig = tuple(dict.fromkeys(u if u.startswith("MIG-") else f"MIG-{u}" for u in listed))
        if "mig.gi" in value or "mig.ci" in value:
            if mig or "mig.gi" not in value or "mig.ci" not in value:
                raise ValueError(
                    f"gpu = {dict(value)!r}: give mig.uuid (a list: mig), or both mig.gi and mig.ci"
                )
            try:
                pair = (int(value["mig.gi"]), int(value["mig.ci"]))
            except (TypeError, ValueError):
                raise ValueError(f"gpu = {dict(value)!r}: mig.gi and mig.ci are numbers") from None
        elif not mig:
            raise ValueError(
                f"gpu = {dict(value)!r}: a MIG GPU needs mig.uuid (or a list in mig, or "
                "mig.gi and mig.ci): MIG devices are made beforehand with nvidia-smi"
            )
    elif any(k in value for k in ("mig", "mig.uuid", "mig.gi", "mig.ci")):
        raise ValueError(f'gpu = {dict(value)!r}: the mig keys need "gputype": "mig"')

    count = value.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise bad("count", "must be a whole number of at least 1")
    if pci and gputype == "physical" and count != 1:
        raise bad("count", "pci names one card: count must be 1")
    if pair is not None and count != 1:
        raise bad("count", "mig.gi and mig.ci name one device: count must be 1")
    if mig and count > len(mig):
        raise bad("count", f"only {len(mig)} MIG device(s) are listed")
    return GpuRequest(
        count=count,
        vendor_id=vendor,
        product_id=product,
        pci=pci,
        drm_id=drm_id,
        gputype=gputype,
        mig=mig,
        mig_pair=pair,
        extra=tuple(extra),
    )


@dataclass(frozen=True)
class Need:
    """What one new server needs of a member: its guarantees (bytes, CPUs) and GPUs, and the
    ratio by which the members' memory and CPUs may be promised over."""

    mem: int = 0
    cpu: float = 0.0
    gpu: GpuRequest | None = None
    overcommit: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.mem or self.cpu or self.gpu)


@dataclass(frozen=True)
class Usage:
    """What our servers on a member (and the spawns in flight to it) are guaranteed, and the
    GPUs they hold."""

    mem: int = 0
    cpu: float = 0.0
    gpus: frozenset[str] = field(default_factory=frozenset)

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.mem + other.mem, self.cpu + other.cpu, self.gpus | other.gpus)


NOTHING = Usage()


def instance_keys(mem: int, cpu: float, gpus: Iterable[str]) -> dict[str, str]:
    """The config keys recording a server's guarantees and GPUs on its instance."""
    keys = {}
    if mem:
        keys[KEY_MEM] = str(int(mem))
    if cpu:
        keys[KEY_CPU] = f"{cpu:g}"
    gpus = list(gpus)
    if gpus:
        keys[KEY_GPUS] = ",".join(gpus)
    return keys


def usage_of(config: Mapping[str, str]) -> Usage:
    """What an instance's keys say it holds (nothing for keys that do not parse: a key
    someone edited by hand counts for nothing rather than failing every placement)."""
    try:
        mem = max(0, int(config.get(KEY_MEM) or 0))
    except ValueError:
        mem = 0
    try:
        cpu = max(0.0, float(config.get(KEY_CPU) or 0))
        cpu = cpu if math.isfinite(cpu) else 0.0
    except ValueError:
        cpu = 0.0
    gpus = frozenset(g for g in (config.get(KEY_GPUS) or "").split(",") if g)
    return Usage(mem, cpu, gpus)


# -- the decision ---------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def cpus(n: float) -> str:
    return f"{n:.3g} CPU{'s' if n != 1 else ''}"


def choose_gpus(resources: Resources, usage: Usage, request: GpuRequest) -> tuple[str, ...] | str:
    """The tokens of the GPUs (PCI addresses, or ``mig:<uuid>``) this server gets on a
    member, in a stable order; or why there are not enough, with the figures."""
    cards = [g for g in resources.gpus if request.matches(g)]
    if request.gputype == "mig":
        if not cards:
            return f"no NVIDIA card matching {request.describe()} (of {len(resources.gpus)} GPUs)"
        free = [t for t in request.tokens if t not in usage.gpus]
        if len(free) < request.count:
            held = len(request.tokens) - len(free)
            return (
                f"{request.describe()} wanted: {held} of the {len(request.tokens)} listed in "
                "use by our servers"
            )
        return tuple(free[: request.count])
    free = [g.pci for g in cards if g.pci not in usage.gpus]
    if len(free) < request.count:
        return (
            f"{request.describe()} wanted: {len(cards)} matching here, "
            f"{len(cards) - len(free)} in use by our servers"
        )
    return tuple(sorted(free)[: request.count])


def why_full(resources: Resources | None, usage: Usage, need: Need, error: str = "") -> str | None:
    """Why a member cannot take a server needing ``need`` on top of ``usage``, naming the
    figures (guaranteed of available); None if it fits."""
    if not need:
        return None
    if resources is None:
        return f"its resources cannot be read ({error or 'no answer'})"
    if need.mem:
        room = resources.memory * need.overcommit
        if usage.mem + need.mem > room:
            return (
                f"memory guaranteed {gib(usage.mem)} of {gib(room)}"
                f"{_ratio(need.overcommit)}, this server needs {gib(need.mem)}"
            )
    if need.cpu:
        room = resources.cpus * need.overcommit
        if usage.cpu + need.cpu > room + 1e-9:
            return (
                f"CPUs guaranteed {cpus(usage.cpu)} of {cpus(room)}"
                f"{_ratio(need.overcommit)}, this server needs {cpus(need.cpu)}"
            )
    if need.gpu:
        chosen = choose_gpus(resources, usage, need.gpu)
        if isinstance(chosen, str):
            return chosen
    return None


def _ratio(overcommit: float) -> str:
    return f" (overcommit {overcommit:g})" if overcommit != 1.0 else ""


# -- the devices ----------------------------------------------------------------------------


def gpu_devices(request: GpuRequest | None, chosen: Sequence[str]) -> dict[str, dict[str, str]]:
    """One ``gpu`` device per chosen card (pinned by ``pci``) or MIG device, named gpu0, ..."""
    if request is None:
        return {}
    devices = {}
    for i, token in enumerate(chosen):
        device = {"type": "gpu", "gputype": request.gputype}
        if request.gputype == "mig":
            if request.mig_pair is not None:
                device["mig.gi"], device["mig.ci"] = (str(n) for n in request.mig_pair)
            else:
                device["mig.uuid"] = token.removeprefix("mig:")
            for key, value in (
                ("vendorid", request.vendor_id),
                ("productid", request.product_id),
                ("pci", request.pci),
                ("id", request.drm_id),
            ):
                if value:
                    device[key] = value
        else:
            device["pci"] = token
        device.update(request.extra)
        devices[f"gpu{i}"] = device
    return devices


def usage_summary(resources: Resources | None, usage: Usage) -> str:
    """Guaranteed / available, for a log line."""
    if resources is None:
        return "resources unknown"
    return (
        f"memory {gib(usage.mem)} of {gib(resources.memory)}, CPUs {cpus(usage.cpu)} of "
        f"{cpus(resources.cpus)}, GPUs {len(usage.gpus)} held of {len(resources.gpus)}"
    )


__all__ = [
    "KEY_CPU",
    "KEY_GPUS",
    "KEY_MEM",
    "NOTHING",
    "Gpu",
    "GpuRequest",
    "Need",
    "Resources",
    "Usage",
    "choose_gpus",
    "gpu_devices",
    "gpu_request",
    "instance_keys",
    "normal_pci",
    "resources_from_api",
    "usage_of",
    "why_full",
]
