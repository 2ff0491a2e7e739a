"""Pure helpers of the spawn benchmark: statistics, Prometheus text, hub-log parsing, tables.

No I/O, no JupyterHub or LXD imports, so they can be read (and tested) on their own; the
orchestration is in ``spawn.py`` and the modules it drives.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between order statistics.

    The same definition as numpy's default ("linear"); with few samples p95 is close to the
    maximum, which is what a reader of a 3-sample quick run should expect.
    """
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def summary(values: Sequence[float]) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "n": len(vals),
        "median": median(vals),
        "p95": percentile(vals, 95),
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- Prometheus text format ----------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and types are skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        samples.append(Sample(m.group(1), labels, value))
    return samples


def metric_sum(samples: Iterable[Sample], name: str) -> float | None:
    """Sum of all samples called ``name`` (all label sets); None if there is none."""
    found = [s.value for s in samples if s.name == name]
    return sum(found) if found else None


def histogram_buckets(samples: Iterable[Sample], name: str) -> dict[float, float]:
    """``{upper bound: cumulative count}`` of the histogram ``name`` (without ``_bucket``)."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == name + "_bucket" and "le" in s.labels:
            le = math.inf if s.labels["le"] in ("+Inf", "inf") else float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def histogram_quantile(
    q: float, before: dict[float, float], after: dict[float, float], lowest: float = 0.0
) -> tuple[float | None, float | None]:
    """Quantile q (0..1) of the observations made between two histogram snapshots.

    Returns (estimate, bucket upper bound), the estimate interpolated linearly inside the
    bucket as Prometheus' ``histogram_quantile`` does (from ``lowest`` in the first bucket).
    """
    bounds = sorted(after)
    delta = [(le, after[le] - before.get(le, 0.0)) for le in bounds]
    if not delta or delta[-1][1] <= 0:
        return None, None
    total = delta[-1][1]
    rank = q * total
    prev_le, prev_count = lowest, 0.0
    for le, count in delta:
        if count >= rank:
            if math.isinf(le):
                return prev_le, le
            if count == prev_count:
                return le, le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count), le
        prev_le, prev_count = le, count
    return None, None


def exact_p99_from_log(
    observations: int, logged: Sequence[float], threshold: float, q: float = 0.99
) -> tuple[float | None, bool]:
    """p99 of the event-loop lag from the histogram's count and the hub's own warnings.

    JupyterHub logs every lag at or above its ``event_loop_interval_log_threshold``; with the
    threshold equal to the resolution, every lag it can resolve is in the log, and the
    remaining ``observations - len(logged)`` samples are below ``threshold``. Returns (value,
    is_upper_bound): (threshold, True) when the quantile falls among the unresolved ones.
    """
    if observations <= 0:
        return None, False
    below = max(0, observations - len(logged))
    rank = math.ceil(q * observations)  # 1-based
    if rank <= below:
        return threshold, True
    ordered = sorted(logged)
    index = min(len(ordered) - 1, rank - below - 1)
    return ordered[index], False


# -- the hub's log ---------------------------------------------------------------------------

_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})"
_TIMINGS = re.compile(
    r"\[\w " + _TS + r"[^\]]*\] (\S+): container (\S+) running at (\S+):(\d+) "
    r"\(timings (\{[^}]*\})\)"
)
_TOOK = re.compile(r"\[\w " + _TS + r"[^\]]*\] User (\S+) took ([\d.]+) seconds to start")
_STOP_TOOK = re.compile(
    r"\[\w " + _TS + r"[^\]]*\] User (\S+) server took ([\d.]+) seconds to stop"
)
_RUNNING_AT = re.compile(r"\[\w " + _TS + r"[^\]]*\] .*is running at:?")
_LOOP = re.compile(r"Event loop was unresponsive for at least ([\d.]+)s")


def log_time(ts: str) -> float:
    """A hub log timestamp (local time, ms) → epoch seconds."""
    return datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def spawn_timings(log: str) -> dict[str, dict]:
    """``{user: {"t": epoch of the log line, "instance": ..., "timings": {...}}}``.

    From lxdspawner's ``<user>: container <name> running at <ip>:<port> (timings {...})``;
    the last line per user wins.
    """
    found = {}
    for m in _TIMINGS.finditer(log):
        try:
            timings = ast.literal_eval(m.group(6))
        except (ValueError, SyntaxError):
            continue
        found[m.group(2)] = {
            "t": log_time(m.group(1)),
            "instance": m.group(3),
            "ip": m.group(4),
            "timings": {k: float(v) for k, v in timings.items()},
        }
    return found


def hub_took(log: str, stop: bool = False) -> dict[str, tuple[float, float]]:
    """``{user: (epoch of the line, seconds)}`` from the hub's "User x took N seconds to
    start" (or "... server took N seconds to stop") lines; the last per user wins."""
    pattern = _STOP_TOOK if stop else _TOOK
    return {m.group(2): (log_time(m.group(1)), float(m.group(3))) for m in pattern.finditer(log)}


