"""Task dependencies, for both backends: the ``task_deps`` edges and the release.

A task submitted with ``delay`` or ``run_at`` is stored like any other, then (in
the same transaction) made ``scheduled`` with its due time in ``run_at``; the
promoter makes it pending when that comes (``tasks_due`` index).

A task submitted with ``depends_on`` is stored like any other, then (in the
same transaction) made ``blocked`` with ``deps_left`` = its dependencies not
yet met, one ``task_deps`` row per edge (``pos`` its place in depends_on,
``done`` once it has counted), its ``dep_policy`` and ``dep_input``.

The release happens inside the transaction that finishes a dependency: every
write that can move a task to succeeded, dead or cancelled (reports, expired
or lost leases, cancels) calls ``settle`` with the tasks it finished. For each
of their edges not yet done whose dependent is still blocked:

    succeeded                          the edge is done, deps_left - 1
    dead/cancelled, policy "run"       the edge is done, deps_left - 1
    dead/cancelled, policy "wait"      nothing: the edge waits for a retried
                                       dependency to succeed
    dead/cancelled, policy "cancel"    the dependent is cancelled, its error naming
                                       the dependency; its own dependents follow

A dependent whose ``deps_left`` reaches 0 becomes pending in the same
statement (the decrement and the state change are one conditional UPDATE,
so two brokers finishing two dependencies at once on PostgreSQL release it
exactly once), or ``scheduled`` when it has a due time of its own still
ahead (``run_at``, or ``dep_delay`` seconds after that moment: the later),
and its ``dep_input`` (``{"mode": "result"|"results", "key":
K}``) puts its dependencies' results into its payload then. An edge counts
once (``done``), so a dependency that died, counted for a "run" dependent,
then was retried and succeeded, does not count twice.

Submitting: ``submit`` inserts through the backend's own insert, then reads
the dependencies' states (PostgreSQL: ``FOR SHARE``, so a dependency being
finished by another broker is read after that commits, or finishes after
this commits and then sees these edges). A dependency already succeeded
counts as met; one already dead or cancelled counts as finished (the policy
decides at once). "#N" names the N-th task of the same submit, which must
come earlier, so one submit cannot form a cycle and ids that exist already
cannot either.

Statements are written once with ``?`` placeholders (``schedule_sql.Dialect``
turns them into psycopg's); lists travel as JSON on SQLite, as arrays on
PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from tq.core.errors import InvalidRequest, NotFound
from tq.core.states import Event, State, next_state
from tq.core.task import Task, TaskError, TaskSpec
from tq.core.when import due_at
from tq.store import history_sql
from tq.store.base import OutcomeResult, SubmitResult
from tq.store.schedule_sql import Dialect
from tq.store.schema import TASK_COLUMNS, row_to_task

MAX_GRAPH = 20_000  # tasks a workflow listing walks at most
_BLOCKED = State.BLOCKED.value
_UNBLOCKED = next_state(State.BLOCKED, Event.UNBLOCK).value
_CANCELLED = next_state(State.BLOCKED, Event.CANCEL).value
_FAILED_ENDS = frozenset({State.DEAD.value, State.CANCELLED.value})


def _in(d: Dialect, column: str) -> str:
    if d.name == "postgresql":
        return f"{column} = ANY(?)"
    return f"{column} IN (SELECT value FROM json_each(?))"


def _list(d: Dialect, values: Sequence[str]) -> Any:
    return list(values) if d.name == "postgresql" else json.dumps(list(values))


_STATES = "SELECT id, state FROM tasks WHERE {ids}"
_BLOCK = (  # run_at and dep_delay: the task's own due time, judged when it is released
    "UPDATE tasks SET state = ?, deps_left = ?, dep_policy = ?, dep_input = ?, run_at = ?, "
    "dep_delay = ? WHERE id = ?"
)
_EDGE = "INSERT INTO task_deps (task, depends_on, pos, done) VALUES (?, ?, ?, ?)"
_PENDING_EDGES = (  # the open edges of finished dependencies, with their dependents
    "SELECT e.task, e.depends_on, t.dep_policy, t.state FROM task_deps e "
    "JOIN tasks t ON t.id = e.task WHERE {deps} AND e.done = 0 ORDER BY e.task, e.depends_on"
)
_EDGE_DONE = "UPDATE task_deps SET done = 1 WHERE task = ? AND depends_on = ? AND done = 0"
# the decrement and the release in one conditional statement: pending, or scheduled
# when the task's own due time (run_at, or now + dep_delay, the later) is still ahead
_DUE_AFTER = "{later}(coalesce(run_at, 0), ? + coalesce(dep_delay, 0))"
_COUNT_DOWN = (
    "UPDATE tasks SET deps_left = deps_left - ?, "
    f"state = CASE WHEN deps_left - ? > 0 THEN state WHEN {_DUE_AFTER} > ? THEN ? ELSE ? END, "
    f"run_at = CASE WHEN deps_left - ? > 0 THEN run_at WHEN {_DUE_AFTER} > ? THEN {_DUE_AFTER} "
    "ELSE NULL END "
    "WHERE id = ? AND state = ? RETURNING state, queue, dep_input"
)
_COUNT_DOWN_SQLITE = _COUNT_DOWN.format(later="max")
_COUNT_DOWN_PG = _COUNT_DOWN.format(later="greatest")
_LATER = next_state(State.BLOCKED, Event.UNBLOCK_LATER).value
_CANCEL_DEPENDENT = (
    "UPDATE tasks SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state = ? RETURNING id"
)
_INPUTS = (
    "SELECT d.result FROM task_deps e JOIN tasks d ON d.id = e.depends_on "
    "WHERE e.task = ? ORDER BY e.pos"
)
_PAYLOAD = "SELECT payload FROM tasks WHERE id = ?"
_SET_PAYLOAD = "UPDATE tasks SET payload = ? WHERE id = ?"
_DEPENDENCIES = (
    "SELECT e.depends_on, t.state, e.done FROM task_deps e LEFT JOIN tasks t "
    "ON t.id = e.depends_on WHERE e.task = ? ORDER BY e.pos"
)
_EDGES_OF = (
    "SELECT task, depends_on FROM task_deps WHERE {tasks} UNION "
    "SELECT task, depends_on FROM task_deps WHERE {deps}"
)
# delayed tasks of a submit, one row each through the id index (an UPDATE ... FROM
# json_each lets SQLite's planner walk the whole table once per row: quadratic)
_SCHEDULE_SQLITE = "UPDATE tasks SET state = ?, run_at = ? WHERE id = ? AND state = ?"
_SCHEDULE_PG = (
    "UPDATE tasks SET state = ?, run_at = j.run_at FROM unnest(?::text[], ?::float8[]) "
    "AS j(id, run_at) WHERE tasks.id = j.id AND tasks.state = ?"
)
_SCHEDULED = State.SCHEDULED.value
_EXISTS = "SELECT 1 FROM tasks WHERE id = ?"
_STATE = "SELECT state FROM tasks WHERE id = ?"


@dataclass
class Settled:
    """What ``settle`` changed besides the finished tasks themselves."""

    released: list[tuple[str, str]] = field(default_factory=list)  # (id, queue) now pending
    # (id, queue) done waiting for dependencies, now scheduled until their own due time
    scheduled: list[tuple[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    cause: dict[str, str] = field(default_factory=dict)  # changed id -> finished task behind it


def needed(specs: Sequence[TaskSpec]) -> bool:
    """Whether a submit takes ``submit`` here (dependencies or due times) rather than
    the backend's plain insert."""
    return any(
        spec.depends_on or spec.delay is not None or spec.run_at is not None for spec in specs
    )


