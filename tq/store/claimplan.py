"""Claims with caps and priority aging: which pending tasks a claim takes (both stores).

Contract: pure planning over a ``Reader``; ``StatementReader`` is the one Reader,
running each store's own statements on the connection it is given, inside the
claim's transaction (tq.store.schema_caps for SQLite, tq.store.pg_caps for
PostgreSQL). Imports nothing of tq but tq.core.

**Caps.** A cap names a queue or a task type and limits it cluster-wide: at most
``concurrency`` tasks running at once and at most ``rate`` started per second
(a token bucket of ``burst`` tokens, refilled at ``rate`` per second; in any
window of ``w`` seconds at most ``burst + rate * w`` tasks start). The running
count is an index count (``tasks_running_queue`` / ``tasks_running_type``,
counted up to the cap), the bucket is the cap's row, updated in the claim's
transaction. PostgreSQL locks the cap rows a claim reads (``FOR UPDATE``, in
one order), so claims on a capped queue or type serialise across brokers; the
SQLite store has a single writer. A claim takes at most the allowance of every
cap its tasks fall under.

**Aging.** With a rate ``r`` (priority points per second) and a cap ``c``
(points), a pending task's effective priority is ``priority + min(c, r * wait)``.
Claims take the highest effective priority first, ties by submission order.
Within one priority the oldest task has the highest effective priority, so the
best tasks are among the heads of the priority levels; a claim walks the levels
of the claim index from the top (one O(log n) probe per level) and stops at the
first level ``p`` with ``p + c`` below the n-th best effective priority found:
at most ``c + 1`` levels (priorities are whole numbers), whatever the backlog.
The result is exact. Within one priority a claim takes tasks in submission
order even if clocks disagree (effective priorities are made non-increasing
along the level).

**Type caps for a claim of any type.** When type caps exist and a claim takes
any type, the claim reads each pending type of the queue separately (a skip
scan of ``tasks_claim_type``: O(types * log n)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

QUEUE = "queue"
TYPE = "type"
KINDS = (QUEUE, TYPE)
CLOCK_STEP = 5.0  # seconds a claim's clock may lag a bucket's before it counts as a step back


@dataclass(slots=True)
class Cap:
    """A cap row: ``kind`` queue or type, ``name``; None: that limit is not set."""

    kind: str
    name: str
    concurrency: int | None = None
    rate: float | None = None
    burst: float | None = None
    tokens: float = 0.0
    refilled_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "burst": self.burst,
        }

    def refilled(self, now: float) -> float:
        """The bucket's tokens at ``now`` (rate caps only)."""
        if self.rate is None:
            return math.inf
        burst = self.burst if self.burst is not None else default_burst(self.rate)
        return min(burst, self.tokens + max(0.0, now - self.refilled_at) * self.rate)

    def next_token_at(self, now: float) -> float:
        """When the bucket holds a whole token again (``now`` if it does)."""
        tokens = self.refilled(now)
        if tokens >= 1 or self.rate is None:
            return now
        return now + (1 - tokens) / self.rate


def default_burst(rate: float) -> float:
    """A bucket holds one second's worth of tokens, and at least one."""
    return max(1.0, rate)


@dataclass(slots=True, frozen=True)
class Aging:
    """Effective priority = priority + min(cap, rate * seconds waited)."""

    rate: float  # priority points per second, > 0
    cap: float  # points, > 0

    def effective(self, priority: int, created_at: float, now: float) -> float:
        return priority + min(self.cap, self.rate * max(0.0, now - created_at))


@dataclass(slots=True)
class CapNote:
    """What stopped a claim (filled by the store, read by the broker): ``capped`` when
    some cap left pending tasks unclaimed, ``refill_in`` the seconds until the first
    bucket that held a claim back gets a token again."""

    capped: bool = False
    refill_in: float | None = None
    blocked: list[str] = field(default_factory=list)


