"""Caps and priority aging on the PostgreSQL store (as tq.store.schema_caps).

Contract: ``claim`` replaces ``tq.store.pg_schema.claim`` for the store. The
cap rows a claim falls under are read ``FOR UPDATE`` in (kind, name) order, so
two brokers claiming under the same cap take turns and each counts the other's
committed claims (READ COMMITTED: every statement sees what committed before
it). Index heads are read ``FOR UPDATE SKIP LOCKED`` like the plain claim.
Imports tq.core, tq.store.pg_schema, tq.store.schema and tq.store.claimplan.
"""

from __future__ import annotations

from typing import Any

import psycopg

from tq.core.task import Lease
from tq.store import pg_schema
from tq.store.claimplan import (
    QUEUE,
    TYPE,
    Aging,
    Cap,
    CapNote,
    ReadStatements,
    StatementReader,
    cap_of,
    default_burst,
    plan,
    spend,
)
from tq.store.pg_schema import rows
from tq.store.schema import _CLAIMED, _lease_tokens, row_to_lease

# Whether the last claim in this process fell under a cap: the writer then notifies the
# other brokers of every finished task (tq.store.pg_cluster.made_work). Process-wide:
# with several stores in one process a claim under a cap on one makes the others
# notify too, which costs a spurious wake-up, never a missed one.
CAPS_SEEN = [False]

_CAP_COLUMNS = "kind, name, concurrency, rate, burst, tokens, refilled_at"
_CAPS_FOR_QUEUES = (
    f"SELECT {_CAP_COLUMNS} FROM caps WHERE (kind = 'queue' AND name = ANY(%s::text[])) "
    "OR kind = 'type' ORDER BY kind, name FOR UPDATE"
)
_CAPS_FOR = (
    f"SELECT {_CAP_COLUMNS} FROM caps WHERE (kind = 'queue' AND name = ANY(%s::text[])) "
    "OR (kind = 'type' AND name = ANY(%s::text[])) ORDER BY kind, name FOR UPDATE"
)
_ALL_CAPS = f"SELECT {_CAP_COLUMNS} FROM caps ORDER BY kind, name"
_SAVE_BUCKET = "UPDATE caps SET tokens = %s, refilled_at = %s WHERE kind = %s AND name = %s"
_SET_CAP = (
    "INSERT INTO caps (kind, name, concurrency, rate, burst, tokens, refilled_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (kind, name) DO UPDATE SET "
    "concurrency = excluded.concurrency, rate = excluded.rate, burst = excluded.burst, "
    "tokens = least(caps.tokens, excluded.tokens), updated_at = excluded.updated_at"
)
_REMOVE_CAP = "DELETE FROM caps WHERE kind = %s AND name = %s RETURNING name"

