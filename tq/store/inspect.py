"""Look at a store without a broker: what `tq doctor` and the offline commands need.

    report = inspect_store("postgresql://tq@db.example/tq")
    report.exists, report.schema_version, report.facts

Contract: reads only. Nothing is created or migrated: an SQLite file is
opened read-only (``query_only``), a PostgreSQL session is read-only and
calls itself "tq doctor" (so `tq migrate` does not take it for a broker).
Synchronous and blocking (call it from a thread in async code). A store that
cannot be reached or read raises StoreError naming it and what to check; an
unusable URL raises ConfigError.

``facts`` is plain data, the backend's own:
    sqlite      journal_mode, wal (bytes of the -wal file)
    postgresql  server_version, synchronous_commit, fsync, max_connections,
                connections (this database's sessions, all users),
                broker_connections (those of tq brokers), shared_buffers,
                idle_in_transaction_session_timeout
``clock`` is the database server's clock (PostgreSQL; None for SQLite) read
at ``measured_at`` (this host's clock at that moment), so a caller can tell
how far apart the two are.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from tq.core.errors import ConfigError, StoreError
from tq.store import POSTGRESQL, SQLITE, parse_store_url

__all__ = ["StoreReport", "inspect_store"]

CONNECT_TIMEOUT = 5  # seconds: a doctor run must not hang on an unreachable server
APPLICATION_NAME = "tq doctor"


@dataclass
class StoreReport:
    backend: str  # "sqlite" or "postgresql"
    location: str  # the file path, or the URL without its password
    exists: bool  # False: no tq store there yet (a broker start creates it)
    schema_version: int = 0  # the store's (0 when it does not exist)
    known_version: int = 0  # the newest this tq knows
    size: int = 0  # bytes the database takes (SQLite: the main file)
    newest: float | None = None  # created_at of the newest task
    clock: float | None = None  # the database server's clock (PostgreSQL)
    measured_at: float = 0.0  # this host's clock when ``clock`` was read
    facts: dict[str, Any] = field(default_factory=dict)


def inspect_store(url: str) -> StoreReport:
    """What the store ``url`` names holds and how it is set up; reads only."""
    parsed = parse_store_url(url)
    if parsed.backend == SQLITE:
        return _inspect_sqlite(parsed.target)
    if parsed.backend == POSTGRESQL:
        return _inspect_postgres(parsed.target, parsed.shown)
    raise ConfigError(f"cannot inspect {parsed.shown}")  # pragma: no cover - parse decides


# -- SQLite -----------------------------------------------------------------------------


def _inspect_sqlite(path: str) -> StoreReport:
    import apsw

    from tq.store.schema import SCHEMA_VERSION

    report = StoreReport(SQLITE, path, os.path.exists(path), known_version=SCHEMA_VERSION)
    if not report.exists:
        return report
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            conn.set_busy_timeout(2000)
            conn.execute("PRAGMA query_only = 1").fetchall()
            version: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
            report.schema_version = int(version)
            mode = str(conn.execute("PRAGMA journal_mode").fetchall()[0][0])
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
            if "tasks" in tables:
                row = conn.execute("SELECT max(created_at) FROM tasks").fetchall()[0]
                report.newest = float(row[0]) if row[0] is not None else None
        finally:
            conn.close()
    except apsw.Error as exc:
        raise StoreError(
            f"cannot read {path}: {type(exc).__name__}: {exc}; check the file's permissions, "
            "and if it is corrupt, restore the last backup"
        ) from None
    report.size = _file_size(path)
    report.facts = {"journal_mode": mode, "wal": _file_size(path + "-wal")}
    return report


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# -- PostgreSQL -------------------------------------------------------------------------

SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "max_connections",
    "shared_buffers",
    "idle_in_transaction_session_timeout",
)
FACTS = (
    "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
    "SELECT count(*), count(*) FILTER (WHERE application_name = %s) FROM pg_stat_activity "
    "WHERE datname = current_database()",
    "SELECT pg_database_size(current_database()), extract(epoch FROM clock_timestamp())",
)


def _inspect_postgres(url: str, shown: str) -> StoreReport:
    import psycopg

    from tq.store import pg_schema
    from tq.store.postgres import APPLICATION_NAME as BROKER_NAME
    from tq.store.postgres import conninfo, store_error

    try:
        info = conninfo(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"the store URL is not a valid PostgreSQL URL ({exc})") from None
    report = StoreReport(POSTGRESQL, shown, False, known_version=pg_schema.SCHEMA_VERSION)
    try:
        with psycopg.connect(
            info,
            autocommit=True,
            application_name=APPLICATION_NAME,
            connect_timeout=CONNECT_TIMEOUT,
        ) as conn:
            conn.execute("SET default_transaction_read_only = on")
            settings = conn.execute(FACTS[0], (list(SETTINGS),)).fetchall()
            sessions, brokers = conn.execute(FACTS[1], (BROKER_NAME,)).fetchone() or (0, 0)
            before = time.time()
            size, clock = conn.execute(FACTS[2]).fetchone() or (0, None)
            after = time.time()
            if conn.execute(pg_schema.HAS_VERSION_TABLE).fetchone() == (True,):
                row = conn.execute(pg_schema.READ_VERSION).fetchone()
                report.schema_version = 0 if row is None else int(row[0])
                report.exists = report.schema_version > 0
            elif conn.execute(pg_schema.HAS_TASKS_TABLE).fetchone() == (True,):
                raise StoreError(
                    f"{shown} holds a tasks table that tq did not create (no tq_schema "
                    "table); point tq at another database or schema"
                )
            if report.exists:
                row = conn.execute("SELECT max(created_at) FROM tasks").fetchone()
                report.newest = None if row is None or row[0] is None else float(row[0])
    except psycopg.Error as exc:  # libpq's message spans lines: one line here
        raise StoreError(" ".join(store_error(exc, "read", shown).message.split())) from exc
    report.size = int(size)
    report.clock = None if clock is None else float(clock)
    report.measured_at = (before + after) / 2
    report.facts = {name: _setting(value, unit) for name, value, unit in settings}
    report.facts["connections"] = int(sessions)
    report.facts["broker_connections"] = int(brokers)
    return report


def _setting(value: str, unit: str | None) -> Any:
    """A pg_settings value as shown to people: 128MB rather than 16384 8kB pages."""
    if unit is None or not value.lstrip("-").isdigit():
        return int(value) if value.lstrip("-").isdigit() else value
    scale = {"8kB": 8192, "kB": 1024, "MB": 2**20, "B": 1}.get(unit)
    if scale is not None:
        size = int(value) * scale
        for name, step in (("GB", 2**30), ("MB", 2**20), ("kB", 1024)):
            if size >= step and size % step == 0:
                return f"{size // step}{name}"
        return f"{size}B"
    return f"{value}{unit}"  # times: ms, s, min
