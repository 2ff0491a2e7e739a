"""Placement: the default policy, its error message, and building members from API answers."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lxdspawner.objects import KEY_MANAGED, MANAGED_BY
from lxdspawner.placement import (
    Member,
    NoMemberAvailable,
    PlacementPolicy,
    PlacementRequest,
    count_by_location,
    members_from_api,
    members_from_counts,
    weighted_least_loaded,
    why_unusable,
)

REQ = PlacementRequest("alice", "")


def member(name, status="Online", groups=(), instances=0, in_flight=0, weight=1.0):
    return Member(name, status, tuple(groups), instances, in_flight, weight)


def burst(members: list[Member], n: int, request: PlacementRequest = REQ) -> Counter:
    """n placements in a row, each counted as in flight on the member it chose (as the
    spawner does before it creates anything)."""
    by_name = {m.name: m for m in members}
    chosen: Counter = Counter()
    for _ in range(n):
        name = weighted_least_loaded(list(by_name.values()), request)
        m = by_name[name]
        by_name[name] = Member(m.name, m.status, m.groups, m.instances, m.in_flight + 1, m.weight)
        chosen[name] += 1
    return chosen


# -- the default policy ------------------------------------------------------------------------


def test_burst_of_30_on_three_equal_members_is_10_10_10():
    members = [member("node1"), member("node2"), member("node3")]
    assert burst(members, 30) == {"node1": 10, "node2": 10, "node3": 10}


def test_weights_2_1_1_give_about_15_7_8():
    members = [member("node1", weight=2), member("node2"), member("node3")]
    got = burst(members, 30)
    assert sum(got.values()) == 30
    assert abs(got["node1"] - 15) <= 1
    assert abs(got["node2"] - 7.5) <= 1
    assert abs(got["node3"] - 7.5) <= 1


def test_existing_instances_count():
    members = [member("a", instances=5), member("b", instances=1), member("c", instances=3)]
    assert weighted_least_loaded(members, REQ) == "b"
    # b fills up to c's level, then the two alternate (ties to "b"); a stays highest.
    assert burst(members, 6) == {"b": 4, "c": 2}


def test_in_flight_counts_like_instances():
    members = [member("a", instances=2), member("b", in_flight=3), member("c", instances=1)]
    assert weighted_least_loaded(members, REQ) == "c"


def test_ties_go_to_the_first_name():
    members = [member("node3"), member("node1"), member("node2")]
    assert weighted_least_loaded(members, REQ) == "node1"
    assert weighted_least_loaded(list(reversed(members)), REQ) == "node1"


def test_weight_is_relative_to_load():
    y = member("y", instances=1)  # 1 / (1 + 1) = 0.5
    assert weighted_least_loaded([member("x", instances=2, weight=2), y], REQ) == "x"  # 0.67
    assert weighted_least_loaded([member("x", instances=3, weight=2), y], REQ) == "x"  # tie
    assert weighted_least_loaded([member("x", instances=4, weight=2), y], REQ) == "y"  # 0.4


@pytest.mark.parametrize("status", ["Offline", "Evacuated", "Blocked", "Unknown", "online"])
def test_only_online_members_are_used(status):
    members = [member("a", status=status), member("b", instances=50)]
    assert weighted_least_loaded(members, REQ) == "b"


def test_weight_zero_is_never_used():
    members = [member("a", weight=0), member("b", instances=1000)]
    assert weighted_least_loaded(members, REQ) == "b"
    assert burst(members, 20) == {"b": 20}


def test_require_a_member():
    members = [member("a"), member("b", instances=9), member("c")]
    assert weighted_least_loaded(members, PlacementRequest("u", "", require="b")) == "b"


def test_require_a_group():
    members = [
        member("a", groups=["default"]),
        member("b", groups=["default", "gpu"], instances=4),
        member("c", groups=["default", "gpu"], instances=2),
    ]
    request = PlacementRequest("u", "", require="@gpu")
    assert weighted_least_loaded(members, request) == "c"
    assert burst(members, 4, request) == {"c": 3, "b": 1}


def test_required_member_offline_is_an_error_not_a_fallback():
    members = [member("a", status="Offline"), member("b")]
    with pytest.raises(NoMemberAvailable) as e:
        weighted_least_loaded(members, PlacementRequest("u", "", require="a"))
    assert "a: status 'Offline', not Online" in str(e.value)
    assert "b: not the required member 'a'" in str(e.value)


# -- the error ---------------------------------------------------------------------------------


def test_error_names_every_member_and_why():
    members = [
        member("node1", status="Offline"),
        member("node2", status="Evacuated"),
        member("node3", weight=0),
    ]
    with pytest.raises(NoMemberAvailable) as e:
        weighted_least_loaded(members, PlacementRequest("ana.maria@uni.es", ""))
    message = str(e.value)
    assert "the server of user 'ana.maria@uni.es'" in message
    assert "node1: status 'Offline', not Online" in message
    assert "node2: status 'Evacuated', not Online" in message
    assert "node3: weight 0 in host_weights" in message
    assert e.value.reasons == {
        "node1": "status 'Offline', not Online",
        "node2": "status 'Evacuated', not Online",
        "node3": "weight 0 in host_weights",
    }


def test_error_for_a_group_nobody_is_in():
    members = [member("a", groups=["default"]), member("b", groups=["default", "cpu"])]
    with pytest.raises(NoMemberAvailable) as e:
        weighted_least_loaded(members, PlacementRequest("u", "lab", require="@gpu"))
    message = str(e.value)
    assert "server 'lab' of user 'u' in cluster group 'gpu'" in message
    assert "a: not in cluster group 'gpu' (its groups: default)" in message
    assert "b: not in cluster group 'gpu' (its groups: default, cpu)" in message


def test_error_for_an_unknown_required_member():
    request = PlacementRequest("u", "", require="nodeX")
    with pytest.raises(NoMemberAvailable, match=r"required member 'nodeX' is not in the cluster"):
        weighted_least_loaded([member("a"), member("b")], request)


def test_error_for_no_members():
    with pytest.raises(NoMemberAvailable, match="the cluster reports no members"):
        weighted_least_loaded([], REQ)


def test_why_unusable():
    assert why_unusable(member("a")) is None
    assert why_unusable(member("a", groups=["g"]), "@g") is None
    assert why_unusable(member("a"), "a") is None


# -- a replacement policy has the documented signature -------------------------------------


def test_a_custom_policy_can_wrap_the_default():
    import dataclasses

    def by_course(members, request):
        if request.user.startswith("cs101-"):
            request = dataclasses.replace(request, require="@cs101")
        return weighted_least_loaded(members, request)

    policy: PlacementPolicy = by_course
    members = [member("a"), member("b", groups=["cs101"], instances=3)]
    assert policy(members, PlacementRequest("cs101-ana", "")) == "b"
    assert policy(members, PlacementRequest("bob", "")) == "a"


# -- members from the API ----------------------------------------------------------------------


def api_member(name, status="Online", groups=("default",)):
    return {
        "server_name": name,
        "url": f"https://{name}:8443",
        "roles": ["database"],
        "architecture": "x86_64",
        "failure_domain": "default",
        "groups": list(groups),
        "status": status,
        "message": "Fully operational",
        "config": {},
    }


def api_instance(name, location, ours=True, **config):
    if ours:
        config[KEY_MANAGED] = MANAGED_BY
    return {"name": name, "location": location, "status": "Running", "config": config}


def test_members_from_api():
    members = members_from_api(
        [api_member("n1"), api_member("n2", "Offline", ["default", "gpu"]), api_member("n3")],
        [
            api_instance("j1", "n1"),
            api_instance("j2", "n1"),
            api_instance("j3", "n2"),
            api_instance("other", "n3", ours=False),
            api_instance("foreign", "n3", ours=False, **{KEY_MANAGED: "someone-else"}),
        ],
        {"n3": 2},
        {"n1": 2, "n2": 0.5},
    )
    assert members == [
        Member("n1", "Online", ("default",), 2, 0, 2.0),
        Member("n2", "Offline", ("default", "gpu"), 1, 0, 0.5),
        Member("n3", "Online", ("default",), 0, 2, 1.0),
    ]


def test_members_from_api_tolerates_sparse_objects():
    members = members_from_api(
        [{"server_name": "n1"}], [{"name": "x"}, {"name": "y", "config": None}], {}, {}
    )
    assert members == [Member("n1", "Unknown", (), 0, 0, 1.0)]


def test_standalone_daemon_has_no_members():
    assert members_from_api([], [api_instance("j1", "none")], {}, {}) == []


def test_members_from_counts_matches_members_from_api():
    cluster = [api_member("n1"), api_member("n2")]
    instances = [api_instance(f"j{i}", f"n{i % 2 + 1}") for i in range(7)]
    counts = count_by_location(instances)
    assert counts == {"n1": 4, "n2": 3}
    assert members_from_counts(cluster, counts, {"n1": 1}, {}) == members_from_api(
        cluster, instances, {"n1": 1}, {}
    )


# -- properties --------------------------------------------------------------------------------

names = st.text("abcdefghij0123456789-", min_size=1, max_size=8)
statuses = st.sampled_from(["Online", "Online", "Online", "Offline", "Evacuated", "Blocked"])
weights = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0])
groups = st.lists(st.sampled_from(["default", "gpu", "big"]), unique=True, max_size=3)


@st.composite
def clusters(draw, min_size=1):
    member_names = draw(st.lists(names, min_size=min_size, max_size=8, unique=True))
    return [
        Member(
            name,
            draw(statuses),
            tuple(draw(groups)),
            draw(st.integers(0, 50)),
            draw(st.integers(0, 10)),
            draw(weights),
        )
        for name in member_names
    ]


requires = st.one_of(st.none(), names, st.sampled_from(["@default", "@gpu", "@big", "@none"]))


@given(clusters(), requires)
def test_chosen_member_is_usable_and_best(members, require):
    request = PlacementRequest("u", "", require=require)
    usable = [m for m in members if why_unusable(m, require) is None]
    if not usable:
        with pytest.raises(NoMemberAvailable) as e:
            weighted_least_loaded(members, request)
        for m in members:  # every member is named, with its reason
            assert f"{m.name}: " in str(e.value) or "not in the cluster" in str(e.value)
        return
    chosen = weighted_least_loaded(members, request)
    best = next(m for m in usable if m.name == chosen)
    assert best.status == "Online"
    assert best.weight > 0
    if require and require.startswith("@"):
        assert require[1:] in best.groups
    elif require:
        assert chosen == require
    assert all(best.score >= m.score for m in usable)
    # Deterministic, whatever the order of the members.
    assert weighted_least_loaded(list(reversed(members)), request) == chosen


@given(st.integers(2, 6), st.integers(0, 60))
def test_bursts_on_equal_members_spread_evenly(n_members, n):
    members = [member(f"m{i}") for i in range(n_members)]
    counts = burst(members, n)
    values = [counts.get(m.name, 0) for m in members]
    assert sum(values) == n
    assert max(values) - min(values) <= 1


@settings(max_examples=50)
@given(clusters(min_size=2), st.integers(1, 40))
def test_bursts_follow_weights(members, n):
    usable = [m for m in members if why_unusable(m) is None]
    if not usable:
        return
    counts = burst(members, n)
    assert set(counts) <= {m.name for m in usable}
    # After the burst, loads are weight-proportional: no usable member could have taken
    # the last spawn with a better score than the one that did.
    final = {
        m.name: Member(
            m.name, m.status, m.groups, m.instances, m.in_flight + counts[m.name], m.weight
        )
        for m in usable
    }
    for m in final.values():
        if counts[m.name]:
            # When it was chosen last, its load was one less: weight / (load - 1 + 1).
            score_when_chosen = m.weight / m.load
            others = [o.score for o in final.values() if o.name != m.name]
            assert all(score_when_chosen >= s - 1e-12 for s in others)


def test_cache_counts_stay_right_through_changes():
    """The shared cache keeps per-member counts as instances come, move state and go."""
    from lxdspawner.cache import InstanceCache

    cache = InstanceCache(client=None)
    ours = {"user.jupyterhub.managed-by": "lxdspawner"}
    for i, member in enumerate(["m1", "m1", "m2"]):
        cache.note_instance(
            {"name": f"i{i}", "location": member, "status": "Running", "config": ours}
        )
    cache.note_instance({"name": "theirs", "location": "m2", "status": "Running", "config": {}})
    cache.note("i0", status="Stopped")
    assert cache.count_by_location() == {"m1": 2, "m2": 1}
    cache.note("i1", deleted=True)
    cache.note("i2", deleted=True)
    assert cache.count_by_location() == {"m1": 1}


async def test_a_member_counts_as_down_only_while_it_stays_down():
    """A heartbeat blip (down, then up again) resets the clock the spawner's grace reads."""
    from lxdspawner.cache import InstanceCache

    class Cluster:
        status = "Offline"

        async def cluster_members(self):
            return [
                {"server_name": "m1", "status": self.status},
                {"server_name": "m2", "status": "Online"},
            ]

    cluster = Cluster()
    cache = InstanceCache(client=cluster)
    await cache.refresh_members()
    first = cache.member_down_for("m1")
    await cache.refresh_members()
    assert cache.member_down_for("m1") >= first  # still the same outage
    assert cache.member_down_for("m2") == 0
    cluster.status = "Online"
    await cache.refresh_members()
    assert cache.member_down_for("m1") == 0


