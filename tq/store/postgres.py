"""The PostgreSQL task store: psycopg 3 (sync API), one writer with group commit.

    async with open_postgres_store("postgresql://tq@db.example/tq") as store:
        [res] = await store.submit([TaskSpec(type="email")], now=time.time())

Contract: implements ``tq.store.base.Store`` with the same answers as the
SQLite store (one conformance suite runs against both). When a write method
returns, its transaction is committed. All SQL lives in ``tq.store.pg_schema``
(tasks, migrations), ``tq.store.pg_ops`` (listings, counts, operator
surface, keys, audit) and ``tq.store.pg_cluster`` (workers, brokers, leader).

Durability (``synchronous``):
    "full"    (default) the server's own ``synchronous_commit`` (normally on: a
              commit returns once its WAL is flushed, and with synchronous
              replicas configured, once they have it too).
    "normal"  ``synchronous_commit = off`` for this broker's writes: a commit
              returns before its WAL is flushed; a crash of the PostgreSQL
              server (not of the broker) may lose the last ~0.6 s of commits.
              The database is never corrupted either way.

Connections and threads: psycopg's async API needs asyncio, so the store
drives the sync API from its own threads, one connection per role, each
serialised by its own ``trio.CapacityLimiter(1)`` (as the SQLite store):
    writer   every write, in batches (below)
    reader   get / list / stats / next_due / keys / audit (autocommit)
    prober   readiness probes, never queued behind slow reads (autocommit)
A connection found broken (the server restarted, the network dropped) is
replaced: a read, or a write batch that had not sent COMMIT, runs once more
on a new connection; a batch whose COMMIT met the break (its outcome
unknown) fails with a StoreError, as does everything while the server stays
unreachable. The store recovers without a broker restart. The connections call
themselves "tq broker" (``application_name``), so ``pg_stat_activity`` shows
them and ``tq migrate`` can tell that a broker is running.

Group commit: as in the SQLite store, write calls enqueue an operation and
wait; the writer takes every queued operation (at most MAX_BATCH_WEIGHT rows)
into one transaction and wakes the callers after COMMIT. The batch first
runs without savepoints (they are subtransactions in PostgreSQL, costly in
numbers: past 64 in one transaction, other sessions' visibility checks slow
down until it ends); if an operation raises, the transaction is rolled back
and the batch runs again with one savepoint per operation, so the failing
one undoes only itself and its exception goes to its caller only. A deadlock or
serialization failure (possible with several brokers) reruns the batch.
If COMMIT fails every caller of the batch gets a StoreError.

Several brokers may share one database: see ``tq.store.pg_schema`` for the
locking (SKIP LOCKED claims). A broker opens the store with ``broker=``
(a ``BrokerSelf``); the store then
  * runs the cluster state (``self.cluster``, ``tq.store.pg_cluster``): beats,
    leader election, wake-ups from the other brokers;
  * uses the database's clock for leases: claim, complete, extend_leases,
    release_expired, release_worker and promote_due ignore the ``now`` they
    are given and use the transaction's ``now()`` (read once per write batch),
    so lease expiry, fencing and retry times never depend on which broker's
    clock asked;
  * ends every write batch that made tasks pending (a submit, a release, a
    promotion, a retry) with ``pg_notify`` on the schema's channel, inside the
    transaction: the other brokers hear of it once it committed; and one that
    finished tasks, while some broker waits for tasks, with their ids on the
    finished channel (``PgClusterState.notes``).
Without ``broker=`` (the conformance suite, ``tq migrate``) none of this runs
and every method uses exactly the ``now`` it is given.
"""

from __future__ import annotations

import builtins
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import psycopg.errors
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import ConfigError, InvalidRequest, StoreError, TQError, Unavailable
from tq.core.retention import RetentionPolicy
from tq.core.states import Event, State
from tq.core.task import Lease, ListFilter, Outcome, Task, TaskSpec
from tq.store import (
    deps_sql,
    history_sql,
    pg_caps,
    pg_cluster,
    pg_ops,
    pg_schema,
    retention_sql,
    schedule_sql,
    schema_ops,
    unique_sql,
)
from tq.store.base import (
    PROMOTE_BATCH,
    BrokerSelf,
    ClusterState,
    OutcomeResult,
    QueueDepth,
    Store,
    StoreStats,
    SubmitResult,
)
from tq.store.claimplan import Aging, Cap, CapNote
from tq.store.sqlite import MAX_LIST_LIMIT, PREPARE_CHUNK, Note, _check_bulk, _Op


