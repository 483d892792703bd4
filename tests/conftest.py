from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tq.testing import BrokerProcess

# Shared 2-core machines: judge hypothesis tests by what they find, not how fast
# inputs are generated or examples run.
settings.register_profile(
    "tq", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("tq")


@pytest.fixture
def broker_proc(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker in its own process (TLS on, short leases), stopped after the test."""
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "2") as broker:
        yield broker


# -- PostgreSQL: one throwaway cluster per test session -----------------------------------

PG_CTL_GLOB = "/usr/lib/postgresql/*/bin/pg_ctl"
PG_MISSING = (
    "PostgreSQL is not installed (no {glob}): the PostgreSQL store tests need its "
    "server binaries; install them with `apt-get install postgresql` (Debian/Ubuntu)"
)


@dataclasses.dataclass
class PgCluster:
    """A PostgreSQL cluster on loopback (trust authentication), for tests only."""

    bindir: Path
    datadir: Path
    port: int
    user: str = "tq"
    dbname: str = "tq"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def schema_url(self, key: str) -> str:
        """The URL of a schema of its own for ``key`` (created if missing): the same
        key gives the same schema, so a store can be closed and opened again."""
        import psycopg

        name = "t_" + hashlib.sha1(key.encode()).hexdigest()[:20]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {name}")
        return f"{self.url}?options=-csearch_path%3D{name}"


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob(PG_CTL_GLOB))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """Start a cluster (initdb in a temp dir, its own port), stop it at the end.

    Without PostgreSQL's binaries the tests that need it skip, saying why; in CI
    (``CI`` set) they fail instead, so the suite is never skipped there.
    """
    bindir = _pg_bindir()
    if bindir is None:
        message = PG_MISSING.format(glob=PG_CTL_GLOB)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run these tests)", pytrace=False)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="tq-pg-"))
    datadir, sockets = base / "data", base / "run"
    sockets.mkdir()
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        as_owner = ["runuser", "-u", "postgres", "--"]
        base.chmod(0o755)
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    cluster = PgCluster(bindir, datadir, port)

    def run(*args: str) -> None:
        subprocess.run([*as_owner, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            cluster.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off "
            "-c max_connections=200"
        )
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(datadir),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "-l",
            str(base / "log"),
            "start",
        )
        run(
            str(bindir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            cluster.user,
            cluster.dbname,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"cannot start a PostgreSQL cluster: {exc.stderr}") from exc
    try:
        yield cluster
    finally:
        subprocess.run(
            [*as_owner, str(bindir / "pg_ctl"), "-D", str(datadir), "stop", "-m", "fast"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster, tmp_path: Path) -> str:
    """A PostgreSQL store URL of this test's own (an empty schema)."""
    return pg_cluster.schema_url(str(tmp_path))
