"""The SQLite schema, its migrations, its SQL, and the operations built on them.

Contract: the SQL layer of the SQLite backend; sqlite.py is its concurrency
layer (connections, threads, group commit) and holds no SQL. Every
statement is a constant here (APSW caches prepared statements by their
text, so texts never vary per call). The operations at the bottom are plain
synchronous functions of one APSW connection: write operations run inside
the writer's transaction, read operations on the reader. Rows map to
tq.core objects through ``row_to_task``; payloads, results and errors are
stored as msgpack. Imports tq.core, tq.store.base, apsw and msgpack only.

Migrations: ``MIGRATIONS[i]`` turns schema version ``i`` into ``i + 1``;
``PRAGMA user_version`` records the version. A migration's text is frozen
once released: change the schema by appending a migration, never by editing
one. ``migrate`` refuses a database newer than this code.

State literals: the WHERE clauses of the queries are computed from
``tq.core.states.sources`` so the states table decides which rows a verb
may touch. The partial indexes, however, are frozen in a migration, and
SQLite only uses a partial index when the query's WHERE term matches the
index's literally (``state = 'pending'``, or the same IN list in the same
order). The hot queries therefore name their index with ``INDEXED BY``: if
the states table ever changes so that a query no longer matches its index,
preparing the query fails loudly ("no query solution") instead of silently
scanning the table, and a new migration must rebuild the index.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import apsw
import msgpack

from tq.core.errors import InvalidRequest, InvalidTransition, NotFound, PayloadTooLarge, StoreError
from tq.core.ids import uuid7
from tq.core.retry import RetryPolicy
from tq.core.states import Event, State, next_state, sources
from tq.core.task import (
    MAX_PAYLOAD_BYTES,
    Lease,
    ListFilter,
    Outcome,
    Task,
    TaskError,
    TaskSpec,
)
from tq.core.values import check_plain, readable
from tq.store.base import OutcomeResult, SubmitResult
from tq.store.history_sql import SQLITE_MIGRATION as HISTORY_MIGRATION

MIGRATIONS: tuple[str, ...] = (
    # 1: the tasks table and the indexes that keep every hot query O(log n).
    """
    CREATE TABLE tasks (
        seq              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        type             TEXT NOT NULL,
        queue            TEXT NOT NULL,
        payload          BLOB,
        priority         INTEGER NOT NULL,
        state            TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        max_retries      INTEGER NOT NULL,
        timeout          REAL NOT NULL,
        retry_base       REAL NOT NULL,
        retry_cap        REAL NOT NULL,
        created_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL,
        run_at           REAL,
        worker           TEXT,
        lease_token      INTEGER,
        lease_expires_at REAL,
        result           BLOB,
        error            BLOB,
        idempotency_key  TEXT
    ) STRICT;
    CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_claim ON tasks (queue, priority DESC, seq) WHERE state = 'pending';
    CREATE INDEX tasks_claim_type ON tasks (queue, type, priority DESC, seq)
        WHERE state = 'pending';
    CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE state = 'running';
    CREATE INDEX tasks_due ON tasks (run_at) WHERE state IN ('failed', 'scheduled');
    CREATE INDEX tasks_state ON tasks (state, seq);
    """,
    # 2 (security): API keys (only a salted slow hash of each secret) and the audit log.
    """
    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        role        TEXT NOT NULL,
        queues      TEXT,
        created_at  REAL NOT NULL,
        expires_at  REAL,
        revoked_at  REAL,
        kdf         TEXT NOT NULL,
        salt        BLOB NOT NULL,
        hash        BLOB NOT NULL
    ) STRICT;
    CREATE TABLE audit (
        seq     INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        detail  BLOB
    ) STRICT;
    """,
    # 3: finished tasks counted per (queue, state) as they finish, so stats never scans
    # the table (unfinished ones are counted through their partial indexes instead).
    """
    CREATE TABLE finished_counts (
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        n     INTEGER NOT NULL,
        PRIMARY KEY (queue, state)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO finished_counts (queue, state, n)
        SELECT queue, state, count(*) FROM tasks
        WHERE state IN ('succeeded', 'dead', 'cancelled') GROUP BY queue, state;
    CREATE TRIGGER tasks_finished_insert AFTER INSERT ON tasks
    WHEN NEW.state IN ('succeeded', 'dead', 'cancelled')
    BEGIN
        INSERT INTO finished_counts (queue, state, n) VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tasks_finished_enter AFTER UPDATE OF state ON tasks
    WHEN NEW.state IN ('succeeded', 'dead', 'cancelled') AND NEW.state IS NOT OLD.state
    BEGIN
        INSERT INTO finished_counts (queue, state, n) VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tasks_finished_leave AFTER UPDATE OF state ON tasks
    WHEN OLD.state IN ('succeeded', 'dead', 'cancelled') AND NEW.state IS NOT OLD.state
    BEGIN
        UPDATE finished_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
    END;
    CREATE TRIGGER tasks_finished_delete AFTER DELETE ON tasks
    WHEN OLD.state IN ('succeeded', 'dead', 'cancelled')
    BEGIN
        UPDATE finished_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
    END;
    """,
    # 4: the submitter's trace context (W3C traceparent/tracestate as a JSON map).
    """
    ALTER TABLE tasks ADD COLUMN trace TEXT;
    """,
    # 5: queue settings (a paused queue accepts submits and hands nothing out) and
    # recurring schedules (tq.store.schedule_sql; due ones found through schedules_due).
    """
    CREATE TABLE queues (
        name      TEXT PRIMARY KEY,
        paused_at REAL
    ) STRICT;
    CREATE TABLE schedules (
        name          TEXT PRIMARY KEY,
        cron          TEXT NOT NULL,
        timezone      TEXT NOT NULL,
        task          BLOB NOT NULL,
        missed        TEXT NOT NULL,
        next_at       REAL NOT NULL,
        paused_at     REAL,
        last_fired_at REAL,
        last_task     TEXT,
        fired         INTEGER NOT NULL DEFAULT 0,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    ) STRICT;
    CREATE INDEX schedules_due ON schedules (next_at) WHERE paused_at IS NULL;
    """,
    # 6: task dependencies (tq.store.deps_sql): the edges, indexed both ways, and what
    # a blocked task waits for (deps_left), does when one fails, and receives.
    """
    CREATE TABLE task_deps (
        task       TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        pos        INTEGER NOT NULL,
        done       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task, depends_on)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX task_deps_dependents ON task_deps (depends_on, task);
    ALTER TABLE tasks ADD COLUMN deps_left INTEGER;
    ALTER TABLE tasks ADD COLUMN dep_policy TEXT;
    ALTER TABLE tasks ADD COLUMN dep_input TEXT;
""",
    # 7: retention (tq.store.retention_sql): finished tasks per queue and state in the
    # order they finished, so expiring the oldest reads only what it deletes.
    """
    CREATE INDEX tasks_finished ON tasks (queue, state, finished_at)
        WHERE state IN ('succeeded', 'dead', 'cancelled');
    """,
    # 8: concurrency and rate caps per queue or task type (tq.store.schema_caps)
    # and the running tasks counted per queue and per type through partial indexes.
    """
    CREATE TABLE caps (
        kind        TEXT NOT NULL,
        name        TEXT NOT NULL,
        concurrency INTEGER,
        rate        REAL,
        burst       REAL,
        tokens      REAL NOT NULL,
        refilled_at REAL NOT NULL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (kind, name)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX tasks_running_queue ON tasks (queue) WHERE state = 'running';
    CREATE INDEX tasks_running_type ON tasks (type) WHERE state = 'running';
    """,
    # 9: progress and unique tasks (PROGRESS_UNIQUE below)
    # 10: task history (tq.store.history_sql): every transition, written by triggers
    # (HISTORY_MIGRATION, appended after PROGRESS_UNIQUE below)
    # 11: due counts, a blocked task's delay, unique keys by task (DUE_COUNTS_MIGRATION below)
)
# The latest progress a running task's handler reported (cleared when an attempt is
# leased), and the keys unique tasks hold (tq.store.unique_sql): one row per (queue,
# key), naming the task that holds it and until when the window lasts.
PROGRESS_UNIQUE = """
    ALTER TABLE tasks ADD COLUMN progress REAL;
    ALTER TABLE tasks ADD COLUMN progress_message TEXT;
    CREATE TABLE task_unique (
        queue TEXT NOT NULL,
        key   TEXT NOT NULL,
        task  TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (queue, key)
    ) STRICT, WITHOUT ROWID;
"""
# 11: scheduled tasks and due retries counted per (queue, priority, state) by
# triggers, so stats, queue depth and metrics read a few counter rows instead of
# walking a backlog of a million scheduled tasks (as finished_counts does for history);
# a blocked task's delay, counted from the moment its dependencies are done; the unique
# keys by the task holding them, so deleting a task deletes its keys.
DUE_COUNTS_MIGRATION = """
    ALTER TABLE tasks ADD COLUMN dep_delay REAL;
    CREATE INDEX task_unique_task ON task_unique (task);
    CREATE TABLE due_counts (
        queue    TEXT NOT NULL,
        priority INTEGER NOT NULL,
        state    TEXT NOT NULL,
        n        INTEGER NOT NULL,
        PRIMARY KEY (queue, priority, state)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO due_counts (queue, priority, state, n)
        SELECT queue, priority, state, count(*) FROM tasks
        WHERE state IN ('failed', 'scheduled') GROUP BY queue, priority, state;
    CREATE TRIGGER tasks_due_insert AFTER INSERT ON tasks
    WHEN NEW.state IN ('failed', 'scheduled')
    BEGIN
        INSERT INTO due_counts (queue, priority, state, n)
        VALUES (NEW.queue, NEW.priority, NEW.state, 1)
        ON CONFLICT (queue, priority, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tasks_due_leave AFTER UPDATE OF state, priority, queue ON tasks
    WHEN OLD.state IN ('failed', 'scheduled') AND (NEW.state IS NOT OLD.state
        OR NEW.priority IS NOT OLD.priority OR NEW.queue IS NOT OLD.queue)
    BEGIN
        UPDATE due_counts SET n = n - 1
        WHERE queue = OLD.queue AND priority = OLD.priority AND state = OLD.state;
    END;
    CREATE TRIGGER tasks_due_enter AFTER UPDATE OF state, priority, queue ON tasks
    WHEN NEW.state IN ('failed', 'scheduled') AND (NEW.state IS NOT OLD.state
        OR NEW.priority IS NOT OLD.priority OR NEW.queue IS NOT OLD.queue)
    BEGIN
        INSERT INTO due_counts (queue, priority, state, n)
        VALUES (NEW.queue, NEW.priority, NEW.state, 1)
        ON CONFLICT (queue, priority, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER tasks_due_delete AFTER DELETE ON tasks
    WHEN OLD.state IN ('failed', 'scheduled')
    BEGIN
        UPDATE due_counts SET n = n - 1
        WHERE queue = OLD.queue AND priority = OLD.priority AND state = OLD.state;
    END;
    """
MIGRATIONS += (PROGRESS_UNIQUE, HISTORY_MIGRATION, DUE_COUNTS_MIGRATION)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: apsw.Connection, path: str) -> int:
    """Bring the database to SCHEMA_VERSION; return the version it had before.

    Each migration runs in its own IMMEDIATE transaction and re-reads the
    version inside it, so two processes opening a new file do not both migrate.
    """
    start = version = _user_version(conn, path)
    if start == 0:
        _refuse_foreign(conn, path)
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn, path)
            if version < SCHEMA_VERSION:
                conn.execute(MIGRATIONS[version]).fetchall()  # multi-statement: exhaust it
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return start


def _refuse_foreign(conn: apsw.Connection, path: str) -> None:
    """A version-0 file must be empty: never add our tables to another program's database."""
    tables = _rows(conn, "SELECT count(*) FROM sqlite_schema")[0][0]
    if tables:
        raise StoreError(
            f"{path} is an SQLite database that tq did not create (it has tables but no tq "
            "schema version); choose another database path."
        )


def _user_version(conn: apsw.Connection, path: str) -> int:
    version: int = _rows(conn, "PRAGMA user_version")[0][0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the task database {path} has schema version {version}, but this tq only "
            f"knows versions up to {SCHEMA_VERSION}: it was written by a newer tq. "
            "Upgrade tq (or point it at another database)."
        )
    return version


# -- WHERE terms computed from the states table ---------------------------------------


def state_is(states: Iterable[State]) -> str:
    """``state = 'x'`` for one state, else ``state IN ('a', 'b')`` in sorted order."""
    names = sorted(s.value for s in states)
    if len(names) == 1:
        return f"state = '{names[0]}'"
    return "state IN (" + ", ".join(f"'{n}'" for n in names) + ")"


CLAIMABLE = state_is(sources(Event.CLAIM))
LEASED = state_is(sources(Event.LEASE_EXPIRED_RETRY))  # the states that hold a lease
DUE = state_is(sources(Event.DUE))

# -- statements -------------------------------------------------------------------------

TASK_COLUMNS = (
    "id, type, queue, payload, priority, state, attempts, max_retries, timeout, retry_base, "
    "retry_cap, created_at, started_at, finished_at, run_at, worker, result, error, "
    "idempotency_key, trace, progress, progress_message"
)
# New tasks arrive as one JSON array of rows (see prepare_submit), in order:
# [id, type, queue, payload as hex, priority, max_retries, timeout, retry_base,
#  retry_cap, idempotency_key, trace as JSON text].
INSERT_TASKS = (
    "INSERT INTO tasks (id, type, queue, payload, priority, state, attempts, max_retries, "
    "timeout, retry_base, retry_cap, created_at, idempotency_key, trace) "
    "SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, unhex(r.value ->> 3), r.value ->> 4, "
    "?, 0, r.value ->> 5, r.value ->> 6, r.value ->> 7, r.value ->> 8, ?, r.value ->> 9, "
    "r.value ->> 10 FROM json_each(?) AS r ORDER BY r.key"
)
# The rows of several submits in one statement (the writer's group commit of
# concurrent single submits): a JSON array of [created_at, rows] pairs, each
# ``rows`` as INSERT_TASKS takes them; inserted in submit order, then row order.
INSERT_TASKS_GROUPED = (
    "INSERT INTO tasks (id, type, queue, payload, priority, state, attempts, max_retries, "
    "timeout, retry_base, retry_cap, created_at, idempotency_key, trace) "
    "SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, unhex(r.value ->> 3), r.value ->> 4, "
    "?, 0, r.value ->> 5, r.value ->> 6, r.value ->> 7, r.value ->> 8, g.value ->> 0, "
    "r.value ->> 9, r.value ->> 10 FROM json_each(?) AS g, json_each(g.value, '$[1]') AS r "
    "ORDER BY g.key, r.key"
)
INSERT_TASK = (  # one row: idempotency keys, large payloads (see prepare_submit)
    "INSERT INTO tasks (id, type, queue, payload, priority, state, attempts, max_retries, "
    "timeout, retry_base, retry_cap, created_at, idempotency_key, trace) "
    "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)"
)
FIND_BY_KEY = "SELECT id FROM tasks WHERE idempotency_key = ?"
QUEUES_OF_KEYS = (
    "SELECT idempotency_key, queue FROM tasks WHERE idempotency_key IN "
    "(SELECT value FROM json_each(?))"
)
CLAIM_PICK = (
    f"SELECT priority, seq FROM tasks INDEXED BY tasks_claim WHERE {CLAIMABLE} AND queue = ? "
    "ORDER BY priority DESC, seq LIMIT ?"
)
CLAIM_PICK_TYPE = (
    f"SELECT priority, seq FROM tasks INDEXED BY tasks_claim_type WHERE {CLAIMABLE} "
    "AND queue = ? AND type = ? ORDER BY priority DESC, seq LIMIT ?"
)
# One statement leases every picked row: the picks arrive as a JSON array of
# [seq, lease_token] pairs. NOT INDEXED keeps the planner on rowid lookups
# (it would otherwise walk tasks_state); RETURNING cannot name ``pick``, so
# the caller restores the pick order from ``seq``.
CLAIM_TAKE = (
    "UPDATE tasks NOT INDEXED SET state = ?, attempts = attempts + 1, started_at = ?, "
    "worker = ?, lease_token = pick.value ->> 1, lease_expires_at = ?, progress = NULL, "
    "progress_message = NULL "
    f"FROM json_each(?) AS pick WHERE tasks.seq = pick.value ->> 0 AND {CLAIMABLE} "
    "RETURNING seq, id, type, queue, payload, priority, attempts, max_retries, timeout, "
    "lease_token, trace"
)
REPORT_LOOKUP_MANY = (  # the ids arrive as a JSON array: one statement for a batch
    "SELECT id, seq, state, lease_token, lease_expires_at, attempts, max_retries, retry_base, "
    "retry_cap, queue, type, started_at FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
)
FINISH_OK = (  # one large result (see _apply_outcome)
    "UPDATE tasks SET state = ?, result = ?, error = NULL, finished_at = ?, lease_token = NULL, "
    "lease_expires_at = NULL WHERE seq = ?"
)
FINISH_OK_MANY = (  # rows as JSON: [seq, state, result as hex]
    "UPDATE tasks SET state = r.value ->> 1, result = unhex(r.value ->> 2), error = NULL, "
    "finished_at = ?, lease_token = NULL, lease_expires_at = NULL "
    "FROM json_each(?) AS r WHERE tasks.seq = r.value ->> 0"
)
# One success report (complete_one_ok): the fence of _fence and the write of FINISH_OK
# in one statement, returning what the report's answer needs and whether any task
# depends on this one (if none, there is nothing for tq.store.deps_sql to settle).
FINISH_OK_LEASED = (
    "UPDATE tasks SET state = ?, result = ?, error = NULL, finished_at = ?, lease_token = NULL, "
    f"lease_expires_at = NULL WHERE id = ? AND {LEASED} AND lease_token = ? "
    "AND lease_expires_at >= ? RETURNING queue, type, started_at, "
    "EXISTS (SELECT 1 FROM task_deps WHERE depends_on = tasks.id)"
)
GIVE_BACK = (
    "UPDATE tasks SET state = ?, attempts = attempts - 1, started_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq = ?"
)
FINISH_FAILED = (
    "UPDATE tasks SET state = ?, error = ?, run_at = ?, lease_token = NULL, "
    "lease_expires_at = NULL WHERE seq = ?"
)
FINISH_DEAD = (
    "UPDATE tasks SET state = ?, error = ?, finished_at = ?, lease_token = NULL, "
    "lease_expires_at = NULL WHERE seq = ?"
)
RELEASE_RETRY = (
    "UPDATE tasks SET state = ?, error = ?, lease_token = NULL, lease_expires_at = NULL "
    "WHERE seq = ?"
)
EXTEND_LEASE = (
    f"UPDATE tasks SET lease_expires_at = ? WHERE id = ? AND {LEASED} AND lease_token = ? "
    "AND lease_expires_at >= ? AND worker = ? RETURNING id"
)
EXPIRED_LEASES = (
    "SELECT seq, id, attempts <= max_retries FROM tasks INDEXED BY tasks_lease "
    f"WHERE {LEASED} AND lease_expires_at < ?"
)
WORKER_LEASES = (
    "SELECT seq, id, attempts <= max_retries FROM tasks INDEXED BY tasks_lease "
    f"WHERE {LEASED} AND worker = ?"
)
# progress reported with a heartbeat, for leases the same transaction found live
SET_PROGRESS = (
    "UPDATE tasks SET progress = ?, progress_message = ? WHERE id = ? AND lease_token = ?"
)
# at most ``limit`` due tasks per statement, earliest first: one transaction stays short
# whatever the backlog that came due at once (the promoter repeats until a batch is short)
PROMOTE_DUE = (
    "UPDATE tasks SET state = ? WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_due "
    f"WHERE {DUE} AND run_at <= ? ORDER BY run_at LIMIT ?)"
)
NEXT_DUE = (
    f"SELECT run_at FROM tasks INDEXED BY tasks_due WHERE {DUE} AND run_at IS NOT NULL "
    "ORDER BY run_at LIMIT 1"
)
LOOKUP_STATE = "SELECT seq, state FROM tasks WHERE id = ?"
CANCEL_TASK = (
    "UPDATE tasks SET state = ?, finished_at = ?, lease_token = NULL, lease_expires_at = NULL "
    "WHERE seq = ?"
)
RETRY_TASK = (
    "UPDATE tasks SET state = ?, attempts = 0, run_at = NULL, finished_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq = ?"
)
GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"
SET_PRIORITY = "UPDATE tasks SET priority = ? WHERE seq = ?"
CURSOR_SEQ = "SELECT seq FROM tasks WHERE id = ?"
FINISHED_COUNTS = "SELECT queue, state, n FROM finished_counts WHERE n > 0"


@lru_cache(maxsize=32)
def list_query(
    state: bool, type_: bool, queue: bool, after: bool, newest_first: bool = False
) -> str:
    """The listing statement for the filters present (one constant text per combination).

    Parameters bind in this order: state, type, queue, after-seq, limit. The
    cursor ("after") means "past this task in the listing's order".
    """
    terms = [
        term
        for term, present in (
            ("state = ?", state),
            ("type = ?", type_),
            ("queue = ?", queue),
            ("seq < ?" if newest_first else "seq > ?", after),
        )
        if present
    ]
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    order = "seq DESC" if newest_first else "seq"
    return f"SELECT {TASK_COLUMNS} FROM tasks{where} ORDER BY {order} LIMIT ?"


# -- values <-> columns ---------------------------------------------------------------


def pack(value: Any, what: str = "payload") -> bytes:
    """msgpack ``value``; InvalidRequest if it cannot be, PayloadTooLarge if too big."""
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"task {what} cannot be encoded as msgpack: {exc}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"task {what} is {len(data)} bytes once encoded; the limit is {MAX_PAYLOAD_BYTES} "
            "bytes (store large data elsewhere and pass a reference)"
        )
    return data


def unpack(data: bytes | None) -> Any:
    if data is None:
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def unpack_readable(data: bytes | None, what: str) -> Any:
    """A stored payload or result as every reader can show it (tq.core.values.readable):
    a value stored before the submit-time rules existed never fails a read."""
    try:
        return readable(unpack(data), what)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        return f"<unreadable {what}: not valid msgpack ({exc})>"


def pack_error(error: TaskError | None) -> bytes | None:
    if error is None:
        return None
    packed: bytes = msgpack.packb(
        {"type": error.type, "message": error.message, "traceback": error.traceback},
        use_bin_type=True,
    )
    return packed


def unpack_error(data: bytes | None) -> TaskError | None:
    return None if data is None else TaskError.from_mapping(unpack(data))


def _trace(text: str | None) -> dict[str, str] | None:
    """A stored trace context (JSON text); None when absent or not a map of strings."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return value
    return None


def row_to_task(row: tuple[Any, ...]) -> Task:
    """A row of TASK_COLUMNS as a Task."""
    return Task(
        id=row[0],
        type=row[1],
        queue=row[2],
        payload=unpack_readable(row[3], "payload"),
        priority=row[4],
        state=State(row[5]),
        attempts=row[6],
        max_retries=row[7],
        timeout=row[8],
        retry_base=row[9],
        retry_cap=row[10],
        created_at=row[11],
        started_at=row[12],
        finished_at=row[13],
        run_at=row[14],
        worker=row[15],
        result=unpack_readable(row[16], "result"),
        error=unpack_error(row[17]),
        idempotency_key=row[18],
        trace=_trace(row[19]),
        progress=row[20],
        progress_message=row[21],
    )


# -- operations: sync functions of one connection ---------------------------------------
#
# Write operations run on the writer connection inside the writer's transaction (and
# their own savepoint); read operations run on the reader connection. Cursors are
# always exhausted so that no statement keeps a read transaction open.

_PENDING = State.PENDING  # the state of a new task (submission is not a transition)


def _rows(conn: apsw.Connection, statement: str, params: Sequence[Any] = ()) -> list[Any]:
    """Every row of one statement (exhausted, so it holds no read transaction open)."""
    return conn.execute(statement, params).fetchall()


def _rows_many(conn: apsw.Connection, statement: str, params: Sequence[Sequence[Any]]) -> list[Any]:
    """executemany, exhausted; the rows of its RETURNING clause, if any."""
    return conn.executemany(statement, params).fetchall() if params else []


def _target(event: Event) -> State:
    """The one state that ``event`` leads to from every state it is legal in."""
    targets = {next_state(state, event) for state in sources(event)}
    if len(targets) != 1:
        raise AssertionError(f"{event} leads to several states {targets}: split the statement")
    return targets.pop()


_CLAIMED = _target(Event.CLAIM)
_DUE_TARGET = _target(Event.DUE)
_LEASED_STATES = sources(Event.LEASE_EXPIRED_RETRY)
_SUCCEEDED = _target(Event.SUCCEED).value  # from every leased state (FINISH_OK_LEASED)
if not sources(Event.SUCCEED) >= _LEASED_STATES:
    raise AssertionError("a leased state cannot succeed: split FINISH_OK_LEASED")
_EXPIRED_RETRY = _target(Event.LEASE_EXPIRED_RETRY)
_EXPIRED_FINAL = _target(Event.LEASE_EXPIRED_FINAL)


def submit(conn: apsw.Connection, specs: list[TaskSpec], now: float) -> list[SubmitResult]:
    """Insert new tasks (prepare, then insert: see ``prepare_submit``)."""
    return insert_prepared(conn, prepare_submit(specs, now))


_ROW_PAYLOAD = 3  # fields of a prepared row
_ROW_KEY = 9
HEX_PAYLOAD_MAX = 64 * 1024  # encoded payloads up to this size travel as hex in the JSON insert
DOCUMENT_PAYLOAD_MAX = 1024 * 1024  # hex characters one JSON insert may carry


@dataclass(slots=True)
class PreparedSubmit:
    """New task rows, built before the write transaction (``prepare_submit``)."""

    now: float
    rows: list[list[Any]]  # INSERT_TASKS' row layout; a payload is hex, or bytes when large
    document: str | None  # the rows as JSON for one INSERT; None: bound one by one (below)


def prepare_submit(specs: Sequence[TaskSpec], now: float) -> PreparedSubmit:
    """The rows for ``specs``: ids made, payloads encoded, every limit checked.

    Needs no connection, so the store builds them before the write transaction.
    The transaction then runs one INSERT over the JSON document: SQLite parses
    it without the GIL, whereas an executemany gives the GIL up and waits to get
    it back once per row (measured: 1000 rows in 4.3 ms either way when alone,
    but 15 ms against 3.2 s while another thread runs Python). Rows with an
    idempotency key (looked up one by one) or large payloads (hex and JSON would
    double and copy them on the event loop) are bound one by one instead.
    """
    return prepared(now, prepare_rows(specs, now))


def prepare_rows(specs: Sequence[TaskSpec], now: float) -> list[list[Any]]:
    """``prepare_submit`` in pieces: the rows of some specs (then ``prepared``)."""
    return [
        [
            uuid7(now),
            spec.type,
            spec.queue,
            _payload_field(pack(spec.payload)),
            spec.priority,
            spec.max_retries,
            spec.timeout,
            spec.retry_base,
            spec.retry_cap,
            spec.idempotency_key,
            None if spec.trace is None else _json(spec.trace),
        ]
        for spec in specs
    ]


def _payload_field(packed: bytes) -> str | bytes:
    return packed.hex() if len(packed) <= HEX_PAYLOAD_MAX else packed


def prepared(now: float, rows: list[list[Any]]) -> PreparedSubmit:
    """The rows, with their JSON document when they can take the one-statement insert."""
    size = 0
    for row in rows:
        payload = row[_ROW_PAYLOAD]
        if row[_ROW_KEY] is not None or type(payload) is bytes:
            return PreparedSubmit(now, rows, None)
        size += len(payload)
    return PreparedSubmit(now, rows, _json(rows) if size <= DOCUMENT_PAYLOAD_MAX else None)


def _json(rows: list[Any] | dict[str, Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def insert_prepared(conn: apsw.Connection, prepared: PreparedSubmit) -> list[SubmitResult]:
    """Insert prepared rows, in order; a row whose idempotency key is taken (by an
    existing task or an earlier row) inserts nothing and answers with that task's id."""
    now = prepared.now
    if prepared.document is not None:
        _rows(conn, INSERT_TASKS, (_PENDING.value, now, prepared.document))
        return [SubmitResult(row[0], created=True) for row in prepared.rows]
    results: list[SubmitResult] = []
    fresh: list[tuple[Any, ...]] = []
    new_keys: dict[str, str] = {}
    for row in prepared.rows:
        key = row[_ROW_KEY]
        if key is not None:
            existing = new_keys.get(key) or _id_for_key(conn, key)
            if existing is not None:
                results.append(SubmitResult(existing, created=False))
                continue
            new_keys[key] = row[0]
        task_id, type_, queue, payload, priority, retries, timeout, base, cap, _, trace = row
        if isinstance(payload, str):
            payload = bytes.fromhex(payload)
        state = _PENDING.value
        values = (task_id, type_, queue, payload, priority, state, retries, timeout, base, cap)
        fresh.append((*values, now, key, trace))
        results.append(SubmitResult(task_id, created=True))
    _rows_many(conn, INSERT_TASK, fresh)
    return results


def insert_grouped(conn: apsw.Connection, group: Sequence[PreparedSubmit]) -> None:
    """Insert the rows of several prepared submits, each with its JSON document
    (``document`` not None), in one statement; each row's ``created_at`` is its own
    submit's ``now``. Their results are each ``insert_prepared``'s."""
    pairs = ",".join(f"[{json.dumps(p.now)},{p.document}]" for p in group)
    _rows(conn, INSERT_TASKS_GROUPED, (_PENDING.value, f"[{pairs}]"))


def _id_for_key(conn: apsw.Connection, key: str) -> str | None:
    rows = _rows(conn, FIND_BY_KEY, (key,))
    return rows[0][0] if rows else None


def claimable(conn: apsw.Connection, queues: list[str], types: list[str] | None, n: int) -> int:
    """How many tasks ``claim`` would find to choose from, at most n: the same index
    heads it reads, without taking them (a read: no transaction, no lease)."""
    found = 0
    for queue in queues:
        for task_type in [None] if types is None else types:
            if task_type is None:
                found += len(_rows(conn, CLAIM_PICK, (queue, n - found)))
            else:
                found += len(_rows(conn, CLAIM_PICK_TYPE, (queue, task_type, n - found)))
            if found >= n:
                return n
    return found


def claim(
    conn: apsw.Connection,
    worker: str,
    queues: list[str],
    types: list[str] | None,
    n: int,
    now: float,
    lease_ttl: float,
) -> list[Lease]:
    """Best n of the per-(queue[, type]) index heads, each read with LIMIT n: O(q log N)."""
    picks: list[tuple[int, int]] = []
    for queue in queues:
        if types is None:
            picks += _rows(conn, CLAIM_PICK, (queue, n))
        else:
            for task_type in types:
                picks += _rows(conn, CLAIM_PICK_TYPE, (queue, task_type, n))
    picks.sort(key=lambda pick: (-pick[0], pick[1]))  # merge the heads: priority, then age
    taken = picks[:n]
    chosen = [
        [seq, token] for (_, seq), token in zip(taken, _lease_tokens(len(taken)), strict=True)
    ]
    if not chosen:
        return []
    expires = now + lease_ttl
    params = (_CLAIMED.value, now, worker, expires, json.dumps(chosen))
    order = {seq: position for position, (seq, _) in enumerate(chosen)}
    rows = sorted(_rows(conn, CLAIM_TAKE, params), key=lambda row: order[row[0]])
    return [row_to_lease(row, expires) for row in rows]


def row_to_lease(row: Sequence[Any], expires: float) -> Lease:
    """A claimed row (seq, id, type, queue, payload, priority, attempts, max_retries,
    timeout, lease_token, trace) as the Lease handed to the worker; both stores."""
    return Lease(
        id=row[1],
        type=row[2],
        queue=row[3],
        payload=unpack_readable(row[4], "payload"),
        priority=row[5],
        attempt=row[6],
        max_retries=row[7],
        timeout=row[8],
        token=row[9],
        expires_at=expires,
        trace=_trace(row[10]),
    )


def _lease_tokens(n: int) -> list[int]:
    """``n`` fresh random positive 62-bit fencing tokens (one OS call for all)."""
    data = secrets.token_bytes(8 * n)
    mask = (1 << 62) - 1
    return [(int.from_bytes(data[i : i + 8], "big") & mask) or 1 for i in range(0, 8 * n, 8)]


def complete(conn: apsw.Connection, outcomes: list[Outcome], now: float) -> list[OutcomeResult]:
    """Apply a batch of reports: one lookup for all, then one write per kind of outcome
    (successes as one JSON ``UPDATE``, the rarer kinds and large results bound row by row).

    Each task's row is read once, before any change: a second report for the
    same task in one call is judged against that row unless an earlier one was
    accepted (then it is stale: "already reported"), exactly as if they were
    applied one by one.
    """
    ids = list(dict.fromkeys(outcome.id for outcome in outcomes))
    found = {row[0]: row[1:] for row in _rows(conn, REPORT_LOOKUP_MANY, (json.dumps(ids),))}
    writes: dict[str, list[Any]] = {}
    results: list[OutcomeResult] = []
    settled: dict[str, str] = {}  # a second report for the same task in one call is stale
    for outcome in outcomes:
        if outcome.id in settled:
            state = settled[outcome.id]
            results.append(OutcomeResult(outcome.id, False, state, "already reported"))
            continue
        row = found.get(outcome.id)
        if row is None:
            results.append(OutcomeResult(outcome.id, False, None, f"no task with id {outcome.id}"))
            continue
        result = _apply_outcome(writes, outcome, row, now)
        if result.accepted and result.state is not None:
            settled[outcome.id] = result.state
        results.append(result)
    for statement, params in writes.items():
        if statement is FINISH_OK_MANY:
            _rows(conn, statement, (now, _json(params)))
        else:
            _rows_many(conn, statement, params)
    return results


def complete_one_ok(
    conn: apsw.Connection, outcome: Outcome, now: float
) -> tuple[OutcomeResult, bool] | None:
    """One "ok" report holding its task's live lease, applied by one statement (a lone
    report's common case; ``complete`` reads the row first, then writes it): the
    result and whether any task depends on this one. None, with nothing changed,
    when it is anything else (another status, a result the task cannot keep, a
    refused or unknown lease): ``complete`` then judges it as it always does."""
    if outcome.status != "ok":
        return None
    try:
        event, _, result = _judge(outcome, 0, 0)  # "ok" does not read the attempts
    except Exception:  # raised again by complete, if the task is there to judge
        return None
    if event is not Event.SUCCEED:
        return None
    rows = _rows(conn, FINISH_OK_LEASED, (_SUCCEEDED, result, now, outcome.id, outcome.token, now))
    if not rows:
        return None
    queue, type_, started, dependents = rows[0]
    return OutcomeResult(outcome.id, True, _SUCCEEDED, "", queue, type_, started), bool(dependents)


def _apply_outcome(
    writes: dict[str, list[Any]], outcome: Outcome, row: tuple[Any, ...], now: float
) -> OutcomeResult:
    """Judge one report against its task's row; queue the write it makes (if any)."""
    seq, state, token, expires_at, attempts, max_retries, base, cap, queue, type_, started = row
    refusal = _fence(state, token, expires_at, outcome.token, now)
    if refusal:
        return OutcomeResult(outcome.id, False, state, refusal, queue, type_)
    event, error, result = _judge(outcome, attempts, max_retries)
    target = _next_value(state, event)
    if event is Event.SUCCEED and result is not None and len(result) > HEX_PAYLOAD_MAX:
        writes.setdefault(FINISH_OK, []).append((target, result, now, seq))  # large: bound
    elif event is Event.SUCCEED:  # the common case: one statement for all (see INSERT_TASKS)
        packed = result.hex() if result is not None else None
        writes.setdefault(FINISH_OK_MANY, []).append([seq, target, packed])
    elif event is Event.RELEASE:  # handed back unrun: the attempt does not count
        writes.setdefault(GIVE_BACK, []).append((target, seq))
    elif event is Event.FAIL_RETRY:
        wait = max(outcome.delay or 0.0, RetryPolicy(base, cap).delay(attempts))
        writes.setdefault(FINISH_FAILED, []).append((target, pack_error(error), now + wait, seq))
    else:
        writes.setdefault(FINISH_DEAD, []).append((target, pack_error(error), now, seq))
    return OutcomeResult(outcome.id, True, target, "", queue, type_, started)


@cache
def _next_value(state: str, event: Event) -> str:
    """``next_state(state, event).value``, remembered (a report's hot path)."""
    return next_state(state, event).value


def _fence(state: str, token: int | None, expires_at: float | None, given: int, now: float) -> str:
    """Why a report with token ``given`` is refused, or "" if it holds the live lease."""
    if state not in _LEASED_STATES:
        return f"the task is {state}: it holds no lease"
    if token != given:
        return "the lease token is stale: the task was released or leased again"
    if expires_at is None or expires_at < now:
        return f"the lease expired at {expires_at}"
    return ""


def _judge(
    outcome: Outcome, attempts: int, max_retries: int
) -> tuple[Event, TaskError | None, bytes | None]:
    """The event an outcome means, with the error and packed result to store."""
    if outcome.status == "ok":
        try:
            check_plain(outcome.result, "task result")
            return Event.SUCCEED, None, pack(outcome.result, "result")
        except InvalidRequest as exc:  # a result we cannot keep: the task cannot succeed
            return Event.FAIL_FINAL, TaskError("ResultRejected", exc.message), None
    if outcome.status == "release":
        return Event.RELEASE, None, None
    if outcome.status == "retry" and attempts <= max_retries:
        return Event.FAIL_RETRY, outcome.error, None
    return Event.FAIL_FINAL, outcome.error, None


def extend_leases(
    conn: apsw.Connection,
    worker: str,
    leases: list[tuple[str, int]],
    now: float,
    ttl: float,
    progress: dict[str, tuple[float, str | None]] | None = None,
) -> list[str]:
    """Extend the live leases; store ``progress`` (task id -> fraction, message) for
    those whose lease is still live (a lost lease's progress is dropped)."""
    params = [(now + ttl, task_id, token, now, worker) for task_id, token in leases]
    kept = {row[0] for row in _rows_many(conn, EXTEND_LEASE, params)}
    if progress:
        tokens = dict(leases)
        updates = [
            (fraction, message, task_id, tokens[task_id])
            for task_id, (fraction, message) in progress.items()
            if task_id in kept
        ]
        _rows_many(conn, SET_PROGRESS, updates)
    return [task_id for task_id, _ in leases if task_id not in kept]


def release_expired(conn: apsw.Connection, now: float) -> list[str]:
    rows = _rows(conn, EXPIRED_LEASES, (now,))
    error = TaskError("LeaseExpired", "the lease expired before the worker reported")
    return _release(conn, rows, error, now)


def release_worker(conn: apsw.Connection, worker: str, now: float) -> list[str]:
    rows = _rows(conn, WORKER_LEASES, (worker,))
    error = TaskError("WorkerLost", f"worker {worker} went away while running the task")
    return _release(conn, rows, error, now)


def _release(
    conn: apsw.Connection, rows: list[tuple[int, str, int]], error: TaskError, now: float
) -> list[str]:
    """Leased rows (seq, id, attempts_left) back to pending, or dead when none are left."""
    packed = pack_error(error)
    again = [(_EXPIRED_RETRY.value, packed, seq) for seq, _, left in rows if left]
    final = [(_EXPIRED_FINAL.value, packed, now, seq) for seq, _, left in rows if not left]
    _rows_many(conn, RELEASE_RETRY, again)
    _rows_many(conn, FINISH_DEAD, final)
    return [task_id for _, task_id, _ in rows]


def promote_due(conn: apsw.Connection, now: float, limit: int) -> int:
    _rows(conn, PROMOTE_DUE, (_DUE_TARGET.value, now, limit))
    return int(conn.changes())


def change_one(conn: apsw.Connection, task_id: str, event: Event, now: float) -> Task:
    """Cancel or retry one task; NotFound, or InvalidTransition naming the task."""
    rows = _rows(conn, LOOKUP_STATE, (task_id,))
    if not rows:
        raise NotFound(f"no task with id {task_id}")
    seq, state = rows[0]
    try:
        target = next_state(state, event)
    except InvalidTransition as exc:
        raise InvalidTransition(f"task {task_id}: {exc}") from None
    if event is Event.CANCEL:
        conn.execute(CANCEL_TASK, (target.value, now, seq))
    elif event is Event.RETRY:
        conn.execute(RETRY_TASK, (target.value, seq))
    else:
        raise AssertionError(f"change_one does not handle {event}")
    return get(conn, task_id)


# states in which a task waits to run, so its priority still matters (set_priority)
WAITING = frozenset({State.PENDING, State.FAILED, State.SCHEDULED, State.BLOCKED})


def set_priority(conn: apsw.Connection, task_id: str, priority: int) -> Task:
    """Change a waiting task's priority; NotFound, or InvalidTransition naming its state."""
    rows = _rows(conn, LOOKUP_STATE, (task_id,))
    if not rows:
        raise NotFound(f"no task with id {task_id}")
    seq, state = rows[0]
    if state not in WAITING:
        raise InvalidTransition(
            f"task {task_id} is {state}: only a task waiting to run "
            f"({', '.join(sorted(WAITING))}) can change priority"
        )
    conn.execute(SET_PRIORITY, (priority, seq))
    return get(conn, task_id)


def get(conn: apsw.Connection, task_id: str) -> Task:
    rows = _rows(conn, GET_TASK, (task_id,))
    if not rows:
        raise NotFound(f"no task with id {task_id}")
    return row_to_task(rows[0])


def list_tasks(conn: apsw.Connection, flt: ListFilter) -> list[Task]:
    params: list[Any] = [value for value in (flt.state, flt.type, flt.queue) if value is not None]
    if flt.after is not None:
        rows = _rows(conn, CURSOR_SEQ, (flt.after,))
        if not rows:
            raise InvalidRequest(f"cursor {flt.after!r} is not the id of a task")
        params.append(rows[0][0])
    query = list_query(
        flt.state is not None,
        flt.type is not None,
        flt.queue is not None,
        flt.after is not None,
        flt.newest_first,
    )
    return [row_to_task(row) for row in _rows(conn, query, (*params, flt.limit))]


def queues_of_keys(conn: apsw.Connection, keys: list[str]) -> dict[str, str]:
    """idempotency key -> queue of the task that holds it, for the keys in use."""
    found = _rows(conn, QUEUES_OF_KEYS, (json.dumps(keys),))
    return {key: queue for key, queue in found}


def next_due(conn: apsw.Connection) -> float | None:
    rows = _rows(conn, NEXT_DUE)
    return float(rows[0][0]) if rows else None


def counts(conn: apsw.Connection) -> dict[str, dict[str, int]]:
    """Tasks per queue and state without a scan: unfinished ones through their partial
    indexes (cost grows with the backlog), finished ones from ``finished_counts``."""
    from tq.store.schema_ops import queue_depth

    out: dict[str, dict[str, int]] = {}
    for row in queue_depth(conn):
        states = out.setdefault(row.queue, {})
        states[row.state] = states.get(row.state, 0) + row.count
    for queue, state, n in _rows(conn, FINISHED_COUNTS):
        out.setdefault(queue, {})[state] = n
    return out
