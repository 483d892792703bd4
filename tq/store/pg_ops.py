"""The PostgreSQL SQL of listings, counts, the operator surface and the security tables.

Same rules as ``tq.store.pg_schema`` (whose migrations create these tables):
constant statement texts, plain synchronous operations of one psycopg
connection, every state change asked of ``tq.core.states``. Argument checks
that do not depend on the backend (purge states, retry state, limits) are
shared with the SQLite backend (``tq.store.schema_ops``, ``schema_auth``).

Costs: ``queue_depth`` counts unfinished tasks only, through the partial
indexes of each state, so it grows with the backlog, never with history
(failed and scheduled ones are read from ``due_counts``, kept by triggers, so
not even with a backlog of scheduled tasks);
``counts`` adds the finished tasks from ``finished_counts`` (kept by
triggers), so ``stats`` never scans the table either. ``purge`` deletes the
oldest finished tasks in chunks; ``seq`` comes from a sequence and is never
reused, so unlike SQLite no row has to be kept back.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import msgpack
import psycopg

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import InvalidRequest, NotFound
from tq.core.states import TERMINAL, Event, State, next_state, sources
from tq.core.task import ListFilter, Task
from tq.store.base import QueueDepth
from tq.store.pg_schema import check_text, rows
from tq.store.schema import TASK_COLUMNS, row_to_task, state_is
from tq.store.schema_auth import MAX_AUDIT_LIMIT, _row_to_entry, _row_to_key

# -- listings ---------------------------------------------------------------------------

CURSOR_SEQ = "SELECT seq FROM tasks WHERE id = %s"


@lru_cache(maxsize=32)
def list_query(
    state: bool, type_: bool, queue: bool, after: bool, newest_first: bool = False
) -> str:
    """The listing statement for the filters present; binds state, type, queue,
    after-seq, limit in that order (as ``tq.store.schema.list_query``)."""
    terms = [
        term
        for term, present in (
            ("state = %s", state),
            ("type = %s", type_),
            ("queue = %s", queue),
            ("seq < %s" if newest_first else "seq > %s", after),
        )
        if present
    ]
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    order = "seq DESC" if newest_first else "seq"
    return f"SELECT {TASK_COLUMNS} FROM tasks{where} ORDER BY {order} LIMIT %s"


def list_tasks(conn: psycopg.Connection[Any], flt: ListFilter) -> list[Task]:
    params: list[Any] = [value for value in (flt.state, flt.type, flt.queue) if value is not None]
    for value in params:
        check_text(value, "a listing filter")
    if flt.after is not None:
        check_text(flt.after, "the cursor")
        found = rows(conn, CURSOR_SEQ, (flt.after,))
        if not found:
            raise InvalidRequest(f"cursor {flt.after!r} is not the id of a task")
        params.append(found[0][0])
    query = list_query(
        flt.state is not None,
        flt.type is not None,
        flt.queue is not None,
        flt.after is not None,
        flt.newest_first,
    )
    return [row_to_task(row) for row in rows(conn, query, (*params, flt.limit))]


# -- counts: unfinished through their partial indexes, finished from the counters -------

_ACTIVE = frozenset(State) - TERMINAL
_BY_INDEX: tuple[frozenset[State], ...] = (
    sources(Event.CLAIM),  # tasks_claim: pending
    sources(Event.LEASE_EXPIRED_RETRY),  # tasks_lease: running
)
_COUNTED = sources(Event.DUE)  # failed, scheduled: due_counts, kept by triggers
_UNCOVERED = _ACTIVE - frozenset().union(_COUNTED, *_BY_INDEX)  # blocked: tasks_state
DUE_COUNTS = (
    "SELECT queue, priority, state, sum(n) FROM due_counts "
    "GROUP BY queue, priority, state HAVING sum(n) > 0"
)
DEPTH_STATEMENTS: tuple[str, ...] = (
    *(
        f"SELECT queue, priority, state, count(*) FROM tasks WHERE {state_is(states)} "
        "GROUP BY queue, priority, state"
        for states in (*_BY_INDEX, _UNCOVERED)
        if states
    ),
    DUE_COUNTS,
)
FINISHED_COUNTS = (
    "SELECT queue, state, sum(n) FROM finished_counts GROUP BY queue, state HAVING sum(n) > 0"
)


def queue_depth(conn: psycopg.Connection[Any]) -> list[QueueDepth]:
    found = [row for statement in DEPTH_STATEMENTS for row in rows(conn, statement)]
    return sorted(QueueDepth(queue, priority, state, int(n)) for queue, priority, state, n in found)


def counts(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in queue_depth(conn):
        states = out.setdefault(row.queue, {})
        states[row.state] = states.get(row.state, 0) + row.count
    for queue, state, n in rows(conn, FINISHED_COUNTS):
        out.setdefault(queue, {})[state] = int(n)
    return out


# -- purge and bulk retry ---------------------------------------------------------------

PURGE = (
    "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE state = %s AND finished_at < %s "
    "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id"
)
PURGE_EDGES = "DELETE FROM task_deps WHERE task = ANY(%s)"  # as tq.store.schema_ops
PURGE_KEYS = "DELETE FROM task_unique WHERE task = ANY(%s)"
COUNT_PURGEABLE = "SELECT count(*) FROM tasks WHERE state = %s AND finished_at < %s"
_RETRY_TARGET = {state: next_state(state, Event.RETRY) for state in sources(Event.RETRY)}
RETRY_MANY = (
    "UPDATE tasks SET state = %s, attempts = 0, run_at = NULL, finished_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq IN (SELECT seq FROM tasks "
    "WHERE state = %s ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, seq"
)


def purge(conn: psycopg.Connection[Any], states: list[State], cutoff: float, limit: int) -> int:
    deleted = 0
    for state in states:
        if deleted >= limit:
            break
        ids = [row[0] for row in rows(conn, PURGE, (state.value, cutoff, limit - deleted))]
        if ids:
            conn.execute(PURGE_EDGES, (ids,))
            conn.execute(PURGE_KEYS, (ids,))
        deleted += len(ids)
    return deleted


def count_purgeable(conn: psycopg.Connection[Any], states: list[State], cutoff: float) -> int:
    return sum(int(rows(conn, COUNT_PURGEABLE, (s.value, cutoff))[0][0]) for s in states)


def retry_many(conn: psycopg.Connection[Any], state: State, limit: int) -> list[str]:
    found = rows(conn, RETRY_MANY, (_RETRY_TARGET[state].value, state.value, limit))
    return [task_id for task_id, _ in sorted(found, key=lambda row: row[1])]


# -- probe and details ------------------------------------------------------------------

PROBE = "SELECT pg_database_size(current_database()), current_setting('server_version')"


def probe(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    size, version = rows(conn, PROBE)[0]
    return int(size), str(version)


# -- API keys and the audit log ---------------------------------------------------------

KEY_COLUMNS = "id, name, role, queues, created_at, expires_at, revoked_at, kdf, salt, hash"
INSERT_KEY = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
GET_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = %s"
LIST_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
REVOKE_KEY = (
    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s "
    f"RETURNING {KEY_COLUMNS}"
)
REHASH_KEY = "UPDATE api_keys SET kdf = %s, salt = %s, hash = %s WHERE id = %s AND kdf = %s"
INSERT_AUDIT = (
    "INSERT INTO audit (at, actor, action, target, detail) VALUES (%s, %s, %s, %s, %s) "
    "RETURNING seq"
)
AUDIT_COLUMNS = "seq, at, actor, action, target, detail"
LIST_AUDIT = f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT %s"
LIST_AUDIT_BEFORE = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq < %s ORDER BY seq DESC LIMIT %s"


def create_key(conn: psycopg.Connection[Any], key: ApiKey) -> None:
    queues = None if key.queues is None else json.dumps(list(key.queues))
    params = (key.id, key.name, key.role, queues, key.created_at, key.expires_at)
    conn.execute(INSERT_KEY, (*params, key.revoked_at, key.kdf, key.salt, key.hash))


def get_key(conn: psycopg.Connection[Any], key_id: str) -> ApiKey:
    check_text(key_id, "a key id")
    found = rows(conn, GET_KEY, (key_id,))
    if not found:
        raise NotFound(f"no API key with id {key_id}")
    return _row_to_key(found[0])


def list_keys(conn: psycopg.Connection[Any]) -> list[ApiKey]:
    return [_row_to_key(row) for row in rows(conn, LIST_KEYS)]


def revoke_key(conn: psycopg.Connection[Any], key_id: str, now: float) -> ApiKey:
    check_text(key_id, "a key id")
    found = rows(conn, REVOKE_KEY, (now, key_id))
    if not found:
        raise NotFound(f"no API key with id {key_id}")
    return _row_to_key(found[0])


def rehash_key(conn: psycopg.Connection[Any], key: ApiKey, old_kdf: str) -> bool:
    """Store ``key``'s new hash if the row still has one made with ``old_kdf``."""
    params = (key.kdf, key.salt, key.hash, key.id, old_kdf)
    return conn.execute(REHASH_KEY, params).rowcount > 0


