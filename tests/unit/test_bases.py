"""When servers are copies of a shifted base: a pure rule, no daemon."""

from __future__ import annotations

import pytest

from lxdspawner import bases
from lxdspawner.lxd import Dialect
from lxdspawner.names import is_valid_instance_name

LXD = Dialect(product="lxd")
INCUS = Dialect(product="incus")
LXD_CLUSTER = Dialect(product="lxd", clustered=True)


@pytest.mark.parametrize(
    "dialect, privileged, member, expected",
    [
        (LXD, False, None, True),  # LXD 5.0 shifts every new unprivileged container
        (INCUS, False, None, False),  # idmapped mounts: nothing to shift
        (LXD, True, None, False),  # privileged: nothing shifted
        (LXD_CLUSTER, False, "member1", False),  # one base per member is not made (yet)
        (None, False, None, False),
    ],
)
def test_on_by_default_only_for_unprivileged_containers_on_a_standalone_lxd(
    dialect, privileged, member, expected
):
    assert bases.wanted(None, dialect, privileged, member) is expected


@pytest.mark.parametrize("setting", [True, False])
def test_the_setting_wins(setting):
    assert bases.wanted(setting, INCUS, False, None) is setting
    assert bases.wanted(setting, LXD, False, None) is setting


def test_base_names_are_valid_and_per_image():
    a = bases.base_name("jupyter", "a" * 64)
    assert is_valid_instance_name(a)
    assert a != bases.base_name("jupyter", "b" * 64)
