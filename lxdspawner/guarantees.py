"""LxdSpawner's GPU and capacity settings (see capacity.py and README "GPUs and guarantees"):
a mixin, so that ``c.LxdSpawner.gpu`` and ``c.LxdSpawner.overcommit`` are LxdSpawner's own.

``mem_guarantee`` and ``cpu_guarantee`` are JupyterHub's own Spawner settings; here they make
placement capacity-aware. ``mem_limit`` and ``cpu_limit`` stay what they were: the limits the
daemon enforces on each container.
"""

from __future__ import annotations

import dataclasses
import math

from traitlets import Any as AnyTrait
from traitlets import Float, TraitError, validate
from traitlets.config import Configurable

from . import capacity, objects, placement
from .members import Reservation


class CapacitySettings(Configurable):
    """The settings, and what a spawn needs of a member (:meth:`_need`)."""

    gpu = AnyTrait(
        0,
        config=True,
        help="""GPUs for each server. 0 (default): none. A number N: N whole GPUs, any
        vendor, each its own `gpu` device pinned by `pci` to a card nobody else of this hub
        holds. A dict picks which: `{"vendor": "nvidia", "count": 2}`, also `vendorid`,
        `productid`, `pci` (one card), `id` (DRM card id), `uid`/`gid`/`mode` (passed to the
        device), and `"gputype": "mig"` with `mig.uuid` (one MIG device), `mig` (a list of
        MIG device uuids to choose from) or `mig.gi` + `mig.ci`. Placement considers only
        members whose /1.0/resources shows enough free matching GPUs; none → the spawn fails
        saying how many match and are in use on each member. "mdev" and "sriov" GPUs are
        for virtual machines: refused. Set it per profile (spawner_override) or in a
        pre_spawn_hook, e.g. `c.LxdSpawner.gpu = {"vendor": "nvidia", "productid": "20b5"}`.
        """,
    )
    overcommit = Float(
        1.0,
        config=True,
        help="""How far placement may promise a member's memory and CPUs (one ratio for
        both): a member takes a server only if the `mem_guarantee` and `cpu_guarantee` of
        our servers running there, the spawns on their way to it and this one stay within
        its memory and CPU threads (/1.0/resources) times this. 1.0 (default): never more
        than it has; 2.0: twice. Only servers with guarantees count; without any, placement
        counts servers only, as before. The limits (mem_limit, cpu_limit) are unchanged.""",
    )

    @validate("gpu")
    def _check_gpu(self, proposal: dict) -> object:
        try:
            capacity.gpu_request(proposal["value"])
        except ValueError as e:
            raise TraitError(str(e)) from e
        return proposal["value"]

    @validate("overcommit")
    def _check_overcommit(self, proposal: dict) -> float:
        value = proposal["value"]
        if not math.isfinite(value) or value <= 0:
            raise TraitError(f"overcommit = {value!r}: must be a number above 0, such as 1.5")
        return value

    #: JupyterHub's Spawner settings (bytes; CPUs).
    mem_guarantee: int | None
    cpu_guarantee: float | None

    def _need(self) -> capacity.Need:
        """This server's guarantees and GPUs (ValueError naming the setting if wrong)."""
        mem = self.mem_guarantee or 0
        cpu = self.cpu_guarantee or 0.0
        if mem < 0 or cpu < 0 or not math.isfinite(cpu):
            raise ValueError(
                f"mem_guarantee = {self.mem_guarantee!r}, cpu_guarantee = {self.cpu_guarantee!r}:"
                " guarantees cannot be negative"
            )
        return capacity.Need(
            mem=int(mem),
            cpu=float(cpu),
            gpu=capacity.gpu_request(self.gpu),
            overcommit=self.overcommit,
        )

    async def _reserve(
        self, daemon, name: str, data, need: capacity.Need, *, kept: dict | None = None
    ) -> Reservation:
        """Place the server ``name`` and hold its guarantees and GPUs there; a ``kept``
        container (remove = False) is not placed: they are held on its member, or refused."""
        request = placement.PlacementRequest(
            user=self.user.name,
            server_name=self.name or "",
            require=self.target or None,
            data_member=data.member,
            data_volume=data.pinned_by,
            need=need,
        )
        if kept is not None:
            member = kept.get("location") if daemon.clustered else None
            return await daemon.reserve_on(member or None, request, name)
        return await daemon.reserve(
            request, weights=self.host_weights, policy=self.placement_policy, instance=name
        )

    @staticmethod
    def _with_capacity(
        spec: objects.ServerSpec, need: capacity.Need, reservation: Reservation
    ) -> objects.ServerSpec:
        """The spec with the GPUs placement chose, and the keys recording what it holds."""
        if not need:
            return spec
        return dataclasses.replace(
            spec,
            gpu_devices=capacity.gpu_devices(need.gpu, reservation.gpus),
            capacity_config=capacity.instance_keys(need.mem, need.cpu, reservation.gpus),
        )
