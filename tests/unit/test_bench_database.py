"""The spawn benchmark's pure parts for ``--db`` and ``--loop-debug``: which databases a run
uses, the hubs' database names and URLs, the configuration lines, the choice of a Debian
PostgreSQL cluster, the reading of asyncio's slow-callback warnings and the loop-lag table
per database."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy.engine import make_url
from traitlets.config import Config

from benchmarks import benchlib as bl
from benchmarks import database
from benchmarks.report import database_report, loop_by_database
from benchmarks.setups import LOOP_DEBUG_CONFIG, LOOP_RESOLUTION, Setup


def test_db_choices():
    assert database.databases("sqlite") == ["sqlite"]
    assert database.databases("postgresql") == ["postgresql"]
    # PostgreSQL's round first: the full one (single spawns, volumes, polling).
    assert database.databases("both") == ["postgresql", "sqlite"]
    with pytest.raises(ValueError, match="mysql"):
        database.databases("mysql")


def test_database_names_are_ours_and_plain():
    assert database.database_name("floor") == "lxdspbench_floor"
    assert database.database_name("lxd") == "lxdspbench_lxd"
    for bad in ("lxd; DROP DATABASE postgres", "Floor", "a-b", "x" * 60):
        with pytest.raises(ValueError):
            database.database_name(bad)


def test_postgres_url_round_trips_any_password():
    password = "p@ss:/word%?#"
    url = database.postgres_url(password, "lxdspbench_lxd", port=5433)
    parsed = make_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.username, parsed.password) == ("lxdspbench", password)
    assert (parsed.host, parsed.port, parsed.database) == ("127.0.0.1", 5433, "lxdspbench_lxd")


def test_db_config_sets_the_hubs_db_url():
    url = database.postgres_url("secret'\"", "lxdspbench_floor")
    c = Config()
    c.JupyterHub.db_url = "sqlite:///harness.sqlite"  # the harness's base config comes first
    exec(database.db_config(url), {"c": c})
    assert c.JupyterHub.db_url == url


def test_pick_cluster_prefers_a_running_one():
    clusters = [
        {"version": 16, "cluster": "main", "port": "5433", "running": 0},
        {"version": 15, "cluster": "main", "port": "5432", "running": 1},
    ]
    c = database.pick_cluster(clusters)
    assert (c.version, c.name, c.port, c.running) == ("15", "main", 5432, True)
    clusters[1]["running"] = 0
    c = database.pick_cluster(clusters)
    assert (c.version, c.port, c.running) == ("16", 5433, False)
    assert database.pick_cluster([]) is None


def test_slow_callbacks_from_asyncios_own_warnings(caplog):
    """The warnings of a real loop in debug mode (as --loop-debug sets up the hubs) name the
    coroutine that held the loop, and where."""

    async def hog():
        await asyncio.sleep(0)
        time.sleep(0.06)  # noqa: ASYNC251 (holding the loop is the point)
        await asyncio.sleep(0)

    async def main():
        namespace = {}
        exec(LOOP_DEBUG_CONFIG, namespace)  # the hubs' lines, in this running loop
        assert asyncio.get_running_loop().get_debug()
        await asyncio.gather(hog(), hog())

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main())
    log = "\n".join(r.getMessage() for r in caplog.records)
    found = bl.slow_callbacks(log)
    assert len(found) >= 2, log
    assert all(seconds >= 0.05 for _, seconds in found)
    hogs = [what for what, _ in found if "hog" in what]
    assert len(hogs) == 2, found
    assert "test_bench_database.py:" in hogs[0]
    top = bl.top_slow_callbacks(found)
    assert top[0]["count"] == 2 and top[0]["what"] == hogs[0]
    assert top[0]["total_s"] >= 0.1


def test_slow_callbacks_of_plain_handles():
    log = (
        "Executing <Handle IOLoop._run_callback(functools.par...7f0>)) created at "
        "/x/tornado/ioloop.py:685> took 0.031 seconds\n"
        "Executing <TimerHandle when=123.4 PeriodicCallback._run() created at /x.py:1> took "
        "0.052 seconds\n"
        "[I 2026-12-01 00:00:00.000 JupyterHub log:192] 200 GET /hub/api (@127.0.0.1) 3 ms\n"
    )
    assert bl.slow_callbacks(log) == [
        ("IOLoop._run_callback", 0.031),
        ("PeriodicCallback._run", 0.052),
    ]


def _burst(observations: int, lags: list[float], wall: float, slow=()) -> dict:
    return {
        "wall_s": wall,
        "loop": {"observations": observations, "logged_lags_s": lags},
        "slow_callbacks": list(slow),
    }


def test_loop_lag_per_database():
    def setup(key: str, *bursts: dict) -> Setup:
        s = Setup(key, hub=None, lxd=None)
        for b in bursts:
            s.add("burst", b)
        return s

    # 200 samples per burst, 6 lags of 20 ms or more in all: p99 of 400 samples is the 396th,
    # the 2nd smallest of the logged ones (394 are below the resolution).
    pg_floor = setup(
        "floor", _burst(200, [0.03, 0.12, 0.025], 18.0), _burst(200, [0.05, 0.02, 0.04], 20.0)
    )
    pg_lxd = setup("lxd", _burst(200, [], 19.0, [("SpawnHandler.post (a.py:1)", 0.03)]))
    sq_floor = setup("floor")
    sq_lxd = setup("lxd", _burst(100, [0.02] * 5, 21.0))
    result = loop_by_database([("postgresql", pg_floor, pg_lxd), ("sqlite", sq_floor, sq_lxd)])

    f = result["postgresql"]["floor"]
    assert f["observations"] == 400 and f["bursts"] == 2
    assert f["p99_s"] == 0.025 and not f["p99_is_upper_bound"]
    assert f["p50_s"] == LOOP_RESOLUTION and f["p50_is_upper_bound"]
    assert f["max_lag_s"] == 0.12
    assert f["lags_sum_s"] == pytest.approx(0.285)
    assert f["burst_wall_median_s"] == 19.0
    x = result["postgresql"]["lxd"]
    assert x["p99_is_upper_bound"] and x["max_lag_s"] is None
    assert x["slow_callbacks_top"][0]["what"] == "SpawnHandler.post (a.py:1)"
    assert result["sqlite"]["floor"]["p99_s"] is None  # no burst: nothing to report
    assert result["sqlite"]["lxd"]["p99_s"] == 0.02

    text = database_report(result)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines["postgresql, floor"].split()[2:5] == ["<20", "25", "120"]
    assert lines["postgresql, lxd"].split()[2:4] == ["<20", "<20"]
    assert lines["sqlite, floor"].split()[2:4] == ["n/a", "n/a"]
    assert "SpawnHandler.post (a.py:1)" in text
