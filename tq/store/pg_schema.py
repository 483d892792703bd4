"""The PostgreSQL schema, its migrations, and the task operations built on them.

Contract: the SQL layer of the PostgreSQL backend; postgres.py is its
concurrency layer (connections, threads, group commit) and holds no SQL.
Every statement is a constant here (psycopg prepares a statement on the
server once it has run a few times, keyed by its text). The operations are
plain synchronous functions of one psycopg connection: write operations run
inside the writer's transaction, read operations on a reader in autocommit.
Rows map to tq.core objects through ``tq.store.schema.row_to_task`` (the same
columns, in the same order, as the SQLite backend); payloads, results and
errors are msgpack in ``bytea`` columns; times are ``double precision``
seconds since the epoch, exactly the floats the caller passed.

Migrations: ``MIGRATIONS[i]`` turns schema version ``i`` into ``i + 1``; the
table ``tq_schema`` records the version. Each migration runs in its own
transaction under an advisory lock, so several brokers starting at once on
one new database migrate it once. A migration's text is frozen once
released. ``migrate`` refuses a database newer than this code, and a schema
that holds a ``tasks`` table tq did not create.

Several brokers on one database: every write that decides on a row locks it
first. Claims pick with ``FOR UPDATE SKIP LOCKED`` (a row another broker is
claiming is passed over, never waited for); reports, cancels and retries lock
the rows they judge (``FOR UPDATE``), so a fencing decision is never made on
a row another transaction is changing. Finished tasks are counted per
(queue, state) by triggers into ``finished_counts``, spread over ``slot``
rows (the backend's process id modulo COUNT_SLOTS) so that brokers finishing
tasks of one queue at once do not queue up behind one counter row.

Time: every operation uses the ``now`` its caller passes, as the SQLite
backend does; lease expiry is ``now + lease_ttl`` and fencing compares with
``now``. A store a broker opens as a cluster member passes the database's
clock as ``now`` to the lease operations (claim, report, heartbeat, release,
promotion: see ``tq.store.postgres``), so brokers whose clocks drift never
disagree about whether a lease has expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from tq.core.errors import InvalidRequest, InvalidTransition, NotFound, StoreError
from tq.core.ids import uuid7
from tq.core.retry import RetryPolicy
from tq.core.states import TERMINAL, Event, next_state
from tq.core.task import Lease, Outcome, Task, TaskError, TaskSpec
from tq.store.base import OutcomeResult, SubmitResult
from tq.store.history_sql import PG_MIGRATION as HISTORY_MIGRATION
from tq.store.schema import (
    _CLAIMED,
    _DUE_TARGET,
    _EXPIRED_FINAL,
    _EXPIRED_RETRY,
    _PENDING,
    CLAIMABLE,
    DUE,
    LEASED,
    TASK_COLUMNS,
    WAITING,
    _fence,
    _json,
    _judge,
    _lease_tokens,
    _next_value,
    pack,
    pack_error,
    row_to_lease,
    row_to_task,
    state_is,
)

COUNT_SLOTS = 16
FINISHED = state_is(TERMINAL)
_OLD_FINISHED = FINISHED.replace("state", "OLD.state", 1)
_NEW_FINISHED = FINISHED.replace("state", "NEW.state", 1)

MIGRATIONS: tuple[str, ...] = (
    # 1: tasks (with the indexes that keep every hot query O(log n)), API keys, the
    # audit log, and finished tasks counted per (queue, state) by triggers.
    f"""
    CREATE TABLE tasks (
        seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id               text NOT NULL UNIQUE,
        type             text NOT NULL,
        queue            text NOT NULL,
        payload          bytea,
        priority         integer NOT NULL,
        state            text NOT NULL,
        attempts         bigint NOT NULL DEFAULT 0,
        max_retries      bigint NOT NULL,
        timeout          double precision NOT NULL,
        retry_base       double precision NOT NULL,
        retry_cap        double precision NOT NULL,
        created_at       double precision NOT NULL,
        started_at       double precision,
        finished_at      double precision,
        run_at           double precision,
        worker           text,
        lease_token      bigint,
        lease_expires_at double precision,
        result           bytea,
        error            bytea,
        idempotency_key  text,
        trace            text
    );
    CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_claim ON tasks (queue, priority DESC, seq) WHERE state = 'pending';
    CREATE INDEX tasks_claim_type ON tasks (queue, type, priority DESC, seq)
        WHERE state = 'pending';
    CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE state = 'running';
    CREATE INDEX tasks_worker ON tasks (worker) WHERE state = 'running';
    CREATE INDEX tasks_due ON tasks (run_at) WHERE state IN ('failed', 'scheduled');
    CREATE INDEX tasks_state ON tasks (state, seq);
    -- every claim and report leaves a dead row version behind: vacuum a queue table
    -- after 2 % of it changed (the default waits for 20 %), so the claim index's head
    -- does not fill with entries of rows already leased
    ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.02,
                           autovacuum_analyze_scale_factor = 0.02);
    CREATE TABLE api_keys (
        id          text PRIMARY KEY,
        name        text NOT NULL,
        role        text NOT NULL,
        queues      text,
        created_at  double precision NOT NULL,
        expires_at  double precision,
        revoked_at  double precision,
        kdf         text NOT NULL,
        salt        bytea NOT NULL,
        hash        bytea NOT NULL
    );
    CREATE TABLE audit (
        seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at      double precision NOT NULL,
        actor   text NOT NULL,
        action  text NOT NULL,
        target  text NOT NULL,
        detail  bytea
    );
    CREATE TABLE finished_counts (
        queue text NOT NULL,
        state text NOT NULL,
        slot  integer NOT NULL,
        n     bigint NOT NULL,
        PRIMARY KEY (queue, state, slot)
    );
    CREATE FUNCTION tq_count_finished() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' AND {_OLD_FINISHED} THEN
            INSERT INTO finished_counts (queue, state, slot, n)
            VALUES (OLD.queue, OLD.state, pg_backend_pid() % {COUNT_SLOTS}, -1)
            ON CONFLICT (queue, state, slot) DO UPDATE SET n = finished_counts.n - 1;
        END IF;
        IF TG_OP <> 'DELETE' AND {_NEW_FINISHED} THEN
            INSERT INTO finished_counts (queue, state, slot, n)
            VALUES (NEW.queue, NEW.state, pg_backend_pid() % {COUNT_SLOTS}, 1)
            ON CONFLICT (queue, state, slot) DO UPDATE SET n = finished_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_finished_insert AFTER INSERT ON tasks FOR EACH ROW
        WHEN ({_NEW_FINISHED}) EXECUTE FUNCTION tq_count_finished();
    CREATE TRIGGER tasks_finished_update AFTER UPDATE OF state ON tasks FOR EACH ROW
        WHEN (NEW.state IS DISTINCT FROM OLD.state AND ({_NEW_FINISHED} OR {_OLD_FINISHED}))
        EXECUTE FUNCTION tq_count_finished();
    CREATE TRIGGER tasks_finished_delete AFTER DELETE ON tasks FOR EACH ROW
        WHEN ({_OLD_FINISHED}) EXECUTE FUNCTION tq_count_finished();
    """,
    # 2: the cluster's shared state (tq.store.pg_cluster): the workers brokers heard
    # from, with their last heartbeat on the database's clock, and the brokers
    # themselves, with their last sign of life and which one leads.
    """
    CREATE TABLE workers (
        id         text PRIMARY KEY,
        broker     text NOT NULL,
        key_id     text,
        info       text NOT NULL,
        joined_at  double precision NOT NULL,
        last_seen  double precision NOT NULL
    );
    CREATE INDEX workers_last_seen ON workers (last_seen);
    CREATE TABLE brokers (
        id          text PRIMARY KEY,
        address     text,
        http        text,
        version     text NOT NULL,
        started_at  double precision NOT NULL,
        last_seen   double precision NOT NULL,
        leader      boolean NOT NULL DEFAULT false
    );
    """,
    # 3: queue settings (a paused queue accepts submits and hands nothing out) and
    # recurring schedules (tq.store.schedule_sql; due ones found through schedules_due).
    """
    CREATE TABLE queues (
        name      text PRIMARY KEY,
        paused_at double precision
    );
    CREATE TABLE schedules (
        name          text PRIMARY KEY,
        cron          text NOT NULL,
        timezone      text NOT NULL,
        task          bytea NOT NULL,
        missed        text NOT NULL,
        next_at       double precision NOT NULL,
        paused_at     double precision,
        last_fired_at double precision,
        last_task     text,
        fired         bigint NOT NULL DEFAULT 0,
        created_at    double precision NOT NULL,
        updated_at    double precision NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (next_at) WHERE paused_at IS NULL;
    """,
    # 4: task dependencies (tq.store.deps_sql): the edges, indexed both ways, and what
    # a blocked task waits for (deps_left), does when one fails, and receives.
    """
    CREATE TABLE task_deps (
        task       text NOT NULL,
        depends_on text NOT NULL,
        pos        integer NOT NULL,
        done       integer NOT NULL DEFAULT 0,
        PRIMARY KEY (task, depends_on)
    );
    CREATE INDEX task_deps_dependents ON task_deps (depends_on, task);
    ALTER TABLE tasks ADD COLUMN deps_left bigint;
    ALTER TABLE tasks ADD COLUMN dep_policy text;
    ALTER TABLE tasks ADD COLUMN dep_input text;
""",
    # 5: retention (tq.store.retention_sql): finished tasks per queue and state in the
    # order they finished, so expiring the oldest reads only what it deletes.
    """
    CREATE INDEX tasks_finished ON tasks (queue, state, finished_at)
        WHERE state IN ('succeeded', 'dead', 'cancelled');
    """,
    # 6: concurrency and rate caps per queue or task type (tq.store.pg_caps)
    # and the running tasks counted per queue and per type through partial indexes.
    """
    CREATE TABLE caps (
        kind        text NOT NULL,
        name        text NOT NULL,
        concurrency bigint,
        rate        double precision,
        burst       double precision,
        tokens      double precision NOT NULL,
        refilled_at double precision NOT NULL,
        updated_at  double precision NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE INDEX tasks_running_queue ON tasks (queue) WHERE state = 'running';
    CREATE INDEX tasks_running_type ON tasks (type) WHERE state = 'running';
    """,
    # 7: progress and unique tasks (PROGRESS_UNIQUE below)
    # 8: task history (tq.store.history_sql): every transition, written by triggers
    # (HISTORY_MIGRATION, appended after PROGRESS_UNIQUE below)
    # 9: due counts, a blocked task's delay, unique keys by task (DUE_COUNTS_MIGRATION)
)
# The latest progress a running task's handler reported (cleared when an attempt is
# leased), and the keys unique tasks hold (tq.store.unique_sql): one row per (queue,
# key), naming the task that holds it and until when the window lasts. The primary
# key makes a key unique across every broker sharing the database.
PROGRESS_UNIQUE = """
    ALTER TABLE tasks ADD COLUMN progress double precision;
    ALTER TABLE tasks ADD COLUMN progress_message text;
    CREATE TABLE task_unique (
        queue text NOT NULL,
        key   text NOT NULL,
        task  text NOT NULL,
        until double precision NOT NULL,
        PRIMARY KEY (queue, key)
    );
"""
# 9: scheduled tasks and due retries counted per (queue, priority, state) by triggers
# (spread over slots like finished_counts), so stats, queue depth and metrics never walk
# a backlog of a million scheduled tasks; a blocked task's delay, counted from the moment
# its dependencies are done; the unique keys by the task holding them, so deleting a
# task deletes its keys.
DUE_COUNTS_MIGRATION = f"""
    ALTER TABLE tasks ADD COLUMN dep_delay double precision;
    CREATE INDEX task_unique_task ON task_unique (task);
    CREATE TABLE due_counts (
        queue    text NOT NULL,
        priority integer NOT NULL,
        state    text NOT NULL,
        slot     integer NOT NULL,
        n        bigint NOT NULL,
        PRIMARY KEY (queue, priority, state, slot)
    );
    INSERT INTO due_counts (queue, priority, state, slot, n)
        SELECT queue, priority, state, 0, count(*) FROM tasks
        WHERE state IN ('failed', 'scheduled') GROUP BY queue, priority, state;
    CREATE FUNCTION tq_count_due() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' AND OLD.state IN ('failed', 'scheduled') THEN
            INSERT INTO due_counts (queue, priority, state, slot, n)
            VALUES (OLD.queue, OLD.priority, OLD.state, pg_backend_pid() % {COUNT_SLOTS}, -1)
            ON CONFLICT (queue, priority, state, slot) DO UPDATE SET n = due_counts.n - 1;
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.state IN ('failed', 'scheduled') THEN
            INSERT INTO due_counts (queue, priority, state, slot, n)
            VALUES (NEW.queue, NEW.priority, NEW.state, pg_backend_pid() % {COUNT_SLOTS}, 1)
            ON CONFLICT (queue, priority, state, slot) DO UPDATE SET n = due_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_due_insert AFTER INSERT ON tasks FOR EACH ROW
        WHEN (NEW.state IN ('failed', 'scheduled')) EXECUTE FUNCTION tq_count_due();
    CREATE TRIGGER tasks_due_update AFTER UPDATE OF state, priority, queue ON tasks FOR EACH ROW
        WHEN ((NEW.state IN ('failed', 'scheduled') OR OLD.state IN ('failed', 'scheduled'))
            AND (NEW.state IS DISTINCT FROM OLD.state OR NEW.priority IS DISTINCT FROM OLD.priority
                OR NEW.queue IS DISTINCT FROM OLD.queue))
        EXECUTE FUNCTION tq_count_due();
    CREATE TRIGGER tasks_due_delete AFTER DELETE ON tasks FOR EACH ROW
        WHEN (OLD.state IN ('failed', 'scheduled')) EXECUTE FUNCTION tq_count_due();
    """
MIGRATIONS += (PROGRESS_UNIQUE, HISTORY_MIGRATION, DUE_COUNTS_MIGRATION)
SCHEMA_VERSION = len(MIGRATIONS)

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS tq_schema (version integer NOT NULL)"
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('tq migrate ' || current_schema()))"
READ_VERSION = "SELECT version FROM tq_schema"
HAS_VERSION_TABLE = "SELECT to_regclass('tq_schema') IS NOT NULL"
HAS_TASKS_TABLE = "SELECT to_regclass('tasks') IS NOT NULL"


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the database to SCHEMA_VERSION; return the version it had before.

    ``conn`` must not be in a transaction. Each migration is one transaction
    that re-reads the version under an advisory lock.
    """
    start: int | None = None
    while True:
        with conn.transaction():
            conn.execute(MIGRATION_LOCK)
            version = _version(conn, where)
            if start is None:
                start = version
            if version >= SCHEMA_VERSION:
                return start
            conn.execute(VERSION_TABLE)
            conn.execute(MIGRATIONS[version].encode())  # several statements: no parameters
            conn.execute("DELETE FROM tq_schema")
            conn.execute("INSERT INTO tq_schema (version) VALUES (%s)", (version + 1,))


def _version(conn: psycopg.Connection[Any], where: str) -> int:
    if not _one(conn, HAS_VERSION_TABLE):
        if _one(conn, HAS_TASKS_TABLE):
            raise StoreError(
                f"{where} holds a tasks table that tq did not create (no tq_schema table); "
                "choose another database or schema."
            )
        return 0
    row = conn.execute(READ_VERSION).fetchone()
    version = 0 if row is None else int(row[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the task database {where} has schema version {version}, but this tq only "
            f"knows versions up to {SCHEMA_VERSION}: it was written by a newer tq. "
            "Upgrade tq (or point it at another database)."
        )
    return version


def schema_version(conn: psycopg.Connection[Any], where: str) -> int:
    return _version(conn, where)


def _one(conn: psycopg.Connection[Any], statement: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(statement, params).fetchone()
    return None if row is None else row[0]


def rows(conn: psycopg.Connection[Any], statement: str, params: Sequence[Any] = ()) -> list[Any]:
    return conn.execute(statement, params).fetchall()


# -- statements -------------------------------------------------------------------------

_NEW_COLUMNS = (
    "id, type, queue, payload, priority, state, max_retries, timeout, retry_base, retry_cap, "
    "created_at, idempotency_key, trace"
)
INSERT_MANY = (  # one statement for rows without idempotency keys, in order
    f"INSERT INTO tasks ({_NEW_COLUMNS}) "
    "SELECT r.id, r.type, r.queue, r.payload, r.priority, %s, r.max_retries, r.timeout, "
    "r.retry_base, r.retry_cap, r.created_at, NULL, r.trace FROM unnest(%s::text[], "
    "%s::text[], %s::text[], %s::bytea[], %s::integer[], %s::bigint[], %s::float8[], "
    "%s::float8[], %s::float8[], %s::text[], %s::float8[]) WITH ORDINALITY AS r(id, type, "
    "queue, payload, priority, max_retries, timeout, retry_base, retry_cap, trace, "
    "created_at, n) ORDER BY r.n"
)
INSERT_KEYED = (  # one row; an idempotency key already taken inserts nothing
    f"INSERT INTO tasks ({_NEW_COLUMNS}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id"
)
FIND_BY_KEY = "SELECT id FROM tasks WHERE idempotency_key = %s"

# A claim: the head of each (queue[, type]) index, each read with LIMIT n and locked
# with SKIP LOCKED (rows another broker is leasing are passed over), merged by
# priority then age; the best n are leased in the same statement. O(q log N).
_CLAIM_HEADS = (
    "SELECT h.seq, h.priority FROM unnest(%s::text[]) AS q(queue) CROSS JOIN LATERAL ("
    f"SELECT t.seq, t.priority FROM tasks t WHERE t.{CLAIMABLE} AND t.queue = q.queue "
    "ORDER BY t.priority DESC, t.seq LIMIT %s FOR UPDATE SKIP LOCKED) AS h"
)
_CLAIM_HEADS_TYPE = (
    "SELECT h.seq, h.priority FROM unnest(%s::text[]) AS q(queue) "
    "CROSS JOIN unnest(%s::text[]) AS k(type) CROSS JOIN LATERAL ("
    f"SELECT t.seq, t.priority FROM tasks t WHERE t.{CLAIMABLE} AND t.queue = q.queue "
    "AND t.type = k.type ORDER BY t.priority DESC, t.seq LIMIT %s FOR UPDATE SKIP LOCKED) AS h"
)
_CLAIM_TAKE = (
    "chosen AS (SELECT seq, row_number() OVER (ORDER BY priority DESC, seq) AS k FROM heads "
    "ORDER BY priority DESC, seq LIMIT %s) "
    "UPDATE tasks SET state = %s, attempts = tasks.attempts + 1, started_at = %s, worker = %s, "
    "lease_token = (%s::bigint[])[chosen.k], lease_expires_at = %s, progress = NULL, "
    "progress_message = NULL FROM chosen "
    "WHERE tasks.seq = chosen.seq RETURNING chosen.k, tasks.id, tasks.type, tasks.queue, "
    "tasks.payload, tasks.priority, tasks.attempts, tasks.max_retries, tasks.timeout, "
    "tasks.lease_token, tasks.trace"
)
CLAIM = f"WITH heads AS ({_CLAIM_HEADS}), {_CLAIM_TAKE}"
CLAIM_TYPE = f"WITH heads AS ({_CLAIM_HEADS_TYPE}), {_CLAIM_TAKE}"

REPORT_LOOKUP = (  # the rows a batch of reports judges, locked in one order
    "SELECT id, seq, state, lease_token, lease_expires_at, attempts, max_retries, retry_base, "
    "retry_cap, queue, type, started_at FROM tasks WHERE id = ANY(%s::text[]) "
    "ORDER BY seq FOR UPDATE"
)
FINISH_OK_MANY = (
    "UPDATE tasks SET state = r.state, result = r.result, error = NULL, finished_at = %s, "
    "lease_token = NULL, lease_expires_at = NULL "
    "FROM unnest(%s::bigint[], %s::text[], %s::bytea[]) AS r(seq, state, result) "
    "WHERE tasks.seq = r.seq"
)
_SUCCEEDED = next_state(LEASED.split("'")[1], Event.SUCCEED).value
FINISH_OK_FENCED = (  # successes with the live lease, in one statement; the rest is judged
    "UPDATE tasks SET state = %s, result = r.result, error = NULL, finished_at = %s, "
    "lease_token = NULL, lease_expires_at = NULL "
    "FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS r(id, token, result) "
    f"WHERE tasks.id = r.id AND tasks.{LEASED} AND tasks.lease_token = r.token "
    "AND tasks.lease_expires_at >= %s RETURNING tasks.id, tasks.queue, tasks.type, "
    "tasks.started_at"
)
GIVE_BACK = (
    "UPDATE tasks SET state = %s, attempts = attempts - 1, started_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq = %s"
)
FINISH_FAILED = (
    "UPDATE tasks SET state = %s, error = %s, run_at = %s, lease_token = NULL, "
    "lease_expires_at = NULL WHERE seq = %s"
)
FINISH_DEAD = (
    "UPDATE tasks SET state = %s, error = %s, finished_at = %s, lease_token = NULL, "
    "lease_expires_at = NULL WHERE seq = %s"
)
RELEASE_RETRY = (
    "UPDATE tasks SET state = %s, error = %s, lease_token = NULL, lease_expires_at = NULL "
    "WHERE seq = %s"
)
EXTEND_LEASES = (
    "UPDATE tasks SET lease_expires_at = %s FROM unnest(%s::text[], %s::bigint[]) AS l(id, token) "
    f"WHERE tasks.id = l.id AND tasks.{LEASED} AND tasks.lease_token = l.token "
    "AND tasks.lease_expires_at >= %s AND tasks.worker = %s RETURNING tasks.id"
)
SET_PROGRESS = (  # progress reported with a heartbeat, for leases found live just before
    "UPDATE tasks SET progress = p.fraction, progress_message = p.message FROM "
    "unnest(%s::text[], %s::bigint[], %s::double precision[], %s::text[]) "
    "AS p(id, token, fraction, message) WHERE tasks.id = p.id AND tasks.lease_token = p.token"
)
EXPIRED_LEASES = (
    "SELECT seq, id, attempts <= max_retries FROM tasks "
    f"WHERE {LEASED} AND lease_expires_at < %s ORDER BY seq FOR UPDATE SKIP LOCKED"
)
WORKER_LEASES = (
    "SELECT seq, id, attempts <= max_retries FROM tasks "
    f"WHERE {LEASED} AND worker = %s ORDER BY seq FOR UPDATE"
)
# at most ``limit`` due tasks per statement, earliest first (see tq.store.schema)
PROMOTE_DUE = (
    "UPDATE tasks SET state = %s WHERE seq IN (SELECT seq FROM tasks "
    f"WHERE {DUE} AND run_at <= %s ORDER BY run_at LIMIT %s FOR UPDATE SKIP LOCKED)"
)
NEXT_DUE = f"SELECT run_at FROM tasks WHERE {DUE} AND run_at IS NOT NULL ORDER BY run_at LIMIT 1"
LOOKUP_STATE = "SELECT seq, state FROM tasks WHERE id = %s FOR UPDATE"
CANCEL_TASK = (
    "UPDATE tasks SET state = %s, finished_at = %s, lease_token = NULL, lease_expires_at = NULL "
    "WHERE seq = %s"
)
RETRY_TASK = (
    "UPDATE tasks SET state = %s, attempts = 0, run_at = NULL, finished_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq = %s"
)
SET_PRIORITY = "UPDATE tasks SET priority = %s WHERE seq = %s"
GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s"


# -- values -----------------------------------------------------------------------------


def check_text(value: str | None, what: str) -> None:
    """PostgreSQL text cannot hold NUL: refuse it as the caller's mistake."""
    if value is not None and "\x00" in value:
        raise InvalidRequest(f"{what} must not contain NUL characters (\\x00)")


def prepare_rows(specs: Sequence[TaskSpec], now: float) -> list[list[Any]]:
    """The new rows for ``specs``, built before the write transaction: ids made,
    payloads encoded, every limit checked. Row layout: id, type, queue, payload,
    priority, max_retries, timeout, retry_base, retry_cap, idempotency_key, trace
    (as JSON text)."""
    out: list[list[Any]] = []
    for spec in specs:
        check_text(spec.type, "task type")
        check_text(spec.queue, "task queue")
        check_text(spec.idempotency_key, "task idempotency_key")
        out.append(
            [
                uuid7(now),
                spec.type,
                spec.queue,
                pack(spec.payload),
                spec.priority,
                spec.max_retries,
                spec.timeout,
                spec.retry_base,
                spec.retry_cap,
                spec.idempotency_key,
                None if spec.trace is None else _json(spec.trace),
            ]
        )
    return out


# -- write operations (inside the writer's transaction) ----------------------------------


def insert_rows(conn: psycopg.Connection[Any], now: float, new: list[list[Any]]) -> list[Any]:
    """Insert prepared rows in order; a row whose idempotency key is taken (by an
    existing task or an earlier row) inserts nothing and answers with that task's id."""
    if all(row[9] is None for row in new):
        return insert_unkeyed(conn, [(now, new)])[0]
    results: list[SubmitResult] = []
    for row in new:
        task_id, type_, queue, payload, priority, retries, timeout, base, cap, key, trace = row
        state = _PENDING.value
        params: tuple[Any, ...] = (task_id, type_, queue, payload, priority, state, retries)
        params += (timeout, base, cap, now, key, trace)
        if conn.execute(INSERT_KEYED, params).fetchone() is not None:
            results.append(SubmitResult(task_id, created=True))
        else:
            results.append(SubmitResult(_one(conn, FIND_BY_KEY, (key,)), created=False))
    return results


def unkeyed(new: list[list[Any]]) -> bool:
    return all(row[9] is None for row in new)


def insert_unkeyed(
    conn: psycopg.Connection[Any], requests: list[tuple[float, list[list[Any]]]]
) -> list[list[SubmitResult]]:
    """Several submits' rows (none with an idempotency key) in one statement, in
    order; each request's results. The writer merges concurrent submits this way."""
    rows = [[*row[:9], row[10], now] for now, new in requests for row in new]
    columns = list(zip(*rows, strict=True))
    conn.execute(INSERT_MANY, (_PENDING.value, *map(list, columns)))
    return [[SubmitResult(row[0], created=True) for row in new] for _, new in requests]


def claim(
    conn: psycopg.Connection[Any],
    worker: str,
    queues: list[str],
    types: list[str] | None,
    n: int,
    now: float,
    lease_ttl: float,
) -> list[Lease]:
    expires = now + lease_ttl
    take = (n, _CLAIMED.value, now, worker, _lease_tokens(n), expires)
    if types is None:
        found = rows(conn, CLAIM, (queues, n, *take))
    else:
        found = rows(conn, CLAIM_TYPE, (queues, types, n, *take))
    found.sort(key=lambda row: row[0])  # the pick order: priority, then age
    return [row_to_lease(row, expires) for row in found]


def complete(
    conn: psycopg.Connection[Any], outcomes: list[Outcome], now: float
) -> list[OutcomeResult]:
    """Apply a batch of reports; the same answers as the SQLite backend.

    The common case, a success reported with the live lease, is one fenced
    ``UPDATE`` for the whole batch: its WHERE clause is the fence (running,
    this token, not expired), re-checked on the newest row version if another
    broker changed it meanwhile. Everything else (other outcomes, refusals,
    several reports for one task in one call) is judged against the locked
    rows, as ``_complete_judged`` does.
    """
    if len({outcome.id for outcome in outcomes}) < len(outcomes):
        return _complete_judged(conn, outcomes, now)
    fast: list[tuple[Outcome, bytes | None]] = []
    for outcome in outcomes:
        if outcome.status == "ok":
            event, _, packed = _judge(outcome, 0, 0)  # the result, checked and packed
            if event is Event.SUCCEED:
                fast.append((outcome, packed))
    done: dict[str, OutcomeResult] = {}
    if fast:
        params = (
            _SUCCEEDED,
            now,
            [outcome.id for outcome, _ in fast],
            [outcome.token for outcome, _ in fast],
            [packed for _, packed in fast],
            now,
        )
        for task_id, queue, type_, started in rows(conn, FINISH_OK_FENCED, params):
            done[task_id] = OutcomeResult(task_id, True, _SUCCEEDED, "", queue, type_, started)
    rest = [outcome for outcome in outcomes if outcome.id not in done]
    if rest:
        done.update((r.id, r) for r in _complete_judged(conn, rest, now))
    return [done[outcome.id] for outcome in outcomes]


def _complete_judged(
    conn: psycopg.Connection[Any], outcomes: list[Outcome], now: float
) -> list[OutcomeResult]:
    """Judge reports against their locked rows (read once, before any change, as
    the SQLite backend does); then one write per kind of outcome."""
    ids = list(dict.fromkeys(outcome.id for outcome in outcomes))
    found = {row[0]: row[1:] for row in rows(conn, REPORT_LOOKUP, (ids,))}
    ok: list[tuple[int, str, bytes | None]] = []
    writes: dict[str, list[tuple[Any, ...]]] = {}
    results: list[OutcomeResult] = []
    settled: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.id in settled:
            results.append(
                OutcomeResult(outcome.id, False, settled[outcome.id], "already reported")
            )
            continue
        row = found.get(outcome.id)
        if row is None:
            results.append(OutcomeResult(outcome.id, False, None, f"no task with id {outcome.id}"))
            continue
        seq, state, token, expires_at, attempts, max_retries, base, cap, queue, type_, started = row
        refusal = _fence(state, token, expires_at, outcome.token, now)
        if refusal:
            results.append(OutcomeResult(outcome.id, False, state, refusal, queue, type_))
            continue
        event, error, result = _judge(outcome, attempts, max_retries)
        target = _next_value(state, event)
        if event is Event.SUCCEED:
            ok.append((seq, target, result))
        elif event is Event.RELEASE:
            writes.setdefault(GIVE_BACK, []).append((target, seq))
        elif event is Event.FAIL_RETRY:
            wait = max(outcome.delay or 0.0, RetryPolicy(base, cap).delay(attempts))
            writes.setdefault(FINISH_FAILED, []).append(
                (target, pack_error(error), now + wait, seq)
            )
        else:
            writes.setdefault(FINISH_DEAD, []).append((target, pack_error(error), now, seq))
        settled[outcome.id] = target
        results.append(OutcomeResult(outcome.id, True, target, "", queue, type_, started))
    if ok:
        seqs, states, packed = (list(column) for column in zip(*ok, strict=True))
        conn.execute(FINISH_OK_MANY, (now, seqs, states, packed))
    for statement, params in writes.items():
        _many(conn, statement, params)
    return results


def _many(conn: psycopg.Connection[Any], statement: str, params: list[tuple[Any, ...]]) -> None:
    if params:
        with conn.cursor() as cur:
            cur.executemany(statement, params)


def extend_leases(
    conn: psycopg.Connection[Any],
    worker: str,
    leases: list[tuple[str, int]],
    now: float,
    ttl: float,
    progress: dict[str, tuple[float, str | None]] | None = None,
) -> list[str]:
    ids = [task_id for task_id, _ in leases]
    tokens = [token for _, token in leases]
    kept = {row[0] for row in rows(conn, EXTEND_LEASES, (now + ttl, ids, tokens, now, worker))}
    if progress:
        owned = dict(leases)
        live = [task_id for task_id in progress if task_id in kept]
        if live:
            conn.execute(
                SET_PROGRESS,
                (
                    live,
                    [owned[task_id] for task_id in live],
                    [progress[task_id][0] for task_id in live],
                    [progress[task_id][1] for task_id in live],
                ),
            )
    return [task_id for task_id in ids if task_id not in kept]


def release_expired(conn: psycopg.Connection[Any], now: float) -> list[str]:
    found = rows(conn, EXPIRED_LEASES, (now,))
    return _release(conn, found, TaskError("LeaseExpired", _EXPIRED_TEXT), now)


_EXPIRED_TEXT = "the lease expired before the worker reported"


def release_worker(conn: psycopg.Connection[Any], worker: str, now: float) -> list[str]:
    found = rows(conn, WORKER_LEASES, (worker,))
    error = TaskError("WorkerLost", f"worker {worker} went away while running the task")
    return _release(conn, found, error, now)


def _release(
    conn: psycopg.Connection[Any], found: list[Any], error: TaskError, now: float
) -> list[str]:
    packed = pack_error(error)
    _many(
        conn, RELEASE_RETRY, [(_EXPIRED_RETRY.value, packed, seq) for seq, _, left in found if left]
    )
    final = [(_EXPIRED_FINAL.value, packed, now, seq) for seq, _, left in found if not left]
    _many(conn, FINISH_DEAD, final)
    return [task_id for _, task_id, _ in found]


def promote_due(conn: psycopg.Connection[Any], now: float, limit: int) -> int:
    return conn.execute(PROMOTE_DUE, (_DUE_TARGET.value, now, limit)).rowcount


def change_one(conn: psycopg.Connection[Any], task_id: str, event: Event, now: float) -> Task:
    """Cancel or retry one task; NotFound, or InvalidTransition naming the task."""
    seq, state = _lookup(conn, task_id)
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


def set_priority(conn: psycopg.Connection[Any], task_id: str, priority: int) -> Task:
    seq, state = _lookup(conn, task_id)
    if state not in WAITING:
        raise InvalidTransition(
            f"task {task_id} is {state}: only a task waiting to run "
            f"({', '.join(sorted(WAITING))}) can change priority"
        )
    conn.execute(SET_PRIORITY, (priority, seq))
    return get(conn, task_id)


def _lookup(conn: psycopg.Connection[Any], task_id: str) -> tuple[int, str]:
    check_text(task_id, "task id")
    found = rows(conn, LOOKUP_STATE, (task_id,))
    if not found:
        raise NotFound(f"no task with id {task_id}")
    return int(found[0][0]), str(found[0][1])


def get(conn: psycopg.Connection[Any], task_id: str) -> Task:
    check_text(task_id, "task id")
    found = rows(conn, GET_TASK, (task_id,))
    if not found:
        raise NotFound(f"no task with id {task_id}")
    return row_to_task(found[0])


QUEUES_OF_KEYS = "SELECT idempotency_key, queue FROM tasks WHERE idempotency_key = ANY(%s)"


def queues_of_keys(conn: psycopg.Connection[Any], keys: list[str]) -> dict[str, str]:
    """idempotency key -> queue of the task that holds it, for the keys in use."""
    for key in keys:
        check_text(key, "idempotency key")
    found = rows(
        conn, "SELECT idempotency_key, queue FROM tasks WHERE idempotency_key = ANY(%s)", (keys,)
    )
    return {key: queue for key, queue in found}


def next_due(conn: psycopg.Connection[Any]) -> float | None:
    value = _one(conn, NEXT_DUE)
    return None if value is None else float(value)


# The partial indexes of migration 1 name their states literally; PostgreSQL uses
# them only for queries whose WHERE implies the index's. If the states table
# ever changes so that the queries no longer match, fail loudly at import (a new
# migration must rebuild the indexes) rather than scan the table silently.
if (CLAIMABLE, LEASED, DUE) != (
    "state = 'pending'",
    "state = 'running'",
    "state IN ('failed', 'scheduled')",
):  # pragma: no cover
    raise AssertionError(f"the states table no longer matches the indexes: {CLAIMABLE, DUE}")
