"""The Store interface every backend implements (SQLite and PostgreSQL).

Nothing outside tq.store knows which backend it talks to: ``tq.store.open_store``
opens one from a URL, and what a backend says about itself travels in
``StoreStats.details``.

Durability contract: when ``submit``, ``complete``, ``cancel`` or ``retry``
returns, the change is committed (and fsynced as the backend's documented
``synchronous`` setting promises). Callers acknowledge to clients only then.

Time is an argument: every method that depends on the clock takes ``now``
(seconds since the epoch, float), and every backend uses exactly the ``now``
it is given (lease expiry is ``now + lease_ttl``): the conformance suite
(tests/test_store.py) proves the backends answer alike. The one exception is
a store a broker opens as a member of a cluster (``open_store(...,
broker=BrokerSelf(...))`` on PostgreSQL): its lease operations use the
database's clock instead (see ``ClusterState``).

Several brokers: ``Store.cluster`` is None for a backend only one broker can
use (SQLite: that broker is the whole cluster and runs every upkeep itself).
Otherwise it is the ``ClusterState`` the brokers share through the database:
workers and their heartbeats as rows, one elected leader for the upkeep that
must run once per cluster, wake-ups across brokers, and the list of brokers.
"""

from __future__ import annotations

import builtins
import os
import secrets
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tq.core.auth import ApiKey, AuditEntry
from tq.core.retention import RetentionPolicy
from tq.core.task import Lease, ListFilter, Outcome, Task, TaskSpec
from tq.store.claimplan import Aging, Cap, CapNote

if TYPE_CHECKING:
    from tq.core.schedule import Schedule
    from tq.store.history_sql import Transition
    from tq.store.schedule_sql import Fired


@dataclass(frozen=True, slots=True)
class SubmitResult:
    id: str
    created: bool  # False when an idempotency key matched an existing task


@dataclass(frozen=True, slots=True)
class OutcomeResult:
    """What became of one reported outcome."""

    id: str
    accepted: bool  # False: stale/unknown lease token (fencing), task unchanged
    state: str | None  # the task's state after the report (None if unknown id)
    reason: str = ""
    queue: str | None = None  # the task's queue and type (None if unknown id); for events
    type: str | None = None
    started_at: float | None = None  # when the reported attempt was claimed (run-time metric)
    # tasks waiting on this one that the report released (now pending) or cancelled
    dependents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, order=True)
class QueueDepth:
    """How many unfinished tasks of one queue wait (or run) at one priority in one state."""

    queue: str
    priority: int
    state: str
    count: int


