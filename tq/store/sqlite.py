"""The SQLite task store: APSW, WAL mode, one writer with group commit.

    async with open_sqlite_store("tq.db") as store:
        [res] = await store.submit([TaskSpec(type="email")], now=time.time())

Contract: implements ``tq.store.base.Store``. When a write method returns,
its transaction is committed. Every state change is asked of
``tq.core.states`` (``sources`` gives the WHERE clauses of bulk updates,
``next_state`` the target of each single-task change). All SQL text lives
in ``tq.store.schema`` (tasks, migrations) and ``tq.store.schema_auth``
(API keys, audit log).

Durability (``synchronous``; the journal is always WAL):
    "full"    (default) a committed transaction survives a crash of the process
              AND a power loss or OS crash: the WAL is fsynced at every commit.
    "normal"  a committed transaction survives a crash of the process (kill -9),
              but the last transactions before a power loss or OS crash may
              roll back (the WAL is fsynced only at checkpoints). The database
              is never corrupted either way.

Connections and threads: APSW connections raise rather than wait when used
from two threads at once, so each connection has one owner, serialised by
its own ``trio.CapacityLimiter(1)``:
    writer        every write, in batches (below); wal_autocheckpoint=0
    reader        list / stats / next_due, one short statement each
    pointer       small reads on the event loop's own thread, no limiter: get,
                  depth, caps, paused queues; every read bounded to
                  POINT_STEPS VM steps, beyond which it runs on the reader
    checkpointer  ``PRAGMA wal_checkpoint(PASSIVE)`` at most ~1 s after a commit
                  (sooner after many commits), so no commit pays for a
                  checkpoint; when the WAL has grown long under steady writes,
                  a RESTART in the writer's turn (it holds the writer's
                  limiter for that moment); TRUNCATE once writes go idle.

Group commit: a write call enqueues an operation (a sync function of the
writer connection and its arguments) and waits. The writer task takes every
queued operation (at most MAX_BATCH_WEIGHT rows) and makes one thread hop for the
batch: ``BEGIN IMMEDIATE``, each operation inside its own SAVEPOINT (an
operation that raises rolls back only itself and its exception goes to its
caller only; a batch of one needs no savepoint), ``COMMIT``; then, and only
then, it wakes the callers. Consecutive plain submits of a batch with the same
history actor (concurrent single submits: the web-app pattern) are inserted by
one statement under one savepoint (``_run_grouped``); if it fails, they run one
by one as above, so a failure stays its own submit's.
Operations that arrive while a batch runs form the next batch, so under load
one fsync is shared by many calls. Light operations (weight <= SMALL_WEIGHT)
queued with heavy ones get a transaction of their own first, and before
heavy-only work the writer lets the event loop run LIGHT_GRACE_ROUNDS rounds
so that a light request just read can still go first (``_take_batch``). A
submit's rows (ids, encoded payloads) are built before its operation is
queued, so its transaction holds the writer only for the INSERT. If BEGIN or
COMMIT fails (disk full, I/O error, database locked by another process) every
caller of the batch gets a StoreError. A caller cancelled before its operation
was taken is dropped from the queue; once taken, the operation runs and commits
regardless.
A lone light write (nothing queued, no transaction running) skips the queue:
its caller makes the thread hop itself, in the writer's turn (the writer's
limiter), and is answered after its own COMMIT, exactly as from a batch of
one; writes arriving meanwhile queue for the writer as they would behind any
batch. This saves the writer task's wake-up and hand-back (with the broker's
direct answers, a single durable submit's broker CPU went down by 14 %:
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import builtins
import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import apsw
import trio

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import ConfigError, InvalidRequest, StoreError, TQError, Unavailable
from tq.core.retention import RetentionPolicy
from tq.core.states import Event, State
from tq.core.task import Lease, ListFilter, Outcome, Task, TaskSpec
from tq.store import (
    deps_sql,
    history_sql,
    retention_sql,
    schedule_sql,
    schema,
    schema_auth,
    schema_caps,
    schema_ops,
    unique_sql,
)
from tq.store.base import (
    PROMOTE_BATCH,
    ClusterState,
    OutcomeResult,
    QueueDepth,
    Store,
    StoreStats,
    SubmitResult,
)
from tq.store.claimplan import Aging, Cap, CapNote

log = logging.getLogger(__name__)
T = TypeVar("T")

SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


def _sqlite_insert(conn: Any, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
    return schema.submit(conn, list(specs), now)


_DIALECT = schedule_sql.Dialect("sqlite", _sqlite_insert)


def _insert_any(conn: Any, d: Any, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
    """Insert specs with or without dependencies or due times (for tq.store.unique_sql)."""
    if deps_sql.needed(specs):
        return deps_sql.submit(conn, d, specs, now)
    return _sqlite_insert(conn, specs, now)


# Writes that may finish a task settle its dependents in the same transaction.
def _complete(conn: Any, outcomes: list[Outcome], now: float) -> list[OutcomeResult]:
    if len(outcomes) == 1:  # a lone success: one statement, and none to settle if no dependents
        done = schema.complete_one_ok(conn, outcomes[0], now)
        if done is not None:
            result, dependents = done
            if not dependents:
                return [result]
            return deps_sql.after_complete(conn, _DIALECT, [result], now)
    return deps_sql.after_complete(conn, _DIALECT, schema.complete(conn, outcomes, now), now)


def _release_expired(conn: Any, now: float) -> list[str]:
    return deps_sql.after_release(conn, _DIALECT, schema.release_expired(conn, now), now)


def _release_worker(conn: Any, worker: str, now: float) -> list[str]:
    ids = schema.release_worker(conn, worker, now)
    return deps_sql.after_release(conn, _DIALECT, ids, now)


def _cancel(conn: Any, task_id: str, now: float) -> Task:
    task = schema.change_one(conn, task_id, Event.CANCEL, now)
    return deps_sql.after_cancel(conn, _DIALECT, task, now)


MIN_SQLITE = (3, 45)  # what the SQL in schema.py needs; apsw>=3.45 bundles at least this
# Rows per transaction (an operation's weight is its row count). Any write that
# arrives meanwhile waits for the transaction in progress, ~5 us per row: 250 rows
# keep that wait near 1-2 ms (with 1000-row transactions and requests, single
# submits under load measured p99 ~18 ms instead of 7-10, for ~10 % more
# end-to-end throughput; docs/BENCHMARKS.md).
# One operation heavier than this (a larger submit request) still runs alone.
MAX_BATCH_WEIGHT = 250
SMALL_WEIGHT = 8  # operations this light jump ahead of a heavy queue head, once
LIGHT_GRACE_ROUNDS = 3  # scheduling rounds a heavy-only batch waits for light writes to queue
PREPARE_CHUNK = 250  # submitted rows built (ids, encoding) between event-loop checkpoints
BUSY_TIMEOUT_MS = 5000
CHECKPOINT_BUSY_TIMEOUT_MS = 100  # never stall the writer for long behind a TRUNCATE
POINT_BUSY_TIMEOUT_MS = 0  # point reads on the event loop never wait: busy -> reader thread
# SQLite VM steps a read may take on the event loop's thread before it is interrupted
# and run on the reader thread instead (_read_here): ~4-5 ns a step here, so at most
# ~0.1 ms of stall and of wasted work, less than one thread hop costs (~0.15-0.3 ms).
# Counted in grains by the progress handler: SQLite calls it when a statement's
# lifetime step count crosses a multiple of the grain, and a cached statement's
# count carries over from its earlier runs, so one read is counted by the calls
# it gets (the first may come early: the budget is exact to one grain).
POINT_STEP_GRAIN = 1000
POINT_STEPS = 25_000
OVER_BUDGET_PAUSE = 1.0  # seconds a read that ran over POINT_STEPS goes straight to the thread
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
CACHE_SIZE_KIB = 32 * 1024  # writer page cache: keeps the claim index hot, bounds RSS
CHECKPOINT_INTERVAL = 1.0  # seconds from a commit to the next PASSIVE checkpoint
CHECKPOINT_AFTER_COMMITS = 500  # ... or sooner, after this many commits
WAL_RESTART_FRAMES = 8192  # ~32 MiB of 4 KiB pages: start the WAL over (see _checkpoint)
_CHECKPOINTS = {
    mode: f"PRAGMA wal_checkpoint({mode})" for mode in ("PASSIVE", "RESTART", "TRUNCATE")
}
MAX_LIST_LIMIT = 10_000
MAX_BULK_LIMIT = 10_000  # rows one purge / retry_many operation may touch (one write batch)


@asynccontextmanager
async def open_sqlite_store(
    path: str | os.PathLike[str], *, synchronous: str = "full"
) -> AsyncIterator[SQLiteStore]:
    """Open (creating and migrating if needed) the store at ``path``; close it on exit."""
    mode = SYNCHRONOUS.get(str(synchronous).lower())
    if mode is None:
        raise ConfigError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
    path = os.fspath(path)
    with trio.CancelScope(shield=True):  # a cancelled open must not leak connections
        conns = await trio.to_thread.run_sync(_connect, path, mode)
    store = SQLiteStore(path, mode.lower(), *conns)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._writer_loop)
            nursery.start_soon(store._checkpoint_loop)
            try:
                yield store
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                await store.aclose()
    except BaseExceptionGroup as group:
        # The body ran inside our nursery, which wrapped its exception: unwrap it, so
        # callers see their own exception rather than a group.
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        raise
    finally:
        await store.aclose()


class _Op:
    """One queued write: ``fn(writer_connection, *args)``, run inside a batch."""

    __slots__ = (
        "abandoned",
        "args",
        "deferred",
        "done",
        "error",
        "fn",
        "note",
        "result",
        "weight",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        weight: int = 1,
        note: Note | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.weight = max(1, weight)
        # (now, actor) for the task history of the changes it makes (tq.store.history_sql)
        self.note = note
        self.deferred = False  # a heavy op lets light ones go first at most once
        self.result: Any = None
        self.error: BaseException | None = Unavailable("the store closed before this write ran")
        self.done = trio.Event()
        self.abandoned = False


_Batch = list[_Op]
Note = tuple[Any, "str | None"]  # (now or None, actor or None): see tq.store.history_sql


class SQLiteStore(schedule_sql.ScheduleVerbs):  # schedules: schedule_sql.py
    """The Store over one SQLite file. Create it with ``open_sqlite_store``."""

    cluster: ClusterState | None = None  # one broker per file: it is the whole cluster

    _dialect = _DIALECT

    def __init__(
        self,
        path: str,
        synchronous: str,
        writer: apsw.Connection,
        reader: apsw.Connection,
        checkpointer: apsw.Connection,
        prober: apsw.Connection,
        pointer: apsw.Connection,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.commits = 0  # transactions committed by the writer (one per batch)
        self.committed_ops = 0  # operations in those transactions
        self.grouped_ops = 0  # submits inserted together with others by one statement
        self.checkpoints = dict.fromkeys(_CHECKPOINTS, 0)  # completed, by mode
        self._writer = writer
        self._noted = _Noted()  # the writer's history note (see _run_op)
        self._reader = reader
        self._checkpointer = checkpointer
        self._prober = prober
        self._pointer = pointer  # used only by the event loop's thread (see _read_here)
        self._over_budget: dict[Callable[..., Any], float] = {}  # read -> trio time to retry
        self._grains_left = 0  # of the read running on the pointer connection
        # tasks asked for by claims queued or running, by (queues, types) (see claim)
        self._claims_pending: dict[tuple[Any, ...], int] = {}
        self._claims_done = trio.Event()  # set as each such claim ends
        # every read of the event loop's connection is bounded (see _read_here)
        pointer.set_progress_handler(self._count_grain, POINT_STEP_GRAIN)
        self._probe_limiter = trio.CapacityLimiter(1)
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._checkpoint_limiter = trio.CapacityLimiter(1)
        self._queue: deque[_Op] = deque()
        self._writing = False  # a write transaction is running (or waits for its turn)
        self._wake = trio.Event()
        self._dirty = trio.Event()  # a commit since the last checkpoint
        self._urgent = trio.Event()  # many commits since the last checkpoint
        self._checkpointed_at = 0  # self.commits at the last checkpoint
        self._checkpoint_scope = trio.CancelScope()
        self._closing = False
        self._close_started = False
        self._writer_done = trio.Event()
        self._checkpointer_done = trio.Event()
        self._closed = trio.Event()
        self._reader_open = True

    # -- writes -----------------------------------------------------------------------

    async def submit(
        self, specs: Sequence[TaskSpec], now: float, *, actor: str | None = None
    ) -> list[SubmitResult]:
        if not specs:
            return []
        note = (None, actor)  # history: each row at its created_at
        if unique_sql.has_unique(specs):  # keys held too: tq.store.unique_sql
            unique_sql.check(specs)
            return await self._write(
                unique_sql.submit,
                _DIALECT,
                list(specs),
                now,
                _insert_any,
                weight=len(specs),
                note=(now, actor),
            )
        if deps_sql.needed(specs):  # edges or due times too: tq.store.deps_sql
            return await self._write(
                deps_sql.submit, _DIALECT, list(specs), now, weight=len(specs), note=(now, actor)
            )
        rows: list[list[Any]] = []
        for start in range(0, len(specs), PREPARE_CHUNK):
            if start:
                await trio.lowlevel.checkpoint()  # let other requests in between chunks
            rows += schema.prepare_rows(specs[start : start + PREPARE_CHUNK], now)
        prepared = schema.prepared(now, rows)
        return await self._write(schema.insert_prepared, prepared, weight=len(rows), note=note)

    async def claim(
        self,
        worker: str,
        queues: Sequence[str],
        types: Sequence[str] | None,
        n: int,
        now: float,
        lease_ttl: float,
        aging: Aging | None = None,
        note: CapNote | None = None,
    ) -> list[Lease]:
        if lease_ttl <= 0:
            raise InvalidRequest(f"lease_ttl must be > 0 seconds, not {lease_ttl!r}")
        if n <= 0 or not queues or (types is not None and not types):
            return []
        queues = list(dict.fromkeys(queues))
        types = None if types is None else list(dict.fromkeys(types))
        # Look before writing. A new task wakes every long-polling worker, and each
        # claims; all but one find nothing, yet each such claim costs a write
        # transaction. So the pending heads are read first, on the event loop's
        # connection; if a few are there (SMALL_WEIGHT at most: a backlog is claimed
        # at once), no more than the claims of the same queues and types already on
        # their way to the writer ask for, this claim waits for those to end (once: a
        # claim never waits longer than one of theirs) and looks again. Nothing
        # there: nothing to claim as of the latest commit (what commits later is
        # announced to the caller, as it always was).
        same = (tuple(queues), None if types is None else tuple(types))
        waited = False
        while True:
            await trio.lowlevel.checkpoint()
            if self._closing:
                raise Unavailable("the task store is closed")
            # no await from here until this claim is counted in _claims_pending
            ahead = self._claims_pending.get(same, 0)
            found = self._peek(schema.claimable, queues, types, n + ahead)
            if found == 0:
                return []  # nothing pending
            if found is None or found > ahead or found > SMALL_WEIGHT or waited:
                break  # some left for this claim too, a backlog, or unknown: claim
            waited = True
            await self._claims_done.wait()
        self._claims_pending[same] = self._claims_pending.get(same, 0) + n
        try:
            return await self._write(
                schema_caps.claim,
                worker,
                queues,
                types,
                n,
                now,
                lease_ttl,
                aging,
                note,
                weight=n,
                note=(now, None),
            )
        finally:
            left = self._claims_pending.pop(same) - n
            if left:
                self._claims_pending[same] = left
            self._claims_done.set()
            self._claims_done = trio.Event()

    async def set_cap(self, cap: Cap, now: float) -> Cap:
        return await self._write(schema_caps.set_cap, cap, now)

    async def remove_cap(self, kind: str, name: str) -> bool:
        return await self._write(schema_caps.remove_cap, kind, name)

    async def list_caps(self) -> list[Cap]:
        return await self._read_here(schema_caps.list_caps)

    async def running_count(self, kind: str, name: str, limit: int) -> int:
        return await self._read(schema_caps.running, kind, name, limit)

    async def complete(self, outcomes: Sequence[Outcome], now: float) -> list[OutcomeResult]:
        for outcome in outcomes:
            if outcome.status not in Outcome.STATUSES:
                raise InvalidRequest(
                    f"outcome status {outcome.status!r} for task {outcome.id} is not one of "
                    f"{', '.join(Outcome.STATUSES)}"
                )
        if not outcomes:
            return []
        return await self._write(
            _complete, list(outcomes), now, weight=len(outcomes), note=(now, None)
        )

    async def extend_leases(
        self,
        worker: str,
        leases: Sequence[tuple[str, int]],
        now: float,
        lease_ttl: float,
        progress: Mapping[str, tuple[float, str | None]] | None = None,
    ) -> list[str]:
        """Extend leases ``worker`` holds; a lease held by another worker counts as lost."""
        if not leases:
            return []
        return await self._write(
            schema.extend_leases,
            worker,
            list(leases),
            now,
            lease_ttl,
            dict(progress) if progress else None,
            weight=len(leases),
        )

    async def release_expired(self, now: float) -> list[str]:
        return await self._write(_release_expired, now, note=(now, None))

    async def release_worker(self, worker: str, now: float) -> list[str]:
        return await self._write(_release_worker, worker, now, note=(now, None))

    async def promote_due(self, now: float, limit: int = PROMOTE_BATCH) -> int:
        if limit <= 0:
            return 0
        return await self._write(schema.promote_due, now, limit, weight=limit, note=(now, None))

    async def cancel(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        return await self._write(_cancel, task_id, now, note=(now, actor))

    async def retry(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        return await self._write(schema.change_one, task_id, Event.RETRY, now, note=(now, actor))

    async def set_priority(
        self, task_id: str, priority: int, *, now: float | None = None, actor: str | None = None
    ) -> Task:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255:
            raise InvalidRequest(f"priority {priority!r} must be 0..255 (255 highest)")
        return await self._write(schema.set_priority, task_id, priority, note=(now, actor))

    async def history(self, task_id: str) -> builtins.list[history_sql.Transition]:
        return await self._read(history_sql.history, "sqlite", task_id)

    # -- reads ------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        """One task by its primary key, read on the event loop's own thread."""
        return await self._read_here(schema.get, task_id)

    async def list(self, flt: ListFilter) -> list[Task]:
        """Tasks in insertion (seq) order, after the cursor task ``flt.after``."""
        limit = flt.limit
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidRequest(f"limit must be an integer 1..{MAX_LIST_LIMIT}")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}, not {limit}")
        if flt.state is not None and flt.state not in set(State):
            known = ", ".join(s.value for s in State)
            raise InvalidRequest(f"unknown state {flt.state!r}; known states: {known}")
        return await self._read(schema.list_tasks, flt)

    async def dependencies(self, task_id: str) -> builtins.list[tuple[str, str | None, bool]]:
        return await self._read(deps_sql.dependencies, _DIALECT, task_id)

    async def graph(
        self, task_id: str
    ) -> tuple[builtins.list[Task], builtins.list[tuple[str, str]], bool]:
        return await self._read(deps_sql.graph, _DIALECT, task_id)

    async def queues_of_keys(self, keys: Sequence[str]) -> dict[str, str]:
        return await self._read(schema.queues_of_keys, list(keys))

    async def next_due(self) -> float | None:
        return await self._read(schema.next_due)

    async def stats(self) -> StoreStats:
        counts = await self._read(schema.counts)
        details = {
            **self._details(),
            "commits": self.commits,
            "committed_ops": self.committed_ops,
            "checkpoints": dict(self.checkpoints),
        }
        return StoreStats(counts=counts, details=details)

    def _details(self) -> dict[str, Any]:
        return {
            "backend": "sqlite",
            "location": self.path,
            "path": self.path,
            "size": _file_size(self.path),
            "wal": _file_size(self.path + "-wal"),
            "synchronous": self.synchronous,
            "schema_version": schema.SCHEMA_VERSION,
        }

    # -- security: API keys and the audit log (SQL in tq.store.schema_auth) -----------

    async def create_key(self, key: ApiKey) -> None:
        await self._write(schema_auth.create_key, key)

    async def get_key(self, key_id: str) -> ApiKey:
        return await self._read(schema_auth.get_key, key_id)

    async def list_keys(self) -> builtins.list[ApiKey]:
        return await self._read(schema_auth.list_keys)

    async def revoke_key(self, key_id: str, now: float) -> ApiKey:
        return await self._write(schema_auth.revoke_key, key_id, now)

    async def rehash_key(self, key: ApiKey, old_kdf: str) -> bool:
        return await self._write(schema_auth.rehash_key, key, old_kdf)

    async def record_audit(self, entry: AuditEntry) -> int:
        return await self._write(schema_auth.record_audit, entry)

    async def list_audit(
        self, limit: int = 100, before: int | None = None
    ) -> builtins.list[AuditEntry]:
        return await self._read(schema_auth.list_audit, limit, before)

    # -- operator surface (SQL in tq.store.schema_ops) ---------------------------------

    async def queue_depth(self) -> builtins.list[QueueDepth]:
        # index-only counts of the unfinished tasks: a small backlog costs less to count
        # than a thread hop; a large one runs over POINT_STEPS and goes to the reader
        return await self._read_here(schema_ops.queue_depth)

    async def set_paused(self, queue: str, paused: bool, now: float) -> bool:
        return await self._write(schema_ops.set_paused, queue, paused, now)

    async def paused_queues(self) -> dict[str, float]:
        return await self._read_here(schema_ops.paused_queues)

    async def ahead(self, task_id: str, limit: int) -> tuple[int, int] | None:
        return await self._read(schema_ops.ahead, task_id, limit)

    async def purge(self, states: Sequence[str], older_than: float, now: float, limit: int) -> int:
        checked = schema_ops.purge_states(states)
        _check_bulk(older_than, limit)
        return await self._write(schema_ops.purge, checked, now - older_than, limit)

    async def count_purgeable(self, states: Sequence[str], older_than: float, now: float) -> int:
        checked = schema_ops.purge_states(states)
        _check_bulk(older_than, 1)
        return await self._read(schema_ops.count_purgeable, checked, now - older_than)

    async def expire_finished(
        self, policy: RetentionPolicy, now: float, limit: int
    ) -> dict[tuple[str, str], int]:
        if limit <= 0 or not policy.active:
            return {}
        return await self._write(retention_sql.expire, _DIALECT, policy, now, limit, weight=limit)

    async def retry_many(
        self, state: str, now: float, limit: int, *, actor: str | None = None
    ) -> builtins.list[str]:
        source = schema_ops.retry_state(state)
        _check_bulk(0.0, limit)
        return await self._write(schema_ops.retry_many, source, limit, note=(now, actor))

    async def probe(self) -> StoreStats:
        """A cheap read on a connection of its own, so a readiness probe never waits
        behind slow reads (a large listing) or the writer."""
        if self._closing:
            raise Unavailable("the task store is closed")
        await trio.to_thread.run_sync(self._run_probe, limiter=self._probe_limiter)
        return StoreStats(details=self._details())

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish queued writes, stop the loops, checkpoint, close the connections."""
        if self._close_started:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._close_started = self._closing = True
        self._wake.set()
        with trio.CancelScope(shield=True):
            await self._writer_done.wait()
            self._checkpoint_scope.cancel()
            await self._checkpointer_done.wait()
            await trio.to_thread.run_sync(self._close_reader, limiter=self._read_limiter)
            await trio.to_thread.run_sync(self._close_prober, limiter=self._probe_limiter)
            await trio.to_thread.run_sync(
                self._close_checkpointer, limiter=self._checkpoint_limiter
            )
            await trio.to_thread.run_sync(self._close_writer, limiter=self._write_limiter)
        self._closed.set()

    def _close_reader(self) -> None:
        self._reader_open = False
        _close(self._reader, self.path)

    def _close_prober(self) -> None:
        _close(self._prober, self.path)
        _close(self._pointer, self.path)

    def _run_probe(self) -> None:
        if not self._reader_open:
            raise Unavailable("the task store is closed")
        try:
            schema_ops.probe(self._prober)
        except apsw.Error as exc:
            raise _store_error(exc, "read from", self.path) from exc

    def _close_checkpointer(self) -> None:
        self._run_checkpoint("TRUNCATE")
        _close(self._checkpointer, self.path)

    def _close_writer(self) -> None:
        _close(self._writer, self.path)

    # -- the writer: group commit -----------------------------------------------------

    async def _write(
        self, fn: Callable[..., T], *args: Any, weight: int = 1, note: Note | None = None
    ) -> T:
        if self._closing:
            raise Unavailable("the task store is closed")
        op = _Op(fn, args, weight, note)
        if not self._queue and not self._writing and op.weight <= SMALL_WEIGHT:
            # a lone light write: no batch to join and none running, so it commits in
            # this caller's own thread hop (the writer task's wake-up and hand-back
            # cost as much as the hop); writes arriving meanwhile queue and share the
            # writer's next transaction, as they would behind any batch
            await self._run_alone(op)
        else:
            self._queue.append(op)
            self._wake.set()
            try:
                await op.done.wait()
            except BaseException:
                op.abandoned = True  # not run if the writer has not taken it yet
                raise
        if op.error is not None:
            raise op.error
        result: T = op.result
        return result

    async def _run_alone(self, op: _Op) -> None:
        """Commit ``op`` in a transaction of its own, in the writer's turn (its limiter)."""
        self._writing = True
        try:
            wrote = await trio.to_thread.run_sync(
                self._run_batch, [op], limiter=self._write_limiter
            )
        finally:
            self._writing = False
            if self._queue or self._closing:
                self._wake.set()  # what queued meanwhile: the writer's next batch
        self._committed(wrote)

    def _committed(self, wrote: bool) -> None:
        if wrote:  # a batch that changed nothing leaves nothing to checkpoint
            self._dirty.set()
            if self.commits - self._checkpointed_at >= CHECKPOINT_AFTER_COMMITS:
                self._urgent.set()

    async def _writer_loop(self) -> None:
        try:
            while True:
                if self._queue and all(op.weight > SMALL_WEIGHT for op in self._queue):
                    # only heavy work queued: give requests already read (or just
                    # arrived) a moment to queue a light write that would otherwise
                    # wait for the whole heavy transaction
                    for _ in range(LIGHT_GRACE_ROUNDS):
                        await trio.lowlevel.checkpoint()
                # while a lone write runs, what queued meanwhile waits for its end and
                # then goes as one batch (taken now, it could no longer be dropped)
                batch = [] if self._writing else self._take_batch()
                if not batch:
                    if self._closing and not self._writing:
                        return
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                self._writing = True
                try:
                    wrote = await trio.to_thread.run_sync(
                        self._run_batch, batch, limiter=self._write_limiter
                    )
                finally:
                    self._writing = False
                    for op in batch:
                        op.done.set()
                self._committed(wrote)
        finally:
            self._closing = True
            while self._queue:
                self._queue.popleft().done.set()  # their error says the store closed
            self._writer_done.set()

    def _take_batch(self) -> _Batch:
        """The next transaction's operations: FIFO up to MAX_BATCH_WEIGHT rows.

        Latency: light operations (a single submit, a cancel, a small claim)
        queued together with heavy ones (a bulk submit, a large claim or report)
        get a short transaction of their own first, wherever they stand in the
        queue. Then the oldest heavy operation goes, with what follows it in
        FIFO order, so it is passed over at most once and never starves.
        """
        queue = self._queue
        while queue and queue[0].abandoned:
            queue.popleft()
        if not queue:
            return []
        heavy = next((op for op in queue if op.weight > SMALL_WEIGHT and not op.abandoned), None)
        if heavy is not None and not heavy.deferred:
            light = [op for op in queue if op.weight <= SMALL_WEIGHT and not op.abandoned]
            if light:
                heavy.deferred = True
                light = light[: MAX_BATCH_WEIGHT // SMALL_WEIGHT]
                taken = set(map(id, light))
                self._queue = deque(op for op in queue if id(op) not in taken)
                return light
        batch: _Batch = []
        weight = 0
        while queue and (not batch or weight + queue[0].weight <= MAX_BATCH_WEIGHT):
            op = queue.popleft()
            if not op.abandoned:
                batch.append(op)
                weight += op.weight
        return batch

    def _run_batch(self, batch: _Batch) -> bool:
        """In the writer thread: one transaction, one savepoint per operation.

        Returns whether the committed transaction changed any row.
        """
        conn = self._writer
        noted = self._noted
        held = noted.held  # what a rollback takes the history note back to
        changes = conn.total_changes()
        unchanged = 0  # changes of the history note (in memory)
        grouped = 0  # submits inserted together with others
        doing = "start a write transaction on"
        try:
            conn.execute("BEGIN IMMEDIATE")
            doing = "write to"
            if len(batch) == 1:  # the transaction is the operation's own: no savepoint
                unchanged += _run_op(conn, batch[0], "ROLLBACK", self.path, noted)
                if not conn.in_transaction:
                    return False
            else:
                for group in _groups(batch):
                    if len(group) > 1:
                        noting = _run_grouped(conn, group, noted)
                        if noting is not None:
                            unchanged += noting
                            grouped += len(group)
                            continue
                    for op in group:
                        conn.execute("SAVEPOINT op")
                        unchanged += _run_op(conn, op, "ROLLBACK TO op", self.path, noted)
                        conn.execute("RELEASE op")
            doing = "commit to"
            conn.execute("COMMIT")
        except apsw.Error as exc:
            _rollback(conn)
            # rolled back, the note holds what it held before the batch; else unknown
            noted.held = None if conn.in_transaction else held
            for op in batch:
                op.result = None
                op.error = _store_error(exc, doing, self.path)
            return False
        self.commits += 1
        self.committed_ops += len(batch)
        self.grouped_ops += grouped
        return bool(conn.total_changes() - unchanged != changes)

    # -- the checkpointer -------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        try:
            with self._checkpoint_scope:
                while True:
                    await self._dirty.wait()
                    with trio.move_on_after(CHECKPOINT_INTERVAL):
                        await self._urgent.wait()
                    await self._checkpoint()
                    with trio.move_on_after(CHECKPOINT_INTERVAL):
                        await self._dirty.wait()
                    if not self._dirty.is_set():  # idle for a whole interval: empty the WAL
                        await self._checkpoint_in_writers_turn("TRUNCATE")
        finally:
            self._checkpointer_done.set()

    async def _checkpoint(self) -> None:
        """PASSIVE, concurrent with the writer; then restart the WAL if it has grown long.

        Under a steady stream of commits a PASSIVE checkpoint never catches up
        with the end of the WAL, so SQLite never starts the WAL over and the
        file grows. When it is long, the checkpointer takes the writer's turn
        (its limiter) for a RESTART, which has little left to copy.
        """
        self._dirty = trio.Event()
        self._urgent = trio.Event()
        self._checkpointed_at = self.commits
        frames = await trio.to_thread.run_sync(
            self._run_checkpoint, "PASSIVE", limiter=self._checkpoint_limiter
        )
        if frames >= WAL_RESTART_FRAMES:
            await self._checkpoint_in_writers_turn("RESTART")

    async def _checkpoint_in_writers_turn(self, mode: str) -> None:
        async with self._write_limiter:  # no write transaction starts meanwhile
            await trio.to_thread.run_sync(
                self._run_checkpoint, mode, limiter=self._checkpoint_limiter
            )

    def _run_checkpoint(self, mode: str) -> int:
        """Checkpoint in ``mode``; the number of frames the WAL held (0 after a failure)."""
        try:
            rows: list[Any] = self._checkpointer.execute(_CHECKPOINTS[mode]).fetchall()
        except apsw.Error as exc:
            log.warning("checkpoint (%s) of %s failed: %s", mode, self.path, exc)
            return 0
        busy, frames, _ = rows[0]
        if not busy:
            self.checkpoints[mode] += 1
        return int(frames)

    # -- reads ------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closing:
            raise Unavailable("the task store is closed")
        return await trio.to_thread.run_sync(self._run_read, fn, args, limiter=self._read_limiter)

    async def _read_here(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` run on the event loop's own thread, on its own
        connection (``pointer``), when that is cheap; on the reader thread otherwise.

        The hop to the reader thread and back costs ~150-300 us of broker CPU, most
        of a small read's cost (a point ``get`` is ~10-20 us of B-tree lookups, a
        ``depth`` of a backlog of a thousand tasks ~60 us). A read on this
        connection is interrupted after POINT_STEPS VM steps in all (~0.1 ms), and the
        read then runs again, whole, on the reader thread; for OVER_BUDGET_PAUSE
        seconds after that, the same read goes to the thread at once, so a
        large backlog costs at most one wasted budget a second. The answer is the
        same either way: both connections read the committed database (WAL readers
        do not wait for the writer); a busy answer (a checkpoint resetting the
        WAL: this connection never waits) also falls back to the reader thread.
        """
        if self._closing:
            raise Unavailable("the task store is closed")
        await trio.lowlevel.checkpoint()
        if self._over_budget and trio.current_time() < self._over_budget.get(fn, -math.inf):
            return await self._read(fn, *args)
        self._grains_left = POINT_STEPS // POINT_STEP_GRAIN
        try:
            return fn(self._pointer, *args)
        except apsw.InterruptError:
            self._over_budget[fn] = trio.current_time() + OVER_BUDGET_PAUSE
            return await self._read(fn, *args)
        except apsw.BusyError:
            return await self._read(fn, *args)
        except apsw.Error as exc:
            raise _store_error(exc, "read from", self.path) from exc

    def _peek(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(connection, *args)`` on the event loop's connection when it is cheap
        (as ``_read_here``, without yielding); None when it is not (over its budget,
        busy): a hint for a write that does not need it, never worth a thread hop."""
        self._grains_left = POINT_STEPS // POINT_STEP_GRAIN
        try:
            return fn(self._pointer, *args)
        except apsw.Error:
            return None

    def _count_grain(self) -> bool:
        """The pointer connection's progress handler: True (interrupt the statement,
        apsw.InterruptError) once the read has run its POINT_STEPS."""
        self._grains_left -= 1
        return self._grains_left < 0

    def _run_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if not self._reader_open:
            raise Unavailable("the task store is closed")
        try:
            return fn(self._reader, *args)
        except apsw.Error as exc:
            raise _store_error(exc, "read from", self.path) from exc


class _Noted:
    """What the writer connection's history note (tq.store.history_sql: a one-row TEMP
    table) holds, as far as the writer knows; None when it does not know."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: Note | None = _NO_NOTE  # as SQLITE_WRITER_SETUP leaves it


_NO_NOTE: Note = (None, None)  # an operation without a note: the database's clock, no actor


def _set_note(conn: apsw.Connection, noted: _Noted, note: Note) -> int:
    """Make the history note hold ``note``: one statement, none if it holds it already
    (consecutive submits of one producer, say). The changes made (0 or 1)."""
    if noted.held == note:
        return 0
    noted.held = None  # until the statement has run
    conn.execute(history_sql.SQLITE_NOTE, note).fetchall()
    noted.held = note
    return 1


def _run_op(conn: apsw.Connection, op: _Op, undo: str, path: str, noted: _Noted) -> int:
    """Run one operation; if it raises, ``undo`` its changes and keep its exception.

    An apsw.Error after which SQLite rolled back the whole transaction (disk
    full, I/O error) is re-raised instead: the batch as a whole has failed.
    The history note (tq.store.history_sql: a TEMP table, in memory) is set to
    the operation's (no time and no actor for an operation without one) before
    it runs, if it holds another; it is left as it is after (the next operation
    sets its own), and ``undo`` takes it back to what it held before. Returns
    the changes the note made (they count in ``total_changes`` but leave the
    database file untouched).
    """
    held = noted.held
    try:
        changes = _set_note(conn, noted, op.note or _NO_NOTE)
        taken = history_sql.notes_taken()
        op.result = op.fn(conn, *op.args)
        if history_sql.notes_taken() != taken:  # the operation noted its own changes
            noted.held = None
        op.error = None
        return changes
    except Exception as exc:
        noted.held = held  # the note's change is undone with the operation's
        if isinstance(exc, apsw.Error) and not conn.in_transaction:
            raise
        op.result = None
        op.error = _store_error(exc, "write to", path) if isinstance(exc, apsw.Error) else exc
        conn.execute(undo)
        return 0


def _groupable(op: _Op) -> bool:
    """A plain submit whose rows travel as one JSON document (schema.insert_prepared)."""
    return op.fn is schema.insert_prepared and op.args[0].document is not None


def _groups(batch: _Batch) -> list[_Batch]:
    """The batch in order, runs of groupable submits with the same history note
    together (each run inserted by one statement), every other operation alone."""
    groups: list[_Batch] = []
    for op in batch:
        last = groups[-1] if groups else None
        if last is not None and _groupable(op) and _groupable(last[0]) and op.note == last[0].note:
            last.append(op)
        else:
            groups.append([op])
    return groups


def _run_grouped(conn: apsw.Connection, group: _Batch, noted: _Noted) -> int | None:
    """Insert the rows of several plain submits with one statement, under one
    savepoint and one history note (concurrent single submits: one statement per
    transaction instead of three or four per submit, each giving up and taking back the GIL).
    None, with nothing changed, if it failed: the caller then runs them one by one,
    so a failure stays the failing submit's own. An error after which SQLite rolled
    back the whole transaction is raised (the batch has failed). Otherwise the
    changes the note made (as ``_run_op``)."""
    held = noted.held
    conn.execute("SAVEPOINT op")
    try:
        changes = _set_note(conn, noted, group[0].note or _NO_NOTE)
        schema.insert_grouped(conn, [op.args[0] for op in group])
    except Exception as exc:
        noted.held = held
        if isinstance(exc, apsw.Error) and not conn.in_transaction:
            raise
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return None
    conn.execute("RELEASE op")
    for op in group:
        op.result = [SubmitResult(row[0], created=True) for row in op.args[0].rows]
        op.error = None
    return changes


def _rollback(conn: apsw.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except apsw.Error as exc:  # the connection is in trouble; the next BEGIN will say so
        log.error("rollback failed: %s", exc)


# -- opening and closing --------------------------------------------------------------


def _connect(path: str, synchronous: str) -> tuple[apsw.Connection, ...]:
    """Open writer, reader and checkpointer connections; create or migrate the schema."""
    _check_sqlite_version(apsw.sqlite_lib_version())
    _check_location(path)
    _make_private(path)
    opened: list[apsw.Connection] = []
    try:
        writer = _open(path, opened, BUSY_TIMEOUT_MS)
        schema.migrate(writer, path)
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"cannot use WAL mode for {path} (SQLite answered {mode!r}); put the database "
                "on a local file system"
            )
        for pragma in (
            f"PRAGMA synchronous = {synchronous}",
            "PRAGMA wal_autocheckpoint = 0",
            f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}",
            f"PRAGMA cache_size = -{CACHE_SIZE_KIB}",
            "PRAGMA temp_store = MEMORY",  # savepoint journals: a temp file halves throughput
        ):
            writer.execute(pragma).fetchall()
        writer.execute(history_sql.SQLITE_WRITER_SETUP).fetchall()  # task history triggers
        reader = _open(path, opened, BUSY_TIMEOUT_MS)
        reader.execute("PRAGMA query_only = 1").fetchall()
        checkpointer = _open(path, opened, CHECKPOINT_BUSY_TIMEOUT_MS)
        checkpointer.execute(f"PRAGMA synchronous = {synchronous}").fetchall()
        checkpointer.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}").fetchall()
        prober = _open(path, opened, BUSY_TIMEOUT_MS)  # readiness probes: never queued
        prober.execute("PRAGMA query_only = 1").fetchall()  # behind slow reads
        pointer = _open(path, opened, POINT_BUSY_TIMEOUT_MS)  # point reads, on the event loop
        pointer.execute("PRAGMA query_only = 1").fetchall()
    except BaseException as exc:
        for conn in reversed(opened):
            _close(conn, path)
        if isinstance(exc, apsw.Error):
            raise _store_error(exc, "open", path) from exc
        raise
    return writer, reader, checkpointer, prober, pointer


def _make_private(path: str) -> None:
    """The database 0600 whatever the umask: created so (SQLite gives its -wal and -shm
    the database's mode), and group/other bits taken from existing files we own."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError:
        return  # not ours to create or open: SQLite says why, in its own words
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except OSError:
            pass  # absent, or owned by someone else (tq doctor reports it)


def _check_sqlite_version(version: str) -> None:
    """The SQL here needs SQLite 3.45 (``->>``, ``unhex``, ``UPDATE ... FROM``)."""
    found = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if found < MIN_SQLITE:
        wanted = ".".join(map(str, MIN_SQLITE))
        raise ConfigError(
            f"tq needs SQLite >= {wanted}, but APSW runs SQLite {version}; "
            f"install a newer APSW (pip install 'apsw>={wanted}'), which bundles its own SQLite"
        )


def _open(path: str, opened: list[apsw.Connection], busy_ms: int) -> apsw.Connection:
    conn = apsw.Connection(path, statementcachesize=256)
    opened.append(conn)
    conn.set_busy_timeout(busy_ms)
    return conn


def _check_location(path: str) -> None:
    """Fail early, naming the path and the remedy, where SQLite would fail obscurely."""
    if path in ("", ":memory:"):
        raise ConfigError(f"the task store needs a file path, not {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(
            f"cannot open the task database {path}: {directory} is not a directory. "
            "Create the directory or choose another database path."
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(
            f"cannot open the task database {path}: the directory {directory} is not writable "
            "by this user, and SQLite must create its -wal and -shm files there. Make the "
            "directory writable or choose another database path."
        )
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(
            f"cannot open the task database {path}: the file is not readable and writable by "
            "this user. Fix its permissions or choose another database path."
        )


def _close(conn: apsw.Connection, path: str) -> None:
    try:
        conn.close()
    except apsw.Error as exc:
        log.warning("closing a connection to %s failed: %s", path, exc)


def _check_bulk(older_than: float, limit: int) -> None:
    if isinstance(older_than, bool) or not isinstance(older_than, int | float) or older_than < 0:
        raise InvalidRequest(f"older_than must be a number of seconds >= 0, not {older_than!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_BULK_LIMIT:
        raise InvalidRequest(f"limit must be 1..{MAX_BULK_LIMIT}, not {limit!r}")


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


_HINTS: tuple[tuple[type[apsw.Error], str], ...] = (
    (apsw.FullError, "the disk is full; free some space"),
    (
        apsw.ReadOnlyError,
        "the database is read-only; check the permissions of the file and its directory",
    ),
    (apsw.CorruptError, "the database file is corrupt; restore it from a backup"),
    (apsw.NotADBError, "the file is not an SQLite database (or is corrupt); choose another path"),
    (apsw.BusyError, "the database is locked by another process (is another broker using it?)"),
    (
        apsw.CantOpenError,
        "SQLite cannot open the file; check that its directory exists and is writable",
    ),
    (apsw.IOError, "an I/O error occurred; check the disk and the file system"),
    (apsw.PermissionsError, "permission denied; check the permissions of the file"),
)


def _store_error(exc: apsw.Error, doing: str, path: str) -> TQError:
    """A StoreError saying what failed, where, and what to do about it."""
    hint = next((text for cls, text in _HINTS if isinstance(exc, cls)), "")
    where = f" {path}" if path else " the task database"
    detail = f"{type(exc).__name__}: {exc}"
    message = (
        f"cannot {doing}{where}: {hint} ({detail})" if hint else f"cannot {doing}{where}: {detail}"
    )
    return StoreError(message)


if TYPE_CHECKING:  # mypy proves here that SQLiteStore implements the Store protocol

    def _implements_store(store: SQLiteStore) -> Store:
        return store