def _pg_insert(conn: Any, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
    return pg_schema.insert_rows(conn, now, pg_schema.prepare_rows(specs, now))


_DIALECT = schedule_sql.Dialect("postgresql", _pg_insert)


def _insert_any(conn: Any, d: Any, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
    """Insert specs with or without dependencies or due times (for tq.store.unique_sql)."""
    if deps_sql.needed(specs):
        return deps_sql.submit(conn, d, specs, now)
    return _pg_insert(conn, specs, now)


# Writes that may finish a task settle its dependents in the same transaction.
def _complete(conn: Any, outcomes: list[Outcome], now: float) -> list[OutcomeResult]:
    return deps_sql.after_complete(conn, _DIALECT, pg_schema.complete(conn, outcomes, now), now)


def _release_expired(conn: Any, now: float) -> list[str]:
    return deps_sql.after_release(conn, _DIALECT, pg_schema.release_expired(conn, now), now)


def _release_worker(conn: Any, worker: str, now: float) -> list[str]:
    ids = pg_schema.release_worker(conn, worker, now)
    return deps_sql.after_release(conn, _DIALECT, ids, now)


def _release_lost(conn: Any, timeout: float, now: float) -> list[str]:
    ids = pg_cluster.release_lost(conn, timeout, now)
    return deps_sql.after_release(conn, _DIALECT, ids, now)


def _cancel(conn: Any, task_id: str, now: float) -> Task:
    task = pg_schema.change_one(conn, task_id, Event.CANCEL, now)
    return deps_sql.after_cancel(conn, _DIALECT, task, now)


pg_cluster.FINISHES_SOME.add(_cancel)
pg_cluster.SAME_AS.update(
    {
        _complete: pg_schema.complete,
        _release_expired: pg_schema.release_expired,
        _release_worker: pg_schema.release_worker,
        _release_lost: pg_cluster.release_lost,
    }
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SYNCHRONOUS = {"full": None, "normal": "off"}  # None: the server's synchronous_commit
MAX_BATCH_WEIGHT = 250  # rows per transaction, as the SQLite store (docs/BENCHMARKS.md)
CONNECT_TIMEOUT = 10  # seconds to reach the server before a StoreError
APPLICATION_NAME = "tq broker"  # how the store's connections show in pg_stat_activity
CONNECTION_DEFAULTS = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 4,
}
RETRIES = 3  # reruns of a batch after a deadlock or serialization failure
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

__all__ = ["APPLICATION_NAME", "PostgresStore", "open_postgres_store", "redact"]


def redact(url: str) -> str:
    """The URL without its password (what logs, stats and errors show)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    if "password" not in params:
        return url
    params["password"] = "***"
    user = params.get("user", "")
    host = params.get("host", "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}:***@{host}{port}/{params.get('dbname', '')}"


@asynccontextmanager
async def open_postgres_store(
    url: str, *, synchronous: str = "full", broker: BrokerSelf | None = None
) -> AsyncIterator[PostgresStore]:
    """Open (migrating if needed) the store at ``url``; close it on exit. With
    ``broker``, as that broker's store in a cluster (see the module docstring)."""
    key = str(synchronous).lower()
    if key not in SYNCHRONOUS:
        raise ConfigError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
    try:
        conninfo(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"the store URL is not a valid PostgreSQL URL ({exc}); use "
            "postgresql://user[:password]@host[:port]/database[?param=value]"
        ) from None
    store = PostgresStore(url, key, db_clock=broker is not None)
    with trio.CancelScope(shield=True):  # a cancelled open must not leak connections
        await trio.to_thread.run_sync(store._open)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._writer_loop)
            try:
                if broker is not None:
                    cluster = pg_cluster.PgClusterState(store, broker)
                    store.cluster = store._cluster = cluster
                    await nursery.start(cluster.run)
                yield store
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                await store.aclose()
    except BaseExceptionGroup as group:
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        raise
    finally:
        await store.aclose()


class _Connection:
    """One role's connection, opened (again) on demand; used from one thread at a time."""

    def __init__(self, url: str, where: str, *, autocommit: bool, options: str = "") -> None:
        self.url = url
        self.where = where
        self.autocommit = autocommit
        self.options = options
        self.conn: psycopg.Connection[Any] | None = None
        self.closed = False

    def get(self) -> psycopg.Connection[Any]:
        if self.closed:
            raise Unavailable("the task store is closed")
        conn = self.conn
        if conn is not None and (conn.closed or conn.broken):
            self.drop()
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(conninfo(self.url), autocommit=self.autocommit)
            except psycopg.Error as exc:
                raise store_error(exc, "connect to", self.where) from exc
            try:
                if self.options:
                    conn.execute(self.options)
                    if not self.autocommit:
                        conn.commit()
            except psycopg.Error as exc:
                conn.close()
                raise store_error(exc, "set up a connection to", self.where) from exc
            self.conn = conn
        return conn

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as exc:
                log.warning("closing a connection to %s failed: %s", self.where, exc)

    def close(self) -> None:
        self.closed = True
        self.drop()


class PostgresStore(schedule_sql.ScheduleVerbs):  # schedules: schedule_sql.py
    """The Store over one PostgreSQL database. Create it with ``open_postgres_store``."""

    _dialect = _DIALECT

    def __init__(self, url: str, synchronous: str, *, db_clock: bool = False) -> None:
        self.url = url
        self.cluster: ClusterState | None = None
        self._cluster: pg_cluster.PgClusterState | None = None
        self._db_clock = db_clock
        self.location = redact(url)
        self.synchronous = synchronous
        self.server_version = ""
        self.commits = 0  # transactions committed by the writer (one per batch)
        self.committed_ops = 0
        setting = SYNCHRONOUS[synchronous]
        options = f"SET synchronous_commit = {setting}" if setting else ""
        self._writer = _Connection(url, self.location, autocommit=False, options=options)
        self._reader = _Connection(url, self.location, autocommit=True)
        self._prober = _Connection(url, self.location, autocommit=True)
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._probe_limiter = trio.CapacityLimiter(1)
        self._queue: deque[_Op] = deque()
        self._wake = trio.Event()
        self._closing = False
        self._close_started = False
        self._writer_done = trio.Event()
        self._closed = trio.Event()

    def _open(self) -> None:
        """Connect, migrate, and learn the server version (in a thread)."""
        try:
            conn = self._writer.get()
            try:
                conn.commit()
                conn.autocommit = True  # migrate manages its own transactions
                pg_schema.migrate(conn, self.location)
            finally:
                conn.autocommit = False
            self.server_version = str(conn.info.server_version)
            self._reader.get()
        except psycopg.Error as exc:
            self._close_all()
            raise store_error(exc, "open", self.location) from exc
        except BaseException:
            self._close_all()
            raise

    # -- writes -----------------------------------------------------------------------

    async def submit(
        self, specs: Sequence[TaskSpec], now: float, *, actor: str | None = None
    ) -> list[SubmitResult]:
        if not specs:
            return []
        if unique_sql.has_unique(specs):  # keys held too: tq.store.unique_sql
            unique_sql.check(specs)
            pg_schema.prepare_rows(specs, now)  # every limit checked before the transaction
            for spec in specs:
                pg_schema.check_text(spec.unique_key, "task unique_key")
                for dep in spec.depends_on or ():
                    pg_schema.check_text(dep, "a dependency's task id")
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
            for spec in specs:
                for dep in spec.depends_on or ():
                    pg_schema.check_text(dep, "a dependency's task id")
            pg_schema.prepare_rows(specs, now)  # every limit checked before the transaction
            return await self._write(
                deps_sql.submit, _DIALECT, list(specs), now, weight=len(specs), note=(now, actor)
            )
        rows: list[list[Any]] = []
        for start in range(0, len(specs), PREPARE_CHUNK):
            if start:
                await trio.lowlevel.checkpoint()
            rows += pg_schema.prepare_rows(specs[start : start + PREPARE_CHUNK], now)
        return await self._write(
            pg_schema.insert_rows, now, rows, weight=len(rows), note=(None, actor)
        )

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
        pg_schema.check_text(worker, "worker name")
        queues = list(dict.fromkeys(queues))
        types = None if types is None else list(dict.fromkeys(types))
        for name in (*queues, *(types or ())):
            pg_schema.check_text(name, "a queue or type name")
        return await self._write(
            pg_caps.claim,
            worker,
            queues,
            types,
            n,
            self._now(now),
            lease_ttl,
            aging,
            note,
            weight=n,
            note=(self._now(now), None),
        )

    async def set_cap(self, cap: Cap, now: float) -> Cap:
        pg_schema.check_text(cap.name, "a queue or type name")
        return await self._write(pg_caps.set_cap, cap, self._now(now))

    async def remove_cap(self, kind: str, name: str) -> bool:
        pg_schema.check_text(name, "a queue or type name")
        return await self._write(pg_caps.remove_cap, kind, name)

    async def list_caps(self) -> builtins.list[Cap]:
        return await self._read(pg_caps.list_caps)

    async def running_count(self, kind: str, name: str, limit: int) -> int:
        pg_schema.check_text(name, "a queue or type name")
        return await self._read(pg_caps.running, kind, name, limit)

    async def complete(self, outcomes: Sequence[Outcome], now: float) -> list[OutcomeResult]:
        for outcome in outcomes:
            if outcome.status not in Outcome.STATUSES:
                raise InvalidRequest(
                    f"outcome status {outcome.status!r} for task {outcome.id} is not one of "
                    f"{', '.join(Outcome.STATUSES)}"
                )
            pg_schema.check_text(outcome.id, "task id")
        if not outcomes:
            return []
        return await self._write(
            _complete,
            list(outcomes),
            self._now(now),
            weight=len(outcomes),
            note=(self._now(now), None),
        )

    async def extend_leases(
        self,
        worker: str,
        leases: Sequence[tuple[str, int]],
        now: float,
        lease_ttl: float,
        progress: Mapping[str, tuple[float, str | None]] | None = None,
    ) -> list[str]:
        if not leases:
            return []
        pg_schema.check_text(worker, "worker name")
        for task_id, _ in leases:
            pg_schema.check_text(task_id, "task id")
        return await self._write(
            pg_schema.extend_leases,
            worker,
            list(leases),
            self._now(now),
            lease_ttl,
            dict(progress) if progress else None,
            weight=len(leases),
        )

    async def release_expired(self, now: float) -> list[str]:
        return await self._write(_release_expired, self._now(now), note=(self._now(now), None))

    async def release_worker(self, worker: str, now: float) -> list[str]:
        pg_schema.check_text(worker, "worker name")
        return await self._write(
            _release_worker, worker, self._now(now), note=(self._now(now), None)
        )

    async def release_lost_workers(self, timeout: float) -> list[str]:
        """The cluster's lost workers' leases released (``PgClusterState``)."""
        return await self._write(
            _release_lost, timeout, pg_cluster.DB_NOW, note=(pg_cluster.DB_NOW, None)
        )

    async def promote_due(self, now: float, limit: int = PROMOTE_BATCH) -> int:
        if limit <= 0:
            return 0
        return await self._write(
            pg_schema.promote_due, self._now(now), limit, weight=limit, note=(self._now(now), None)
        )

    def _now(self, now: float) -> float:
        """``now``, or DB_NOW (the database clock) for a cluster member's lease operations."""
        db_now: float = pg_cluster.DB_NOW
        return db_now if self._db_clock else now

    async def cancel(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        return await self._write(_cancel, task_id, now, note=(now, actor))

    async def retry(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        return await self._write(pg_schema.change_one, task_id, Event.RETRY, now, note=(now, actor))

    async def set_priority(
        self, task_id: str, priority: int, *, now: float | None = None, actor: str | None = None
    ) -> Task:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255:
            raise InvalidRequest(f"priority {priority!r} must be 0..255 (255 highest)")
        return await self._write(pg_schema.set_priority, task_id, priority, note=(now, actor))

    async def history(self, task_id: str) -> builtins.list[history_sql.Transition]:
        return await self._read(history_sql.history, "postgresql", task_id)

    # -- reads ------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        return await self._read(pg_schema.get, task_id)

    async def dependencies(self, task_id: str) -> builtins.list[tuple[str, str | None, bool]]:
        return await self._read(deps_sql.dependencies, _DIALECT, task_id)

    async def graph(
        self, task_id: str
    ) -> tuple[builtins.list[Task], builtins.list[tuple[str, str]], bool]:
        return await self._read(deps_sql.graph, _DIALECT, task_id)

    async def queues_of_keys(self, keys: Sequence[str]) -> dict[str, str]:
        return await self._read(pg_schema.queues_of_keys, list(keys))

    async def list(self, flt: ListFilter) -> list[Task]:
        limit = flt.limit
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidRequest(f"limit must be an integer 1..{MAX_LIST_LIMIT}")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}, not {limit}")
        if flt.state is not None and flt.state not in set(State):
            known = ", ".join(s.value for s in State)
            raise InvalidRequest(f"unknown state {flt.state!r}; known states: {known}")
        return await self._read(pg_ops.list_tasks, flt)

    async def next_due(self) -> float | None:
        return await self._read(pg_schema.next_due)

    async def stats(self) -> StoreStats:
        counts = await self._read(pg_ops.counts)
        size, _ = await self._read(pg_ops.probe)
        details = {
            **self._details(size),
            "commits": self.commits,
            "committed_ops": self.committed_ops,
        }
        return StoreStats(counts=counts, details=details)

    def _details(self, size: int) -> dict[str, Any]:
        return {
            "backend": "postgresql",
            "location": self.location,
            "size": size,
            "synchronous": self.synchronous,
            "schema_version": pg_schema.SCHEMA_VERSION,
            "server_version": self.server_version,
        }

    # -- security: API keys and the audit log -----------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        await self._write(pg_ops.create_key, key)

    async def get_key(self, key_id: str) -> ApiKey:
        return await self._read(pg_ops.get_key, key_id)

    async def list_keys(self) -> builtins.list[ApiKey]:
        return await self._read(pg_ops.list_keys)

    async def revoke_key(self, key_id: str, now: float) -> ApiKey:
        return await self._write(pg_ops.revoke_key, key_id, now)

    async def rehash_key(self, key: ApiKey, old_kdf: str) -> bool:
        return await self._write(pg_ops.rehash_key, key, old_kdf)

    async def record_audit(self, entry: AuditEntry) -> int:
        return await self._write(pg_ops.record_audit, entry)

    async def list_audit(
        self, limit: int = 100, before: int | None = None
    ) -> builtins.list[AuditEntry]:
        return await self._read(pg_ops.list_audit, limit, before)

    # -- operator surface -------------------------------------------------------------

    async def queue_depth(self) -> builtins.list[QueueDepth]:
        return await self._read(pg_ops.queue_depth)

    async def set_paused(self, queue: str, paused: bool, now: float) -> bool:
        return await self._write(pg_ops.set_paused, queue, paused, now)

    async def paused_queues(self) -> dict[str, float]:
        return await self._read(pg_ops.paused_queues)

    async def ahead(self, task_id: str, limit: int) -> tuple[int, int] | None:
        return await self._read(pg_ops.ahead, task_id, limit)

    async def purge(self, states: Sequence[str], older_than: float, now: float, limit: int) -> int:
        checked = schema_ops.purge_states(states)
        _check_bulk(older_than, limit)
        return await self._write(pg_ops.purge, checked, now - older_than, limit)

    async def count_purgeable(self, states: Sequence[str], older_than: float, now: float) -> int:
        checked = schema_ops.purge_states(states)
        _check_bulk(older_than, 1)
        return await self._read(pg_ops.count_purgeable, checked, now - older_than)

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
        return await self._write(pg_ops.retry_many, source, limit, note=(now, actor))

    async def probe(self) -> StoreStats:
        """A cheap read on a connection of its own (never behind slow reads or the writer)."""
        if self._closing:
            raise Unavailable("the task store is closed")
        size, _ = await trio.to_thread.run_sync(
            self._run, self._prober, pg_ops.probe, (), "read from", limiter=self._probe_limiter
        )
        return StoreStats(details=self._details(size))

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the cluster state, finish queued writes, stop the writer, close the
        connections."""
        if self._close_started:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._close_started = True
        if self._cluster is not None:
            with trio.CancelScope(shield=True):
                await self._cluster.aclose()
        self._closing = True
        self._wake.set()
        with trio.CancelScope(shield=True):
            await self._writer_done.wait()
            await trio.to_thread.run_sync(self._reader.close, limiter=self._read_limiter)
            await trio.to_thread.run_sync(self._prober.close, limiter=self._probe_limiter)
            await trio.to_thread.run_sync(self._writer.close, limiter=self._write_limiter)
        self._closed.set()

    def _close_all(self) -> None:
        for conn in (self._reader, self._prober, self._writer):
            conn.close()

    # -- the writer: group commit -----------------------------------------------------

    async def _write(
        self, fn: Callable[..., T], *args: Any, weight: int = 1, note: Note | None = None
    ) -> T:
        if self._closing:
            raise Unavailable("the task store is closed")
        op = _Op(fn, args, weight, note)
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

    async def _writer_loop(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    if self._closing:
                        return
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                try:
                    await trio.to_thread.run_sync(
                        self._run_batch, batch, limiter=self._write_limiter
                    )
                finally:
                    for op in batch:
                        op.done.set()
        finally:
            self._closing = True
            while self._queue:
                self._queue.popleft().done.set()  # their error says the store closed
            self._writer_done.set()

    def _take_batch(self) -> builtins.list[_Op]:
        """FIFO, up to MAX_BATCH_WEIGHT rows (a heavier operation runs alone)."""
        queue = self._queue
        batch: builtins.list[_Op] = []
        weight = 0
        while queue:
            if batch and weight + queue[0].weight > MAX_BATCH_WEIGHT:
                break
            op = queue.popleft()
            if not op.abandoned:
                batch.append(op)
                weight += op.weight
        return batch

    def _run_batch(self, batch: builtins.list[_Op]) -> None:
        """In the writer thread: one transaction for the batch (see the module doc).

        A connection found broken before COMMIT was sent (the server restarted,
        an idle connection was cut) committed nothing: the batch runs once more
        on a new connection. Broken during COMMIT, the outcome is unknown, and
        the callers get a StoreError.
        """
        for reconnect in (False, True):
            doing = "connect to"
            try:
                conn = self._writer.get()
                doing = "write to"
                if not self._attempt(conn, batch):
                    return  # a batch of one that failed: rolled back, nothing to commit
                cluster = self._cluster
                doing = "commit to"
                notes = [] if cluster is None else cluster.notes(batch)
                if notes:
                    with conn.pipeline():  # one round trip: the notifications and COMMIT
                        for statement, params in notes:
                            conn.execute(statement, params)
                        conn.commit()
                else:
                    conn.commit()
            except (psycopg.Error, TQError) as exc:
                conn_now = conn_of(self._writer)
                broken = conn_now is not None and (conn_now.broken or conn_now.closed)
                self._writer_failed(conn_now)
                if broken and doing == "write to" and not reconnect:
                    log.warning(
                        "the store's connection to %s was lost; reconnecting", self.location
                    )
                    continue
                error = exc if isinstance(exc, TQError) else store_error(exc, doing, self.location)
                for op in batch:
                    op.result = None
                    op.error = error
                return
            self.commits += 1
            self.committed_ops += len(batch)
            return

    @staticmethod
    def _attempt(conn: psycopg.Connection[Any], batch: builtins.list[_Op]) -> bool:
        """The batch's operations in the open transaction, rerun after a deadlock;
        False if there is nothing to commit (its only operation failed)."""
        for attempt in range(RETRIES + 1):
            try:
                if _run_ops(conn, batch, savepoints=False):
                    conn.rollback()
                    if len(batch) == 1:  # its own transaction: nothing else to keep
                        return False
                    _run_ops(conn, batch, savepoints=True)
                return True
            except _RETRYABLE:
                conn.rollback()
                if attempt == RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _writer_failed(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is None:
            return
        if conn.broken or conn.closed:
            self._writer.drop()
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._writer.drop()

    # -- reads ------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closing:
            raise Unavailable("the task store is closed")
        return await trio.to_thread.run_sync(
            self._run, self._reader, fn, args, "read from", limiter=self._read_limiter
        )

    def _run(
        self, holder: _Connection, fn: Callable[..., T], args: tuple[Any, ...], doing: str
    ) -> T:
        for reconnect in (False, True):
            conn = holder.get()
            try:
                return fn(conn, *args)
            except psycopg.Error as exc:
                if not (conn.broken or conn.closed):
                    raise store_error(exc, doing, self.location) from exc
                holder.drop()  # a read is safe to repeat: once, on a new connection
                if reconnect:
                    raise store_error(exc, doing, self.location) from exc
        raise AssertionError("unreachable")  # pragma: no cover


def conninfo(url: str) -> str:
    """``url`` with tq's connection defaults where the URL does not set them: a
    connect timeout, TCP keepalives (a server gone silent is noticed in ~30 s
    instead of the system's hours), and the application name brokers go by."""
    given = conninfo_to_dict(url)
    extra = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in given}
    return make_conninfo(url, **extra, application_name=APPLICATION_NAME)


def conn_of(holder: _Connection) -> psycopg.Connection[Any] | None:
    return holder.conn


def _run_ops(conn: psycopg.Connection[Any], batch: list[_Op], *, savepoints: bool) -> bool:
    """Run the batch's operations; True if one raised (without savepoints: stop there).

    Without savepoints, neighbouring submits without idempotency keys share one
    INSERT (one round trip instead of one per call). A psycopg error that broke
    the connection, or a deadlock, leaves for the caller: the batch as a whole
    has failed (or is run again).
    """
    clock: list[float] = []  # the transaction's database clock, read once if needed
    i = 0
    while i < len(batch):
        run = 1
        if not savepoints:
            while (
                i + run < len(batch)
                and _mergeable(batch[i])
                and _mergeable(batch[i + run])
                and batch[i].note == batch[i + run].note  # one actor per statement
            ):
                run += 1
        ops = batch[i : i + run]
        i += run
        if savepoints:
            conn.execute("SAVEPOINT op")
        try:
            if ops[0].note is not None:
                _note(conn, ops[0].note, clock)
            if run > 1:
                merged = pg_schema.insert_unkeyed(conn, [op.args for op in ops])
                for op, result in zip(ops, merged, strict=True):
                    op.result, op.error = result, None
            else:
                ops[0].result = ops[0].fn(conn, *pg_cluster.resolve(conn, ops[0].args, clock))
                ops[0].error = None
            if ops[0].note is not None:
                history_sql.unnote(conn, "postgresql")
        except Exception as exc:
            if isinstance(exc, psycopg.Error) and (conn.broken or isinstance(exc, _RETRYABLE)):
                raise
            for op in ops:
                op.result = None
                op.error = _op_error(exc, conn)
            if not savepoints:
                return True
            conn.execute("ROLLBACK TO SAVEPOINT op")
        else:
            if savepoints:
                conn.execute("RELEASE SAVEPOINT op")
    return False


def _note(conn: psycopg.Connection[Any], note: Note, clock: list[float]) -> None:
    """Note who and when for the task history (tq.store.history_sql)."""
    now, actor = note
    [now] = pg_cluster.resolve(conn, (now,), clock)
    history_sql.note(conn, "postgresql", now, actor)


def _mergeable(op: _Op) -> bool:
    return op.fn is pg_schema.insert_rows and pg_schema.unkeyed(op.args[1])


def _op_error(exc: Exception, conn: psycopg.Connection[Any]) -> BaseException:
    if isinstance(exc, psycopg.Error):
        return store_error(exc, "write to", "")
    return exc


def store_error(exc: psycopg.Error, doing: str, where: str) -> TQError:
    """A StoreError saying what failed, where, and what to do about it."""
    if isinstance(exc, psycopg.OperationalError):
        hint = (
            "PostgreSQL is unreachable or refused the connection; check that the server "
            "runs, the URL (host, port, database, user) and the password"
        )
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        hint = "the database user lacks a privilege; grant it or use the owner of the database"
    elif isinstance(exc, psycopg.errors.DiskFull):
        hint = "the database server's disk is full; free some space"
    else:
        hint = ""
    target = f" {where}" if where else " the task database"
    detail = f"{type(exc).__name__}: {str(exc).strip()}"
    return StoreError(
        f"cannot {doing}{target}: {hint} ({detail})"
        if hint
        else f"cannot {doing}{target}: {detail}"
    )


if TYPE_CHECKING:  # mypy proves here that PostgresStore implements the Store protocol

    def _implements_store(store: PostgresStore) -> Store:
        return store
