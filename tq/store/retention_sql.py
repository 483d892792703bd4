"""Retention, for both backends: finished tasks deleted once their TTL has passed.

``expire`` runs in one write transaction and deletes at most ``limit`` tasks:
for each (queue, finished state) that has tasks (read from ``finished_counts``,
a small table the triggers keep), the oldest finished before ``now - ttl``,
through the ``tasks_finished`` index (queue, state, finished_at), so a pass
reads what it deletes plus one index probe per (queue, state), whatever the
size of the table. The caller (the broker's retention loop) calls it again
while a pass comes back full, yielding in between.

What goes with a task: its result, error and progress (columns of its row),
its own dependency edges (``task_deps`` rows where it is the dependent) and
the unique keys it holds (``task_unique`` rows naming it). Kept: a
finished task that is a dependency of a ``blocked`` task (met or not), so a
dependent's ``depends_on`` never names a task that vanished while it waits
(its status and explanation show every dependency with its state); and
edges from a kept task to a deleted dependency, so a dependent's record
still names what it depended on (read as a dependency no longer stored).
Never deleted: unfinished tasks (the state is in every WHERE), and on SQLite
the newest row (its sequence number would be reused: list cursors rely on
that, as ``tq purge`` does).
"""

from __future__ import annotations

import json
from typing import Any

from tq.core.retention import FINISHED, RetentionPolicy
from tq.core.states import State
from tq.store.schedule_sql import Dialect

_BLOCKED = State.BLOCKED.value
_KINDS_SQLITE = "SELECT queue, state FROM finished_counts WHERE n > 0 ORDER BY queue, state"
_KINDS_PG = (
    "SELECT queue, state FROM finished_counts GROUP BY queue, state HAVING sum(n) > 0 "
    "ORDER BY queue, state"
)
_WAITED_FOR = (  # a dependency of a task still blocked (met or not: it is shown with it)
    "EXISTS (SELECT 1 FROM task_deps e JOIN tasks b ON b.id = e.task "
    "WHERE e.depends_on = tasks.id AND b.state = ?)"
)
# the index's own condition, word for word: what lets the planners use a partial index
_IS_FINISHED = "state IN ('succeeded', 'dead', 'cancelled')"
_PICK_SQLITE = (
    f"SELECT id FROM tasks INDEXED BY tasks_finished WHERE {_IS_FINISHED} AND queue = ? "
    "AND state = ? "
    "AND finished_at < ? AND seq < (SELECT max(seq) FROM tasks) "
    f"AND NOT {_WAITED_FOR} ORDER BY finished_at LIMIT ?"
)
_PICK_PG = (
    f"SELECT id FROM tasks WHERE {_IS_FINISHED} AND queue = ? AND state = ? AND finished_at < ? "
    f"AND NOT {_WAITED_FOR} ORDER BY finished_at LIMIT ? FOR UPDATE SKIP LOCKED"
)
_DELETE_SQLITE = "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?)) AND state = ?"
_DELETE_EDGES_SQLITE = "DELETE FROM task_deps WHERE task IN (SELECT value FROM json_each(?))"
_DELETE_PG = "DELETE FROM tasks WHERE id = ANY(?) AND state = ?"
_DELETE_EDGES_PG = "DELETE FROM task_deps WHERE task = ANY(?)"
# the unique keys the deleted tasks held (a key whose holder is gone is free anyway:
# tq.store.unique_sql takes it over), found through task_unique_task
_DELETE_KEYS_SQLITE = "DELETE FROM task_unique WHERE task IN (SELECT value FROM json_each(?))"
_DELETE_KEYS_PG = "DELETE FROM task_unique WHERE task = ANY(?)"


def expire(
    conn: Any, d: Dialect, policy: RetentionPolicy, now: float, limit: int
) -> dict[tuple[str, str], int]:
    """Delete up to ``limit`` expired finished tasks; how many per (queue, state)."""
    pg = d.name == "postgresql"
    deleted: dict[tuple[str, str], int] = {}
    left = limit
    for queue, state in d.rows(conn, _KINDS_PG if pg else _KINDS_SQLITE):
        if left <= 0:
            break
        ttl = policy.ttl(queue, state)
        if state not in FINISHED or ttl <= 0:
            continue
        picked = d.rows(
            conn, _PICK_PG if pg else _PICK_SQLITE, (queue, state, now - ttl, _BLOCKED, left)
        )
        if not picked:
            continue
        ids = [row[0] for row in picked]
        listed: Any = ids if pg else json.dumps(ids)
        d.run(conn, _DELETE_EDGES_PG if pg else _DELETE_EDGES_SQLITE, (listed,))
        d.run(conn, _DELETE_KEYS_PG if pg else _DELETE_KEYS_SQLITE, (listed,))
        n = d.run(conn, _DELETE_PG if pg else _DELETE_SQLITE, (listed, state))
        deleted[(queue, state)] = n
        left -= n
    return deleted
