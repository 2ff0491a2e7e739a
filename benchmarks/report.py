"""The spawn benchmark's figures: the analysis of what ``measure.py`` recorded, the printed
report (against the issue's targets), and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import benchlib as bl
from . import loopwatch
from .setups import API_COUNTER, LOOP_RESOLUTION, LOOPWATCH_INTERVAL, POLL_INTERVAL, Setup, say

TARGETS = {
    "spawn_ratio": ("<=", 1.3),
    "burst_ratio": ("<=", 1.2),
    "stop_ratio": ("<=", 1.0),
    "stop_burst_ratio": ("<=", 1.0),
    "memory_ratio": ("<=", 1.3),
    "api_requests_per_poll_per_server": ("<=", 0.0),
    "loop_lag_p99_s": ("<", 0.050),
    # Seconds, not a ratio: a spawn with an existing home volume against one without.
    "volume_existing_extra_s": ("<=", 0.2),
}

#: The volume phase's spawns: key in the data → label in the report.
VOLUME_KINDS = (
    ("none", "spawn without a volume"),
    ("first", "first spawn, creates the volume"),
    ("existing", "spawn, the volume exists"),
)

# Names of the parts of a spawn, in order, as shown in the report and the plot.
FLOOR_PARTS = (
    ("server start", "POST until the server logs that it listens (hub work, fork, imports)"),
    ("hub notices", "server listening until the hub reports it ready (the hub's back-off)"),
    ("first request", "hub ready until a request through the proxy answers"),
)
LXD_PARTS = (
    ("hub", "POST until start()'s first step (hub work, lookups, hub address)"),
    ("create", "spawner: create the container (POST /1.0/instances, clone)"),
    ("push", "spawner: push the env file and the unit"),
    ("start", "spawner: start the container"),
    ("ipv4", "spawner: boot until it has an IPv4"),
    ("server", "spawner: until the server answers HTTP"),
    ("hub notices", "start() returned until the hub reports it ready"),
    ("first request", "hub ready until a request through the proxy answers"),
)


def _parts_of(key: str, rec: dict) -> tuple[dict[str, float], float | None]:
    """One single spawn cut into its parts (seconds), and when its server said it listens."""
    parts: dict[str, float] = {}
    at = rec.get("server_running_at")
    listening = at - rec["wall0"] if at is not None else None
    if listening is not None and not 0 < listening < rec["spawn_s"] + 5:
        listening = None  # a clock or time zone we cannot compare with
    if key == "floor":
        if listening is not None:
            parts["server start"] = listening
            parts["hub notices"] = rec["ready_s"] - listening
    else:
        sp = rec.get("spawner")
        if sp:
            steps = {k: v for k, v in sp["timings"].items() if k != "total"}
            # The log line is written when start() returns; its steps run back to back.
            parts["hub"] = sp["t"] - sum(steps.values()) - rec["wall0"]
            parts.update(steps)
            parts["hub notices"] = rec["wall0"] + rec["ready_s"] - sp["t"]
    parts["first request"] = rec["spawn_s"] - rec["ready_s"]
    return parts, listening


def breakdown(floor: Setup, lxd: Setup) -> dict:
    """Where single spawns' time goes: per part, the median over spawns; and the parts of
    the typical spawn (the one with the median duration), which add up to its duration."""
    result: dict[str, Any] = {"listening": {}, "typical": {}}
    for key, setup, names_ in (("floor", floor, FLOOR_PARTS), ("lxd", lxd, LXD_PARTS)):
        recs = setup.data.get("single", [])
        cut = [_parts_of(key, r) for r in recs]
        values: dict[str, list] = {name: [] for name, _ in names_}
        for parts, _ in cut:
            for k, v in parts.items():
                values.setdefault(k, []).append(v)
        result[key] = {k: {"median": bl.median(v), "values": v} for k, v in values.items()}
        result["listening"][key] = bl.median([at for _, at in cut if at is not None])
        if recs:
            mid = bl.median([r["spawn_s"] for r in recs])
            i = min(range(len(recs)), key=lambda j: abs(recs[j]["spawn_s"] - mid))
            result["typical"][key] = {
                "user": recs[i]["user"],
                "spawn_s": recs[i]["spawn_s"],
                "parts": cut[i][0],
                "listening": cut[i][1],
            }
    return result


def burst_steps(lxd: Setup) -> dict:
    """Medians of the spawner's steps across all spawns of lxdspawner's bursts."""
    steps: dict[str, list] = {}
    for b in lxd.data.get("burst", []):
        for sp in b.get("spawner") or []:
            for k, v in ((sp or {}).get("timings") or {}).items():
                steps.setdefault(k, []).append(v)
    return {k: bl.median(v) for k, v in steps.items()}


def volume_analysis(lxd: Setup) -> dict:
    """The volume phase: per kind of spawn, the summary and the parts of the spawns (medians);
    the extra seconds of a first spawn and of one with an existing volume over a spawn
    without: medians' and p95s' differences, and the median of the differences within each
    repetition (whose three spawns ran back to back)."""
    recs = lxd.data.get("volume", [])
    by_kind = {k: [r for r in recs if r["kind"] == k] for k, _ in VOLUME_KINDS}
    summary = {k: bl.summary([r["spawn_s"] for r in rs]) for k, rs in by_kind.items()}
    stops = {k: bl.summary([r["stop_s"] for r in rs]) for k, rs in by_kind.items()}
    parts: dict[str, dict[str, float | None]] = {}
    for k, rs in by_kind.items():
        values: dict[str, list] = {}
        for r in rs:
            for name, v in _parts_of("lxd", r)[0].items():
                values.setdefault(name, []).append(v)
        parts[k] = {name: bl.median(v) for name, v in values.items()}

    def diff(kind: str, stat: str) -> float | None:
        a, b = summary[kind][stat], summary["none"][stat]
        return None if a is None or b is None else a - b

    def paired(kind: str) -> float | None:
        base = {r["rep"]: r["spawn_s"] for r in by_kind["none"]}
        return bl.median([r["spawn_s"] - base[r["rep"]] for r in by_kind[kind] if r["rep"] in base])

    return {
        "summary": summary,
        "stop_summary": stops,
        "parts_median_s": parts,
        "existing_extra_s": diff("existing", "median"),
        "existing_extra_p95_s": diff("existing", "p95"),
        "existing_extra_paired_s": paired("existing"),
        "first_extra_s": diff("first", "median"),
        "first_extra_p95_s": diff("first", "p95"),
        "first_extra_paired_s": paired("first"),
    }


def analyse(floor: Setup, lxd: Setup, poll: dict | None, meta: dict) -> dict:
    def singles(s: Setup, key: str) -> list:
        return [r[key] for r in s.data.get("single", [])]

    def mem(s: Setup, key: str = "bytes") -> list:
        return [r["memory"].get(key) for r in s.data.get("single", [])]

    def bursts(s: Setup, key: str) -> list:
        return [b[key] for b in s.data.get("burst", []) if b.get(key) is not None]

    def cpu(s: Setup, phase: str, who: str) -> list:
        return [r[phase][who] for r in s.data.get("single", []) if r[phase].get(who) is not None]

    metrics = {
        "spawn_s": (singles(floor, "spawn_s"), singles(lxd, "spawn_s")),
        "burst_s": (bursts(floor, "wall_s"), bursts(lxd, "wall_s")),
        "stop_s": (singles(floor, "stop_s"), singles(lxd, "stop_s")),
        "stop_burst_s": (bursts(floor, "stop_wall_s"), bursts(lxd, "stop_wall_s")),
        "memory_bytes": (mem(floor), mem(lxd)),
        "memory_in_burst_bytes": (
            [m for b in floor.data.get("burst", []) for m in b["memory_bytes"]],
            [m for b in lxd.data.get("burst", []) for m in b["memory_bytes"]],
        ),
        # Not targets; what explains the figures above.
        "memory_working_set_bytes": (mem(floor), mem(lxd, "working_set")),
        "memory_processes_rss_bytes": (mem(floor), mem(lxd, "procs_rss")),
        "memory_server_rss_bytes": (mem(floor), mem(lxd, "server_rss")),
        "server_cpu_s": (mem(floor, "cpu_s"), mem(lxd, "cpu_s")),
        "hub_cpu_per_spawn_s": (cpu(floor, "cpu_spawn_s", "hub"), cpu(lxd, "cpu_spawn_s", "hub")),
        "daemon_cpu_per_spawn_s": ([], cpu(lxd, "cpu_spawn_s", "daemon")),
        "hub_cpu_per_stop_s": (cpu(floor, "cpu_stop_s", "hub"), cpu(lxd, "cpu_stop_s", "hub")),
        "daemon_cpu_per_stop_s": ([], cpu(lxd, "cpu_stop_s", "daemon")),
    }
    summary = {}
    for name, (f, x) in metrics.items():
        fs, xs = bl.summary(f), bl.summary(x)
        summary[name] = {"floor": fs, "lxd": xs, "ratio": bl.ratio(xs["median"], fs["median"])}

    def loop_p99(s: Setup) -> tuple[float | None, bool]:
        """p99 over all bursts of a setup: every observation and logged lag pooled."""
        obs = sum(b["loop"]["observations"] for b in s.data.get("burst", []))
        lags = [x for b in s.data.get("burst", []) for x in b["loop"]["logged_lags_s"]]
        return bl.exact_p99_from_log(obs, lags, LOOP_RESOLUTION)

    lxd_p99, lxd_bound = loop_p99(lxd)
    floor_p99, floor_bound = loop_p99(floor)
    volumes = volume_analysis(lxd)
    result = {
        "spawn_ratio": summary["spawn_s"]["ratio"],
        "burst_ratio": summary["burst_s"]["ratio"],
        "stop_ratio": summary["stop_s"]["ratio"],
        "stop_burst_ratio": summary["stop_burst_s"]["ratio"],
        "memory_ratio": summary["memory_bytes"]["ratio"],
        "api_requests_per_poll_per_server": (poll or {}).get("per_poll_per_server"),
        "api_requests_per_poll_per_server_net": (poll or {}).get("per_poll_per_server_net"),
        "api_requests_source": (poll or {}).get("source", "not measured"),
        "loop_lag_p99_s": lxd_p99,
        "loop_lag_p99_is_upper_bound": lxd_bound,
        "loop_lag_p99_floor_s": floor_p99,
        "loop_lag_p99_floor_is_upper_bound": floor_bound,
        "volume_existing_extra_s": volumes["existing_extra_s"],
        "volume_first_extra_s": volumes["first_extra_s"],
        "volumes": volumes,
        "summary": summary,
        "breakdown": breakdown(floor, lxd),
        "burst_steps_median_s": burst_steps(lxd),
        "poll": poll,
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "failures": {"floor": floor.data.get("failures", []), "lxd": lxd.data.get("failures", [])},
        "meta": meta,
        "raw": {"floor": floor.data, "lxd": lxd.data},
    }
    lx = lxd.data.get("single", [])
    for key in ("api_requests_spawn", "api_requests_stop", "api_requests_idle"):
        vals = [r[key] for r in lx if key in r]
        result[key + "_median"] = bl.median(vals)
    result["targets_met"] = {k: target_met(k, result.get(k)) for k in TARGETS}
    return result


def loop_by_database(rounds: list[tuple[str, Setup, Setup]]) -> dict:
    """The event-loop lag of each setup's hub during the bursts, per database (``--db``):
    p50 and p99 (exact, from the histogram's count and the logged lags, as `analyse`), the
    logged lags themselves (every one of at least the resolution), their sum (how long the
    loop was held in all), the burst's wall time, and with ``--loop-debug`` the places in
    the code that held it most (`loopwatch`)."""
    out: dict[str, dict] = {}
    for db, *setups in rounds:
        out[db] = {}
        for s in setups:
            bursts = s.data.get("burst", [])
            obs = sum(b["loop"]["observations"] for b in bursts)
            lags = [x for b in bursts for x in b["loop"]["logged_lags_s"]]
            p50, p50_bound = bl.exact_p99_from_log(obs, lags, LOOP_RESOLUTION, q=0.50)
            p99, p99_bound = bl.exact_p99_from_log(obs, lags, LOOP_RESOLUTION)
            samples = [tuple(x) for b in bursts for x in b.get("loop_samples") or []]
            out[db][s.key] = {
                "bursts": len(bursts),
                "observations": obs,
                "lags_logged_s": lags,
                "lags_sum_s": sum(lags),
                "max_lag_s": max(lags) if lags else None,
                "p50_s": p50,
                "p50_is_upper_bound": p50_bound,
                "p99_s": p99,
                "p99_is_upper_bound": p99_bound,
                "burst_wall_median_s": bl.median([b["wall_s"] for b in bursts if b.get("wall_s")]),
                "loop_samples": len(samples),
                "held_by": loopwatch.top(samples, LOOPWATCH_INTERVAL),
            }
    return out


def database_report(by_db: dict) -> str:
    """The table of `loop_by_database`, and where the loop was held when it was watched."""

    def lag(v: float | None, bound: bool) -> str:
        return "n/a" if v is None else ("<" if bound else "") + bl.fmt(v, "ms")

    rows = []
    for db, setups in by_db.items():
        for key, d in setups.items():
            rows.append([
                f"{db}, {key}",
                lag(d["p50_s"], d["p50_is_upper_bound"]), lag(d["p99_s"], d["p99_is_upper_bound"]),
                bl.fmt(d["max_lag_s"], "ms"), str(len(d["lags_logged_s"])),
                bl.fmt(d["lags_sum_s"], "ms"), str(d["observations"]),
                bl.fmt(d["burst_wall_median_s"]), str(d["bursts"]),
            ])  # fmt: skip
    header = ["loop lag in bursts (ms)", "p50", "p99", "max", f">={LOOP_RESOLUTION * 1000:.0f}",
              "sum", "samples", "burst (s)", "n"]  # fmt: skip
    out = [bl.table(rows, header)]
    for db, setups in by_db.items():
        for key, d in setups.items():
            if d["held_by"]:
                out.append(
                    f"  the loop held, {db}, {key}: {d['loop_samples']} samples of "
                    f"{LOOPWATCH_INTERVAL * 1000:.0f} ms (samples, ~ms, longest hold ms, where):"
                )
                out.extend(
                    f"    {r['samples']:4d} {r['held_s'] * 1000:6.0f} "
                    f"{r['longest_s'] * 1000:5.0f}  {r['where']}"
                    for r in d["held_by"][:8]
                )
    return "\n".join(out)


def target_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value < target


def report(result: dict) -> str:
    s = result["summary"]
    met = result["targets_met"]

    def mark(key: str) -> str:
        return {True: "yes", False: "NO", None: "?"}[met.get(key)]

    def row(label: str, name: str, unit: str, key: str | None) -> list[str]:
        f, x = s[name]["floor"], s[name]["lxd"]
        r = s[name]["ratio"]
        op, target = TARGETS[key] if key else ("", None)
        return [
            label,
            bl.fmt(f["median"], unit), bl.fmt(f["p95"], unit),
            bl.fmt(x["median"], unit), bl.fmt(x["p95"], unit),
            (bl.fmt(r) + "x") if r is not None else "",
            f"{op} {target}x" if key else "", mark(key) if key else "",
            f"{f['n']}/{x['n']}",
        ]  # fmt: skip

    rows = [
        row("single spawn (s)", "spawn_s", "s", "spawn_ratio"),
        row("burst of 10, all ready (s)", "burst_s", "s", "burst_ratio"),
        row("stop (s)", "stop_s", "s", "stop_ratio"),
        row("10 stops at once (s)", "stop_burst_s", "s", "stop_burst_ratio"),
        row("idle memory per server (MiB)", "memory_bytes", "MiB", "memory_ratio"),
    ]
    api = result["api_requests_per_poll_per_server"]
    rows.append([
        "LXD API requests/poll/server", "", "", bl.fmt(api), "", "", "0",
        mark("api_requests_per_poll_per_server"), "",
    ])  # fmt: skip

    def lag(v: float | None, bound: bool) -> str:
        return "n/a" if v is None else ("<" if bound else "") + bl.fmt(v, "ms")

    rows.append([
        "loop lag p99 in bursts (ms)",
        lag(result["loop_lag_p99_floor_s"], result["loop_lag_p99_floor_is_upper_bound"]), "",
        lag(result["loop_lag_p99_s"], result["loop_lag_p99_is_upper_bound"]), "", "",
        "< 50 ms", mark("loop_lag_p99_s"), "",
    ])  # fmt: skip
    header = ["metric", "floor med", "p95", "lxd med", "p95", "ratio", "target", "met", "n"]
    out = []
    keys = result["meta"].get("setups") or ["floor", "lxd"]
    if result.get("peer"):
        out.append("side by side (median, p95; ratio of medians against the floor):")
        out.append(bl.peer_table(result["peer"], keys))
        sizes = (result["raw"].get("lxdpool") or {}).get("pool_memory_bytes")
        if sizes:
            out.append(
                f"  lxdpool's warm pool, idle: {bl.fmt(bl.median(sizes), 'MiB')} MiB per member "
                f"(median of {len(sizes)}), {sum(sizes) / 2**20:.0f} MiB in all"
            )
        out.append("\nlxdspawner against the floor and the targets:")
    out.append(bl.table(rows, header))
    dbs = result["meta"].get("databases") or ["sqlite"]
    if len(dbs) > 1:
        out.append(f"  (hubs on {dbs[0]}: the first round; the bursts on each database below)")

    if result.get("databases"):
        out.append("\n" + database_report(result["databases"]))

    volumes = result.get("volumes") or {}
    if any(v["n"] for v in (volumes.get("summary") or {}).values()):
        out.append("\n" + volume_report(result))

    out.append("\nwhat explains them (not targets):")
    rows = [
        row("memory, 10 running (MiB/server)", "memory_in_burst_bytes", "MiB", None),
        row("memory: working set (MiB)", "memory_working_set_bytes", "MiB", None),
        row("memory: processes' RSS (MiB)", "memory_processes_rss_bytes", "MiB", None),
        row("memory: the server's RSS (MiB)", "memory_server_rss_bytes", "MiB", None),
        row("CPU to start a server (s)", "server_cpu_s", "s", None),
        row("hub CPU per spawn (s)", "hub_cpu_per_spawn_s", "s", None),
        row("daemon CPU per spawn (s)", "daemon_cpu_per_spawn_s", "s", None),
        row("hub CPU per stop (s)", "hub_cpu_per_stop_s", "s", None),
        row("daemon CPU per stop (s)", "daemon_cpu_per_stop_s", "s", None),
    ]
    out.append(bl.table(rows, header))
    poll = result.get("poll") or {}
    if not poll:
        out.append("  polling: phase skipped (--poll-cycles 0)")
    elif result["api_requests_source"] != API_COUNTER:
        out.append(f"  API requests: {API_COUNTER} is not on /hub/metrics: figure unavailable")
    elif poll.get("requests") is not None:
        idle = poll.get("no_servers") or {}
        out.append(
            f"  polling: {poll['requests']:.0f} LXD API requests in {poll['window_s']:.0f} s with "
            f"{poll.get('running')} servers (poll_interval {POLL_INTERVAL:g} s); "
            f"{idle.get('requests', 'n/a')} in the same time with none; the daemon logged "
            f"{poll.get('daemon_saw_for_our_instances')} naming our instances"
            + (f": {sample[:4]}" if (sample := poll.get("daemon_requests_sample")) else "")
        )
    for k, what in (("api_requests_spawn_median", "spawn"), ("api_requests_stop_median", "stop")):
        if result.get(k) is not None:
            out.append(f"  LXD API requests per {what} (median): {result[k]:.0f}")
    out.append("\nwhere a single spawn's time goes (medians, s):")
    for key in ("floor", "lxd"):
        b = result["breakdown"][key]
        parts = ", ".join(f"{n} {v['median']:.2f}" for n, v in b.items() if v["median"] is not None)
        out.append(f"  {key:5s}: {parts}")
    listening = result["breakdown"]["listening"]
    if listening.get("lxd") is not None:
        out.append(
            f"  the server itself logged that it listens {listening['lxd']:.2f} s after the "
            f"POST in a container, {bl.fmt(listening.get('floor'))} s as a local process "
            "(medians)"
        )
    steps = result.get("burst_steps_median_s") or {}
    if steps:
        out.append("  lxd in the bursts: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    boot = result["raw"]["lxd"].get("boot_analysis") or {}
    if boot.get("critical_chain"):
        chain = [
            ln
            for ln in boot["critical_chain"].splitlines()
            if ("@" in ln or "+" in ln) and not ln.startswith("The time")
        ]
        out.append(
            "  container boot (first single spawn): "
            + (boot.get("summary") or "").splitlines()[0]
            + "\n    "
            + "\n    ".join(chain[:8])
        )
    meta = result["meta"]
    out.append(
        f"\nnoise: load average {meta['loadavg_start'][0]:.1f} at the start, "
        f"{meta.get('loadavg_end', [float('nan')])[0]:.1f} at the end, on {meta['cpus']} CPUs; "
        f"{meta['other_running_instances_start']} / {meta.get('other_running_instances_end')} "
        "other running instances on this daemon at start / end"
    )
    for key in result["failures"]:
        for f in result["failures"][key]:
            out.append(f"  FAILURE ({key}): {f}")
    return "\n".join(out)


def volume_report(result: dict) -> str:
    """The volume phase's table: each kind of spawn, and its extra over one without."""
    v = result["volumes"]
    s = v["summary"]
    op, target = TARGETS["volume_existing_extra_s"]
    mark = {True: "yes", False: "NO", None: "?"}[result["targets_met"]["volume_existing_extra_s"]]

    def signed(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    rows = []
    for kind, label in VOLUME_KINDS:
        extra = kind != "none"
        rows.append([
            f"{label} (s)",
            bl.fmt(s[kind]["median"]), bl.fmt(s[kind]["p95"]),
            signed(v[f"{kind}_extra_s"]) if extra else "",
            signed(v[f"{kind}_extra_p95_s"]) if extra else "",
            signed(v[f"{kind}_extra_paired_s"]) if extra else "",
            f"{op} +{target} s" if kind == "existing" else "",
            mark if kind == "existing" else "",
            str(s[kind]["n"]),
        ])  # fmt: skip
    header = ["home volumes (lxd)", "median", "p95", "- none med", "p95", "paired", "target",
              "met", "n"]  # fmt: skip
    out = [bl.table(rows, header)]
    out.append(
        "  (- none: minus the spawn without a volume, medians and p95s; paired: median of\n"
        "  the differences within each repetition, whose three spawns ran back to back)"
    )
    parts = v["parts_median_s"]
    names = [n for n, _ in LXD_PARTS if any(n in parts[k] for k, _ in VOLUME_KINDS)]
    for kind, _ in VOLUME_KINDS:
        p = parts[kind]
        out.append(
            f"  {kind:8s}: "
            + ", ".join(f"{n} {bl.fmt(p.get(n))}" for n in names)
            + f"; stop {bl.fmt(v['stop_summary'][kind]['median'])}"
        )
    out.append("  (medians, s; the volume's lookup and creation are in 'hub', before 'create')")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        say("--plot: matplotlib is not installed in this venv (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = result["raw"]
    colors = {"floor": "#4c72b0", "lxd": "#dd8452", "docker": "#55a868", "lxdpool": "#c44e52"}
    labels = {
        "floor": "floor (local process)",
        "lxd": "lxdspawner (Incus)",
        "docker": "DockerSpawner (docker.io)",
        "lxdpool": "warm pool (lxdspawner)",
    }
    keys = [k for k in ("floor", "lxd", "lxdpool", "docker") if k in raw]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1.2, 1.5]})

    ax = axes[0]
    data = [[r["spawn_s"] for r in raw[k].get("single", [])] for k in keys]
    ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
    for i, (k, values) in enumerate(zip(keys, data, strict=True), start=1):
        xs = [i + (j % 7 - 3) * 0.04 for j in range(len(values))]
        ax.scatter(xs, values, color=colors[k], zorder=3, s=24, alpha=0.85)
    ax.set_xticks(
        range(1, len(keys) + 1), [labels[k].replace(" (", "\n(") for k in keys], fontsize=8
    )
    ax.set_ylabel("seconds")
    ax.set_title("single spawn: POST → ready → first request")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    styles = {"burst": "-", "changeover_next": ":", "burst30": "-.", "burst50": "--"}
    names = {"burst": "burst of 10", "changeover_next": "10 right after 10 stopped",
             "burst30": "burst of 30", "burst50": "burst of 50"}  # fmt: skip
    for k in keys:
        for kind, style in styles.items():
            per_user = sorted(t for b in raw[k].get(kind, []) for t in b["per_user_s"])
            if not per_user:
                continue
            ys = [0.0] + [(i + 1) / len(per_user) for i in range(len(per_user))]
            ax.step(
                [0.0, *per_user], ys, where="post", color=colors[k], ls=style,
                label=f"{labels[k].split(' (')[0]}, {names[kind]}",
            )  # fmt: skip
    ax.set_xlabel("seconds after the POSTs (all bursts of a kind pooled)")
    ax.set_ylabel("fraction of users ready")
    ax.set_title("bursts: users ready over time")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)

    ax = axes[2]
    part_colors = {
        "hub": "#b0b0b0", "create": "#55a868", "push": "#8172b2", "start": "#c44e52",
        "ipv4": "#ccb974", "server": "#64b5cd", "server start": "#64b5cd",
        "hub notices": "#937860", "first request": "#da8bc3",
    }  # fmt: skip
    typical = result["breakdown"]["typical"]
    seen = set()
    for row, key in enumerate(("floor", "lxd")):
        t = typical.get(key)
        if not t:
            continue
        left = 0.0
        for name, v in t["parts"].items():
            width = max(v, 0.0)
            color = part_colors.get(name, "#4c72b0")
            ax.barh(
                row, width, left=left, color=color, edgecolor="white",
                label=None if name in seen else name,
            )  # fmt: skip
            seen.add(name)
            left += width
        ax.text(left + 0.05, row, f"{t['spawn_s']:.2f} s", va="center", fontsize=9)
        if t.get("listening") is not None:
            at = t["listening"]
            ax.plot([at, at], [row - 0.42, row + 0.42], color="black", lw=1.5)
            ax.text(at, row + 0.45, "server listens", ha="center", fontsize=8)
    ax.set_yticks([0, 1], [labels["floor"], labels["lxd"]])
    ax.set_xlabel("seconds (the spawn of median duration of each setup)")
    ax.set_title("where a single spawn's time goes")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8)

    meta = result["meta"]
    title = (
        f"lxdspawner vs local-process floor: {meta['mode']} run {meta['started']}, "
        f"{meta['cpus']} CPUs, load {meta['loadavg_start'][0]:.1f}; spawn "
        f"{bl.fmt(result['spawn_ratio'])}×, burst {bl.fmt(result['burst_ratio'])}×, stop "
        f"{bl.fmt(result['stop_ratio'])}×, memory {bl.fmt(result['memory_ratio'])}× the floor"
    )
    ratios = {
        r["metric"]: r["ratio"].get("docker")
        for r in result.get("peer") or []
        if r["ratio"].get("docker") is not None
    }
    if ratios:
        title += (
            "\nDockerSpawner: "
            + ", ".join(
                f"{m.split(' (')[0]} {bl.fmt(v)}×"
                for m, v in ratios.items()
                if m in ("single spawn (s)", "burst of 10, all ready (s)", "stop (s)")
            )
            + " the floor"
        )
    if meta.get("lxd_config_extra"):
        title += f"\nlxdspawner's hub with: {meta['lxd_config_extra']}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    say(f"plot written to {path}")