_PENDING_IN = "state = 'pending' AND queue = %s"
_LEVEL = f"SELECT priority FROM tasks WHERE {_PENDING_IN} ORDER BY priority DESC, seq LIMIT 1"
_LEVEL_BELOW = (
    f"SELECT priority FROM tasks WHERE {_PENDING_IN} AND priority < %s "
    "ORDER BY priority DESC, seq LIMIT 1"
)
_LEVEL_TYPE = (
    f"SELECT priority FROM tasks WHERE {_PENDING_IN} AND type = %s "
    "ORDER BY priority DESC, seq LIMIT 1"
)
_LEVEL_TYPE_BELOW = (
    f"SELECT priority FROM tasks WHERE {_PENDING_IN} AND type = %s AND priority < %s "
    "ORDER BY priority DESC, seq LIMIT 1"
)
_LOCKED = "FOR UPDATE SKIP LOCKED"
_HEAD_COLUMNS = "SELECT priority, seq, created_at, type FROM tasks"
_HEADS = f"{_HEAD_COLUMNS} WHERE {_PENDING_IN} ORDER BY priority DESC, seq LIMIT %s {_LOCKED}"
_HEADS_AT = (
    f"{_HEAD_COLUMNS} WHERE {_PENDING_IN} AND priority = %s "
    f"ORDER BY priority DESC, seq LIMIT %s {_LOCKED}"
)
_HEADS_TYPE = (
    f"{_HEAD_COLUMNS} WHERE {_PENDING_IN} AND type = %s "
    f"ORDER BY priority DESC, seq LIMIT %s {_LOCKED}"
)
_HEADS_TYPE_AT = (
    f"{_HEAD_COLUMNS} WHERE {_PENDING_IN} AND type = %s AND priority = %s "
    f"ORDER BY priority DESC, seq LIMIT %s {_LOCKED}"
)
_NEXT_TYPE = (
    f"SELECT type FROM tasks WHERE {_PENDING_IN} AND type > %s "
    "ORDER BY type, priority DESC, seq LIMIT 1"
)
_RUNNING = {
    QUEUE: "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'running' AND queue = %s "
    "LIMIT %s) AS r",
    TYPE: "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'running' AND type = %s "
    "LIMIT %s) AS r",
}
_READS = ReadStatements(
    _LEVEL,
    _LEVEL_BELOW,
    _LEVEL_TYPE,
    _LEVEL_TYPE_BELOW,
    _HEADS,
    _HEADS_AT,
    _HEADS_TYPE,
    _HEADS_TYPE_AT,
    _NEXT_TYPE,
    _RUNNING,
)
_TAKE = (
    "UPDATE tasks SET state = %s, attempts = tasks.attempts + 1, started_at = %s, worker = %s, "
    "lease_token = c.token, lease_expires_at = %s "
    "FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS c(seq, token, k) "
    "WHERE tasks.seq = c.seq AND tasks.state = 'pending' RETURNING c.k, tasks.id, tasks.type, "
    "tasks.queue, tasks.payload, tasks.priority, tasks.attempts, tasks.max_retries, "
    "tasks.timeout, tasks.lease_token, tasks.trace"
)


def claim(
    conn: psycopg.Connection[Any],
    worker: str,
    queues: list[str],
    types: list[str] | None,
    n: int,
    now: float,
    lease_ttl: float,
    aging: Aging | None = None,
    note: CapNote | None = None,
) -> list[Lease]:
    """``tq.store.pg_schema.claim`` under the caps in force and the broker's aging."""
    if types is None:
        caps = [cap_of(row) for row in rows(conn, _CAPS_FOR_QUEUES, (queues,))]
    else:
        caps = [cap_of(row) for row in rows(conn, _CAPS_FOR, (queues, types))]
    CAPS_SEEN[0] = bool(caps)
    if not caps and aging is None:
        return pg_schema.claim(conn, worker, queues, types, n, now, lease_ttl)
    note = note if note is not None else CapNote()
    seqs, used = plan(StatementReader(conn, _READS), queues, types, n, now, caps, aging, note)
    for cap in spend(caps, used, now):
        conn.execute(_SAVE_BUCKET, (cap.tokens, cap.refilled_at, cap.kind, cap.name))
    if not seqs:
        return []
    expires = now + lease_ttl
    params = (_CLAIMED.value, now, worker, expires, seqs, _lease_tokens(len(seqs)))
    found = sorted(rows(conn, _TAKE, params), key=lambda row: row[0])
    return [row_to_lease(row, expires) for row in found]


def set_cap(conn: psycopg.Connection[Any], cap: Cap, now: float) -> Cap:
    """As ``tq.store.schema_caps.set_cap``."""
    burst = cap.burst
    if cap.rate is not None and burst is None:
        burst = default_burst(cap.rate)
    tokens = burst if burst is not None else 0.0
    conn.execute(_SET_CAP, (cap.kind, cap.name, cap.concurrency, cap.rate, burst, tokens, now, now))
    return Cap(cap.kind, cap.name, cap.concurrency, cap.rate, burst, tokens, now)


def remove_cap(conn: psycopg.Connection[Any], kind: str, name: str) -> bool:
    return bool(rows(conn, _REMOVE_CAP, (kind, name)))


def list_caps(conn: psycopg.Connection[Any]) -> list[Cap]:
    return [cap_of(row) for row in rows(conn, _ALL_CAPS)]


def running(conn: psycopg.Connection[Any], kind: str, name: str, limit: int) -> int:
    return StatementReader(conn, _READS).running(kind, name, limit)
