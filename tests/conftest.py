"""Shared fixtures for the hub and browser tests (tests/e2e), and their failure reports.

- Every test's report gets the tail of the log of each hub still running when it failed
  (hubs held by fixtures; `testbench.hubtools.running_hub` prints its own when its block
  raises), plus ``hub.diagnostics()`` if a test set it (e.g. the containers' logs).
- ``output_dir``: ``test-output/<module>/<test>/`` under the repository, emptied when the test
  starts and kept afterwards, for screenshots and other artefacts worth looking at.
- At the start and the end of a run that uses a daemon, the network ACLs test hubs left on
  the test bridges are removed.
- ``browser``: headless Debian Chromium driven by Playwright (async API) through
  ``executable_path``; Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from testbench.hubtools import (
    CHROMIUM,
    CHROMIUM_ARGS,
    HUBS,
    REPO,
    chromium_missing,
    forget_network_acls,
    forget_volumes,
)

OUTPUT_ROOT = Path(os.environ.get("LXDSPAWNER_TEST_OUTPUT", REPO / "test-output"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when in ("call", "setup"):
        for hub in list(HUBS):
            report.sections.append((f"hub log ({hub.workdir})", hub.log_tail(150)))
            diagnostics = hub.diagnostics
            if diagnostics is not None:
                try:
                    text = diagnostics()
                except Exception as e:  # a report must not hide the failure
                    text = f"(diagnostics failed: {e!r})"
                report.sections.append((f"diagnostics ({hub.workdir})", text))


#: The tiers whose tests use the host's daemons (and so their bridges). The cluster tier has
#: daemons of its own, and runs beside the others (scripts/run-tests.sh): it must not take
#: their hubs' ACLs off.
DAEMON_TIERS = ("integration", "e2e")
_uses_daemons = False
#: Set for sessions that share the host's daemons with another session (scripts/run-tests.sh
#: does not run such sessions now: see there): neither may take the other's hubs' ACLs and
#: volumes away at its start or end, so whoever runs them does that before and after them.
SHARED_DAEMONS = "LXDSPAWNER_TEST_SHARED_DAEMONS"


def pytest_collection_finish(session):
    """No test hub's network ACL from an earlier, interrupted run may hold on the bridges.

    Only when a selected test uses a daemon: the unit tier (``make unit``) never talks to one,
    so it cannot take the ACLs off hubs that other runs have up meanwhile."""
    global _uses_daemons
    _uses_daemons = not os.environ.get(SHARED_DAEMONS) and any(
        Path(str(item.fspath)).parent.name in DAEMON_TIERS
        and item.get_closest_marker("nodaemon") is None
        for item in session.items
    )
    if _uses_daemons:
        asyncio.run(forget_network_acls(None))
        asyncio.run(forget_volumes(None))


def pytest_sessionfinish(session, exitstatus):
    """Nor from this run, once it is over."""
    if _uses_daemons:
        asyncio.run(forget_network_acls(None))
        asyncio.run(forget_volumes(None))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


@pytest.fixture
def output_dir(request) -> Path:
    """A directory for this test's artefacts, kept after the run (test-output/...)."""
    module = _slug(Path(request.node.path).stem)
    path = OUTPUT_ROOT / module / _slug(request.node.name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def chromium_args() -> list[str]:
    return list(CHROMIUM_ARGS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    """One headless Chromium per test module (each test opens its own context)."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # launch() gives every browser a fresh temporary profile (user-data-dir).
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()