# -- pinned by the user's data (a volume on a pool local to each member) --------------------


PINNED = PlacementRequest("alice", data_member="m3", data_volume="jupyter-home-alice")


def test_a_user_with_data_goes_to_its_member_whatever_the_weights():
    members = [member("m1"), member("m2"), member("m3", instances=9, weight=0.5)]
    assert weighted_least_loaded(members, PINNED) == "m3"
    # ...and whatever ``require`` says: the data decides.
    assert weighted_least_loaded(members, dataclass_replace(PINNED, require="m1")) == "m3"


@pytest.mark.parametrize(
    "status, state",
    [
        ("Offline", "Offline, not Online"),
        ("Evacuated", "Evacuated, not Online"),
        (
            "Unreachable (reading jupyter-home-alice on it failed 0 s ago)",
            "Unreachable (reading jupyter-home-alice on it failed 0 s ago), not Online",
        ),
        (None, "not in the cluster"),
    ],
)
def test_a_member_holding_the_data_that_cannot_take_the_server_is_named_with_the_volume(
    status, state
):
    members = [member("m1"), member("m2")] + ([member("m3", status=status)] if status else [])
    with pytest.raises(NoMemberAvailable) as e:
        weighted_least_loaded(members, PINNED)
    assert e.value.message == (
        f"jupyter-home-alice of user 'alice' is on cluster member m3, which is {state}: the "
        "server cannot start elsewhere without those files. Start again once m3 is back, or "
        "have an admin move the data with `lxdspawner volumes move alice --to MEMBER`"
    )
    assert e.value.reasons == {"m3": state}


def dataclass_replace(request, **changes):
    import dataclasses

    return dataclasses.replace(request, **changes)
