"""Caps and priority aging on the SQLite store: the claim's reads and the cap rows.

Contract: ``claim`` replaces ``tq.store.schema.claim`` for the store: with no
cap on the claim's queues or types and aging off it is that claim; otherwise
``tq.store.claimplan`` picks the tasks through the ``Reader`` below (each read
one probe of a claim index, named with INDEXED BY) and the same CLAIM_TAKE
leases them, in the writer's transaction. Imports tq.core, tq.store.schema and
tq.store.claimplan.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import apsw

from tq.core.task import Lease
from tq.store import schema
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

_CAP_COLUMNS = "kind, name, concurrency, rate, burst, tokens, refilled_at"
_CAPS_FOR_QUEUES = (
    f"SELECT {_CAP_COLUMNS} FROM caps WHERE (kind = 'queue' AND name IN "
    "(SELECT value FROM json_each(?))) OR kind = 'type' ORDER BY kind, name"
)
_CAPS_FOR = (
    f"SELECT {_CAP_COLUMNS} FROM caps WHERE (kind = 'queue' AND name IN "
    "(SELECT value FROM json_each(?))) OR (kind = 'type' AND name IN "
    "(SELECT value FROM json_each(?))) ORDER BY kind, name"
)
_ALL_CAPS = f"SELECT {_CAP_COLUMNS} FROM caps ORDER BY kind, name"
_SAVE_BUCKET = "UPDATE caps SET tokens = ?, refilled_at = ? WHERE kind = ? AND name = ?"
_SET_CAP = (
    "INSERT INTO caps (kind, name, concurrency, rate, burst, tokens, refilled_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET "
    "concurrency = excluded.concurrency, rate = excluded.rate, burst = excluded.burst, "
    "tokens = min(caps.tokens, excluded.tokens), updated_at = excluded.updated_at"
)
_REMOVE_CAP = "DELETE FROM caps WHERE kind = ? AND name = ? RETURNING name"

_LEVEL = (
    "SELECT priority FROM tasks INDEXED BY tasks_claim WHERE state = 'pending' AND queue = ? "
    "ORDER BY priority DESC, seq LIMIT 1"
)
_LEVEL_BELOW = (
    "SELECT priority FROM tasks INDEXED BY tasks_claim WHERE state = 'pending' AND queue = ? "
    "AND priority < ? ORDER BY priority DESC, seq LIMIT 1"
)
_LEVEL_TYPE = (
    "SELECT priority FROM tasks INDEXED BY tasks_claim_type WHERE state = 'pending' "
    "AND queue = ? AND type = ? ORDER BY priority DESC, seq LIMIT 1"
)
_LEVEL_TYPE_BELOW = (
    "SELECT priority FROM tasks INDEXED BY tasks_claim_type WHERE state = 'pending' "
    "AND queue = ? AND type = ? AND priority < ? ORDER BY priority DESC, seq LIMIT 1"
)
_HEADS = (
    "SELECT priority, seq, created_at, type FROM tasks INDEXED BY tasks_claim "
    "WHERE state = 'pending' AND queue = ? ORDER BY priority DESC, seq LIMIT ?"
)
_HEADS_AT = (
    "SELECT priority, seq, created_at, type FROM tasks INDEXED BY tasks_claim "
    "WHERE state = 'pending' AND queue = ? AND priority = ? ORDER BY seq LIMIT ?"
)
_HEADS_TYPE = (
    "SELECT priority, seq, created_at, type FROM tasks INDEXED BY tasks_claim_type "
    "WHERE state = 'pending' AND queue = ? AND type = ? ORDER BY priority DESC, seq LIMIT ?"
)
_HEADS_TYPE_AT = (
    "SELECT priority, seq, created_at, type FROM tasks INDEXED BY tasks_claim_type "
    "WHERE state = 'pending' AND queue = ? AND type = ? AND priority = ? ORDER BY seq LIMIT ?"
)
_NEXT_TYPE = (
    "SELECT type FROM tasks INDEXED BY tasks_claim_type WHERE state = 'pending' AND queue = ? "
    "AND type > ? ORDER BY type LIMIT 1"
)
_RUNNING = {
    QUEUE: "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_running_queue "
    "WHERE state = 'running' AND queue = ? LIMIT ?)",
    TYPE: "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_running_type "
    "WHERE state = 'running' AND type = ? LIMIT ?)",
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


def _rows(conn: apsw.Connection, statement: str, params: Sequence[Any] = ()) -> list[Any]:
    return conn.execute(statement, params).fetchall()


def caps_for(conn: apsw.Connection, queues: list[str], types: list[str] | None) -> list[Cap]:
    """The caps a claim on these queues (and types; None: any type) falls under."""
    if types is None:
        found = _rows(conn, _CAPS_FOR_QUEUES, (json.dumps(queues),))
    else:
        found = _rows(conn, _CAPS_FOR, (json.dumps(queues), json.dumps(types)))
    return [cap_of(row) for row in found]


def claim(
    conn: apsw.Connection,
    worker: str,
    queues: list[str],
    types: list[str] | None,
    n: int,
    now: float,
    lease_ttl: float,
    aging: Aging | None = None,
    note: CapNote | None = None,
) -> list[Lease]:
    """``tq.store.schema.claim`` under the caps in force and the broker's aging."""
    caps = caps_for(conn, queues, types)
    if not caps and aging is None:
        return schema.claim(conn, worker, queues, types, n, now, lease_ttl)
    note = note if note is not None else CapNote()
    seqs, used = plan(StatementReader(conn, _READS), queues, types, n, now, caps, aging, note)
    for cap in spend(caps, used, now):
        _rows(conn, _SAVE_BUCKET, (cap.tokens, cap.refilled_at, cap.kind, cap.name))
    if not seqs:
        return []
    tokens = schema._lease_tokens(len(seqs))
    chosen = [[seq, token] for seq, token in zip(seqs, tokens, strict=True)]
    expires = now + lease_ttl
    params = (schema._CLAIMED.value, now, worker, expires, json.dumps(chosen))
    order = {seq: position for position, seq in enumerate(seqs)}
    rows = sorted(_rows(conn, schema.CLAIM_TAKE, params), key=lambda row: order[row[0]])
    return [schema.row_to_lease(row, expires) for row in rows]


def set_cap(conn: apsw.Connection, cap: Cap, now: float) -> Cap:
    """Add or change a cap (an upsert; a lowered burst empties the bucket to it)."""
    burst = cap.burst
    if cap.rate is not None and burst is None:
        burst = default_burst(cap.rate)
    tokens = burst if burst is not None else 0.0
    params = (cap.kind, cap.name, cap.concurrency, cap.rate, burst, tokens, now, now)
    _rows(conn, _SET_CAP, params)
    return Cap(cap.kind, cap.name, cap.concurrency, cap.rate, burst, tokens, now)


def remove_cap(conn: apsw.Connection, kind: str, name: str) -> bool:
    return bool(_rows(conn, _REMOVE_CAP, (kind, name)))


def list_caps(conn: apsw.Connection) -> list[Cap]:
    return [cap_of(row) for row in _rows(conn, _ALL_CAPS)]


def running(conn: apsw.Connection, kind: str, name: str, limit: int) -> int:
    return StatementReader(conn, _READS).running(kind, name, limit)
