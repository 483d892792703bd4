"""The operator surface of the service layer: depth, purge, bulk retry, health.

``OperatorOps`` is a mixin of ``BrokerService`` (service.py): these are
service methods like the others, kept in their own module so service.py
stays small. Every edge (wire query/request, REST route, CLI command) calls
exactly one of them. They validate their arguments (raising TQErrors), ask
the store one verb, and say what changed (work notifications, waiters, the
audit log).

Health has two levels, for two audiences:

* ``health()`` (liveness): the process answers; never touches the store.
* ``ready()`` (readiness): accepting work and the store answers a read
  within READY_TIMEOUT; ``Unavailable`` otherwise.
* ``cluster_status()``: both, plus what an operator wants on one screen;
  never raises for an unhealthy broker, it says so (``healthy: false``).
  ``role`` says whether this broker runs the once-per-cluster upkeep
  (``leader``) or not (``follower``), and ``brokers`` lists every broker of
  the cluster the store knows (one, this broker, on a single-broker store).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio

from tq import PROTOCOL_VERSION, __version__
from tq.broker.activity import Activity
from tq.core.errors import InvalidRequest, TQError, Unavailable
from tq.core.limits import BULK_DEFAULT
from tq.protocol.answers import (
    BrokerMap,
    CapLimits,
    CheckOk,
    Depth,
    Explanation,
    Health,
    HealthChecks,
    Listen,
    PriorityCount,
    PurgeAnswer,
    QueueAnswer,
    QueueDepth,
    RetryManyAnswer,
    StoreCheck,
    Transition,
    WorkerCount,
    Workflow,
    task_error_map,
    task_map,
)
from tq.store.history_sql import MAX_HISTORY

if TYPE_CHECKING:
    from tq.broker.auth import Auth
    from tq.broker.coalesce import Coalesced
    from tq.broker.events import EventBus
    from tq.broker.registry import WorkerRegistry
    from tq.protocol.schema import Purge, QueueOp, RetryMany
    from tq.security.roles import Principal
    from tq.store.base import ClusterState, Store, StoreStats
    from tq.store.base import QueueDepth as DepthRow
    from tq.store.history_sql import Transition as HistoryRow

READY_TIMEOUT = 5.0  # seconds the store may take to answer a readiness probe
EXPLAIN_AHEAD_LIMIT = 10_000  # tasks ahead counted up to this ("at least" beyond)
HISTORY_LIMIT = MAX_HISTORY  # rows kept per task: the ``limit`` of a history answer


def _visible(principal: Principal | None) -> Callable[[str], bool] | None:
    if principal is None or principal.queues is None:
        return None
    return principal.may_use


class OperatorOps:
    # provided by BrokerService
    store: Store
    auth: Auth
    workers: WorkerRegistry
    clock: Callable[[], float]
    closing: bool
    name: str
    started_at: float
    lease_ttl: float
    counters: dict[str, int]
    activity: Activity
    events: EventBus
    cluster: ClusterState | None
    notify_work: Callable[[], None]
    paused: Callable[[], Awaitable[dict[str, float]]]
    forget_paused: Callable[[], None]
    fire: Callable[[Sequence[str]], None]
    _store_depth: Coalesced[list[DepthRow]]
    # set by the server once it listens: {"wire": "host:port", "http": "https://..."}
    addresses: Mapping[str, str | None] = MappingProxyType({})

    async def pause_queue(self, msg: QueueOp, principal: Principal | None = None) -> QueueAnswer:
        """Pause or resume (``op``) a queue, durably and for every broker on the store:
        a paused queue accepts submits and hands nothing out. Audited when it changed."""
        from tq.broker.auth import actor_of
        from tq.core.task import _name

        if msg.op not in ("pause", "resume"):
            raise InvalidRequest(f"unknown queue op {msg.op!r}; known: pause, resume")
        paused = msg.op == "pause"
        name = _name({"queue": msg.queue}, "queue", None)
        if principal is not None:
            principal.check_queue(name)
        changed = await self.store.set_paused(name, paused, self.clock())
        self.forget_paused()
        if changed:
            if not paused:
                self.notify_work()  # claims waiting on other queues look again
            action = "queue.pause" if paused else "queue.resume"
            await self.auth.record(actor_of(principal), action, name, {})
        return QueueAnswer(id=msg.id, queue=name, paused=paused, changed=changed)

    async def explain(self, task_id: str, principal: Principal | None = None) -> Explanation:
        """Why the task is not running right now (tq/broker/explain.py): its reasons."""
        from tq.broker.explain import explain

        task = await self.store.get(task_id)
        if principal is not None:
            principal.check_queue(task.queue)
        ahead = None
        if task.state == "pending":
            ahead = await self.store.ahead(task_id, EXPLAIN_AHEAD_LIMIT)
        unmet = None
        if task.state == "blocked":
            deps = await self.store.dependencies(task_id)
            unmet = [dep for dep, _, met in deps if not met]
        caps = []
        if task.state == "pending":
            for cap in await self.store.list_caps():
                if (cap.kind, cap.name) in (("queue", task.queue), ("type", task.type)):
                    limit = cap.concurrency
                    running = (
                        0
                        if limit is None
                        else await self.store.running_count(cap.kind, cap.name, limit)
                    )
                    caps.append((cap, running))
        now = self.clock()
        paused = (await self.paused()).get(task.queue)
        return explain(
            task,
            ahead,
            EXPLAIN_AHEAD_LIMIT,
            self.workers.all(),
            now,
            self.lease_ttl,
            paused,
            unmet,
            caps,
        )

    async def workflow(self, task_id: str, principal: Principal | None = None) -> Workflow:
        """The tasks linked to ``task_id`` by dependencies, either way, and the edges
        (task, depends_on), and whether the walk was cut. A queue-limited key sees the
        tasks of its queues only (edges to others stay)."""
        task = await self.store.get(task_id)
        if principal is not None:
            principal.check_queue(task.queue)
        tasks, edges, cut = await self.store.graph(task_id)
        if principal is not None:
            tasks = [t for t in tasks if principal.may_use(t.queue)]
        return Workflow(tasks=[task_map(t) for t in tasks], edges=edges, truncated=cut)

    async def history(self, task_id: str, principal: Principal | None = None) -> list[Transition]:
        """The task's transitions, oldest first (at most HISTORY_LIMIT: the first and the
        latest are kept; ``n`` numbers them, so a gap after n=1 counts the dropped
        ones). Queue-limited keys: their queues."""
        task = await self.store.get(task_id)
        if principal is not None:
            principal.check_queue(task.queue)
        return [_transition(row) for row in await self.store.history(task_id)]

    async def queue_depth(self, principal: Principal | None = None) -> Depth:
        """Unfinished tasks per queue: totals per state and rows per priority and state.
        A paused or capped queue is shown, even when empty."""
        visible = _visible(principal)
        rows: dict[str, list[DepthRow]] = {}
        for row in await self._store_depth.get():  # shared by concurrent callers
            if visible is None or visible(row.queue):
                rows.setdefault(row.queue, []).append(row)
        paused = await self.paused()
        for name in paused:
            if visible is None or visible(name):
                rows.setdefault(name, [])
        capped = {
            cap.name: cap
            for cap in await self.store.list_caps()
            if cap.kind == "queue" and (visible is None or visible(cap.name))
        }
        for name in capped:
            rows.setdefault(name, [])
        queues = []
        for name in sorted(rows):
            found = rows[name]
            states: dict[str, int] = {}
            for row in found:
                states[row.state] = states.get(row.state, 0) + row.count
            cap = capped.get(name)
            queues.append(
                QueueDepth(
                    queue=name,
                    total=sum(row.count for row in found),
                    states=states,
                    priorities=[
                        PriorityCount(priority=row.priority, state=row.state, count=row.count)
                        for row in sorted(found, key=lambda r: (-r.priority, r.state))
                    ],
                    paused=name in paused,
                    cap=None
                    if cap is None
                    else CapLimits(concurrency=cap.concurrency, rate=cap.rate, burst=cap.burst),
                )
            )
        return Depth(queues=queues)

    async def purge(self, msg: Purge, principal: Principal | None = None) -> PurgeAnswer:
        """Delete (or with ``dry_run`` count) finished tasks older than ``older_than`` s.

        One chunk of at most ``limit`` rows per call; ``more`` says whether
        another call may find more. The fields' types and ranges are the
        declaration's (tq/protocol/schema.py); the state names are the store's.
        """
        states, older_than = msg.states, msg.older_than
        limit = BULK_DEFAULT if msg.limit is None else msg.limit
        now = self.clock()
        if msg.dry_run:
            matched = await self.store.count_purgeable(states, older_than, now)
            return PurgeAnswer(id=msg.id, purged=0, matched=matched, more=False)
        purged = await self.store.purge(states, older_than, now, limit)
        if purged:
            self.events.removed(purged)
            await self._audit(principal, "task.purge", ",".join(sorted(states)), purged, older_than)
        return PurgeAnswer(id=msg.id, purged=purged, matched=purged, more=purged == limit)

    async def retry_many(
        self, msg: RetryMany, principal: Principal | None = None
    ) -> RetryManyAnswer:
        """Send up to ``limit`` tasks in ``state`` back to pending, oldest first."""
        state = msg.state
        limit = BULK_DEFAULT if msg.limit is None else msg.limit
        from tq.broker.auth import history_actor

        ids = await self.store.retry_many(
            state, self.clock(), limit, actor=history_actor(principal)
        )
        if ids:
            self.notify_work()
            self.fire(ids)
            self.events.promoted(len(ids))  # back to pending; from which state is not listed
            await self._audit(principal, "task.retry_many", state, len(ids), None)
        return RetryManyAnswer(id=msg.id, retried=ids, more=len(ids) == limit)

    async def _audit(
        self, principal: Principal | None, action: str, target: str, n: int, age: float | None
    ) -> None:
        from tq.broker.auth import actor_of

        detail: dict[str, Any] = {"count": n}
        if age is not None:
            detail["older_than"] = age
        await self.auth.record(actor_of(principal), action, target, detail)

    async def gauges(self, principal: Principal | None = None) -> dict[str, Any]:
        """What /metrics reads from the store per scrape: queue depth and file sizes."""
        depth = await self.queue_depth(principal)
        probe = await self.store.probe()
        wal = int(probe.details.get("wal", 0))  # only SQLite has a WAL file of its own
        return {"queues": depth.queues, "store": {"size": probe.size_bytes, "wal": wal}}

    async def authorize(self, key: str | None, action: str) -> Principal | None:
        """Who a REST request acts as: its bearer ``key`` checked like a hello's, and
        its role checked for ``action`` (tq.security.roles). None with --no-auth."""
        principal = await self.auth.authenticate(key)
        if principal is not None:
            self.auth.check(principal)
            principal.authorize(action)
        return principal

    def health(self) -> dict[str, Any]:
        """Liveness: this process answers. Never touches the store."""
        return {
            "status": "ok",
            "broker": self.name,
            "version": __version__,
            "uptime": self.clock() - self.started_at,
        }

    async def ready(self) -> dict[str, Any]:
        """Readiness: accepting work and the store answers; Unavailable otherwise."""
        if self.closing:
            raise Unavailable("the broker is shutting down")
        await self._probe()
        return {"status": "ready", "broker": self.name, "version": __version__}

    async def _probe(self) -> StoreStats:
        with trio.move_on_after(READY_TIMEOUT):
            return await self.store.probe()
        raise Unavailable(f"the task store did not answer within {READY_TIMEOUT:g} s")

    async def cluster_status(self, principal: Principal | None = None) -> Health:
        """Everything an operator checks first; ``healthy`` false (never an error) if not."""
        started = trio.current_time()
        error = None
        probe = None
        try:
            probe = await self._probe()
        except TQError as exc:
            error = exc.message or str(exc)
        latency = trio.current_time() - started
        now = self.clock()
        visible = _visible(principal)
        known = self.workers.visible(visible)
        brokers, brokers_error = await self._brokers(now)
        return Health(
            healthy=error is None and not self.closing,
            checks=HealthChecks(
                accepting=CheckOk(ok=not self.closing),
                store=StoreCheck(ok=error is None, error=error, latency=latency),
            ),
            broker=self.name,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            started_at=self.started_at,
            uptime=now - self.started_at,
            listen=Listen(wire=self.addresses.get("wire") or "", http=self.addresses.get("http")),
            store=None
            if probe is None or visible is not None  # a queue-limited key: not the files
            else dict(probe.details),
            workers=WorkerCount(
                known=len(known), connected=sum(1 for w in known if w.connections > 0)
            ),
            role="leader" if self.cluster is None or self.cluster.leader else "follower",
            brokers=brokers,
            brokers_error=brokers_error,
        )

    async def _brokers(self, now: float) -> tuple[list[BrokerMap] | None, str | None]:
        """(``brokers``, ``brokers_error``): every broker of the cluster, this one marked
        ``self``, and None; on a store error, None and the error (cluster_status never
        raises)."""
        cluster = self.cluster
        if cluster is None:
            one = BrokerMap(
                id=self.name,
                address=self.addresses.get("wire"),
                http=self.addresses.get("http"),
                version=__version__,
                started_at=self.started_at,
                last_seen=now,
                age=0.0,
                alive=True,
                role="leader",
                self=True,
            )
            return [one], None
        try:
            records = await cluster.brokers()
        except TQError as exc:
            return None, exc.message or str(exc)
        return [
            BrokerMap(
                id=r.id,
                address=r.address,
                http=r.http,
                version=r.version,
                started_at=r.started_at,
                last_seen=r.last_seen,
                age=r.age,
                alive=r.alive,
                role="leader" if r.leader and r.alive else "follower",
                self=r.id == cluster.broker.id,
            )
            for r in records
        ], None


def _transition(row: HistoryRow) -> Transition:
    """A stored history row as its answer map."""
    return Transition(
        n=row.n,
        at=row.at,
        event=row.event,
        state=row.state,
        actor=row.actor,
        worker=row.worker,
        token=row.token,
        error=task_error_map(row.error),
        run_at=row.run_at,
        priority=row.priority,
    )