def submit(conn: Any, d: Dialect, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
    """Insert ``specs`` (some with dependencies) in the caller's transaction."""
    refs = _resolve(specs)
    results = d.insert(conn, specs, now)
    ids = [r.id for r in results]
    _schedule(conn, d, specs, results, now)
    named = sorted({ref for deps in refs for ref in deps if isinstance(ref, str)})
    states: dict[str, str] = {r.id: State.PENDING.value for r in results if r.created}
    if named:
        statement = _STATES.format(ids=_in(d, "id"))
        if d.name == "postgresql":
            statement += " ORDER BY id FOR SHARE"
        states.update(d.rows(conn, statement, (_list(d, named),)))
        for ref in named:
            if ref not in states:
                raise NotFound(
                    f"a task depends on {ref}, but there is no task with that id; "
                    "nothing was submitted"
                )
    for index, spec in enumerate(specs):
        if not refs[index] or not results[index].created:
            continue
        deps = [ids[ref] if isinstance(ref, int) else ref for ref in refs[index]]
        for dep in deps:
            if dep not in states:  # an earlier task of this submit matched by its key
                states[dep] = str(d.rows(conn, _STATE, (dep,))[0][0])
        left = 0
        failed: str | None = None
        edges = []
        for pos, dep in enumerate(deps):
            state = states[dep]
            met = state == State.SUCCEEDED.value or (
                state in _FAILED_ENDS and spec.on_dependency_failure == "run"
            )
            if state in _FAILED_ENDS and spec.on_dependency_failure == "cancel" and not failed:
                failed = dep
            left += not met
            edges.append((ids[index], dep, pos, int(met)))
        for edge in edges:
            d.run(conn, _EDGE, edge)
        dep_input = _input_text(spec)
        d.run(
            conn,
            _BLOCK,
            (
                _BLOCKED, left, spec.on_dependency_failure, dep_input, spec.run_at, spec.delay,
                ids[index],
            ),
        )  # fmt: skip
        states[ids[index]] = _BLOCKED
        if failed is not None:
            _cancel(conn, d, ids[index], failed, states[failed], now)
            states[ids[index]] = _CANCELLED
        elif left == 0:
            states[ids[index]] = _count_down(conn, d, ids[index], 0, now)[0]
    return results


def _schedule(
    conn: Any, d: Dialect, specs: Sequence[TaskSpec], results: Sequence[SubmitResult], now: float
) -> None:
    """Make the new delayed tasks of a submit ``scheduled`` with their due time, in the
    submit's transaction (inserted pending, so no claim ever sees them that way)."""
    due: list[tuple[str, float]] = []
    for spec, result in zip(specs, results, strict=True):
        if spec.depends_on:  # due after its dependencies: judged at its release
            continue
        if result.created and (spec.delay is not None or spec.run_at is not None):
            at = due_at(spec.delay, spec.run_at, now)
            if at is not None:
                due.append((result.id, at))
    if not due:
        return
    pending = State.PENDING.value
    if d.name == "postgresql":
        ids, times = [i for i, _ in due], [t for _, t in due]
        d.run(conn, _SCHEDULE_PG, (_SCHEDULED, ids, times, pending))
    else:
        rows = [(_SCHEDULED, at, task_id, pending) for task_id, at in due]
        conn.executemany(_SCHEDULE_SQLITE, rows).fetchall()


def _resolve(specs: Sequence[TaskSpec]) -> list[list[str | int]]:
    """Each spec's dependencies: an int for "#N" (an earlier task of the submit), else an id."""
    out: list[list[str | int]] = []
    for index, spec in enumerate(specs):
        deps: list[str | int] = []
        for dep in spec.depends_on or ():
            if dep.startswith("#"):
                number = dep[1:]
                if not (number.isascii() and number.isdigit()) or int(number) >= index:
                    raise InvalidRequest(
                        f'task {index} depends on {dep!r}: "#N" must name an earlier task '
                        f"of the same submit (0..{index - 1}), so that no cycle can form; "
                        "nothing was submitted"
                    )
                deps.append(int(number))
            else:
                deps.append(dep)
        out.append(deps)
    return out


def _input_text(spec: TaskSpec) -> str | None:
    if spec.input is None:
        return None
    return json.dumps({"mode": spec.input, "key": spec.result_key})


def settle(conn: Any, d: Dialect, finished: dict[str, str], now: float) -> Settled:
    """Count the edges of tasks that just finished (id -> end state); release the
    dependents all of whose dependencies are met, cancel the ones whose policy says
    so, and follow cancelled ones down the graph. In the caller's transaction."""
    out = Settled()
    frontier = dict(finished)
    cause = {task_id: task_id for task_id in finished}
    while frontier:
        found = d.rows(
            conn, _PENDING_EDGES.format(deps=_in(d, "e.depends_on")), (_list(d, list(frontier)),)
        )
        counts: dict[str, int] = {}
        last: dict[str, str] = {}  # the dependency whose end counted last, for the history
        cancel: dict[str, str] = {}
        for task, dep, policy, state in found:
            if state != _BLOCKED:
                continue
            end = frontier[dep]
            if end == State.SUCCEEDED.value or policy == "run":
                if d.run(conn, _EDGE_DONE, (task, dep)):
                    counts[task] = counts.get(task, 0) + 1
                    last[task] = dep
                    cause.setdefault(task, cause[dep])
            elif policy == "cancel" and task not in cancel:
                cancel[task] = dep
                cause[task] = cause[dep]
        nxt: dict[str, str] = {}
        for task, dep in cancel.items():
            history_sql.note(conn, d.name, now, f"dependency:{dep}")
            if _cancel(conn, d, task, dep, frontier[dep], now):
                out.cancelled.append(task)
                out.cause[task] = cause[task]
                nxt[task] = _CANCELLED
        for task, n in counts.items():
            if task in cancel:
                continue
            history_sql.note(conn, d.name, now, f"dependency:{last[task]}")
            state, queue = _count_down(conn, d, task, n, now)
            if state in (_UNBLOCKED, _LATER):
                (out.released if state == _UNBLOCKED else out.scheduled).append((task, queue))
                out.cause[task] = cause[task]
        frontier = nxt
    return out


_ENDS = frozenset({State.SUCCEEDED.value, *_FAILED_ENDS})


def after_complete(
    conn: Any, d: Dialect, results: list[OutcomeResult], now: float
) -> list[OutcomeResult]:
    """``settle`` the tasks a batch of reports finished; each result names the
    dependents its task released or cancelled (``OutcomeResult.dependents``)."""
    finished = {r.id: str(r.state) for r in results if r.accepted and r.state in _ENDS}
    if not finished:
        return results
    settled = settle(conn, d, finished, now)
    if not settled.cause:
        return results
    by_cause: dict[str, list[str]] = {}
    for task, root in settled.cause.items():
        by_cause.setdefault(root, []).append(task)
    return [
        replace(r, dependents=tuple(by_cause.pop(r.id))) if r.accepted and r.id in by_cause else r
        for r in results
    ]


def after_release(conn: Any, d: Dialect, ids: list[str], now: float) -> list[str]:
    """``settle`` the tasks released leases left dead; ``ids`` as given."""
    if ids:
        found = d.rows(conn, _STATES.format(ids=_in(d, "id")), (_list(d, ids),))
        dead = {task: state for task, state in found if state in _ENDS}
        if dead:
            settle(conn, d, dead, now)
    return ids


def after_cancel(conn: Any, d: Dialect, task: Task, now: float) -> Task:
    """``settle`` a task just cancelled."""
    settle(conn, d, {task.id: task.state.value}, now)
    return task


def _count_down(conn: Any, d: Dialect, task: str, n: int, now: float) -> tuple[str, str]:
    """``n`` more of a blocked task's dependencies are met: its state and queue after
    (still blocked, pending, or scheduled until its own due time), its input filled in
    once it is released."""
    statement = _COUNT_DOWN_PG if d.name == "postgresql" else _COUNT_DOWN_SQLITE
    params = (n, n, now, now, _LATER, _UNBLOCKED, n, now, now, now, task, _BLOCKED)
    rows = d.rows(conn, statement, params)
    if not rows:
        return _BLOCKED, ""
    state, queue, dep_input = rows[0]
    if state != _BLOCKED and dep_input is not None:
        _inject(conn, d, task, dep_input)
    return str(state), str(queue)


def _cancel(conn: Any, d: Dialect, task: str, dep: str, end: str, now: float) -> bool:
    error = TaskError(
        "DependencyFailed", f"dependency {dep} ended {end}, so this task was cancelled"
    )
    packed = msgpack.packb(
        {"type": error.type, "message": error.message, "traceback": ""}, use_bin_type=True
    )
    return bool(d.rows(conn, _CANCEL_DEPENDENT, (_CANCELLED, now, packed, task, _BLOCKED)))


def _inject(conn: Any, d: Dialect, task: str, dep_input: str) -> None:
    """Put the dependencies' results into the released task's payload."""
    spec = json.loads(dep_input)
    key = spec.get("key")
    results = [_unpack(row[0]) for row in d.rows(conn, _INPUTS, (task,))]
    if key is not None:
        results = [r.get(key) if isinstance(r, dict) else None for r in results]
    value = results if spec.get("mode") == "results" else (results[0] if results else None)
    payload = _unpack(d.rows(conn, _PAYLOAD, (task,))[0][0])
    payload = {**payload, "input": value} if isinstance(payload, dict) else value
    packed = msgpack.packb(payload, use_bin_type=True)
    d.run(conn, _SET_PAYLOAD, (packed, task))


def _unpack(data: bytes | None) -> Any:
    if data is None:
        return None
    return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)


