"""Task history, for both backends: every transition of a task, kept with the task.

Triggers on ``tasks`` write ``task_history`` in the transaction of the change
itself, so no write path (the store's verbs, dependencies, schedules, upkeep,
any verb added later) can change a task without leaving its row:

    AFTER INSERT                       "submitted" (with the state it starts in)
    AFTER UPDATE OF state (changed)    the event the old and new rows describe:
        -> running                     "leased" (worker, lease token)
        running -> pending             "released" (attempt given back) or
                                       "lease_lost" (expired, worker gone: error)
        blocked -> pending             "unblocked"
        dead/cancelled -> pending,     "retried" (an operator's retry: attempts reset)
        failed -> pending, attempts reset
        failed/scheduled -> pending    "promoted" (its retry or run time came)
        otherwise                      the new state: "failed" (error, retry due at
                                       run_at), "succeeded", "dead" (error),
                                       "cancelled", "blocked", "scheduled"
    AFTER UPDATE OF priority (changed) "priority"
    AFTER DELETE                       the task's history goes with it (purge,
                                       retention, anything that deletes tasks)

Who and when: the row carries what the task row knows (worker, token, error,
run_at, priority). What it does not know, the store notes before each of its
write operations (inside its transaction or savepoint): the operation's ``now``
and its actor (``key:ID`` for a request made with an API key, ``anonymous``
without authentication, ``dependency:ID`` for a change a dependency's end
caused, ``schedule:NAME``).
SQLite keeps the note in the one-row TEMP table ``history_note`` of the writer
connection, whose TEMP triggers write the rows (see SQLITE_WRITER_SETUP); the
writer sets it before each operation to the operation's note (no time, no actor
for an operation without one), and only when it holds another (a TEMP table
change is undone with the transaction or savepoint that made it, so the writer
knows what it holds; ``tq.store.sqlite._set_note``);
PostgreSQL in two transaction-local settings (``set_config(..., true)``). A change made outside
any noted operation is recorded at the database's clock with no actor.

Bounded: at most MAX_HISTORY rows per task, the first (its submission) and
the latest MAX_HISTORY - 1; ``n`` numbers a task's transitions from 1, so a
gap between 1 and the next row says how many were dropped. Cost per
transition: one insert, one index probe for the task's last ``n``, and past
the bound one delete, all in pages the same transaction already writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import msgpack

from tq.core.errors import NotFound
from tq.core.task import TaskError

MAX_HISTORY = 100  # rows kept per task: the first and the latest MAX_HISTORY - 1

_EVENT = """CASE
            WHEN NEW.state = 'running' THEN 'leased'
            WHEN OLD.state = 'running' AND NEW.state = 'pending' THEN
                CASE WHEN NEW.attempts < OLD.attempts THEN 'released' ELSE 'lease_lost' END
            WHEN OLD.state = 'blocked' AND NEW.state = 'pending' THEN 'unblocked'
            WHEN NEW.state = 'pending'
                AND (OLD.state IN ('dead', 'cancelled') OR NEW.attempts < OLD.attempts)
                THEN 'retried'
            WHEN NEW.state = 'pending' THEN 'promoted'
            ELSE NEW.state
        END"""
_RAN = "(NEW.state = 'running' OR OLD.state = 'running')"
_WORKER = f"CASE WHEN {_RAN} THEN NEW.worker END"
_TOKEN = (
    "CASE WHEN NEW.state = 'running' THEN NEW.lease_token "
    "WHEN OLD.state = 'running' THEN OLD.lease_token END"
)
_ERROR = (
    "CASE WHEN OLD.state = 'running' AND NEW.state IN ('failed', 'dead', 'pending') "
    "AND NEW.attempts >= OLD.attempts THEN NEW.error "
    "WHEN NEW.state IN ('failed', 'dead', 'cancelled') AND NEW.error IS DISTINCT FROM OLD.error "
    "THEN NEW.error END"
)
_RUN_AT = "CASE WHEN NEW.state IN ('failed', 'scheduled') THEN NEW.run_at END"

# SQLite: the migration (appended to tq.store.schema.MIGRATIONS as it stands) keeps the
# table and the delete trigger; the triggers that write rows are TEMP triggers of the
# store's writer connection (WRITER_SETUP), reading the note from a TEMP table: the note
# then lives in memory, so an operation that changes nothing (an idle timer, an empty
# claim) writes nothing to the database file. Only the writer changes tasks.
SQLITE_MIGRATION = f"""
    CREATE TABLE task_history (
        task     INTEGER NOT NULL,
        n        INTEGER NOT NULL,
        at       REAL NOT NULL,
        event    TEXT NOT NULL,
        state    TEXT NOT NULL,
        actor    TEXT,
        worker   TEXT,
        token    INTEGER,
        error    BLOB,
        run_at   REAL,
        priority INTEGER,
        PRIMARY KEY (task, n)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO task_history (task, n, at, event, state, priority, run_at)
        SELECT seq, 1, created_at, 'submitted', state, priority, run_at FROM tasks;
    CREATE TRIGGER tasks_history_delete AFTER DELETE ON tasks
    BEGIN
        DELETE FROM task_history WHERE task = OLD.seq;
    END;
    CREATE TRIGGER task_history_bound AFTER INSERT ON task_history
    WHEN NEW.n > {MAX_HISTORY}
    BEGIN
        DELETE FROM task_history WHERE task = NEW.task AND n = NEW.n - {MAX_HISTORY - 1};
    END;
"""
_SQLITE_NOTE_TABLE = """
    CREATE TEMP TABLE history_note (
        one   INTEGER PRIMARY KEY CHECK (one = 1),
        at    REAL,
        actor TEXT
    );
    INSERT INTO temp.history_note (one, at, actor) VALUES (1, NULL, NULL);
"""
SQLITE_TRIGGERS = ("tasks_history_insert", "tasks_history_state", "tasks_history_priority")
SQLITE_WRITER_TRIGGERS = f"""
    CREATE TEMP TRIGGER tasks_history_insert AFTER INSERT ON main.tasks
    BEGIN
        INSERT INTO main.task_history (task, n, at, event, state, actor, priority, run_at)
        SELECT NEW.seq, 1, coalesce(h.at, NEW.created_at), 'submitted', NEW.state, h.actor,
               NEW.priority, NEW.run_at
        FROM temp.history_note AS h WHERE h.one = 1;
    END;
    CREATE TEMP TRIGGER tasks_history_state AFTER UPDATE OF state ON main.tasks
    WHEN NEW.state IS NOT OLD.state
    BEGIN
        INSERT INTO main.task_history (task, n, at, event, state, actor, worker, token, error,
                                       run_at, priority)
        SELECT NEW.seq,
               coalesce((SELECT max(n) FROM main.task_history WHERE task = NEW.seq), 0) + 1,
               coalesce(h.at, unixepoch('subsec')), {_EVENT}, NEW.state, h.actor,
               {_WORKER}, {_TOKEN}, {_ERROR.replace("IS DISTINCT FROM", "IS NOT")}, {_RUN_AT},
               NEW.priority
        FROM temp.history_note AS h WHERE h.one = 1;
    END;
    CREATE TEMP TRIGGER tasks_history_priority AFTER UPDATE OF priority ON main.tasks
    WHEN NEW.priority IS NOT OLD.priority AND NEW.state IS OLD.state
    BEGIN
        INSERT INTO main.task_history (task, n, at, event, state, actor, priority)
        SELECT NEW.seq,
               coalesce((SELECT max(n) FROM main.task_history WHERE task = NEW.seq), 0) + 1,
               coalesce(h.at, unixepoch('subsec')), 'priority', NEW.state, h.actor,
               NEW.priority
        FROM temp.history_note AS h WHERE h.one = 1;
    END;
"""
SQLITE_WRITER_SETUP = _SQLITE_NOTE_TABLE + SQLITE_WRITER_TRIGGERS

# PostgreSQL: inserts and deletes as statement triggers over transition tables (a bulk
# submit or purge pays one statement, not one function call per row); state and
# priority changes per row, filtered by WHEN before any function runs.
_PG_AT = "coalesce(nullif(current_setting('tq.history_at', true), '')::double precision, {clock})"
_PG_ACTOR = "nullif(current_setting('tq.history_actor', true), '')"
_PG_CLOCK = "extract(epoch from clock_timestamp())::double precision"
PG_MIGRATION = f"""
    CREATE TABLE task_history (
        task     bigint NOT NULL,
        n        integer NOT NULL,
        at       double precision NOT NULL,
        event    text NOT NULL,
        state    text NOT NULL,
        actor    text,
        worker   text,
        token    bigint,
        error    bytea,
        run_at   double precision,
        priority integer,
        PRIMARY KEY (task, n)
    );
    INSERT INTO task_history (task, n, at, event, state, priority, run_at)
        SELECT seq, 1, created_at, 'submitted', state, priority, run_at FROM tasks;
    CREATE FUNCTION tq_history_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO task_history (task, n, at, event, state, actor, priority, run_at)
        SELECT t.seq, 1, {_PG_AT.format(clock="t.created_at")}, 'submitted', t.state,
               {_PG_ACTOR}, t.priority, t.run_at
        FROM new_rows AS t;
        RETURN NULL;
    END $$;
    CREATE FUNCTION tq_history_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM task_history AS h USING old_rows AS t WHERE h.task = t.seq;
        RETURN NULL;
    END $$;
    CREATE FUNCTION tq_history_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        last integer;
    BEGIN
        SELECT coalesce(max(n), 0) INTO last FROM task_history WHERE task = NEW.seq;
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            INSERT INTO task_history (task, n, at, event, state, actor, worker, token, error,
                                      run_at, priority)
            VALUES (NEW.seq, last + 1, {_PG_AT.format(clock=_PG_CLOCK)}, {_EVENT}, NEW.state,
                    {_PG_ACTOR}, {_WORKER}, {_TOKEN}, {_ERROR}, {_RUN_AT}, NEW.priority);
        ELSE
            INSERT INTO task_history (task, n, at, event, state, actor, priority)
            VALUES (NEW.seq, last + 1, {_PG_AT.format(clock=_PG_CLOCK)}, 'priority',
                    NEW.state, {_PG_ACTOR}, NEW.priority);
        END IF;
        IF last + 1 - {MAX_HISTORY - 1} > 1 THEN
            DELETE FROM task_history WHERE task = NEW.seq AND n = last + 1 - {MAX_HISTORY - 1};
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_history_insert AFTER INSERT ON tasks
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
        EXECUTE FUNCTION tq_history_insert();
    CREATE TRIGGER tasks_history_delete AFTER DELETE ON tasks
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
        EXECUTE FUNCTION tq_history_delete();
    CREATE TRIGGER tasks_history_state AFTER UPDATE OF state ON tasks FOR EACH ROW
        WHEN (NEW.state IS DISTINCT FROM OLD.state) EXECUTE FUNCTION tq_history_change();
    CREATE TRIGGER tasks_history_priority AFTER UPDATE OF priority ON tasks FOR EACH ROW
        WHEN (NEW.priority IS DISTINCT FROM OLD.priority AND NEW.state IS NOT DISTINCT FROM
              OLD.state)
        EXECUTE FUNCTION tq_history_change();
"""

PG_TRIGGERS = (
    "tasks_history_insert",
    "tasks_history_delete",
    "tasks_history_state",
    "tasks_history_priority",
)

# -- the note: who and when, set around each write operation ----------------------------

SQLITE_NOTE = "UPDATE temp.history_note SET at = ?, actor = ? WHERE one = 1"
SQLITE_UNNOTE = "UPDATE temp.history_note SET at = NULL, actor = NULL WHERE one = 1"
PG_NOTE = "SELECT set_config('tq.history_at', %s, true), set_config('tq.history_actor', %s, true)"
PG_UNNOTE = "SELECT set_config('tq.history_at', '', true), set_config('tq.history_actor', '', true)"


_this_thread = threading.local()  # .notes: calls of ``note`` in this thread so far


def notes_taken() -> int:
    """A count that moves whenever ``note`` runs in this thread: the SQLite writer
    keeps the note it last set and sets it again only for an operation that needs
    another; a change of this count across an operation (run in the writer's
    thread) says the operation noted changes itself."""
    notes: int = getattr(_this_thread, "notes", 0)
    return notes


def note(conn: Any, backend: str, now: float | None, actor: str | None) -> None:
    """Record who (``actor``) and when (``now``) for the changes that follow in this
    transaction, until ``unnote``."""
    _this_thread.notes = notes_taken() + 1
    if backend == "postgresql":
        at = "" if now is None else repr(float(now))
        conn.execute(PG_NOTE, (at, actor or "")).fetchall()
    else:
        conn.execute(SQLITE_NOTE, (now, actor)).fetchall()


def unnote(conn: Any, backend: str) -> None:
    conn.execute(PG_UNNOTE if backend == "postgresql" else SQLITE_UNNOTE).fetchall()


def noted(
    conn: Any, backend: str, now: float | None, actor: str | None, fn: Any, *args: Any
) -> Any:
    """``fn(conn, *args)`` with its changes noted as made by ``actor`` at ``now``."""
    note(conn, backend, now, actor)
    result = fn(conn, *args)
    unnote(conn, backend)
    return result


# -- reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of a task's history (see the module docstring for the events)."""

    n: int
    at: float
    event: str
    state: str
    actor: str | None = None
    worker: str | None = None
    token: int | None = None
    error: TaskError | None = None
    run_at: float | None = None
    priority: int | None = None


_SEQ = "SELECT seq FROM tasks WHERE id = ?"
_HISTORY = (
    "SELECT n, at, event, state, actor, worker, token, error, run_at, priority "
    "FROM task_history WHERE task = ? ORDER BY n"
)


def history(conn: Any, backend: str, task_id: str) -> list[Transition]:
    """The task's transitions, oldest first; NotFound if there is no such task."""
    pg = backend == "postgresql"
    rows = conn.execute(_SEQ.replace("?", "%s") if pg else _SEQ, (task_id,)).fetchall()
    if not rows:
        raise NotFound(f"no task with id {task_id}")
    statement = _HISTORY.replace("?", "%s") if pg else _HISTORY
    found = conn.execute(statement, (rows[0][0],)).fetchall()
    return [
        Transition(
            n=n,
            at=at,
            event=event,
            state=state,
            actor=actor,
            worker=worker,
            token=token,
            error=_error(error),
            run_at=run_at,
            priority=priority,
        )
        for n, at, event, state, actor, worker, token, error, run_at, priority in found
    ]


def _error(data: Any) -> TaskError | None:
    if data is None:
        return None
    try:
        value = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
        return TaskError.from_mapping(value)
    except (ValueError, TypeError, msgpack.UnpackException):
        return TaskError("Unreadable", "the stored error is not valid msgpack")
