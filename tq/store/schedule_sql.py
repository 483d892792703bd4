"""The SQL of recurring schedules, for both backends (the ``schedules`` table).

One function per verb, each a plain synchronous operation on one connection
(APSW or psycopg), run by the store's writer or reader like every other verb.
The statements are written once with ``?`` placeholders; ``Dialect`` turns
them into psycopg's ``%s`` and supplies the backend's task insert.

Firing is one write transaction per batch of due schedules: read the due
rows (``schedules_due`` index: ``next_at`` of schedules not paused; on
PostgreSQL ``FOR UPDATE SKIP LOCKED``, so brokers sharing the database fire
disjoint schedules), decide with ``tq.core.schedule.plan``, insert the tasks
(each with the idempotency key of its tick, so a tick inserts at most one
task whatever happens) and move ``next_at``, all committed together: a tick
fires exactly once, across restarts and brokers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, TypeVar

import msgpack

from tq.core.errors import NotFound
from tq.core.schedule import Schedule, next_after, plan, tick_key
from tq.core.task import TaskSpec
from tq.store.base import SubmitResult

COLUMNS = (
    "name, cron, timezone, task, missed, next_at, paused_at, last_fired_at, last_task, fired, "
    "created_at, updated_at"
)
FIRE_BATCH = 100  # due schedules fired per transaction
MAX_LISTED = 10_000  # schedules a listing returns at most


@dataclass(frozen=True)
class Dialect:
    name: str  # "sqlite" or "postgresql"
    insert: Callable[[Any, Sequence[TaskSpec], float], list[SubmitResult]]

    def sql(self, statement: str) -> str:
        return _to_pg(statement) if self.name == "postgresql" else statement

    def rows(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(conn.execute(self.sql(statement), params).fetchall())

    def run(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> int:
        """A statement without rows; the number of rows it changed."""
        cursor = conn.execute(self.sql(statement), params)
        if self.name == "postgresql":
            return int(cursor.rowcount)
        cursor.fetchall()  # APSW: exhausted, as every cursor
        return int(conn.changes())


@cache
def _to_pg(statement: str) -> str:
    return statement.replace("?", "%s")


def _row(row: Sequence[Any]) -> Schedule:
    task = msgpack.unpackb(row[3], raw=False, strict_map_key=False)
    return Schedule(
        name=row[0],
        cron=row[1],
        timezone=row[2],
        task=task,
        missed=row[4],
        next_at=float(row[5]),
        paused_at=None if row[6] is None else float(row[6]),
        last_fired_at=None if row[7] is None else float(row[7]),
        last_task=row[8],
        fired=int(row[9]),
        created_at=float(row[10]),
        updated_at=float(row[11]),
    )


def _encode(task: dict[str, Any]) -> bytes:
    return msgpack.packb(task, use_bin_type=True)


_PUT = (
    f"INSERT INTO schedules ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, 0, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone, "
    "task = excluded.task, missed = excluded.missed, updated_at = excluded.updated_at, "
    "next_at = CASE WHEN schedules.cron = excluded.cron "
    "AND schedules.timezone = excluded.timezone THEN schedules.next_at "
    "ELSE excluded.next_at END"
)
_GET = f"SELECT {COLUMNS} FROM schedules WHERE name = ?"
_LIST = f"SELECT {COLUMNS} FROM schedules ORDER BY name LIMIT ?"
_REMOVE = "DELETE FROM schedules WHERE name = ?"
_PAUSE = "UPDATE schedules SET paused_at = ?, updated_at = ? WHERE name = ? AND paused_at IS NULL"
_RESUME = (
    "UPDATE schedules SET paused_at = NULL, next_at = ?, updated_at = ? "
    "WHERE name = ? AND paused_at IS NOT NULL"
)
_DUE = (
    f"SELECT {COLUMNS} FROM schedules WHERE paused_at IS NULL AND next_at <= ? "
    "ORDER BY next_at LIMIT ?"
)
_FIRED = (
    "UPDATE schedules SET next_at = ?, last_fired_at = ?, last_task = ?, fired = fired + ? "
    "WHERE name = ?"
)
_NEXT = "SELECT min(next_at) FROM schedules WHERE paused_at IS NULL"
_RAN = "UPDATE schedules SET last_fired_at = ?, last_task = ?, fired = fired + 1 WHERE name = ?"


def put(conn: Any, d: Dialect, schedule: Schedule) -> tuple[Schedule, bool]:
    """Add or redeclare (upsert by name); a redeclared schedule keeps its history, and
    its next tick unless the cron expression or time zone changed. (The schedule as
    stored, created?)"""
    existed = bool(d.rows(conn, _GET, (schedule.name,)))
    s = schedule
    task = _encode(s.task)
    d.run(
        conn,
        _PUT,
        (s.name, s.cron, s.timezone, task, s.missed, s.next_at, s.created_at, s.updated_at),
    )
    return get(conn, d, s.name), not existed


def get(conn: Any, d: Dialect, name: str) -> Schedule:
    found = d.rows(conn, _GET, (name,))
    if not found:
        raise NotFound(f"no schedule named {name!r} (tq schedule list shows them)")
    return _row(found[0])


def listing(conn: Any, d: Dialect) -> list[Schedule]:
    return [_row(row) for row in d.rows(conn, _LIST, (MAX_LISTED,))]


def remove(conn: Any, d: Dialect, name: str) -> bool:
    return d.run(conn, _REMOVE, (name,)) > 0


def set_paused(conn: Any, d: Dialect, name: str, paused: bool, now: float) -> tuple[Schedule, bool]:
    """Pause or resume; a resumed schedule's next tick is the first after ``now`` (ticks
    while it was paused are not fired). (The schedule, changed?)"""
    current = get(conn, d, name)
    if paused:
        changed = d.run(conn, _PAUSE, (now, now, name))
    else:
        changed = d.run(conn, _RESUME, (next_after(current, now), now, name))
    return get(conn, d, name), changed > 0


def next_at(conn: Any, d: Dialect) -> float | None:
    found = d.rows(conn, _NEXT)
    return None if not found or found[0][0] is None else float(found[0][0])


@dataclass(frozen=True)
class Fired:
    schedule: str
    task_ids: list[str]
    queue: str
    type: str
    skipped: int | None  # past ticks not fired (None: too many to count)


def fire_due(conn: Any, d: Dialect, now: float, limit: int = FIRE_BATCH) -> list[Fired]:
    """Fire the schedules due at ``now`` (at most ``limit``), in the caller's write
    transaction: insert their tasks and move their next tick together."""
    statement = _DUE + (" FOR UPDATE SKIP LOCKED" if d.name == "postgresql" else "")
    out: list[Fired] = []
    for row in d.rows(conn, statement, (now, limit)):
        schedule = _row(row)
        decided = plan(schedule, now)
        specs = [
            TaskSpec.from_mapping({**schedule.task, "idempotency_key": tick_key(schedule.name, t)})
            for t in decided.fire
        ]
        results = d.insert(conn, specs, now) if specs else []
        ids = [r.id for r in results]
        last = ids[-1] if ids else schedule.last_task
        fired_at = now if ids else schedule.last_fired_at
        d.run(conn, _FIRED, (decided.next_at, fired_at, last, len(ids), schedule.name))
        queue, kind = str(schedule.task.get("queue")), str(schedule.task.get("type"))
        out.append(Fired(schedule.name, ids, queue, kind, decided.skipped))
    return out


def run_now(conn: Any, d: Dialect, name: str, now: float) -> tuple[Schedule, str]:
    """Submit the schedule's task once, now, outside its ticks (its next tick stays)."""
    schedule = get(conn, d, name)
    [result] = d.insert(conn, [TaskSpec.from_mapping(schedule.task)], now)
    d.run(conn, _RAN, (now, result.id, name))
    ran = replace(schedule, last_fired_at=now, last_task=result.id, fired=schedule.fired + 1)
    return ran, result.id