# -- reads ----------------------------------------------------------------------------


def dependencies(conn: Any, d: Dialect, task_id: str) -> list[tuple[str, str | None, bool]]:
    """The task's dependencies in depends_on order: (id, state or None if purged, met)."""
    if not d.rows(conn, _EXISTS, (task_id,)):
        raise NotFound(f"no task with id {task_id}")
    found = d.rows(conn, _DEPENDENCIES, (task_id,))
    return [(dep, state, bool(done)) for dep, state, done in found]


def graph(
    conn: Any, d: Dialect, task_id: str, limit: int = MAX_GRAPH
) -> tuple[list[Task], list[tuple[str, str]], bool]:
    """The workflow around ``task_id``: every task linked to it by edges, either way
    (ids in discovery order), the edges (task, depends_on), and whether ``limit`` cut
    the walk short."""
    if not d.rows(conn, _EXISTS, (task_id,)):
        raise NotFound(f"no task with id {task_id}")
    seen = {task_id: None}
    edges: dict[tuple[str, str], None] = {}
    frontier = [task_id]
    statement = _EDGES_OF.format(tasks=_in(d, "task"), deps=_in(d, "depends_on"))
    while frontier and len(seen) < limit:
        ids = _list(d, frontier)
        frontier = []
        for task, dep in d.rows(conn, statement, (ids, ids)):
            edges[(task, dep)] = None
            for node in (task, dep):
                if node not in seen and len(seen) < limit:
                    seen[node] = None
                    frontier.append(node)
    statement = f"SELECT {TASK_COLUMNS} FROM tasks WHERE {_in(d, 'id')}"
    found = d.rows(conn, statement, (_list(d, list(seen)),))
    by_id = {row[0]: row_to_task(row) for row in found}
    tasks = [by_id[node] for node in seen if node in by_id]
    return tasks, list(edges), bool(frontier)