# due tasks moved to pending per transaction at most: a backlog that comes due at once
# (a million tasks delayed to the same minute) is promoted in short transactions, other
# writes going in between, never in one that holds the writer for seconds
PROMOTE_BATCH = 250
BROKER_SILENT_AFTER = 10.0  # seconds without a beat before a broker shows as gone
BRIEF_DETAILS = ("backend", "location", "path", "size", "wal")


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Task counts (empty from ``probe``) and what the backend says about itself.

    ``details`` is plain data (JSON-able). Every backend gives ``backend``
    ("sqlite" or "postgresql"), ``location`` (the file path, or the URL without
    its password) and ``size`` (bytes the database takes); the rest is the
    backend's own (SQLite: ``path``, ``wal`` bytes, ``synchronous``, commit and
    checkpoint counters; PostgreSQL: ``server_version``, ``synchronous``, ...).
    """

    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # queue -> state -> n
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return int(self.details.get("size", 0))

    def brief(self) -> dict[str, Any]:
        """The details every summary shows: backend, location, size (and SQLite's
        path and WAL size)."""
        return {key: self.details[key] for key in BRIEF_DETAILS if key in self.details}


@dataclass(frozen=True, slots=True)
class BrokerSelf:
    """Who opens a store as a broker of a cluster: its id (unique while it runs) and
    version; its addresses are announced once it listens (``ClusterState.announce``)."""

    id: str
    version: str

    @classmethod
    def new(cls, version: str) -> BrokerSelf:
        """A broker starting now: ``host-pid-random``, unique while it runs."""
        return cls(f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}", version)


@dataclass(frozen=True, slots=True)
class BrokerRecord:
    """One broker of a cluster, as the database last heard of it (database clock)."""

    id: str
    address: str | None  # its wire address (host:port), None until it listens
    http: str | None  # its REST API's URL, None when it serves none
    version: str
    started_at: float
    last_seen: float
    leader: bool  # it held the leadership at its last sign of life
    now: float  # the database's clock when this was read

    @property
    def age(self) -> float:
        """Seconds since its last sign of life."""
        return max(0.0, self.now - self.last_seen)

    @property
    def alive(self) -> bool:
        """Whether it beat within BROKER_SILENT_AFTER seconds."""
        return self.age <= BROKER_SILENT_AFTER


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """A worker this broker heard from since its last beat: written to the workers rows."""

    id: str
    key_id: str | None
    info: dict[str, Any]  # name, host, pid, queues, types, concurrency (JSON-able)


class ClusterState(Protocol):
    """What brokers sharing one database share besides the tasks (PostgreSQL).

    The store runs it on its own connections and threads once opened with a
    ``BrokerSelf``: every BEAT_INTERVAL seconds it writes this broker's row and
    the workers the broker heard from (``beats``), and tries to become (or checks
    it still is) the leader. Only the leader releases expired leases and lost
    workers' tasks, and promotes due retries. A submit (or anything else that
    makes tasks pending) on any broker calls ``on_work`` on every other one. A task
    finished on any broker while another waits for it (its id in that broker's
    ``waited``, after ``hear_finished``) calls ``on_done`` there with its id.
    """

    broker: BrokerSelf
    on_work: Callable[[], None] | None  # called (in trio) when another broker made work
    beats: Callable[[], builtins.list[WorkerBeat]] | None  # workers heard from since last call
    on_done: Callable[[builtins.list[str]], None] | None  # (in trio) waited tasks finished
    waited: Collection[str]  # the ids this broker's waits are for (read from other threads)

    # task events: whether this broker's subscribers want the others' changes (asked
    # at each beat), whether others want this one's (told when it changes), theirs
    events_wanted: Callable[[], bool] | None
    on_events_wanted: Callable[[bool], None] | None
    on_events: Callable[[builtins.list[dict[str, Any]]], None] | None

    async def hear_finished(self) -> None:
        """From now on, tasks other brokers finish reach ``on_done`` (if waited for)."""
        ...

    def forward_event(self, event: dict[str, Any]) -> None:
        """Send one of this broker's tasks events to the brokers that want them."""
        ...

    @property
    def leader(self) -> bool:
        """Whether this broker runs the once-per-cluster upkeep now."""
        ...

    def announce(self, address: str | None, http: str | None) -> None:
        """Where this broker listens (written with its next beat)."""
        ...

    async def release_lost_workers(self, timeout: float) -> builtins.list[str]:
        """Forget workers no broker heard from for ``timeout`` seconds (database clock)
        and release their leases; the released task ids. The leader calls it."""
        ...

    async def brokers(self) -> builtins.list[BrokerRecord]:
        """Every broker of the cluster the database knows, oldest first."""
        ...

    async def worker_types(self) -> set[str] | None:
        """The task types the cluster's known workers handle (None: one of them takes
        any type); read at most once per BEAT_INTERVAL, cached in between."""
        ...


