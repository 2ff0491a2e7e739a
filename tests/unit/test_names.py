"""Instance names: valid for LXD and Incus, unique per (user, server), stable, readable."""

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lxdspawner.names import (
    home_component,
    instance_name,
    is_pool_member_name,
    is_safe_path_component,
    is_valid_instance_name,
    pool_member_name,
    slugify,
    validate_prefix,
)

# What JupyterHub accepts as a username: anything but "/" (and, in practice, no NUL).
usernames = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=100,
)
server_names = st.one_of(st.just(""), usernames)


@pytest.mark.parametrize(
    "user, expected",
    [
        ("alice", "jupyter-alice"),
        ("a-b", "jupyter-a-b"),
        ("bob42", "jupyter-bob42"),
    ],
)
def test_safe_usernames_stay_readable(user, expected):
    assert instance_name(user) == expected


@pytest.mark.parametrize(
    "user, readable",
    [
        ("ana.maria@uni.es", "jupyter-ana-maria-uni-es-"),
        ("Élodie", "jupyter-elodie-"),
        ("a_b", "jupyter-a-b-"),
        ("Alice", "jupyter-alice-"),
    ],
)
def test_other_usernames_get_slug_and_hash(user, readable):
    name = instance_name(user)
    assert name.startswith(readable)
    assert re.fullmatch(r"[0-9a-f]{16}", name.removeprefix(readable))  # 64 bits


def test_the_awkward_names_from_the_issue_are_distinct_and_valid():
    pairs = [
        ("alice", ""),
        ("ana.maria@uni.es", ""),
        ("ana-maria-uni-es", ""),
        ("Élodie", ""),
        ("elodie", ""),
        ("a-b", ""),
        ("a_b", ""),
        ("x" * 80, ""),
        ("x" * 81, ""),
        ("alice", "lab"),
        ("alice", "Lab"),
        ("alice-lab", ""),
        ("x;touch pwned", ""),
    ]
    got = [instance_name(u, s) for u, s in pairs]
    assert len(set(got)) == len(got)
    assert all(is_valid_instance_name(n) for n in got)


def test_a_safe_name_that_looks_hashed_is_hashed_itself():
    # Otherwise the user "a-b-<hash of a_b>" could take a_b's container.
    looks_hashed = instance_name("a_b").removeprefix("jupyter-")
    assert instance_name(looks_hashed) != instance_name("a_b")


def test_names_are_stable():
    # Servers recorded in the hub's state keep their names whatever these say; a new server
    # gets these, so changing them is a release note.
    assert instance_name("ana.maria@uni.es") == "jupyter-ana-maria-uni-es-4dd671303a2aee8f"
    assert instance_name("alice", "lab") == "jupyter-alice-lab-9b92df35b61fd3bb"
    assert instance_name("alice", attempt=1) == "jupyter-alice-750538bbf2250397"


def test_the_collision_of_the_issue_is_gone():
    # With 8 hex digits these three gave jupyter-ana-maria-uni-es-04889c22.
    got = {
        instance_name("ana.maria@uni.es"),
        instance_name("ana!~-maria+!=uni=.!es__."),
        instance_name("ana", "maria-%%uni=!.es%==%.."),
    }
    assert len(got) == 3


def test_an_old_hashed_name_is_never_a_kept_one():
    # lxdspawner 0.1 made "jupyter-<slug>-<8 hex>": no username may be kept as such a name.
    assert instance_name("bob-04889c22") != "jupyter-bob-04889c22"
    assert instance_name("bob-4dd671303a2aee8f") != "jupyter-bob-4dd671303a2aee8f"


@settings(max_examples=200)
@given(usernames, server_names, st.integers(min_value=1, max_value=20))
def test_alternatives_are_valid_and_differ_from_the_usual_name(user, server, attempt):
    alternative = instance_name(user, server, attempt=attempt)
    assert is_valid_instance_name(alternative)
    assert alternative != instance_name(user, server)
    assert alternative != instance_name(user, server, attempt=attempt + 1)


@pytest.mark.parametrize(
    "user, home",
    [("alice", "alice"), ("ana.maria@uni.es", "ana.maria@uni.es"), ("Élodie", "Élodie")],
)
def test_safe_usernames_are_their_home_directory(user, home):
    assert home_component(user) == home


@settings(max_examples=300)
@given(usernames)
@example(user="..")
@example(user=".")
@example(user="a\rb")
@example(user="x" * 300)
def test_every_home_directory_is_one_plain_name(user):
    home = home_component(user)
    assert is_safe_path_component(home)
    assert home not in (".", "..") and "/" not in home


@settings(max_examples=500)
@given(usernames, server_names)
@example(user="0\n", server="")  # found by hypothesis in CI: "$" matched before the newline
def test_every_name_is_valid(user, server):
    assert is_valid_instance_name(instance_name(user, server))


@settings(max_examples=500)
@given(usernames, server_names, usernames, server_names)
def test_distinct_pairs_get_distinct_names(u1, s1, u2, s2):
    if (u1, s1) != (u2, s2):
        assert instance_name(u1, s1) != instance_name(u2, s2)


@given(usernames, server_names)
def test_same_pair_same_name(user, server):
    assert instance_name(user, server) == instance_name(user, server)


@given(usernames)
def test_slug_is_lowercase_ascii_words(user):
    assert re.fullmatch(r"([a-z0-9]+(-[a-z0-9]+)*)?", slugify(user))


@pytest.mark.parametrize("prefix", ["", "1abc", "a_b", "x-", "a" * 21, "jupyter\n"])
def test_bad_prefixes_are_refused_with_a_reason(prefix):
    with pytest.raises(ValueError, match="prefix"):
        validate_prefix(prefix)


def test_custom_prefix():
    assert instance_name("alice", prefix="class101") == "class101-alice"


@pytest.mark.parametrize("user", ["alice\n", "0\n", "bob\n\n"])
def test_a_trailing_newline_is_not_a_safe_name(user):
    name = instance_name(user)
    assert is_valid_instance_name(name), name
    assert name != instance_name(user.rstrip("\n"))  # a different user, a different name


@given(usernames, server_names, st.integers(min_value=0, max_value=7))
@example("pool-01234567-89abcdef", "", 0)
@example("pool-01234567", "89abcdef", 0)
def test_no_servers_name_looks_like_a_pool_members(username, server_name, attempt):
    """The spawner never takes a recorded name of the pool's form as the server's own (a
    claimed member is used once): so no server's name may have that form, or a kept
    container (remove = False) would be passed over."""
    name = instance_name(username, server_name, "jupyter", attempt)
    assert not is_pool_member_name(name)
    assert is_pool_member_name(pool_member_name("jupyter", "0" * 16, "89abcdef"))
