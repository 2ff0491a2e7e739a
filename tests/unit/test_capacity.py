"""GPUs and guarantees: recorded ``/1.0/resources`` answers with GPUs, the ``gpu`` setting,
which member has room, the message when none has, and the devices and keys a server gets.

These machines have no GPU: the answers below follow the Incus and LXD API (``ResourcesGPU``:
``cards[]`` with ``pci_address``, ``vendor_id``, ``product_id``, ``drm``, ``nvidia``, ``mdev``,
``sriov``), as a host with NVIDIA data-centre cards and one with an Intel and an AMD card
report them. The decision is tested as pure logic, then through the hub's Daemon and the
spawner on an in-memory cluster.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
from fakes import IMAGE, FakeLxd, eventually, owned, server_unit
from hypothesis import given
from hypothesis import strategies as st
from test_spawner_inprocess import fails, server_answers, spawner  # noqa: F401 (a fixture)
from traitlets import TraitError

from lxdspawner import capacity
from lxdspawner.capacity import KEY_CPU, KEY_GPUS, KEY_MEM, Need, Usage, gpu_request
from lxdspawner.daemon import Daemon, DaemonError
from lxdspawner.placement import Member, PlacementRequest, weighted_least_loaded

GiB = 2**30


def nvidia(pci: str, product_id: str, model: str, drm: int, uuid: str) -> dict:
    return {
        "driver": "nvidia",
        "driver_version": "535.183.01",
        "drm": {"id": drm, "card_name": f"card{drm}", "card_device": f"226:{drm}"},
        "nvidia": {
            "cuda_version": "12.2",
            "nvrm_version": "535.183.01",
            "brand": "NVIDIA",
            "model": model,
            "uuid": uuid,
            "architecture": "8.0" if "A100" in model else "7.5",
            "card_name": f"nvidia{drm}",
            "card_device": f"195:{drm}",
        },
        "numa_node": 0,
        "pci_address": pci,
        "vendor": "NVIDIA Corporation",
        "vendor_id": "10de",
        "product": model,
        "product_id": product_id,
    }


#: Two MIG-capable A100s and two T4s, 512 GiB, 64 threads.
NVIDIA_HOST = {
    "cpu": {"architecture": "x86_64", "total": 64, "sockets": []},
    "memory": {"total": 512 * GiB, "used": 40 * GiB, "hugepages_total": 0},
    "gpu": {
        "cards": [
            nvidia("0000:07:00.0", "20b0", "NVIDIA A100-SXM4-40GB", 0, "GPU-2f0d-a100-0"),
            nvidia("0000:0f:00.0", "20b0", "NVIDIA A100-SXM4-40GB", 1, "GPU-2f0d-a100-1"),
            nvidia("0000:3b:00.0", "1eb8", "Tesla T4", 2, "GPU-7c1e-t4-0"),
            nvidia("0000:d8:00.0", "1eb8", "Tesla T4", 3, "GPU-7c1e-t4-1"),
        ],
        "total": 4,
    },
}

#: An Intel iGPU (with GVT-g mdev profiles), an AMD Instinct, and a USB display adapter.
AMD_INTEL_HOST = {
    "cpu": {"architecture": "x86_64", "total": 16},
    "memory": {"total": 64 * GiB, "used": 3 * GiB},
    "gpu": {
        "cards": [
            {
                "driver": "i915",
                "driver_version": "6.8.0-45-generic",
                "drm": {
                    "id": 0,
                    "card_name": "card0",
                    "card_device": "226:0",
                    "render_name": "renderD128",
                    "render_device": "226:128",
                },
                "mdev": {
                    "i915-GVTg_V5_4": {
                        "api": "vfio-pci",
                        "available": 1,
                        "name": "GVTg_V5_4",
                        "devices": [],
                    }
                },
                "numa_node": 0,
                "pci_address": "0000:00:02.0",
                "vendor": "Intel Corporation",
                "vendor_id": "8086",
                "product": "TigerLake-LP GT2 [Iris Xe Graphics]",
                "product_id": "9a49",
            },
            {
                "driver": "amdgpu",
                "driver_version": "6.8.0-45-generic",
                "drm": {"id": 1, "card_name": "card1", "card_device": "226:1"},
                "sriov": {"current_vfs": 0, "maximum_vfs": 0, "vfs": None},
                "numa_node": 0,
                "pci_address": "0000:c1:00.0",
                "vendor": "Advanced Micro Devices, Inc. [AMD/ATI]",
                "vendor_id": "1002",
                "product": "Aldebaran/MI200 [Instinct MI210]",
                "product_id": "740f",
            },
            {"driver": "udl", "usb_address": "2:7", "vendor_id": "17e9", "product_id": "4301"},
        ],
        "total": 3,
    },
}

#: An LXD 5.0 answer of a machine without GPU: no "gpu" cards at all.
PLAIN_HOST = {"cpu": {"total": 2}, "memory": {"total": 24 * GiB}, "gpu": {"cards": None}}

A100_0, A100_1, T4_0, T4_1 = "0000:07:00.0", "0000:0f:00.0", "0000:3b:00.0", "0000:d8:00.0"
MIG = ["MIG-4f1f9b6e-3c2a-5f7e-9d8b-1a2b3c4d5e60", "MIG-4f1f9b6e-3c2a-5f7e-9d8b-1a2b3c4d5e61"]


def res(answer: dict) -> capacity.Resources:
    return capacity.resources_from_api(answer)


# -- reading /1.0/resources ------------------------------------------------------------------


def test_resources_give_memory_threads_and_the_cards_by_pci_address():
    nv = res(NVIDIA_HOST)
    assert (nv.memory, nv.cpus) == (512 * GiB, 64)
    assert [g.pci for g in nv.gpus] == [A100_0, A100_1, T4_0, T4_1]
    assert nv.gpus[0] == capacity.Gpu(A100_0, "10de", "20b0", "0", "NVIDIA A100-SXM4-40GB")
    other = res(AMD_INTEL_HOST)
    # The USB adapter has no PCI address for a gpu device to pin: not counted.
    assert [(g.vendor_id, g.product_id, g.drm_id) for g in other.gpus] == [
        ("8086", "9a49", "0"),
        ("1002", "740f", "1"),
    ]
    assert res(PLAIN_HOST) == capacity.Resources(24 * GiB, 2, ())
    assert res({}) == capacity.Resources(0, 0, ())


@pytest.mark.parametrize(
    "address, normal",
    [("01:00.0", "0000:01:00.0"), ("0000:C1:00.7", "0000:c1:00.7"), ("1:0.0", ""), ("x", "")],
)
def test_pci_addresses_are_compared_in_one_form(address, normal):
    assert capacity.normal_pci(address) == normal


# -- the gpu setting -------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=64))
def test_a_number_is_that_many_whole_gpus_of_any_vendor(n):
    assert gpu_request(n) == capacity.GpuRequest(count=n)


def test_gpu_dicts_become_requests():
    assert gpu_request(0) is None and gpu_request(None) is None
    assert gpu_request({"vendor": "NVIDIA", "productid": "20B0", "count": 2}) == (
        capacity.GpuRequest(count=2, vendor_id="10de", product_id="20b0")
    )
    assert gpu_request({"pci": "c1:00.0", "uid": 1000, "mode": "0660"}) == capacity.GpuRequest(
        pci="0000:c1:00.0", extra=(("uid", "1000"), ("mode", "0660"))
    )
    assert gpu_request({"vendorid": "8086", "id": 0}).drm_id == "0"
    mig = gpu_request({"gputype": "mig", "mig": [MIG[0].removeprefix("MIG-"), MIG[1]], "count": 2})
    assert (mig.gputype, mig.mig, mig.count) == ("mig", tuple(MIG), 2)
    assert gpu_request({"gputype": "mig", "mig.uuid": MIG[0]}).mig == (MIG[0],)
    pair = gpu_request({"gputype": "mig", "pci": A100_0, "mig.gi": 1, "mig.ci": 0})
    assert pair.mig_pair == (1, 0) and pair.tokens == (f"mig:{A100_0}/1/0",)


@pytest.mark.parametrize(
    "value, says",
    [
        (-1, "cannot be negative"),
        (True, "not a bool"),
        ("2", "must be a number of GPUs or a dict"),
        ({"vendro": "nvidia"}, "unknown key vendro"),
        ({"vendor": "matrox"}, "a vendor name"),
        ({"vendor": "amd", "vendorid": "10de"}, "vendor and vendorid disagree"),
        ({"productid": "A10G"}, "4 hex digits"),
        ({"pci": "slot 3"}, "PCI address"),
        ({"pci": A100_0, "count": 2}, "pci names one card"),
        ({"count": 0}, "at least 1"),
        ({"id": "nvidia.com/gpu=0"}, "DRM card id"),
        ({"gputype": "mdev", "mdev": "i915-GVTg_V5_4"}, "virtual machines"),
        ({"gputype": "sriov"}, "virtual machines"),
        ({"gputype": "mig"}, "needs mig.uuid"),
        ({"gputype": "mig", "vendor": "amd", "mig.uuid": MIG[0]}, "NVIDIA's"),
        ({"gputype": "mig", "mig.gi": 1}, "both mig.gi and mig.ci"),
        ({"gputype": "mig", "mig": MIG, "count": 3}, "only 2 MIG device(s)"),
        ({"mig.uuid": MIG[0]}, 'need "gputype": "mig"'),
        ({"uid": "root"}, "must be a number"),
    ],
)
def test_a_wrong_gpu_setting_is_named_with_its_value(value, says):
    with pytest.raises(ValueError) as error:
        gpu_request(value)
    assert str(error.value).startswith("gpu"), error.value
    assert says in str(error.value)


# -- choosing GPUs ---------------------------------------------------------------------------


def test_gpus_are_chosen_among_the_matching_free_cards():
    nv = res(NVIDIA_HOST)
    assert capacity.choose_gpus(nv, Usage(), gpu_request(2)) == (A100_0, A100_1)
    t4 = gpu_request({"vendor": "nvidia", "productid": "1eb8"})
    assert capacity.choose_gpus(nv, Usage(gpus=frozenset({T4_0})), t4) == (T4_1,)
    assert capacity.choose_gpus(nv, Usage(), gpu_request({"id": "3"})) == (T4_1,)
    assert capacity.choose_gpus(nv, Usage(gpus=frozenset({T4_0, T4_1})), t4) == (
        "1 GPU (vendor 10de, product 1eb8) wanted: 2 matching here, 2 in use by our servers"
    )
    other = res(AMD_INTEL_HOST)
    assert capacity.choose_gpus(other, Usage(), gpu_request({"vendor": "amd"})) == ("0000:c1:00.0",)
    assert "0 matching here" in capacity.choose_gpus(
        other, Usage(), gpu_request({"vendor": "10de"})
    )


def test_mig_devices_need_an_nvidia_card_and_are_held_one_server_each():
    request = gpu_request({"gputype": "mig", "mig": MIG})
    nv = res(NVIDIA_HOST)
    assert capacity.choose_gpus(nv, Usage(), request) == (f"mig:{MIG[0]}",)
    held = Usage(gpus=frozenset({f"mig:{MIG[0]}"}))
    assert capacity.choose_gpus(nv, held, request) == (f"mig:{MIG[1]}",)
    both = Usage(gpus=frozenset(f"mig:{u}" for u in MIG))
    assert capacity.choose_gpus(nv, both, request) == (
        "1 MIG device wanted: 2 of the 2 listed in use by our servers"
    )
    assert "no NVIDIA card" in capacity.choose_gpus(res(AMD_INTEL_HOST), Usage(), request)


# -- guarantees ------------------------------------------------------------------------------

SMALL = capacity.Resources(memory=24 * GiB, cpus=2)


@pytest.mark.parametrize(
    "usage, need, why",
    [
        (Usage(16 * GiB, 1), Need(mem=8 * GiB, cpu=1), None),
        (
            Usage(20 * GiB),
            Need(mem=8 * GiB),
            "memory guaranteed 20 GiB of 24 GiB, this server needs 8 GiB",
        ),
        (Usage(20 * GiB), Need(mem=8 * GiB, overcommit=1.5), None),
        (
            Usage(cpu=1.5),
            Need(cpu=1),
            "CPUs guaranteed 1.5 CPUs of 2 CPUs, this server needs 1 CPU",
        ),
        (
            Usage(cpu=3.5),
            Need(cpu=1, overcommit=2),
            "CPUs guaranteed 3.5 CPUs of 4 CPUs (overcommit 2), this server needs 1 CPU",
        ),
        (Usage(cpu=3), Need(cpu=1, overcommit=2), None),
        (
            Usage(),
            Need(gpu=gpu_request(1)),
            "1 GPU wanted: 0 matching here, 0 in use by our servers",
        ),
        (Usage(99 * GiB, 99), Need(), None),  # no guarantee asked: nothing to check
    ],
)
def test_a_member_fits_when_guarantees_stay_within_what_it_has_times_overcommit(usage, need, why):
    assert capacity.why_full(SMALL, usage, need) == why


@given(
    st.lists(st.floats(min_value=0.1, max_value=4), max_size=12),
    st.floats(min_value=0.5, max_value=4),
)
def test_what_fits_never_promises_more_than_the_ratio_allows(cpu_guarantees, overcommit):
    """Servers placed one after the other: the sum of what is placed stays within the ratio."""
    held = Usage()
    for cpu in cpu_guarantees:
        if capacity.why_full(SMALL, held, Need(cpu=cpu, overcommit=overcommit)) is None:
            held = held + Usage(cpu=cpu)
    assert held.cpu <= SMALL.cpus * overcommit + 1e-9


@given(
    st.integers(min_value=0, max_value=2**50),
    st.floats(min_value=0, max_value=512),
    st.lists(st.sampled_from([A100_0, T4_0, f"mig:{MIG[0]}"]), unique=True),
)
def test_an_instances_keys_give_back_what_it_holds(mem, cpu, gpus):
    keys = capacity.instance_keys(mem, cpu, gpus)
    back = capacity.usage_of(keys)
    assert back.mem == mem and back.gpus == frozenset(gpus)
    assert back.cpu == pytest.approx(float(f"{cpu:g}"))


def test_keys_edited_by_hand_count_for_nothing():
    assert capacity.usage_of({KEY_MEM: "lots", KEY_CPU: "nan", KEY_GPUS: ""}) == Usage()


# -- placement with capacity -----------------------------------------------------------------


def member(name: str, held: Usage = capacity.NOTHING, *, resources=SMALL, instances=0, error=""):
    return Member(
        name,
        "Online",
        (),
        instances,
        0,
        resources=resources,
        resources_error=error,
        usage=held,
    )


def test_a_full_member_is_skipped_whatever_its_weight_says():
    members = [
        Member("m1", "Online", (), 0, 0, 100.0, SMALL, "", Usage(cpu=2)),
        member("m2", instances=5),
    ]
    request = PlacementRequest("ana", need=Need(cpu=1))
    assert weighted_least_loaded(members, request) == "m2"
    # Without guarantees placement counts servers only, as before.
    assert weighted_least_loaded(members, PlacementRequest("ana")) == "m1"


def test_nothing_fits_names_every_member_with_its_figures():
    members = [
        member("m1", Usage(cpu=2)),
        member("m2", Usage(20 * GiB, 1)),
        member("m3", resources=None, error="Server isn't ready yet"),
        Member("m4", "Offline", (), 0, 0),
    ]
    request = PlacementRequest("ana", "gpu-box", need=Need(mem=8 * GiB, cpu=1))
    with pytest.raises(Exception) as error:
        weighted_least_loaded(members, request)
    assert str(error.value) == (
        "no cluster member can take server 'gpu-box' of user 'ana' ("
        "m1: CPUs guaranteed 2 CPUs of 2 CPUs, this server needs 1 CPU; "
        "m2: memory guaranteed 20 GiB of 24 GiB, this server needs 8 GiB; "
        "m3: its resources cannot be read (Server isn't ready yet); "
        "m4: status 'Offline', not Online)"
    )


def test_no_free_gpu_says_how_many_match_and_are_in_use_on_each_member():
    nv, other = res(NVIDIA_HOST), res(AMD_INTEL_HOST)
    members = [
        member("gpu1", Usage(gpus=frozenset({T4_0, T4_1})), resources=nv),
        member("cpu1", resources=other),
    ]
    request = PlacementRequest("ana", need=Need(gpu=gpu_request({"productid": "1eb8"})))
    with pytest.raises(Exception) as error:
        weighted_least_loaded(members, request)
    assert str(error.value) == (
        "no cluster member can take the server of user 'ana' ("
        "cpu1: 1 GPU (product 1eb8) wanted: 0 matching here, 0 in use by our servers; "
        "gpu1: 1 GPU (product 1eb8) wanted: 2 matching here, 2 in use by our servers)"
    )


def test_the_member_holding_the_users_data_is_never_left_for_another_when_full():
    members = [member("m1", Usage(cpu=2)), member("m2")]
    request = PlacementRequest(
        "ana", data_member="m1", data_volume="jupyter-home-ana", need=Need(cpu=1)
    )
    with pytest.raises(Exception) as error:
        weighted_least_loaded(members, request)
    assert str(error.value).startswith(
        "jupyter-home-ana of user 'ana' is on cluster member m1, which is full (CPUs "
        "guaranteed 2 CPUs of 2 CPUs, this server needs 1 CPU): the server cannot start "
        "elsewhere without those files. Start again once servers there have stopped"
    )
    assert weighted_least_loaded([member("m1", Usage(cpu=1)), member("m2")], request) == "m1"


# -- the devices and keys a server gets ------------------------------------------------------


def test_each_gpu_is_a_device_pinned_to_the_card_placement_chose():
    request = gpu_request({"vendor": "nvidia", "count": 2, "uid": 1000, "gid": 1000})
    assert capacity.gpu_devices(request, [A100_0, T4_0]) == {
        "gpu0": {"type": "gpu", "gputype": "physical", "pci": A100_0, "uid": "1000", "gid": "1000"},
        "gpu1": {"type": "gpu", "gputype": "physical", "pci": T4_0, "uid": "1000", "gid": "1000"},
    }
    mig = gpu_request({"gputype": "mig", "mig": MIG, "pci": A100_0})
    assert capacity.gpu_devices(mig, [f"mig:{MIG[1]}"]) == {
        "gpu0": {"type": "gpu", "gputype": "mig", "mig.uuid": MIG[1], "pci": A100_0}
    }
    pair = gpu_request({"gputype": "mig", "id": 1, "mig.gi": 2, "mig.ci": 0})
    assert capacity.gpu_devices(pair, pair.tokens) == {
        "gpu0": {"type": "gpu", "gputype": "mig", "mig.gi": "2", "mig.ci": "0", "id": "1"}
    }
    assert capacity.gpu_devices(None, []) == {}


# -- through the hub's Daemon, on an in-memory cluster ----------------------------------------


@pytest.fixture
def cluster() -> FakeLxd:
    fake = FakeLxd(members=["m1", "m2", "m3"])
    fake.add_image(IMAGE, "jupyter-base")
    return fake


@pytest.fixture
def on_cluster(cluster, make_daemon) -> Daemon:
    return make_daemon(cluster)


async def test_spawns_in_flight_hold_their_guarantees_until_their_instance_does(
    on_cluster, cluster
):
    """Six concurrent spawns of one CPU each on three 2-CPU members: two each; a seventh
    finds no room, with the figures of every member."""
    need = Need(cpu=1)
    placed = await asyncio.gather(
        *(
            on_cluster.reserve(PlacementRequest(f"u{i}", need=need), weights={}, instance=f"i{i}")
            for i in range(6)
        )
    )
    assert sorted(r.member for r in placed) == ["m1", "m1", "m2", "m2", "m3", "m3"]
    with pytest.raises(DaemonError) as error:
        await on_cluster.reserve(PlacementRequest("late", need=need), weights={})
    assert (error.value.status, error.value.reason) == (503, "placement")
    assert error.value.message.count("CPUs guaranteed 2 CPUs of 2 CPUs") == 3
    # The first one's instance now runs with its keys, its spawn not ended yet: counted once.
    first = placed[0]
    await cluster.create_instance(
        "i0",
        source={"type": "image", "alias": "jupyter-base"},
        config={**owned("u0"), **capacity.instance_keys(0, 1, ())},
        target=first.member,
        start=True,
    )
    cache = await on_cluster.cache()
    await cache.wait_for("i0", lambda e: e is not None and e.status == "Running", 1)
    with pytest.raises(DaemonError):
        await on_cluster.reserve(PlacementRequest("late", need=need), weights={})
    # The other spawn to that member ends without an instance: room for one there again.
    other = next(r for r in placed[1:] if r.member == first.member)
    on_cluster.landed(other)
    again = await on_cluster.reserve(PlacementRequest("late", need=need), weights={})
    assert again.member == first.member
    on_cluster.landed(first)
    with pytest.raises(DaemonError):
        await on_cluster.reserve(PlacementRequest("later", need=need), weights={})


async def test_resources_are_read_once_per_member_concurrently_and_again_when_members_change(
    on_cluster, cluster
):
    need = Need(mem=GiB)
    for i in range(4):
        on_cluster.landed(
            await on_cluster.reserve(PlacementRequest(f"u{i}", need=need), weights={})
        )
    assert cluster.requests["resources"] == 3
    cluster.members["m4"] = "Online"
    await on_cluster.reserve(PlacementRequest("new", need=need), weights={})
    assert cluster.requests["resources"] == 7
    # Spawns without guarantees or GPUs never ask.
    await on_cluster.reserve(PlacementRequest("plain"), weights={})
    assert cluster.requests["resources"] == 7


async def test_a_member_whose_resources_cannot_be_read_is_skipped_saying_why(on_cluster, cluster):
    from lxdspawner.lxd import LxdError

    cluster.resources_of["m1"] = copy.deepcopy(NVIDIA_HOST)
    cluster.fail("resources", LxdError("Failed to get GPU information"), times=2)
    need = Need(gpu=gpu_request(1))
    with pytest.raises(DaemonError) as error:
        await on_cluster.reserve(PlacementRequest("ana", need=need), weights={})
    message = error.value.message
    assert message.count("its resources cannot be read (Failed to get GPU information)") == 2
    assert "0 matching here" in message  # the third member, read, has no GPU


async def test_gpus_go_to_the_member_that_has_them_and_are_counted_once_held(on_cluster, cluster):
    cluster.resources_of["m3"] = copy.deepcopy(NVIDIA_HOST)
    need = Need(gpu=gpu_request({"productid": "1eb8", "count": 2}))
    first = await on_cluster.reserve(PlacementRequest("ana", need=need), weights={})
    assert (first.member, first.gpus) == ("m3", (T4_0, T4_1))
    with pytest.raises(DaemonError) as error:
        await on_cluster.reserve(PlacementRequest("bob", need=need), weights={})
    assert "m3: 2 GPUs (product 1eb8) wanted: 2 matching here, 2 in use" in error.value.message
    assert "m1: 2 GPUs (product 1eb8) wanted: 0 matching here" in error.value.message


async def test_a_standalone_daemon_is_one_member_with_the_same_check(fake, make_daemon):
    fake.add_image(IMAGE, "jupyter-base")
    daemon = make_daemon(fake)
    assert (
        await daemon.reserve(PlacementRequest("ana", need=Need(cpu=2)), weights={})
    ).member is None
    with pytest.raises(DaemonError) as error:
        await daemon.reserve(PlacementRequest("bob", "big", need=Need(cpu=0.5)), weights={})
    assert error.value.message == (
        "the fake daemon has no room for server 'big' of user 'bob': CPUs guaranteed 2 CPUs "
        "of 2 CPUs, this server needs 0.5 CPUs"
    )


# -- the spawner -----------------------------------------------------------------------------


def test_the_gpu_and_overcommit_settings_are_checked_naming_them():
    from lxdspawner import LxdSpawner

    s = LxdSpawner()
    s.gpu = {"vendor": "nvidia", "count": 2}
    with pytest.raises(TraitError, match=r"gpu\['gputype'\] = 'mdev': that GPU type is for vir"):
        s.gpu = {"gputype": "mdev"}
    with pytest.raises(TraitError, match="overcommit = 0.0: must be a number above 0"):
        s.overcommit = 0.0


async def test_a_spawn_gets_its_gpus_and_records_them_and_the_next_finds_none_free(
    cluster, make_daemon, monkeypatch
):
    cluster.exec_handler = server_unit(cluster)
    cluster.resources_of["m2"] = copy.deepcopy(AMD_INTEL_HOST)
    daemon = make_daemon(cluster)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    settings = {"gpu": {"vendor": "amd"}, "mem_guarantee": 4 * GiB, "home_volume_size": ""}
    s = spawner(cluster, **settings)
    await s.start()
    assert s.member == "m2"
    instance = cluster.instances["jupyter-ana"]
    assert instance.devices["gpu0"] == {"type": "gpu", "gputype": "physical", "pci": "0000:c1:00.0"}
    assert instance.config[KEY_GPUS] == "0000:c1:00.0"
    assert instance.config[KEY_MEM] == str(4 * GiB)
    error, _ = await fails(spawner(cluster, user="bob", **settings))
    assert (error.status_code, error.reason) == (503, "placement")
    assert "m2: 1 GPU (vendor 1002) wanted: 1 matching here, 1 in use by our servers" in str(error)
    assert "jupyter-bob" not in cluster.instances
    bad, _ = await fails(spawner(cluster, user="carl", mem_guarantee=-1, home_volume_size=""))
    assert "mem_guarantee = -1" in str(bad) and bad.status_code == 400


async def events_read(daemon: Daemon, fake: FakeLxd, stopped: str) -> None:
    """Until the cache has read every event sent, the last of them ``stopped``'s stop."""
    cache = await daemon.cache()
    await eventually(
        lambda: (
            all(s.queue.empty() for s in fake._streams) and cache.get(stopped).status == "Stopped"
        )
    )


