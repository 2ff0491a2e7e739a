"""Prometheus metrics, served on the hub's own /hub/metrics with JupyterHub's.

- ``lxdspawner_api_requests_total{endpoint}``: requests made to each daemon by this hub
  (read from the shared clients when scraped, so counting costs nothing per request);
- ``lxdspawner_spawn_step_seconds{step}``: where spawns spend their time (create, push,
  start, ipv4, prepare, server, total).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily

SPAWN_STEP_SECONDS = Histogram(
    "lxdspawner_spawn_step_seconds",
    "Seconds spent in each step of a spawn",
    ["step"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120),
)


class _RequestCounts:
    def __init__(self, clients: Callable[[], Iterable]):
        self._clients = clients

    def collect(self):
        family = CounterMetricFamily(
            "lxdspawner_api_requests", "Requests made to the LXD/Incus daemon", labels=["endpoint"]
        )
        totals: dict[str, int] = {}
        for client in self._clients():
            totals[client.where] = totals.get(client.where, 0) + client.request_count
        for where, count in totals.items():
            family.add_metric([where], count)
        yield family


_registered = False


def register_request_counts(clients: Callable[[], Iterable]) -> None:
    """Expose the request counts of ``clients()`` (once per process)."""
    global _registered
    if not _registered:
        REGISTRY.register(_RequestCounts(clients))
        _registered = True


def observe_spawn(timings: dict[str, float]) -> None:
    for step, seconds in timings.items():
        SPAWN_STEP_SECONDS.labels(step=step).observe(seconds)