T = TypeVar("T")


class ScheduleVerbs:
    """The store verbs of schedules (the Store protocol's), for a store class that has
    ``_read``/``_write`` (its reader and writer) and names its ``_dialect``."""

    _dialect: Dialect

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _write(
        self, fn: Callable[..., T], *args: Any, weight: int = 1, note: Any = None
    ) -> T:
        raise NotImplementedError

    async def put_schedule(self, schedule: Schedule) -> tuple[Schedule, bool]:
        return await self._write(put, self._dialect, schedule)

    async def get_schedule(self, name: str) -> Schedule:
        return await self._read(get, self._dialect, name)

    async def list_schedules(self) -> list[Schedule]:
        return await self._read(listing, self._dialect)

    async def remove_schedule(self, name: str) -> bool:
        return await self._write(remove, self._dialect, name)

    async def pause_schedule(self, name: str, paused: bool, now: float) -> tuple[Schedule, bool]:
        return await self._write(set_paused, self._dialect, name, paused, now)

    async def fire_schedules(self, now: float) -> list[Fired]:
        return await self._write(fire_due, self._dialect, now, note=(None, "schedule"))

    async def run_schedule(self, name: str, now: float) -> tuple[Schedule, str]:
        return await self._write(run_now, self._dialect, name, now, note=(None, f"schedule:{name}"))

    async def next_schedule_at(self) -> float | None:
        return await self._read(next_at, self._dialect)