def first_running_at(log: str) -> float | None:
    """Epoch of the first "Jupyter Server ... is running at" line (a local server's)."""
    m = _RUNNING_AT.search(log)
    return log_time(m.group(1)) if m else None


def loop_lags(log: str) -> list[float]:
    """The lags (s) of JupyterHub's "Event loop was unresponsive for at least Ns!" lines."""
    return [float(x) for x in _LOOP.findall(log)]


# -- output ---------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if unit == "MiB":
        return f"{value / 2**20:.0f}"
    if unit == "ms":
        return f"{value * 1000:.0f}"
    return f"{value:.{digits}f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# -- scenarios and setups (the command line) ---------------------------------------------------

#: What a run can measure (``--scenarios``), in the order a run measures them.
SCENARIOS = {
    "single": "single spawns and stops, one at a time (idle memory, CPU, the breakdown)",
    "volumes": "lxd only: a spawn without a home volume, a first spawn, an existing volume",
    "burst10": "10 users pressing Start together, then the 10 stopped at once",
    "burst30": "30 users together, then the 30 stopped at once",
    "burst50": "50 users together, then the 50 stopped at once",
    "changeover": "a class changeover: a burst of 10, stopped, and 2 s later the next 10",
    "idle100": "100 idle servers (--idle-servers): memory, hub CPU, poll cost, one more spawn",
    "poll": "lxd only: LXD API requests per poll per server with 20 servers running",
}
#: ``--quick``'s scenarios: a few minutes on 2 cores with the three setups.
QUICK_SCENARIOS = ("single", "burst10", "changeover")
#: The setups a run can compare; the first two always run (the floor is what the ratios are
#: against, lxd what is measured).
SETUPS = ("floor", "lxd", "docker", "lxdpool")
#: The bursts each scenario makes: the warm pool of lxdpool is sized for the largest.
BURST_SIZES = {"burst10": 10, "burst30": 30, "burst50": 50, "changeover": 10}


def pool_size_for(scenarios: Sequence[str], given: int | None = None) -> int:
    """lxdpool's ``warm_pool_size``: ``--pool-size`` if given, else sized for the largest
    burst of the run's scenarios (2 for single spawns only: a claim, and one to spare)."""
    if given is not None:
        if given < 0:
            raise ValueError(f"--pool-size {given}: must be 0 or more")
        return given
    return max([BURST_SIZES.get(s, 0) for s in scenarios] + [2])


def parse_scenarios(text: str | None, quick: bool = False) -> list[str]:
    """``--scenarios a,b`` → the scenarios, in the run's order; none given: ``--quick``'s
    few or all of them. An unknown name is an error that lists the known ones."""
    if not text:
        return list(QUICK_SCENARIOS if quick else SCENARIOS)
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in SCENARIOS]
    if unknown or not wanted:
        raise ValueError(
            f"--scenarios {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(SCENARIOS)}"
        )
    return [s for s in SCENARIOS if s in wanted]


#: ``--quick``'s setups: the three columns (lxdpool's pool takes minutes to fill and refill).
QUICK_SETUPS = ("floor", "lxd", "docker")


