"""How long one placement decision takes on a large cluster.

    .venv/bin/python benchmarks/placement.py [--members 1000] [--instances 100000]

Two ways to decide, both printed:

- ``members_from_api + policy``: from the raw answers of ``/1.0/cluster/members?recursion=1``
  and ``/1.0/instances?recursion=1`` (instance objects shaped like LXD's, a tenth of them not
  ours). Its cost is one pass over every instance object: on this 2-core machine merely
  touching 100,000 separate dicts takes about 10 ms, so this is a one-off (a CLI, a resync),
  not something to do per spawn.
- ``members_from_counts + policy``: from the instance counts per member that the spawner's
  shared cache keeps, which is what a spawn should do: it grows with the members only.

The issue asks for a decision in well under 10 ms at 1,000 members and 100,000 instances;
the script exits 1 when the per-spawn way (from counts) takes 10 ms or more at best, and says
so when the raw way does.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lxdspawner.objects import KEY_MANAGED, KEY_SERVER, KEY_USER, MANAGED_BY  # noqa: E402
from lxdspawner.placement import (  # noqa: E402
    PlacementRequest,
    count_by_location,
    members_from_api,
    members_from_counts,
    weighted_least_loaded,
)


def snapshot(n_members: int, n_instances: int, seed: int = 1):
    rng = random.Random(seed)
    statuses = ["Online"] * 18 + ["Offline", "Evacuated"]
    members = [
        {
            "server_name": f"node{i:04d}",
            "url": f"https://10.0.{i // 250}.{i % 250 + 1}:8443",
            "roles": [],
            "architecture": "x86_64",
            "failure_domain": "default",
            "description": "",
            "config": {},
            "groups": ["default", f"rack{i % 20}"],
            "status": rng.choice(statuses),
            "message": "Fully operational",
        }
        for i in range(n_members)
    ]
    names = [m["server_name"] for m in members]
    instances = []
    for i in range(n_instances):
        config = {
            "image.os": "Debian",
            "volatile.base_image": "4cd724750eeb" * 5,
            "volatile.eth0.hwaddr": "10:66:6a:00:00:00",
        }
        if i % 10:  # a tenth are someone else's instances
            config |= {KEY_MANAGED: MANAGED_BY, KEY_USER: f"user{i}", KEY_SERVER: ""}
        instances.append(
            {
                "name": f"jupyter-user{i}",
                "status": "Running",
                "status_code": 103,
                "type": "container",
                "location": rng.choice(names),
                "project": "default",
                "config": config,
                "devices": {},
                "profiles": ["default"],
            }
        )
    in_flight = {rng.choice(names): rng.randint(1, 3) for _ in range(30)}
    weights = {name: rng.choice([0, 1, 1, 1, 2]) for name in names}
    return members, instances, in_flight, weights


def timed(fn, repeat: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of each of ``repeat`` calls."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - t0) * 1000)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    members, instances, in_flight, weights = snapshot(args.members, args.instances)
    request = PlacementRequest("alice", "")

    def decision():
        return weighted_least_loaded(
            members_from_api(members, instances, in_flight, weights), request
        )

    counts = count_by_location(instances)

    def decision_from_counts():
        return weighted_least_loaded(
            members_from_counts(members, counts, in_flight, weights), request
        )

    chosen = decision()
    rows = [
        ("members_from_api + policy", timed(decision, args.repeat)),
        ("  of which: counting instances",
         timed(lambda: count_by_location(instances), args.repeat)),
        ("members_from_counts + policy (counts from a cache)",
         timed(decision_from_counts, args.repeat)),
    ]  # fmt: skip
    print(f"{args.members} members, {args.instances} instances; chose {chosen}")
    print(f"{'':52s} {'wall median':>12s} {'wall min':>10s} {'CPU median':>11s}")
    for label, (wall, cpu) in rows:
        print(
            f"{label:52s} {statistics.median(wall):9.2f} ms {min(wall):7.2f} ms"
            f" {statistics.median(cpu):8.2f} ms"
        )
    # The least disturbed run: on a shared machine the median includes other processes' time.
    raw, per_spawn = min(rows[0][1][0]), min(rows[2][1][0])
    if raw >= 10:
        print(
            f"NOTE: recounting {args.instances} raw instance objects takes {raw:.2f} ms at best:"
            " keep counts per member (the shared cache) instead of recounting per spawn"
        )
    if per_spawn >= 10:
        print(f"FAIL: one decision takes {per_spawn:.2f} ms at best (limit: well under 10 ms)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
