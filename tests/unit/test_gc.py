"""What `lxdspawner gc` may delete, decided from the daemon's answers (pure)."""

from hypothesis import given
from hypothesis import strategies as st

from lxdspawner.bases import KEY_BASE_OF
from lxdspawner.gc import stale
from lxdspawner.names import shared_volume_name as volume_name

OLD, NEW = "a" * 64, "b" * 64
IMAGES = [{"fingerprint": OLD, "aliases": []}, {"fingerprint": NEW, "aliases": [{"name": "x"}]}]


def base(fingerprint: str, status: str = "Stopped", name: str = "") -> dict:
    return {
        "name": name or f"jupyter-base-{fingerprint[:12]}",
        "status": status,
        "location": "none",
        "config": {KEY_BASE_OF: fingerprint},
    }


def volume(fingerprint: str, used_by=(), location: str = "none") -> dict:
    return {
        "name": volume_name(fingerprint, "/usr"),
        "used_by": list(used_by),
        "location": location,
    }


def test_the_copies_of_a_replaced_image_go_and_the_current_ones_stay():
    found = stale(
        IMAGES,
        [base(OLD), base(NEW), {"name": "jupyter-ana", "status": "Running", "config": {}}],
        [("pool", volume(OLD)), ("pool", volume(NEW))],
    )
    assert {(s.kind, s.name) for s in found} == {
        ("base", f"jupyter-base-{OLD[:12]}"),
        ("volume", volume_name(OLD, "/usr")),
    }
    assert all(s.member == "" for s in found)  # "none": a standalone daemon
    assert all("no alias names" in s.why for s in found)


def test_a_volume_in_use_stays_even_of_a_replaced_image():
    used = volume(OLD, used_by=["/1.0/instances/jupyter-kept"])
    assert stale(IMAGES, [], [("pool", used)]) == []


def test_a_base_that_is_not_stopped_stays():
    assert stale(IMAGES, [base(OLD, status="Running")], []) == []


def test_other_volumes_stay_and_cluster_members_are_named():
    others = [("pool", {"name": "homes-ana", "used_by": []}), ("pool", {"name": "lxdspawner-x"})]
    on_member = ("pool", volume(OLD, location="member2"))
    assert [(s.name, s.member) for s in stale(IMAGES, [], [*others, on_member])] == [
        (volume_name(OLD, "/usr"), "member2")
    ]


fingerprints = st.sampled_from([OLD, NEW, "c" * 64])


@given(
    named=st.sets(fingerprints),
    volumes=st.lists(st.tuples(fingerprints, st.booleans())),
    bases=st.lists(st.tuples(fingerprints, st.sampled_from(["Stopped", "Running"]))),
)
def test_never_what_an_alias_names_or_an_instance_uses(named, volumes, bases):
    images = [
        {"fingerprint": f, "aliases": [{"name": f[:3]}] if f in named else []}
        for f in (OLD, NEW, "c" * 64)
    ]
    found = stale(
        images,
        [base(f, status, name=f"b{i}") for i, (f, status) in enumerate(bases)],
        [("pool", volume(f, used_by=["/1.0/instances/x"] if used else [])) for f, used in volumes],
    )
    for item in found:
        fingerprint = item.why.split("image ")[1][:12]
        assert all(not f.startswith(fingerprint) for f in named)
    expected_volumes = {
        volume_name(f, "/usr") for f, used in volumes if not used and f not in named
    }
    assert {s.name for s in found if s.kind == "volume"} == expected_volumes
    expected_bases = {
        f"b{i}" for i, (f, s) in enumerate(bases) if s == "Stopped" and f not in named
    }
    assert {s.name for s in found if s.kind == "base"} == expected_bases
