"""The client's retry of Incus 6.0.4's file-helper race (the race itself needs load to show)."""

import pytest

from lxdspawner.lxd import Dialect, FileHelperFailed, LxdClient, LxdError

RACE = "dial unix /proc/self/fd/23/forkfile.sock: connect: no such file or directory"


class Flaky(LxdClient):
    def __init__(self, failures: list[str]):
        super().__init__("unix:///nonexistent")
        self.dialect = Dialect(product="incus")
        self.failures = failures
        self.calls = 0

    async def request(self, method, path, **kwargs):
        self.calls += 1
        if self.failures:
            raise LxdError(f"{method} {path}: {self.failures.pop(0)}", status=500)
        return {}


async def test_the_forkfile_race_is_retried():
    client = Flaky([RACE, RACE])
    await client.push_file("c1", "/etc/x", b"data")
    assert client.calls == 3


async def test_other_errors_are_not_retried():
    client = Flaky(["Permission denied"])
    with pytest.raises(LxdError, match="Permission denied"):
        await client.make_directory("c1", "/etc/x")
    assert client.calls == 1


async def test_a_race_that_persists_is_reported_as_a_failed_file_helper():
    client = Flaky([RACE] * 50)
    client.file_race_budget = 0.5  # the real budget is 5 s
    with pytest.raises(FileHelperFailed, match="forkfile"):
        await client.make_symlink("c1", "/etc/x", "y")
    assert 3 <= client.calls <= 5  # back-off: 0.1, 0.2, 0.4 s
