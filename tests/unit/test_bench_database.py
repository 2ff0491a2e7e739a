"""The spawn benchmark's pure parts for ``--db`` and ``--loop-debug``: which databases a run
uses, the hubs' database names and URLs, the configuration lines, the choice of a Debian
PostgreSQL cluster, the loop watchdog of ``--loop-debug`` (``benchmarks/loopwatch.py``) and
the loop-lag table per database."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy.engine import make_url
from traitlets.config import Config

from benchmarks import database, loopwatch
from benchmarks.report import database_report, loop_by_database
from benchmarks.setups import LOOP_DEBUG_CONFIG, LOOP_RESOLUTION, LOOPWATCH_INTERVAL, Setup


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


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)


def test_loopwatch_names_what_holds_a_real_loop(capsys):
    """The hubs' --loop-debug lines, run in a real loop: a step that holds the loop is
    sampled, and the samples name the function that held it."""

    async def hog():
        await asyncio.sleep(0.05)  # idle: a waiting loop is not a held one
        _hold_the_loop(0.1)
        await asyncio.sleep(0.05)

    async def main():
        exec(LOOP_DEBUG_CONFIG, {})  # the hubs' configuration lines, in this running loop
        await hog()

    asyncio.run(main())
    for thread in threading.enumerate():
        if thread.name == "loopwatch":
            thread.join(1)  # it ends with its loop
            assert not thread.is_alive()
    samples = loopwatch.parse(capsys.readouterr().err)
    assert len(samples) >= 5, samples  # 100 ms held, sampled every 5 ms from 20 ms on
    assert all(0.02 <= held < 0.2 for _, held in samples)
    places = {place for place, _ in samples}
    assert any("test_bench_database.py:" in p and "_hold_the_loop" in p for p in places), places
    top = loopwatch.top(samples, LOOPWATCH_INTERVAL)
    assert "_hold_the_loop" in top[0]["where"]
    assert top[0]["held_s"] == pytest.approx(top[0]["samples"] * LOOPWATCH_INTERVAL)


def test_loopwatch_attributes_a_sample_to_the_hubs_own_code():
    site = "/venv/lib/python3.11/site-packages"
    stack = [
        (f"{site}/tornado/web.py", 1958, "_execute"),
        (f"{site}/jupyterhub/handlers/base.py", 1190, "finish_user_spawn"),
        (f"{site}/jupyterhub/orm.py", 300, "commit"),
        (f"{site}/sqlalchemy/engine/default.py", 922, "do_commit"),
    ]
    assert (
        loopwatch.where(stack) == "engine/default.py:922 do_commit < jupyterhub/orm.py:300 commit"
    )
    spawner = [*stack[:2], ("/work/x/lxdspawner/spawner.py", 10, "start")]
    assert loopwatch.where(spawner) == "lxdspawner/spawner.py:10 start"
    assert loopwatch.where(stack[:1]) == "tornado/web.py:1958 _execute"
    assert loopwatch.where([]) == "?"
    log = (
        "[W 2026-12-01 00:00:00.000 JupyterHub metrics:391] Event loop was unresponsive ...\n"
        "loopwatch: held 0.025 s: a.py:1 f < jupyterhub/app.py:2 g\n"
        "loopwatch: held 0.030 s: a.py:1 f < jupyterhub/app.py:2 g\n"
        "loopwatch: held 0.021 s: b.py:3 h\n"
    )
    samples = loopwatch.parse(log)
    assert samples == [
        ("a.py:1 f < jupyterhub/app.py:2 g", 0.025),
        ("a.py:1 f < jupyterhub/app.py:2 g", 0.03),
        ("b.py:3 h", 0.021),
    ]
    assert loopwatch.top(samples, 0.005)[0] == {
        "where": "a.py:1 f < jupyterhub/app.py:2 g",
        "samples": 2,
        "held_s": 0.01,
        "longest_s": 0.03,
    }


def _burst(observations: int, lags: list[float], wall: float, samples=()) -> dict:
    return {
        "wall_s": wall,
        "loop": {"observations": observations, "logged_lags_s": lags},
        "loop_samples": list(samples),
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
    pg_lxd = setup("lxd", _burst(200, [], 19.0, [("orm.py:1 commit", 0.03)] * 3))
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
    assert x["loop_samples"] == 3
    assert x["held_by"][0]["where"] == "orm.py:1 commit" and x["held_by"][0]["samples"] == 3
    assert result["sqlite"]["floor"]["p99_s"] is None  # no burst: nothing to report
    assert result["sqlite"]["lxd"]["p99_s"] == 0.02

    text = database_report(result)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines["postgresql, floor"].split()[2:5] == ["<20", "25", "120"]
    assert lines["postgresql, lxd"].split()[2:4] == ["<20", "<20"]
    assert lines["sqlite, floor"].split()[2:4] == ["n/a", "n/a"]
    assert "orm.py:1 commit" in text and "postgresql, lxd: 3 samples" in text
