"""The hubs' database in the spawn benchmark: sqlite (JupyterHub's default, a file in the
hub's directory) or PostgreSQL (Debian's, as a production install uses it).

The README once blamed sqlite for the hub's event-loop lag during bursts: JupyterHub's
SQLAlchemy calls are synchronous, in the loop's thread, and sqlite commits ``fsync`` a file.
``--db postgresql|sqlite|both`` runs the bursts with the hubs on each, so the claim is measured
rather than guessed.

PostgreSQL is Debian's package and its cluster (``pg_lsclusters``): installed with apt when
missing, started with ``pg_ctlcluster`` when down (no systemd as PID 1 on these machines; the
benchmark stops it again at the end if it started it). The benchmark has a role and databases
of its own, all named ``lxdspbench*``: a database per hub (floor and lxd run side by side),
dropped and created again before each pair of hubs starts, so every hub starts on an empty
database as a fresh install does; dropped with the role at the end. The hubs connect over
loopback TCP with a password made for the run (Debian's ``pg_hba.conf`` allows
``scram-sha-256`` on 127.0.0.1), as a hub on the database's host would.

The first half of this module is pure (choices, names, URLs, config lines; unit-tested in
``tests/unit/test_bench_database.py``); the second drives ``apt-get``, ``pg_ctlcluster`` and
``psql``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from sqlalchemy.engine import URL

DB_CHOICES = ("sqlite", "postgresql", "both")
#: The order of the rounds of ``--db both``: PostgreSQL first, so that its round is the full
#: one (single spawns, volumes, polling), sqlite's only the bursts it is compared on.
BOTH = ("postgresql", "sqlite")
#: The benchmark's role, and the prefix of its databases (``lxdspbench_floor``, ...).
ROLE = "lxdspbench"
#: SQLAlchemy's dialect+driver: psycopg 3 (``psycopg[binary]`` in the test extra).
DRIVER = "postgresql+psycopg"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def databases(choice: str) -> list[str]:
    """The databases ``--db choice`` runs on, in the order of the rounds."""
    if choice == "both":
        return list(BOTH)
    if choice in DB_CHOICES:
        return [choice]
    raise ValueError(f"--db {choice!r}: one of {', '.join(DB_CHOICES)}")


def database_name(setup_key: str) -> str:
    """The PostgreSQL database of one setup's hub (``floor`` → ``lxdspbench_floor``).

    Checked as a plain identifier, since it is written into SQL (``CREATE DATABASE``), where
    identifiers cannot be bound parameters.
    """
    name = f"{ROLE}_{setup_key}"
    if not _IDENT.match(name):
        raise ValueError(f"not a plain PostgreSQL identifier: {name!r}")
    return name


def postgres_url(password: str, database: str, host: str = "127.0.0.1", port: int = 5432) -> str:
    """The hub's ``db_url`` for one of our databases (SQLAlchemy quotes the password)."""
    return URL.create(
        DRIVER, username=ROLE, password=password, host=host, port=port, database=database
    ).render_as_string(hide_password=False)


def db_config(url: str) -> str:
    """The hub configuration lines that put it on ``url`` (appended after the harness's
    base configuration, whose sqlite ``db_url`` they override)."""
    return f"\n# the benchmark's database\nc.JupyterHub.db_url = {url!r}\n"


@dataclass
class Cluster:
    """One of Debian's PostgreSQL clusters (a line of ``pg_lsclusters``)."""

    version: str
    name: str
    port: int
    running: bool
    started_here: bool = False
    password: str = field(default="", repr=False)


def pick_cluster(clusters: list[dict]) -> Cluster | None:
    """From ``pg_lsclusters --json``: a running cluster if any, else the newest version's."""
    if not clusters:
        return None

    def key(c: dict) -> tuple:
        return (bool(c.get("running")), float(c.get("version", 0)), c.get("cluster") == "main")

    c = max(clusters, key=key)
    return Cluster(str(c["version"]), str(c["cluster"]), int(c["port"]), bool(c.get("running")))


# -- Debian's PostgreSQL ---------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/", **kw)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def _clusters() -> list[dict]:
    return json.loads(_run(["pg_lsclusters", "--json"]).stdout or "[]")


def ensure_postgresql(say) -> Cluster:
    """A running cluster of Debian's PostgreSQL: installed, created and started as needed."""
    if not shutil.which("pg_lsclusters"):
        say("PostgreSQL is not installed: apt-get install postgresql")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "postgresql"], env=env)
    cluster = pick_cluster(_clusters())
    if cluster is None:
        versions = sorted(os.listdir("/usr/lib/postgresql"), key=float)
        say(f"no PostgreSQL cluster: pg_createcluster {versions[-1]} main")
        _run(["pg_createcluster", versions[-1], "main"])
        cluster = pick_cluster(_clusters())
        assert cluster is not None
    if not cluster.running:
        say(f"starting PostgreSQL {cluster.version}/{cluster.name} (pg_ctlcluster)")
        _run(["pg_ctlcluster", cluster.version, cluster.name, "start"])
        cluster.started_here = True
    deadline = time.monotonic() + 60
    while subprocess.run(
        ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(cluster.port)], check=False
    ).returncode:
        if time.monotonic() > deadline:
            raise SystemExit(f"PostgreSQL {cluster.version}/{cluster.name} does not answer")
        time.sleep(0.2)
    return cluster


def psql(cluster: Cluster, sql: str) -> str:
    """One statement as the ``postgres`` superuser (peer authentication on the socket)."""
    cmd = ["runuser", "-u", "postgres", "--", "psql", "-p", str(cluster.port)]
    return _run([*cmd, "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql]).stdout.strip()


def ensure_role(cluster: Cluster) -> None:
    """Our role, with a new password for this run (hex: nothing to quote in SQL)."""
    cluster.password = secrets.token_hex(16)
    exists = psql(cluster, f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'")
    verb = "ALTER" if exists == "1" else "CREATE"
    psql(cluster, f"{verb} ROLE {ROLE} LOGIN PASSWORD '{cluster.password}'")


def reset_database(cluster: Cluster, setup_key: str) -> str:
    """Drop and create one hub's database (empty, ours); its ``db_url``."""
    name = database_name(setup_key)
    psql(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(cluster, f"CREATE DATABASE {name} OWNER {ROLE}")
    return postgres_url(cluster.password, name, port=cluster.port)


def drop_all(cluster: Cluster, setup_keys: tuple[str, ...]) -> None:
    """The end of a run: our databases and role gone; the cluster stopped if we started it."""
    for key in setup_keys:
        psql(cluster, f"DROP DATABASE IF EXISTS {database_name(key)} WITH (FORCE)")
    psql(cluster, f"DROP ROLE IF EXISTS {ROLE}")
    if cluster.started_here:
        _run(["pg_ctlcluster", cluster.version, cluster.name, "stop"])