def record_audit(conn: psycopg.Connection[Any], entry: AuditEntry) -> int:
    detail = msgpack.packb(entry.detail, use_bin_type=True) if entry.detail else None
    params = (entry.at, entry.actor, entry.action, entry.target, detail)
    return int(rows(conn, INSERT_AUDIT, params)[0][0])


def list_audit(conn: psycopg.Connection[Any], limit: int, before: int | None) -> list[AuditEntry]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise InvalidRequest(f"audit limit must be 1..{MAX_AUDIT_LIMIT}")
    if before is None:
        found = rows(conn, LIST_AUDIT, (limit,))
    else:
        found = rows(conn, LIST_AUDIT_BEFORE, (before, limit))
    return [_row_to_entry(row) for row in found]


# -- explain: how many pending tasks of its queue a claim takes first ------------------

_PLACE = "SELECT queue, priority, seq, state FROM tasks WHERE id = %s"
_AHEAD_HIGHER = (
    "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'pending' AND queue = %s "
    "AND priority > %s LIMIT %s) AS ahead"
)
_AHEAD_OLDER = (
    "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'pending' AND queue = %s "
    "AND priority = %s AND seq < %s LIMIT %s) AS ahead"
)


def ahead(conn: psycopg.Connection[Any], task_id: str, limit: int) -> tuple[int, int] | None:
    """As ``tq.store.schema_ops.ahead``: two range reads of ``tasks_claim``."""
    check_text(task_id, "task id")
    found = rows(conn, _PLACE, (task_id,))
    if not found:
        raise NotFound(f"no task with id {task_id}")
    queue, priority, seq, state = found[0]
    if state != State.PENDING:
        return None
    higher = rows(conn, _AHEAD_HIGHER, (queue, priority, limit))[0][0]
    older = rows(conn, _AHEAD_OLDER, (queue, priority, seq, limit))[0][0]
    return int(higher), int(older)


# -- queue settings: pause and resume ---------------------------------------------------

_PAUSE = (
    "INSERT INTO queues (name, paused_at) VALUES (%s, %s) "
    "ON CONFLICT (name) DO UPDATE SET paused_at = excluded.paused_at "
    "WHERE queues.paused_at IS NULL"
)
_RESUME = "UPDATE queues SET paused_at = NULL WHERE name = %s AND paused_at IS NOT NULL"
_PAUSED = "SELECT name, paused_at FROM queues WHERE paused_at IS NOT NULL ORDER BY name"


def set_paused(conn: psycopg.Connection[Any], queue: str, paused: bool, now: float) -> bool:
    """As ``tq.store.schema_ops.set_paused``."""
    check_text(queue, "queue")
    statement, params = (_PAUSE, (queue, now)) if paused else (_RESUME, (queue,))
    return conn.execute(statement, params).rowcount > 0


def paused_queues(conn: psycopg.Connection[Any]) -> dict[str, float]:
    return {name: float(at) for name, at in rows(conn, _PAUSED)}