def parse_setups(text: str | None, quick: bool = False) -> list[str]:
    """``--setups`` → the setups in a fixed order; floor and lxd are always among them.
    lxd is lxdspawner without a pool, lxdpool with ``warm_pool_size`` (`pool_size_for`).
    None given: all of them, or ``--quick``'s three."""
    default = QUICK_SETUPS if quick else SETUPS
    wanted = {w.strip() for w in (text or ",".join(default)).split(",") if w.strip()}
    unknown = sorted(wanted - set(SETUPS))
    if unknown:
        raise ValueError(
            f"--setups {text!r}: unknown {', '.join(unknown)}; known: {', '.join(SETUPS)}"
        )
    return [s for s in SETUPS if s in wanted or s in ("floor", "lxd")]


# -- the three columns ---------------------------------------------------------------------


def _single(field: str):
    return lambda data: [r.get(field) for r in data.get("single", [])]


def _memory(data: dict) -> list:
    return [(r.get("memory") or {}).get("bytes") for r in data.get("single", [])]


def _records(kind: str, field: str):
    return lambda data: [r.get(field) for r in data.get(kind, [])]


def _pooled(kind: str, field: str):
    return lambda data: [v for r in data.get(kind, []) for v in r.get(field) or []]


#: The rows of the three-column table: (label, unit, the values from one setup's data).
PEER_ROWS = (
    ("single spawn (s)", "s", _single("spawn_s")),
    ("stop (s)", "s", _single("stop_s")),
    ("idle memory per server (MiB)", "MiB", _memory),
    ("burst of 10, all ready (s)", "s", _records("burst", "wall_s")),
    ("10 stops at once (s)", "s", _records("burst", "stop_wall_s")),
    ("burst of 30, all ready (s)", "s", _records("burst30", "wall_s")),
    ("30 stops at once (s)", "s", _records("burst30", "stop_wall_s")),
    ("burst of 50, all ready (s)", "s", _records("burst50", "wall_s")),
    ("50 stops at once (s)", "s", _records("burst50", "stop_wall_s")),
    ("changeover: first 10 ready (s)", "s", _records("changeover", "first_s")),
    ("changeover: next 10, 2 s after (s)", "s", _records("changeover", "next_s")),
    ("idle servers: memory per server (MiB)", "MiB", _pooled("idle", "memory_bytes")),
    ("idle servers: hub CPU (ms per s)", "ms", _records("idle", "hub_cpu_per_s")),
    (
        "idle servers: API requests/poll/server",
        "",
        _records("idle", "api_requests_per_poll_per_server"),
    ),
    ("idle servers: one more spawn (s)", "s", _records("idle", "next_spawn_s")),
    ("idle servers: all stopped (s)", "s", _records("idle", "stop_all_s")),
)


def peer_summary(data: dict[str, dict]) -> list[dict]:
    """Per row of PEER_ROWS measured in this run: each setup's summary, and its ratio of
    medians against the floor's (``data``: setup key → that setup's recorded data)."""
    rows = []
    for label, unit, values in PEER_ROWS:
        per = {key: summary(values(d)) for key, d in data.items()}
        if not any(s["n"] for s in per.values()):
            continue
        floor = (per.get("floor") or {}).get("median")
        rows.append({
            "metric": label,
            "unit": unit,
            "setups": per,
            "ratio": {k: ratio(s["median"], floor) for k, s in per.items() if k != "floor"},
        })  # fmt: skip
    return rows


def peer_table(rows: Sequence[dict], keys: Sequence[str]) -> str:
    """The three-column table: median and p95 of each setup, the others' ratio to the floor."""
    header = ["metric"]
    for k in keys:
        header += [f"{k} med", "p95"] + ([] if k == "floor" else ["ratio"])
    header.append("n")
    lines = []
    for row in rows:
        cells = [row["metric"]]
        for k in keys:
            s = row["setups"].get(k) or summary([])
            cells += [fmt(s["median"], row["unit"]), fmt(s["p95"], row["unit"])]
            if k != "floor":
                r = row["ratio"].get(k)
                cells.append("" if r is None else f"{fmt(r)}x")
        cells.append("/".join(str((row["setups"].get(k) or {"n": 0})["n"]) for k in keys))
        lines.append(cells)
    return table(lines, header)