async def test_a_kept_container_holds_its_share_again_on_its_member_or_is_told_it_is_full(
    cluster, make_daemon, monkeypatch
):
    """A stopped kept container holds nothing; started again it is not placed: its member
    must have room, and its GPU devices and keys are given afresh."""
    cluster.exec_handler = server_unit(cluster)
    cluster.resources_of["m1"] = copy.deepcopy(AMD_INTEL_HOST)  # 16 threads, 2 PCI GPUs
    daemon = make_daemon(cluster)
    monkeypatch.setitem(Daemon._all, daemon.remote, daemon)
    keep = {"remove": False, "home_volume_size": "", "target": "m1", "cpu_guarantee": 16.0}
    ana = spawner(cluster, gpu=1, **keep)
    await ana.start()
    assert cluster.instances["jupyter-ana"].devices["gpu0"]["pci"] == "0000:00:02.0"
    await ana.stop()
    cache = await daemon.cache()  # its stop's events read: it is stopped, and holds nothing
    await eventually(
        lambda: (
            all(s.queue.empty() for s in cluster._streams)
            and cache.get("jupyter-ana").status == "Stopped"
        )
    )
    bob = spawner(cluster, user="bob", **keep)
    await bob.start()  # ana's stopped container holds no CPU
    ana = spawner(cluster, gpu=1, **keep)
    error, _ = await fails(ana)
    assert str(error) == (
        "cluster member m1 (where its kept container jupyter-ana is) has no room for the "
        "server of user 'ana': CPUs guaranteed 16 CPUs of 16 CPUs, this server needs 16 CPUs"
    )
    assert "jupyter-ana" in cluster.instances  # kept, as it was
    await bob.stop()
    await events_read(daemon, cluster, "jupyter-bob")
    ana = spawner(cluster, gpu={"vendor": "amd"}, **keep)
    await ana.start()
    instance = cluster.instances["jupyter-ana"]
    assert instance.devices["gpu0"]["pci"] == "0000:c1:00.0"
    assert instance.config[KEY_GPUS] == "0000:c1:00.0" and instance.config[KEY_CPU] == "16"
