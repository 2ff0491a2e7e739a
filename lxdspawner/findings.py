"""What ``lxdspawner doctor`` reports: one :class:`Result` per finding, with its fix.

Apart from :mod:`lxdspawner.doctor` (settings, orchestration, output) so that the checks in
:mod:`lxdspawner.doctorchecks` share it without importing the orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass

from .lxd import LxdClient

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class Result:
    """One finding: ``fix`` is empty when there is nothing to do."""

    severity: str
    remote: str
    check: str
    what: str
    fix: str = ""


def _tool(client: LxdClient) -> str:
    """The command line the fixes name: ``incus`` or LXD's ``lxc``."""
    return "lxc" if client.dialect and client.dialect.product == "lxd" else "incus"