class Store(Protocol):
    cluster: ClusterState | None  # None: one broker only (see the module docstring)

    async def submit(
        self, specs: Sequence[TaskSpec], now: float, *, actor: str | None = None
    ) -> list[SubmitResult]:
        """Insert tasks as pending; durable when it returns. Idempotency keys dedupe.
        ``actor`` (here and below): who asked, as the task history records it."""
        ...

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
        """Lease up to n pending tasks: highest (effective, with ``aging``) priority
        first, then oldest, within the caps in force (tq.store.claimplan); ``note``
        learns whether a cap held tasks back and when a rate bucket refills."""
        ...

    async def complete(self, outcomes: Sequence[Outcome], now: float) -> list[OutcomeResult]:
        """Apply worker reports. A token that is not the task's live lease is refused."""
        ...

    async def extend_leases(
        self,
        worker: str,
        leases: Sequence[tuple[str, int]],
        now: float,
        lease_ttl: float,
        progress: Mapping[str, tuple[float, str | None]] | None = None,
    ) -> list[str]:
        """Extend the given (id, token) leases; return the ids whose lease is lost.

        ``progress`` (task id -> fraction 0..1, message) is stored on the tasks whose
        lease this call found live, in the same transaction; others' is dropped."""
        ...

    async def release_expired(self, now: float) -> list[str]:
        """Return running tasks whose lease expired to pending (or dead); their ids."""
        ...

    async def release_worker(self, worker: str, now: float) -> list[str]:
        """Release every lease held by ``worker`` (it is gone); their ids."""
        ...

    async def promote_due(self, now: float, limit: int = PROMOTE_BATCH) -> int:
        """Move at most ``limit`` failed/scheduled tasks whose run_at has come to pending,
        earliest due first, in one transaction; how many (fewer than ``limit``: none left)."""
        ...

    async def queues_of_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """For each idempotency key in use, the queue of the task holding it."""
        ...

    async def next_due(self) -> float | None:
        """The earliest run_at among failed/scheduled tasks, or None."""
        ...

    async def cancel(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        """Cancel a pending/failed/scheduled/running task. NotFound, InvalidTransition."""
        ...

    async def retry(self, task_id: str, now: float, *, actor: str | None = None) -> Task:
        """Send a failed/dead/cancelled task back to pending."""
        ...

    async def set_priority(
        self, task_id: str, priority: int, *, now: float | None = None, actor: str | None = None
    ) -> Task:
        """Change the priority (0..255) of a task waiting to run (pending, failed,
        scheduled, blocked). NotFound, InvalidTransition for any other state."""
        ...

    async def get(self, task_id: str) -> Task:
        """NotFound if there is no such task."""
        ...

    async def history(self, task_id: str) -> builtins.list[Transition]:
        """The task's transitions, oldest first (tq.store.history_sql: at most
        MAX_HISTORY, the first and the latest). NotFound if there is no such task."""
        ...

    async def dependencies(self, task_id: str) -> builtins.list[tuple[str, str | None, bool]]:
        """The task's dependencies in depends_on order: (id, state, or None once purged,
        met). NotFound if there is no such task (tq.store.deps_sql)."""
        ...

    async def graph(
        self, task_id: str
    ) -> tuple[builtins.list[Task], builtins.list[tuple[str, str]], bool]:
        """The workflow around a task: the tasks linked to it by dependencies either way,
        the edges (task, depends_on), and whether it was cut at deps_sql.MAX_GRAPH tasks."""
        ...

    async def list(self, flt: ListFilter) -> list[Task]:
        """Tasks matching the filter, in insertion order, after the cursor task ``flt.after``.

        Insertion order is id order for ids from one broker's clock. ``limit``
        must be 1..10000 and ``after`` an existing task id (else InvalidRequest).
        """
        ...

    async def stats(self) -> StoreStats: ...

    # -- operator surface ---------------------------------------------------
    async def queue_depth(self) -> builtins.list[QueueDepth]:
        """Unfinished tasks by queue, priority and state; cost grows with the backlog only."""
        ...

    async def set_paused(self, queue: str, paused: bool, now: float) -> bool:
        """Pause (or resume) a queue, durably; True if that changed it."""
        ...

    async def paused_queues(self) -> dict[str, float]:
        """Paused queue -> when it was paused (Unix time)."""
        ...

    # -- caps (tq.store.claimplan) ---------------------------------------------------
    async def set_cap(self, cap: Cap, now: float) -> Cap:
        """Add or change the cap of a queue or task type, durably; the stored cap."""
        ...

    async def remove_cap(self, kind: str, name: str) -> bool:
        """Remove a cap; False if there was none."""
        ...

    async def list_caps(self) -> builtins.list[Cap]:
        """Every cap, by kind then name."""
        ...

    async def running_count(self, kind: str, name: str, limit: int) -> int:
        """Running tasks of a queue or type, counted up to ``limit``."""
        ...

    # -- recurring schedules (tq.store.schedule_sql, tq.core.schedule) -------------
    async def put_schedule(self, schedule: Schedule) -> tuple[Schedule, bool]:
        """Add or redeclare by name (history kept; the next tick too unless the cron
        expression or time zone changed); (stored schedule, created?)."""
        ...

    async def get_schedule(self, name: str) -> Schedule:
        """NotFound if there is none by that name."""
        ...

    async def list_schedules(self) -> builtins.list[Schedule]:
        """By name, at most schedule_sql.MAX_LISTED."""
        ...

    async def remove_schedule(self, name: str) -> bool: ...

    async def pause_schedule(self, name: str, paused: bool, now: float) -> tuple[Schedule, bool]:
        """Pause, or resume from the first tick after ``now``; (schedule, changed?)."""
        ...

    async def fire_schedules(self, now: float) -> builtins.list[Fired]:
        """Fire due schedules: their tasks and next ticks committed together."""
        ...

    async def run_schedule(self, name: str, now: float) -> tuple[Schedule, str]:
        """Submit the schedule's task once now; (schedule, task id)."""
        ...

    async def next_schedule_at(self) -> float | None:
        """The earliest next tick of a schedule not paused."""
        ...

    async def ahead(self, task_id: str, limit: int) -> tuple[int, int] | None:
        """For a pending task: (pending tasks of higher priority, older pending tasks of its
        priority) in its queue, each counted up to ``limit``; None if it is not pending."""
        ...

    async def purge(self, states: Sequence[str], older_than: float, now: float, limit: int) -> int:
        """Delete up to ``limit`` finished tasks (``states`` must be terminal) that
        finished more than ``older_than`` seconds before ``now``, oldest first; how many.
        A backend may keep rows back to stay consistent (SQLite never deletes the
        newest task, so its ``seq`` values are never reused)."""
        ...

    async def count_purgeable(self, states: Sequence[str], older_than: float, now: float) -> int:
        """How many tasks ``purge`` would delete, without deleting them."""
        ...

    async def expire_finished(
        self, policy: RetentionPolicy, now: float, limit: int
    ) -> dict[tuple[str, str], int]:
        """Delete up to ``limit`` finished tasks whose TTL under ``policy`` has passed,
        oldest first per queue and state, in one transaction; how many per (queue,
        state). Never an unfinished task, nor one a blocked task still waits for
        (tq/store/retention_sql.py)."""
        ...

    async def retry_many(
        self, state: str, now: float, limit: int, *, actor: str | None = None
    ) -> builtins.list[str]:
        """Send up to ``limit`` tasks in ``state`` (failed/dead/cancelled), oldest
        first, back to pending as ``retry`` does; their ids."""
        ...

    async def probe(self) -> StoreStats:
        """A trivial read (StoreError/Unavailable if the database is unreachable);
        the details (location, size), no counts."""
        ...

    # -- security (migration 2): API keys and the audit log ----------------

    async def create_key(self, key: ApiKey) -> None:
        """Store a new key record (it holds only a salted hash of the secret)."""
        ...

    async def get_key(self, key_id: str) -> ApiKey:
        """NotFound if there is no such key."""
        ...

    async def list_keys(self) -> builtins.list[ApiKey]:
        """Every key, revoked and expired ones included, oldest first."""
        ...

    async def revoke_key(self, key_id: str, now: float) -> ApiKey:
        """Mark the key revoked at ``now`` (a second revocation keeps the first time)."""
        ...

    async def rehash_key(self, key: ApiKey, old_kdf: str) -> bool:
        """Replace the stored hash of ``key.id`` by ``key``'s (kdf, salt, hash) if it is
        still hashed with ``old_kdf``; whether it was."""
        ...

    async def record_audit(self, entry: AuditEntry) -> int:
        """Append an audit entry; durable when it returns; its ``seq``."""
        ...

    async def list_audit(
        self, limit: int = 100, before: int | None = None
    ) -> builtins.list[AuditEntry]:
        """Newest first, at most ``limit`` (1..10000) entries with ``seq < before``."""
        ...

    async def aclose(self) -> None: ...