class Reader(Protocol):
    """The store's side of a planned claim (inside the claim's transaction)."""

    def level(self, queue: str, type_: str | None, below: int | None) -> int | None:
        """The highest priority below ``below`` (None: any) with a pending task."""

    def heads(
        self, queue: str, type_: str | None, priority: int | None, limit: int
    ) -> list[tuple[int, int, float, str]]:
        """Up to ``limit`` pending tasks (priority, seq, created_at, type) in claim
        order; of one priority if ``priority`` is given."""

    def next_type(self, queue: str, after: str | None) -> str | None:
        """The smallest type name after ``after`` with a pending task in ``queue``."""

    def running(self, kind: str, name: str, limit: int) -> int:
        """Running tasks of a queue or type, counted up to ``limit``."""


@dataclass(frozen=True)
class ReadStatements:
    """The statements a ``StatementReader`` runs, in one store's SQL dialect: the
    highest pending level (of a queue, or of a queue and type; below a priority or
    not), the heads of those, the next type with pending tasks, running counts."""

    level: str
    level_below: str
    level_type: str
    level_type_below: str
    heads: str
    heads_at: str
    heads_type: str
    heads_type_at: str
    next_type: str
    running: Mapping[str, str]  # kind -> statement


class StatementReader:
    """``Reader`` over one connection of either store (APSW and psycopg both answer
    ``execute(statement, params).fetchall()``), inside the claim's transaction."""

    def __init__(self, conn: Any, sql: ReadStatements) -> None:
        self.conn = conn
        self.sql = sql

    def _rows(self, statement: str, params: Sequence[Any]) -> list[Any]:
        rows: list[Any] = self.conn.execute(statement, params).fetchall()
        return rows

    def level(self, queue: str, type_: str | None, below: int | None) -> int | None:
        sql = self.sql
        if type_ is None:
            found = (
                self._rows(sql.level, (queue,))
                if below is None
                else self._rows(sql.level_below, (queue, below))
            )
        elif below is None:
            found = self._rows(sql.level_type, (queue, type_))
        else:
            found = self._rows(sql.level_type_below, (queue, type_, below))
        return int(found[0][0]) if found else None

    def heads(
        self, queue: str, type_: str | None, priority: int | None, limit: int
    ) -> list[tuple[int, int, float, str]]:
        sql = self.sql
        if type_ is None:
            if priority is None:
                return self._rows(sql.heads, (queue, limit))
            return self._rows(sql.heads_at, (queue, priority, limit))
        if priority is None:
            return self._rows(sql.heads_type, (queue, type_, limit))
        return self._rows(sql.heads_type_at, (queue, type_, priority, limit))

    def next_type(self, queue: str, after: str | None) -> str | None:
        # type names are never empty, so "type > ''" finds the first one
        found = self._rows(self.sql.next_type, (queue, "" if after is None else after))
        return str(found[0][0]) if found else None

    def running(self, kind: str, name: str, limit: int) -> int:
        return int(self._rows(self.sql.running[kind], (name, limit))[0][0])


def cap_of(row: Sequence[Any]) -> Cap:
    """A cap from its row (kind, name, concurrency, rate, burst, tokens, refilled_at)."""
    kind, name, concurrency, rate, burst, tokens, refilled_at = row
    return Cap(kind, name, concurrency, rate, burst, tokens, refilled_at)


def allowances(
    reader: Reader, caps: Sequence[Cap], now: float, note: CapNote
) -> dict[tuple[str, str], float]:
    """How many tasks each cap lets this claim start (0: none)."""
    allowed: dict[tuple[str, str], float] = {}
    for cap in caps:
        allow = math.inf
        if cap.concurrency is not None:
            running = reader.running(cap.kind, cap.name, cap.concurrency)
            allow = max(0, cap.concurrency - running)
        if cap.rate is not None:
            tokens = math.floor(cap.refilled(now))
            if tokens < allow:
                allow = max(0, tokens)
                if allow == 0:
                    wait = cap.next_token_at(now) - now
                    note.refill_in = wait if note.refill_in is None else min(note.refill_in, wait)
        allowed[(cap.kind, cap.name)] = allow
    return allowed


