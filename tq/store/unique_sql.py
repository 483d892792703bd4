"""Unique tasks: the keys they hold, taken in the submit's own transaction.

A spec with ``unique_for`` holds a key (``tq.core.task.unique_key_of``: its
explicit ``unique_key``, else a digest of its type and payload) in its queue:
one row of ``task_unique`` per (queue, key), naming the task that holds it and
``until`` (its submit time + ``unique_for``). A later submit of the same key
in the same queue answers the holder's id (``created`` false) while the holder
is unfinished **or** ``until`` has not passed; otherwise (the holder finished
and the window passed, or the holder was purged) it takes the key over.

Invariants:

* **Cluster-wide.** The row is claimed with ``INSERT ... ON CONFLICT DO
  NOTHING`` and, when it exists, read ``FOR UPDATE`` (PostgreSQL) before it is
  judged, all in the transaction that inserts the task. Two brokers submitting
  one key at once: the second's insert waits for the first's commit and then
  sees its row, so exactly one task is created.
* **Scoped by queue.** A key is unique within its queue, so a key limited to
  some queues can only ever be answered the id of a task in a queue it may
  use (no lookup across queues happens at all).
* **Bounded.** One row per (queue, key) ever used; a taken-over key reuses its
  row. Rows of finished tasks past their window stay until the key is used
  again or the task is deleted (retention or ``tq purge`` delete its rows with
  it, through the ``task_unique_task`` index).

Specs without ``unique_for`` in the same submit are inserted as usual. A
submit mixing unique specs with ``"#N"`` dependency references is refused
(a duplicate is not inserted, which would shift what ``#N`` names).

May import: tq.core, tq.store.schedule_sql (the dialect).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tq.core.errors import InvalidRequest
from tq.core.states import TERMINAL
from tq.core.task import TaskSpec, unique_key_of
from tq.store.base import SubmitResult
from tq.store.schedule_sql import Dialect

_HOLD = (
    "INSERT INTO task_unique (queue, key, task, until) VALUES (?, ?, '', ?) "
    "ON CONFLICT (queue, key) DO NOTHING RETURNING queue"
)
_HOLDER = (
    "SELECT u.task, u.until, t.state FROM task_unique u LEFT JOIN tasks t ON t.id = u.task "
    "WHERE u.queue = ? AND u.key = ?"
)
_TAKE_OVER = "UPDATE task_unique SET task = '', until = ? WHERE queue = ? AND key = ?"
_NAME_HOLDER = "UPDATE task_unique SET task = ? WHERE queue = ? AND key = ?"
_FINISHED = frozenset(state.value for state in TERMINAL)

Insert = Callable[[Any, Dialect, Sequence[TaskSpec], float], list[SubmitResult]]


def has_unique(specs: Sequence[TaskSpec]) -> bool:
    return any(spec.unique_for is not None for spec in specs)


def check(specs: Sequence[TaskSpec]) -> None:
    """Refuse what this module cannot keep: unique specs beside ``"#N"`` references."""
    if any(dep.startswith("#") for spec in specs for dep in spec.depends_on or ()):
        raise InvalidRequest(
            'a submit with unique_for tasks cannot name dependencies by "#N": submit '
            "the unique tasks first, then depend on their ids; nothing was submitted"
        )


def submit(
    conn: Any, d: Dialect, specs: Sequence[TaskSpec], now: float, insert: Insert
) -> list[SubmitResult]:
    """Insert ``specs`` (some unique) in the caller's transaction, in order; a spec
    whose key is held answers the holder's id instead (``created`` false)."""
    results: list[SubmitResult | None] = [None] * len(specs)
    fresh: list[int] = []  # indexes of the specs to insert
    taken: dict[tuple[str, str], int] = {}  # key -> index of the spec of this submit taking it
    later: dict[int, int] = {}  # a spec whose key an earlier spec of this submit takes
    for index, spec in enumerate(specs):
        key = unique_key_of(spec)
        if key is None:
            fresh.append(index)
            continue
        slot = (spec.queue, key)
        if slot in taken:
            later[index] = taken[slot]
            continue
        holder = _hold(conn, d, slot, now + (spec.unique_for or 0.0), now)
        if holder is not None:
            results[index] = SubmitResult(holder, created=False)
            continue
        taken[slot] = index
        fresh.append(index)
    inserted = insert(conn, d, [specs[i] for i in fresh], now) if fresh else []
    for index, result in zip(fresh, inserted, strict=True):
        results[index] = result
    for (queue, key), index in taken.items():
        holder_id = results[index].id  # type: ignore[union-attr]
        d.run(conn, _NAME_HOLDER, (holder_id, queue, key))
    for index, first in later.items():
        results[index] = SubmitResult(results[first].id, created=False)  # type: ignore[union-attr]
    return [r for r in results if r is not None]


def _hold(conn: Any, d: Dialect, slot: tuple[str, str], until: float, now: float) -> str | None:
    """Take the key (None), or the id of the task holding it."""
    queue, key = slot
    if d.rows(conn, _HOLD, (queue, key, until)):
        return None
    statement = _HOLDER + (" FOR UPDATE OF u" if d.name == "postgresql" else "")
    task, held_until, state = d.rows(conn, statement, (queue, key))[0]
    if state is not None and (state not in _FINISHED or held_until > now):
        return str(task)
    d.run(conn, _TAKE_OVER, (until, queue, key))  # finished and past the window, or purged
    return None
