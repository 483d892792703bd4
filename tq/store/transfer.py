"""Copy a whole store to another (``tq migrate``): tasks (with their dependencies and
history), API keys, the audit log and queue settings (which queues are paused).

    result = copy_store("sqlite:///var/lib/tq/tq.db", "postgresql://tq@db/tq")

Contract: synchronous and blocking (the CLI calls it directly). Only while
no broker uses either store: the source is locked for the whole copy (an
SQLite file is opened with an exclusive lock, which fails while any broker
has it open and keeps one from starting meanwhile; on PostgreSQL the copy
refuses if a connection named "tq broker" is open on the database) and the
destination must hold no tasks, keys or audit entries. Every column of every
row is copied as it is (``seq`` included, so listing order and cursors stay
the same; leases, tokens and times unchanged), in chunks, in one destination
transaction: a failure leaves the destination as it was. Then the counts of
both sides are compared (tasks per state, keys, audit entries) and any
difference is a StoreError. The destination is created and migrated first
if needed; finished-task counters are rebuilt by the destination's triggers.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw
import psycopg

from tq.core.errors import ConfigError, StoreError
from tq.store import POSTGRESQL, SQLITE, StoreURL, parse_store_url, pg_schema, schema
from tq.store.postgres import APPLICATION_NAME, store_error
from tq.store.sqlite import _check_location

CHUNK = 2000  # rows read and written at a time
TASK_COLUMNS = (
    "seq, id, type, queue, payload, priority, state, attempts, max_retries, timeout, "
    "retry_base, retry_cap, created_at, started_at, finished_at, run_at, worker, lease_token, "
    "lease_expires_at, result, error, idempotency_key, trace, deps_left, dep_policy, dep_input, "
    "progress, progress_message"
)
KEY_COLUMNS = "id, name, role, queues, created_at, expires_at, revoked_at, kdf, salt, hash"
AUDIT_COLUMNS = "seq, at, actor, action, target, detail"
HISTORY_COLUMNS = "task, n, at, event, state, actor, worker, token, error, run_at, priority"
TABLES = (
    ("tasks", TASK_COLUMNS, "seq"),
    ("api_keys", KEY_COLUMNS, "id"),
    ("audit", AUDIT_COLUMNS, "seq"),
    ("queues", "name, paused_at", "name"),  # paused queues stay paused
    ("task_deps", "task, depends_on, pos, done", "task, depends_on"),  # blocked stay blocked
    ("task_unique", "queue, key, task, until", "queue, key"),  # unique keys stay held
    # the source's history replaces what the destination's triggers wrote for the copy
    ("task_history", HISTORY_COLUMNS, "task, n"),
)

Progress = Callable[[str, int], None]  # (table, rows copied so far)


BROKER_GONE_SECONDS = 2.0  # a just-stopped broker's connections may linger this long


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    tasks: dict[str, int] = field(default_factory=dict)  # state -> n (verified on both sides)
    keys: int = 0
    audit: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def copy_store(source: str, destination: str, progress: Progress | None = None) -> CopyResult:
    src, dst = parse_store_url(source), parse_store_url(destination)
    if (src.backend, _norm(src)) == (dst.backend, _norm(dst)):
        raise ConfigError("--from and --to name the same store; name two different stores")
    started = time.monotonic()
    with _open(src, role="source") as reader, _open(dst, role="destination") as writer:
        reader.begin_snapshot()
        if writer.has_rows():
            raise StoreError(
                f"the destination {dst.shown} already holds tasks, keys or audit entries; "
                "tq migrate only copies into an empty store (drop them, or choose another "
                "database)"
            )
        writer.begin()
        try:
            for table, columns, order in TABLES:
                if table == "task_history":
                    writer.clear(table)
                copied = 0
                for chunk in reader.chunks(table, columns, order):
                    writer.insert(table, columns, chunk)
                    copied += len(chunk)
                    if progress is not None:
                        progress(table, copied)
            writer.after_copy()
            expected, got = reader.counts(), writer.counts()
            if expected != got:
                raise StoreError(
                    f"the copy does not match its source (source {expected}, copy {got}); "
                    "nothing was committed"
                )
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
    tasks, keys, audit = expected
    return CopyResult(src.shown, dst.shown, tasks, keys, audit, time.monotonic() - started)


def _norm(url: StoreURL) -> str:
    return os.path.abspath(url.target) if url.backend == SQLITE else url.target


Counts = tuple[dict[str, int], int, int]
COUNT_TASKS = "SELECT state, count(*) FROM tasks GROUP BY state"
COUNT_KEYS = "SELECT count(*) FROM api_keys"
COUNT_AUDIT = "SELECT count(*) FROM audit"
ANY_ROWS = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM tasks LIMIT 1) t) + "
    "(SELECT count(*) FROM api_keys) + (SELECT count(*) FROM audit)"
)


class _SQLite:
    """One SQLite file, opened with an exclusive lock (no broker can have it open)."""

    def __init__(self, url: StoreURL, role: str) -> None:
        self.url = url
        path = url.target
        if role == "source" and not os.path.exists(path):
            raise ConfigError(f"the source {url.shown} does not exist")
        _check_location(path)
        try:
            self.conn = apsw.Connection(path)
            self.conn.set_busy_timeout(0)
            self.conn.execute("PRAGMA locking_mode = EXCLUSIVE").fetchall()
            schema.migrate(self.conn, path)  # a source is brought to this tq's schema too
            self.conn.execute("BEGIN EXCLUSIVE")  # fails while a broker has the file open
            self.conn.execute("COMMIT")
        except apsw.BusyError:
            self.close()
            raise StoreError(
                f"{url.shown} is in use (is a broker running on it?); stop every broker "
                "using it, then run tq migrate again"
            ) from None
        except apsw.Error as exc:
            self.close()
            raise StoreError(f"cannot open {url.shown}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()

    def begin_snapshot(self) -> None:
        self.conn.execute("BEGIN")

    def has_rows(self) -> bool:
        return bool(self.conn.execute(ANY_ROWS).fetchall()[0][0])

    def chunks(self, table: str, columns: str, order: str) -> Iterator[list[tuple[Any, ...]]]:
        cursor = self.conn.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
        while chunk := list(itertools.islice(cursor, CHUNK)):
            yield chunk

    def counts(self) -> Counts:
        found: list[Any] = self.conn.execute(COUNT_TASKS).fetchall()
        tasks = {str(state): int(n) for state, n in found}
        keys: Any = self.conn.execute(COUNT_KEYS).fetchall()[0][0]
        audit: Any = self.conn.execute(COUNT_AUDIT).fetchall()[0][0]
        return tasks, int(keys), int(audit)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def insert(self, table: str, columns: str, chunk: list[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" * (columns.count(",") + 1))
        self.conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", chunk)

    def clear(self, table: str) -> None:
        self.conn.execute(f"DELETE FROM {table}").fetchall()

    def after_copy(self) -> None:
        pass

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class _Postgres:
    """One PostgreSQL database (or schema); refuses while a broker is connected to it."""

    BROKERS = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s AND pid <> pg_backend_pid()"
    )

    def _broker_connections(self) -> int:
        """Open broker connections to this database; those of a broker that just
        stopped leave the server's list a moment after it closed them: wait a little."""
        deadline = time.monotonic() + BROKER_GONE_SECONDS
        while True:
            row = self.conn.execute(self.BROKERS, (APPLICATION_NAME,)).fetchone()
            count = int(row[0]) if row and row[0] else 0
            if not count or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def __init__(self, url: StoreURL, role: str) -> None:
        self.url = url
        where = url.shown
        try:
            self.conn: psycopg.Connection[Any] = psycopg.connect(
                url.target, autocommit=True, application_name="tq migrate", connect_timeout=10
            )
        except psycopg.Error as exc:
            raise store_error(exc, "connect to", where) from exc
        try:
            if role == "source" and pg_schema.schema_version(self.conn, where) == 0:
                raise ConfigError(f"the source {where} holds no tq store")
            pg_schema.migrate(self.conn, where)
            brokers = self._broker_connections()
            if brokers:
                raise StoreError(
                    f"{where} is in use by {brokers} broker connection(s); stop every "
                    "broker using it, then run tq migrate again"
                )
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def begin_snapshot(self) -> None:
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def has_rows(self) -> bool:
        return bool(self.conn.execute(ANY_ROWS).fetchone()[0])  # type: ignore[index]

    def chunks(self, table: str, columns: str, order: str) -> Iterator[list[tuple[Any, ...]]]:
        with self.conn.cursor(name=f"tq_copy_{table}") as cursor:
            cursor.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
            while chunk := cursor.fetchmany(CHUNK):
                yield chunk

    def counts(self) -> Counts:
        tasks = {state: int(n) for state, n in self.conn.execute(COUNT_TASKS).fetchall()}
        keys = self.conn.execute(COUNT_KEYS).fetchone()[0]  # type: ignore[index]
        audit = self.conn.execute(COUNT_AUDIT).fetchone()[0]  # type: ignore[index]
        return tasks, int(keys), int(audit)

    def begin(self) -> None:
        self.conn.execute("BEGIN")
        self.conn.execute("LOCK TABLE tasks, api_keys, audit IN EXCLUSIVE MODE")

    def insert(self, table: str, columns: str, chunk: list[tuple[Any, ...]]) -> None:
        marks = ", ".join(["%s"] * (columns.count(",") + 1))
        overriding = " OVERRIDING SYSTEM VALUE" if table != "api_keys" else ""
        with self.conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table} ({columns}){overriding} VALUES ({marks})", chunk
            )

    def clear(self, table: str) -> None:
        self.conn.execute(f"DELETE FROM {table}")

    def after_copy(self) -> None:
        """Identity columns continue after the copied rows."""
        for table in ("tasks", "audit"):
            self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), "
                f"coalesce((SELECT max(seq) FROM {table}), 0) + 1, false)"
            )

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if not self.conn.closed and self.conn.info.transaction_status != 0:
            self.conn.execute("ROLLBACK")


class _opened:
    def __init__(self, url: StoreURL, role: str) -> None:
        self.url, self.role = url, role

    def __enter__(self) -> _SQLite | _Postgres:
        self.store: _SQLite | _Postgres = (
            _SQLite(self.url, self.role)
            if self.url.backend == SQLITE
            else _Postgres(self.url, self.role)
        )
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _open(url: StoreURL, role: str) -> _opened:
    if url.backend not in (SQLITE, POSTGRESQL):  # pragma: no cover - parse_store_url decides
        raise ConfigError(f"cannot copy {url.shown}")
    return _opened(url, role)