def _stream(
    reader: Reader,
    queue: str,
    type_: str | None,
    limit: int,
    aging: Aging | None,
    now: float,
) -> list[tuple[float, int, int, str]]:
    """The best ``limit`` tasks of one (queue[, type]): (effective, seq, priority, type)."""
    if aging is None:
        return [(float(p), seq, p, t) for p, seq, _, t in reader.heads(queue, type_, None, limit)]
    found: list[tuple[float, int, int, str]] = []
    below: int | None = None
    while True:
        level = reader.level(queue, type_, below)
        if level is None:
            break
        if len(found) >= limit:
            found.sort(key=lambda c: (-c[0], c[1]))
            del found[limit:]
            if level + aging.cap < found[-1][0]:
                break
        ceiling = math.inf
        for p, seq, created, t in reader.heads(queue, type_, level, limit):
            ceiling = min(ceiling, aging.effective(p, created, now))  # oldest first
            found.append((ceiling, seq, p, t))
        below = level
    found.sort(key=lambda c: (-c[0], c[1]))
    return found[:limit]


def plan(
    reader: Reader,
    queues: Sequence[str],
    types: Sequence[str] | None,
    n: int,
    now: float,
    caps: Sequence[Cap],
    aging: Aging | None,
    note: CapNote,
) -> tuple[list[int], dict[tuple[str, str], int]]:
    """The seqs to lease, best first, and how many of them fall under each cap."""
    allowed = allowances(reader, caps, now, note)
    type_capped = any(kind == TYPE for kind, _ in allowed)
    candidates: list[tuple[float, int, int, str, str]] = []
    for queue in queues:
        q_allow = allowed.get((QUEUE, queue), math.inf)
        if q_allow <= 0:
            note.capped = True
            note.blocked.append(f"queue {queue}")
            continue
        if types is not None:
            names: Sequence[str | None] = list(types)
        elif type_capped:
            names = []
            name = reader.next_type(queue, None)
            while name is not None:
                names.append(name)
                name = reader.next_type(queue, name)
        else:
            names = [None]
        for type_ in names:
            t_allow = math.inf if type_ is None else allowed.get((TYPE, type_), math.inf)
            if t_allow <= 0:
                note.capped = True
                note.blocked.append(f"type {type_}")
                continue
            limit = int(min(n, q_allow, t_allow))
            for e, seq, p, t in _stream(reader, queue, type_, limit, aging, now):
                candidates.append((e, seq, p, t, queue))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    chosen: list[int] = []
    used: dict[tuple[str, str], int] = {}
    for _, seq, _, type_, queue in candidates:
        if len(chosen) >= n:
            break
        keys = [(QUEUE, queue), (TYPE, type_)]
        if any(used.get(k, 0) >= allowed.get(k, math.inf) for k in keys):
            note.capped = True
            continue
        chosen.append(seq)
        for k in keys:
            if k in allowed:
                used[k] = used.get(k, 0) + 1
    return chosen, used


def spend(caps: Sequence[Cap], used: dict[tuple[str, str], int], now: float) -> list[Cap]:
    """The rate caps' buckets after this claim (refilled to ``now``, minus what it took).

    A claim whose ``now`` is a little behind the bucket's (on PostgreSQL ``now`` is
    the transaction's start, and a claim that started first may lock the cap row
    second) leaves ``refilled_at`` where it is: moving it back would let the next
    claim refill the same interval twice. A clock stepped back by more than
    ``CLOCK_STEP`` moves it back (else the bucket would not refill until the clock
    caught up)."""
    changed = []
    for cap in caps:
        if cap.rate is None:
            continue
        cap.tokens = cap.refilled(now) - used.get((cap.kind, cap.name), 0)
        if not 0 < cap.refilled_at - now <= CLOCK_STEP:
            cap.refilled_at = now
        changed.append(cap)
    return changed
