"""The SQL of the operator surface: queue depth, purge, bulk retry, probe.

Same rules as ``tq.store.schema``: constant statement texts, plain synchronous
operations of one APSW connection (writes inside the writer's transaction,
reads on the reader), cursors always exhausted, every state change asked of
``tq.core.states``. No migration: these queries use the indexes of
migration 1.

Cost, and why: ``stats()`` counts every row (history included), ~0.1-0.3 s
at 300k rows. ``queue_depth`` must be cheap enough to poll (metrics,
``tq queue-depth --watch``), so it counts only tasks that are not finished,
each state through the partial index that already exists for it
(``tasks_claim`` for pending, covering; ``tasks_lease`` for running;
``tasks_state`` for anything else): its cost grows with the backlog, never
with history. Failed and scheduled tasks are read from ``due_counts``, kept by
triggers: a million tasks scheduled for next month cost a few rows.

Purge deletes finished tasks in chunks (``limit`` rows per call, each call
its own write operation) so a large purge never holds the writer for long,
and it **never deletes the newest row** (the highest ``seq``): ``seq`` is an
``INTEGER PRIMARY KEY`` without AUTOINCREMENT, so SQLite would hand the
values of deleted newest rows out again. Keeping the high-water row means a
``seq`` is never reused, so insertion order stays the listing order and
cursors (task ids resolved to their ``seq``) stay meaningful for the life of
the database. A cursor whose own task was purged between two pages is
refused (``invalid``); start the listing again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import apsw

from tq.core.errors import InvalidRequest
from tq.core.states import TERMINAL, Event, State, next_state, sources
from tq.store.base import QueueDepth
from tq.store.schema import _rows, state_is

# -- queue depth: every unfinished state through an index that holds it ---------------

_ACTIVE = frozenset(State) - TERMINAL
_BY_INDEX: tuple[tuple[str, frozenset[State]], ...] = (
    ("tasks_claim", sources(Event.CLAIM)),  # partial: state = 'pending', covering
    ("tasks_lease", sources(Event.LEASE_EXPIRED_RETRY)),  # partial: running
)
# failed and scheduled: counted by triggers (schema.DUE_COUNTS_MIGRATION), a backlog of a million
# scheduled tasks costs a read of a few rows, not a walk of tasks_due
_COUNTED = sources(Event.DUE)
DUE_COUNTS = "SELECT queue, priority, state, n FROM due_counts WHERE n > 0"
_COVERED = frozenset().union(_COUNTED, *(states for _, states in _BY_INDEX))


def _depth_statement(index: str, states: frozenset[State]) -> str:
    where = state_is(states)
    if len(states) == 1:  # the state is the index's own: no table lookup for it
        (state,) = states
        return (
            f"SELECT queue, priority, '{state.value}', count(*) FROM tasks INDEXED BY {index} "
            f"WHERE {where} GROUP BY queue, priority"
        )
    return (
        f"SELECT queue, priority, state, count(*) FROM tasks INDEXED BY {index} "
        f"WHERE {where} GROUP BY queue, priority, state"
    )


_UNCOVERED = _ACTIVE - _COVERED  # blocked: no partial index; (state, seq) finds its rows
DEPTH_STATEMENTS: tuple[str, ...] = (
    *(
        _depth_statement(index, states)
        for index, states in (*_BY_INDEX, ("tasks_state", _UNCOVERED))
        if states
    ),
    DUE_COUNTS,
)


def queue_depth(conn: apsw.Connection) -> list[QueueDepth]:
    """(queue, priority, state, count) of every unfinished task, sorted."""
    rows = [row for statement in DEPTH_STATEMENTS for row in _rows(conn, statement)]
    return sorted(QueueDepth(queue, priority, state, n) for queue, priority, state, n in rows)


# -- purge: finished tasks, oldest first, in chunks, never the newest row ---------------

PURGEABLE = TERMINAL
_NOT_NEWEST = "seq < (SELECT max(seq) FROM tasks)"
PURGE = (
    "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_state "
    f"WHERE state = ? AND finished_at < ? AND {_NOT_NEWEST} ORDER BY seq LIMIT ?) RETURNING id"
)
# a purged task's own dependency edges go with it; edges of kept tasks to a purged
# dependency stay (the dependent still names it, read as a dependency no longer stored)
PURGE_EDGES = "DELETE FROM task_deps WHERE task IN (SELECT value FROM json_each(?))"
PURGE_KEYS = "DELETE FROM task_unique WHERE task IN (SELECT value FROM json_each(?))"
COUNT_PURGEABLE = (
    "SELECT count(*) FROM tasks INDEXED BY tasks_state "
    f"WHERE state = ? AND finished_at < ? AND {_NOT_NEWEST}"
)


def purge_states(states: Sequence[str]) -> list[State]:
    """The states to purge, checked: finished states only; InvalidRequest otherwise."""
    if not states:
        raise InvalidRequest("purge needs at least one state")
    known = {s.value for s in PURGEABLE}
    bad = sorted({s for s in states if s not in known})
    if bad:
        raise InvalidRequest(
            f"cannot purge {', '.join(map(repr, bad))}: only finished tasks "
            f"({', '.join(sorted(known))}) can be purged"
        )
    return sorted({State(s) for s in states})


def purge(conn: apsw.Connection, states: list[State], cutoff: float, limit: int) -> int:
    """Delete up to ``limit`` tasks in ``states`` that finished before ``cutoff``."""
    deleted = 0
    for state in states:
        if deleted >= limit:
            break
        ids = [row[0] for row in _rows(conn, PURGE, (state.value, cutoff, limit - deleted))]
        if ids:
            _rows(conn, PURGE_EDGES, (json.dumps(ids),))
            _rows(conn, PURGE_KEYS, (json.dumps(ids),))
        deleted += len(ids)
    return deleted


def count_purgeable(conn: apsw.Connection, states: list[State], cutoff: float) -> int:
    return sum(int(_rows(conn, COUNT_PURGEABLE, (s.value, cutoff))[0][0]) for s in states)


# -- bulk retry: every task in one state back to pending --------------------------------

_RETRY_TARGET = {state: next_state(state, Event.RETRY) for state in sources(Event.RETRY)}
RETRY_MANY = (
    "UPDATE tasks SET state = ?, attempts = 0, run_at = NULL, finished_at = NULL, "
    "lease_token = NULL, lease_expires_at = NULL WHERE seq IN (SELECT seq FROM tasks "
    "INDEXED BY tasks_state WHERE state = ? ORDER BY seq LIMIT ?) RETURNING id"
)


def retry_state(state: str) -> State:
    """The state a bulk retry takes tasks from, checked against the states table."""
    try:
        source = State(state)
    except ValueError:
        source = None
    if source not in _RETRY_TARGET:
        known = ", ".join(sorted(s.value for s in _RETRY_TARGET))
        raise InvalidRequest(f"cannot retry {state!r} tasks; retry takes {known} tasks")
    return source


def retry_many(conn: apsw.Connection, state: State, limit: int) -> list[str]:
    """Up to ``limit`` tasks in ``state`` (oldest first) back to pending; their ids."""
    rows = _rows(conn, RETRY_MANY, (_RETRY_TARGET[state].value, state.value, limit))
    return [row[0] for row in rows]


# -- probe: is the database readable at all ----------------------------------------------

PROBE = "SELECT count(*) FROM sqlite_schema"


def probe(conn: apsw.Connection) -> int:
    return int(_rows(conn, PROBE)[0][0])


# -- explain: how many pending tasks of its queue a claim takes first ------------------

AHEAD_LIMIT = 10_000  # counted up to this; more is reported as "at least"
_PLACE = "SELECT queue, priority, seq, state FROM tasks WHERE id = ?"
_AHEAD_HIGHER = (
    "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_claim "
    "WHERE state = 'pending' AND queue = ? AND priority > ? LIMIT ?)"
)
_AHEAD_OLDER = (
    "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_claim "
    "WHERE state = 'pending' AND queue = ? AND priority = ? AND seq < ? LIMIT ?)"
)


def ahead(conn: apsw.Connection, task_id: str, limit: int = AHEAD_LIMIT) -> tuple[int, int] | None:
    """For a pending task: (tasks of higher priority, older tasks of its priority) in its
    queue that a claim takes before it, each counted up to ``limit`` (two range reads
    of ``tasks_claim``: the cost is the count, never the backlog). None if the task is
    not pending; NotFound if there is no such task."""
    from tq.core.errors import NotFound

    found = _rows(conn, _PLACE, (task_id,))
    if not found:
        raise NotFound(f"no task with id {task_id}")
    queue, priority, seq, state = found[0]
    if state != State.PENDING:
        return None
    higher = _rows(conn, _AHEAD_HIGHER, (queue, priority, limit))[0][0]
    older = _rows(conn, _AHEAD_OLDER, (queue, priority, seq, limit))[0][0]
    return int(higher), int(older)


# -- queue settings: pause and resume ---------------------------------------------------

_PAUSE = (
    "INSERT INTO queues (name, paused_at) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET paused_at = excluded.paused_at "
    "WHERE queues.paused_at IS NULL"
)
_RESUME = "UPDATE queues SET paused_at = NULL WHERE name = ? AND paused_at IS NOT NULL"
_PAUSED = "SELECT name, paused_at FROM queues WHERE paused_at IS NOT NULL ORDER BY name"


def set_paused(conn: apsw.Connection, queue: str, paused: bool, now: float) -> bool:
    """Pause (or resume) ``queue``; True if that changed it (False: it already was)."""
    if paused:
        conn.execute(_PAUSE, (queue, now)).fetchall()
    else:
        conn.execute(_RESUME, (queue,)).fetchall()
    return bool(conn.changes())


def paused_queues(conn: apsw.Connection) -> dict[str, float]:
    """Paused queue -> when it was paused."""
    return {name: float(at) for name, at in _rows(conn, _PAUSED)}
