"""The broker's event bus: live notifications pushed to subscribed connections.

Who publishes: the service layer's operations, one call each (``submitted``,
``claimed``, ``reported``, ``changed``, ``released``, ``promoted``,
``worker``). Who listens: connections that sent ``subscribe`` (the console,
dashboards) and the REST event stream (GET /api/v1/events, tq/http/web.py);
``SessionEvents`` is the per-connection half of the wire, driven by
server.py. docs/PROTOCOL.md ("subscribe", "event") is the wire contract.

Invariants:

* **Publishing never waits and is free when nobody listens.** Every publish
  method starts with one attribute test (``if not self._want_tasks``) and
  returns; with subscribers it appends to an in-memory buffer. The hot path
  never awaits the bus, never encodes and never touches a socket.
* **Batches stay compact.** Task changes are coalesced: the flusher sends at
  most one ``tasks`` event per FLUSH_INTERVAL (the first change after a quiet
  spell goes out at once). An event lists its changes one by one only while
  there are at most DETAIL_LIMIT of them; past that it lists none and says
  how many (``more``). ``totals`` (queue, from, to, n) always summarise every
  change, so a submit of 1000 tasks is one event with one totals row; past
  TOTALS_LIMIT rows, further queues' changes are summed with queue nil.
* **A slow subscriber never slows the broker.** Each subscriber has a bounded
  queue (SUBSCRIBER_BUFFER events). When it is full the event is dropped for
  that subscriber only, and once there is room again a ``lagged`` marker
  (with the number dropped) is queued where the gap is, so the client knows
  to resynchronise with queries. Markers are retried at least every
  COUNTS_INTERVAL even when nothing else is published.
* **A subscriber holds at most one counts event.** Only the newest counts
  matter: a counts event waits in the subscriber's queue as a slot that is
  filled with the newest counts when its turn comes, and a newer one replaces
  the one not yet sent (with 10,000 queues an event is ~1.6 MB).
* **Several brokers, one stream.** With several brokers on one store, a
  broker whose subscribers want task changes or counts says so through the
  store (``ClusterState``); the others then hand each ``tasks`` event they
  flush to ``forward`` (coalesced as above: at most one per FLUSH_INTERVAL per
  broker), and it reaches this broker's subscribers through
  ``from_other_broker`` as the other broker built it (checked against
  ``TasksEvent`` first: a malformed one is logged and dropped). So a subscriber sees
  the whole cluster's changes, each broker's in events of its own.
* **Counts are recounted, not dead-reckoned.** ``counts`` events carry the
  store's per-queue, per-state counts (the same query as ``query stats``),
  taken at most every COUNTS_INTERVAL, only while someone subscribes to
  ``counts``, after a task change was published or, as a safety net for
  changes no hook saw (bulk operations, another broker sharing the store),
  COUNTS_REFRESH after the last count; an event is sent only when the counts
  differ from the last ones sent (a new subscriber always gets the current
  counts first).

What a change knows: ``from`` is nil for a new task and where the broker does
not know it without an extra read (retry promotion); reaped leases and
operator cancel/retry read the task, and a cancel the dependents it moved
(``cascaded``; only while someone subscribes to ``tasks``; these are rare
paths, never the submit/claim/report hot path).

Events are built as their declared Structs (tq/protocol/answers.py) once, with
``id`` and ``seq`` 0; each subscriber's forwarder stamps its own (a shallow
copy). The REST stream and the cluster forwarding take ``event_fields``.

May import: trio, msgspec, tq.core, tq.protocol, tq.broker.registry, tq.store.base.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from tq.core.errors import InvalidRequest, NotFound, TQError, Unavailable
from tq.core.when import due_at
from tq.protocol.answers import (
    CountsEvent,
    Event,
    LaggedEvent,
    Nack,
    ProgressEvent,
    ProgressItem,
    SubscribeAnswer,
    TaskChange,
    TasksEvent,
    TaskTotal,
    UnsubscribeAnswer,
    WorkersEvent,
)
from tq.protocol.schema import Subscribe, Unsubscribe

if TYPE_CHECKING:
    from tq.broker.registry import WorkerInfo, WorkerRegistry
    from tq.core.task import Lease, Task, TaskSpec
    from tq.store.base import OutcomeResult, Store, SubmitResult

log = logging.getLogger("tq.broker")

TOPICS = ("tasks", "workers", "counts", "progress")
SUBSCRIPTION_REQUESTS = frozenset({"subscribe", "unsubscribe"})
DETAIL_LIMIT = 100  # changes listed one by one in a tasks event; beyond: totals only
TOTALS_LIMIT = 100  # totals rows with a queue in a tasks event; beyond: summed with queue nil
SUBSCRIBER_BUFFER = 256  # events queued per subscriber before it is lagging
FLUSH_INTERVAL = 0.1  # seconds: at most one tasks event per interval
COUNTS_INTERVAL = 1.0  # seconds: counts are re-read at most this often
COUNTS_REFRESH = 10.0  # seconds: ... and at least this often (changes no hook saw)
PROGRESS_INTERVAL = 1.0  # seconds: at most one progress event per interval

# queued in place of a counts event (compared by identity, never sent)
COUNTS_SLOT = CountsEvent(id=0, seq=0, topic="counts", time=0.0, queues={})

# (task id, type, queue, from state, to state); None where unknown
Change = tuple[str, str | None, str | None, str | None, str | None]


class Subscriber:
    """One subscription: its topics and its bounded queue of events."""

    def __init__(self, sid: int, topics: frozenset[str], clock: Callable[[], float]) -> None:
        self.id = sid
        self.topics = topics
        self.clock = clock
        self.send, self.receive = trio.open_memory_channel[Event](SUBSCRIBER_BUFFER)
        self.dropped = 0  # events lost since the last lagged marker was queued
        self.dropped_total = 0
        self.needs_counts = "counts" in topics  # a first counts event is owed
        self.latest_counts: Event | None = None  # the newest counts event not yet sent
        self.counts_queued = False  # a COUNTS_SLOT for it waits in the queue

    def offer(self, event: Event) -> None:
        """Queue ``event`` without waiting; drop it (and remember) if the queue is full.

        Counts events coalesce: only the newest matters, so a subscriber holds at most
        one (a slot in the queue, filled when its turn comes) however slowly it reads."""
        if event.topic == "counts":
            self.latest_counts = event
            if self.counts_queued:
                return
            event = COUNTS_SLOT
        if self.dropped and not self.queue_marker():
            self._drop()
            return
        try:
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self._drop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is going away; unsubscribe follows
        else:
            self.counts_queued |= event is COUNTS_SLOT

    def take(self, event: Event) -> Event | None:
        """The event to send for what came out of the queue (a slot: the newest counts)."""
        if event is not COUNTS_SLOT:
            return event
        self.counts_queued = False
        latest, self.latest_counts = self.latest_counts, None
        return latest

    def _drop(self) -> None:
        self.dropped += 1
        self.dropped_total += 1

    def queue_marker(self) -> bool:
        """Queue the lagged marker for the events dropped so far; False if still full."""
        marker = LaggedEvent(id=0, seq=0, topic="lagged", time=self.clock(), dropped=self.dropped)
        try:
            self.send.send_nowait(marker)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        self.dropped = 0
        return True


class EventBus:
    """Fan-out of broker events to subscribers (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.subscribers: set[Subscriber] = set()
        self._want_tasks = False  # publishers' fast checks, kept by _recompute
        self._want_counts = False
        self._want_workers = False
        self._changes: list[Change] = []  # up to DETAIL_LIMIT + 1 (more: totals only)
        self._count = 0  # changes since the last flush, listed or not
        self._incomplete = False  # some of them are known only by their count
        self._totals: Counter[tuple[str | None, str | None, str | None]] = Counter()
        self._counts_dirty = False
        self._last_counts: dict[str, dict[str, int]] | None = None
        self._counted_at = float("-inf")  # trio clock of the last count
        self._flush_wake = trio.Event()
        self._counts_wake = trio.Event()
        self._want_progress = False
        self._progress: dict[str, tuple[float, str | None]] = {}  # latest per task
        self._progress_more = 0  # reports beyond DETAIL_LIMIT tasks since the last event
        self._progress_wake = trio.Event()
        self.events_sent = 0  # events built (each offered to every interested subscriber)
        # several brokers on one store: each tasks event is also handed to ``forward``
        # while other brokers want this one's changes (``set_remote``), and theirs
        # arrive through ``from_other_broker``
        self.forward: Callable[[dict[str, Any]], None] | None = None
        self._remote = False
        self._local_tasks = False

    # -- subscribers ---------------------------------------------------
    def subscribe(self, sid: int, topics: object) -> Subscriber:
        chosen = parse_topics(topics)
        sub = Subscriber(sid, chosen, self.clock)
        self.subscribers.add(sub)
        self._recompute()
        if sub.needs_counts:
            self._counts_wake.set()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            sub.send.close()
            self._recompute()

    def _recompute(self) -> None:
        subs = self.subscribers
        self._local_tasks = any("tasks" in s.topics for s in subs)
        self._want_tasks = self._local_tasks or self._remote
        self._want_counts = any("counts" in s.topics for s in subs)
        self._want_workers = any("workers" in s.topics for s in subs)
        self._want_progress = any("progress" in s.topics for s in subs)
        if not self._want_progress:
            self._progress.clear()
            self._progress_more = 0
        if not self._want_tasks:
            self._changes.clear()
            self._totals.clear()
            self._count = 0
            self._incomplete = False
        if not self._want_counts:
            self._last_counts = None

    @property
    def watching_tasks(self) -> bool:
        return self._want_tasks

    @property
    def wants_other_brokers(self) -> bool:
        """Whether a subscriber here wants the task changes other brokers make."""
        return self._local_tasks or self._want_counts

    def set_remote(self, wanted: bool) -> None:
        """Whether other brokers want this broker's task changes (``forward``)."""
        if wanted != self._remote:
            self._remote = wanted
            self._recompute()

    def from_other_broker(self, fields: dict[str, Any]) -> None:
        """A tasks event another broker of the cluster sent (``forward`` there, as
        ``event_fields``): offered to the subscribers of ``tasks`` as it is, and the
        counts are read again. One that does not fit ``TasksEvent`` is logged, not sent."""
        self._counts_dirty = True
        if not self._local_tasks or fields.get("topic") != "tasks":
            return
        try:
            event = msgspec.convert({**fields, "id": 0, "seq": 0}, TasksEvent, strict=True)
        except msgspec.ValidationError as exc:
            log.warning("a tasks event from another broker is malformed, not sent: %s", exc)
            return
        self._offer("tasks", event)

    @property
    def dropped_total(self) -> int:
        return sum(s.dropped_total for s in self.subscribers)

    # -- publishers (called by the service layer) ------------------------
    def submitted(self, specs: Sequence[TaskSpec], results: Sequence[SubmitResult]) -> None:
        if not (self._want_tasks or self._want_counts):
            return
        now = self.clock()
        self._add(
            # with dependencies: blocked (pending at once if they had all succeeded)
            (r.id, s.type, s.queue, None, _first_state(s, now))
            for s, r in zip(specs, results, strict=True)
            if r.created
        )

    def claimed(self, leases: Sequence[Lease]) -> None:
        if not (self._want_tasks or self._want_counts) or not leases:
            return
        self._add((lease.id, lease.type, lease.queue, "pending", "running") for lease in leases)

    def reported(self, results: Sequence[OutcomeResult]) -> None:
        if not (self._want_tasks or self._want_counts):
            return
        self._add(
            (r.id, getattr(r, "type", None), getattr(r, "queue", None), "running", r.state)
            for r in results
            if r.accepted
        )

    def changed(self, task: Task, before: str | None) -> None:
        """One task changed state (operator cancel/retry); ``before`` as read, or None."""
        if not (self._want_tasks or self._want_counts):
            return
        self._add([(task.id, task.type, task.queue, before, task.state.value)])

    def cascaded(self, tasks: Sequence[Task], *, complete: bool = True) -> None:
        """Blocked dependents a cancel released or cancelled with it (``tasks``, read
        after it); ``complete`` False: there may be more (the workflow was cut)."""
        if not self._want_tasks:
            return
        self._add((t.id, t.type, t.queue, "blocked", t.state.value) for t in tasks)
        if not complete:
            self._incomplete = True  # the event lists none: subscribers re-read
            self._flush_wake.set()

    def promoted(self, count: int) -> None:
        """``count`` failed (or scheduled) tasks became pending; which ones is not known."""
        if not (self._want_tasks or self._want_counts) or not count:
            return
        self._counts_dirty = True
        if self._want_tasks:
            _total(self._totals, (None, None, "pending"), count)
            self._count += count
            self._incomplete = True  # these changes cannot be listed one by one
            self._flush_wake.set()

    def removed(self, count: int, queue: str | None = None) -> None:
        """``count`` tasks were deleted (purge): they left their states for nothing."""
        if not (self._want_tasks or self._want_counts) or not count:
            return
        self._counts_dirty = True
        if self._want_tasks:
            _total(self._totals, (queue, None, None), count)
            self._count += count
            self._incomplete = True
            self._flush_wake.set()

    async def state_before(self, store: Store, task_id: str) -> str | None:
        """The task's state before an operator change, read only if someone listens."""
        if not self._want_tasks:
            return None
        try:
            return (await store.get(task_id)).state.value
        except TQError:
            return None  # unknown id: the change itself will say so

    async def released(
        self, store: Store, task_ids: Sequence[str], before: str = "running"
    ) -> None:
        """Leases returned by the reaper, or blocked tasks their dependencies released or
        cancelled (``before="blocked"``): read where they went (listeners only)."""
        if not (self._want_tasks or self._want_counts) or not task_ids:
            return
        if not self._want_tasks or len(task_ids) > DETAIL_LIMIT:
            self._add((task_id, None, None, before, None) for task_id in task_ids)
            return
        changes: list[Change] = []
        for task_id in task_ids:
            try:
                task = await store.get(task_id)
            except NotFound:
                continue
            changes.append((task.id, task.type, task.queue, before, task.state.value))
        self._add(changes)

    def progressed(self, reports: dict[str, tuple[float, str | None]]) -> None:
        """Running tasks reported progress (task id -> fraction, message); only the
        latest per task is kept until the next progress event (coalesced)."""
        if not self._want_progress or not reports:
            return
        latest = self._progress
        for task_id, value in reports.items():
            if task_id in latest or len(latest) < DETAIL_LIMIT:
                latest[task_id] = value
            else:
                self._progress_more += 1
        self._progress_wake.set()

    def worker(self, kind: str, worker: WorkerInfo | str, registry: WorkerRegistry) -> None:
        """A worker joined, left (disconnected), was lost (forgotten) or sent a heartbeat."""
        if not self._want_workers:
            return
        worker_id = worker if isinstance(worker, str) else worker.id
        if isinstance(worker, str):
            info = next((w for w in registry.all() if w.id == worker_id), None)
        else:
            info = worker
        now = self.clock()
        event = WorkersEvent(
            id=0,
            seq=0,
            topic="workers",
            time=now,
            kind=kind,
            worker_id=worker_id,
            worker=None if info is None or kind == "lost" else info.to_map(now),
        )
        self._offer("workers", event)

    def _add(self, changes: Iterable[Change]) -> None:
        self._counts_dirty = True
        if not self._want_tasks:
            return
        totals = self._totals
        listed = self._changes
        n = 0
        for change in changes:
            n += 1
            _total(totals, (change[2], change[3], change[4]))
            if len(listed) <= DETAIL_LIMIT:
                listed.append(change)
        if n:
            self._count += n
            self._flush_wake.set()

    # -- the bus's own loop (started in the broker's nursery) ---------------
    async def run(self, store: Store) -> None:
        """Flush task changes, recount counts, retry lagged markers; forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            nursery.start_soon(self._progress_loop)
            nursery.start_soon(self._counts_loop, store.stats)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake = trio.Event()
            self.flush()
            await trio.sleep(FLUSH_INTERVAL)  # coalesce whatever arrives meanwhile

    async def _progress_loop(self) -> None:
        while True:
            await self._progress_wake.wait()
            self._progress_wake = trio.Event()
            self.flush_progress()
            await trio.sleep(PROGRESS_INTERVAL)  # coalesce: the latest per task wins

    def flush_progress(self) -> None:
        """Send the latest progress per task as one ``progress`` event."""
        if not (self._progress or self._progress_more):
            return
        event = ProgressEvent(
            id=0,
            seq=0,
            topic="progress",
            time=self.clock(),
            tasks=[
                ProgressItem(id=task_id, progress=value[0], message=value[1])
                for task_id, value in self._progress.items()
            ],
            more=self._progress_more,
        )
        self._progress, self._progress_more = {}, 0
        self._offer("progress", event)

    def flush(self) -> None:
        """Send the buffered task changes as one ``tasks`` event."""
        listed, totals, count = self._changes, self._totals, self._count
        if not count:
            return
        complete = not self._incomplete and count <= DETAIL_LIMIT
        event = TasksEvent(
            id=0,
            seq=0,
            topic="tasks",
            time=self.clock(),
            changes=[
                TaskChange(id=c[0], type=c[1], queue=c[2], from_=c[3], to=c[4])
                for c in (listed if complete else ())
            ],
            more=0 if complete else count,
            totals=[
                TaskTotal(queue=queue, from_=old, to=new, n=n)
                for (queue, old, new), n in totals.items()
            ],
        )
        self._changes, self._totals, self._count = [], Counter(), 0
        self._incomplete = False
        if self._remote and self.forward is not None:
            self.forward(event_fields(event))
        if self._local_tasks:
            self._offer("tasks", event)

    async def _counts_loop(self, stats: Callable[[], Awaitable[Any]]) -> None:
        while True:
            with trio.move_on_after(COUNTS_INTERVAL):
                await self._counts_wake.wait()
            self._counts_wake = trio.Event()
            for sub in list(self.subscribers):
                if sub.dropped:
                    sub.queue_marker()
            try:
                await self.send_counts(stats)
            except TQError as exc:
                log.warning("event bus: cannot read counts: %s", exc)

    async def send_counts(self, stats: Callable[[], Awaitable[Any]]) -> None:
        subs = [s for s in self.subscribers if "counts" in s.topics]
        if not subs:
            return
        if trio.current_time() - self._counted_at >= COUNTS_REFRESH:
            self._counts_dirty = True
        if not (self._counts_dirty or any(s.needs_counts for s in subs)):
            return
        changed = False
        if self._counts_dirty or self._last_counts is None:
            self._counts_dirty = False  # changes during the read mark it dirty again
            self._counted_at = trio.current_time()
            counts = (await stats()).counts
            changed = counts != self._last_counts
            self._last_counts = counts
        event = CountsEvent(
            id=0, seq=0, topic="counts", time=self.clock(), queues=self._last_counts or {}
        )
        self.events_sent += 1
        for sub in subs:
            if changed or sub.needs_counts:
                sub.needs_counts = False
                sub.offer(event)

    def _offer(self, topic: str, event: Event) -> None:
        self.events_sent += 1
        for sub in list(self.subscribers):
            if topic in sub.topics:
                sub.offer(event)


def event_fields(event: Event) -> dict[str, Any]:
    """An event's own fields as plain data, without the envelope (``t``, ``id``,
    ``seq``): what the REST event stream and the forwarding between brokers carry."""
    fields: dict[str, Any] = msgspec.to_builtins(event)
    for key in ("t", "id", "seq"):
        fields.pop(key, None)
    return fields


def parse_topics(topics: object) -> frozenset[str]:
    if (
        not isinstance(topics, list | tuple)
        or not topics
        or not all(isinstance(t, str) for t in topics)
    ):
        raise InvalidRequest(f"subscribe topics must be a non-empty list of: {', '.join(TOPICS)}")
    unknown = sorted(set(topics) - set(TOPICS))
    if unknown:  # named as sent, but a few and short: the request may be a flood of them
        named = ", ".join(repr(t) if len(t) <= 40 else repr(t[:40]) + "..." for t in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise InvalidRequest(f"unknown topic(s) {named}{more}; known topics: {', '.join(TOPICS)}")
    return frozenset(topics)


class SessionEvents:
    """One connection's side of the bus: subscribe/unsubscribe and the forwarder.

    server.py hands ``subscribe``/``unsubscribe`` requests here in reading
    order (like ``hello``, not as concurrent request tasks), so the ACK is
    queued before the first event, and no event of a subscription follows
    the ACK of its ``unsubscribe``. The forwarder runs in the session's
    request nursery and ends with the connection.
    """

    def __init__(
        self,
        bus: EventBus,
        reply: Callable[[SubscribeAnswer | UnsubscribeAnswer | Event | Nack], Awaitable[None]],
        nack: Callable[[int, TQError], Nack],
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.bus = bus
        self._reply = reply
        self._nack = nack
        self._allowed = allowed  # the key is still good (False: it ended the connection)
        self.subscriber: Subscriber | None = None
        self._scope: trio.CancelScope | None = None

    async def handle(
        self, msg: Subscribe | Unsubscribe, nursery: trio.Nursery, closing: bool
    ) -> None:
        rid = msg.id
        answer: SubscribeAnswer | UnsubscribeAnswer
        try:
            if isinstance(msg, Subscribe):
                answer = SubscribeAnswer(id=rid, topics=self._subscribe(rid, msg, closing))
            else:
                self.close()
                answer = UnsubscribeAnswer(id=rid)
        except TQError as exc:
            await self._reply(self._nack(rid, exc))
            return
        await self._reply(answer)
        if isinstance(msg, Subscribe) and self.subscriber is not None:
            # the scope belongs to this subscription from now on, so an unsubscribe
            # cancels this forwarder even before it starts (or after a newer one did)
            self._scope = trio.CancelScope()
            nursery.start_soon(self._forward, self.subscriber, self._scope)

    def _subscribe(self, rid: int, msg: Subscribe, closing: bool) -> list[str]:
        if closing:
            raise Unavailable("the broker is shutting down; subscribe again once it is back")
        # a second subscribe never gets here: the session's rules refuse it
        # (tq/protocol/session.py); the bus refuses bad topics
        self.subscriber = self.bus.subscribe(rid, msg.topics)
        return sorted(self.subscriber.topics)

    async def _forward(self, sub: Subscriber, scope: trio.CancelScope) -> None:
        seq = 0
        with scope:
            try:
                async for queued in sub.receive:
                    event = sub.take(queued)
                    if event is None:
                        continue
                    if not self._allowed():
                        return  # a revoked or expired key: no more events
                    seq += 1
                    await self._reply(msgspec.structs.replace(event, id=sub.id, seq=seq))
            finally:
                self.bus.unsubscribe(sub)

    def close(self) -> None:
        """End the subscription (unsubscribe, or the connection is closing)."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        if self.subscriber is not None:
            self.bus.unsubscribe(self.subscriber)
            self.subscriber = None


def _total(
    totals: Counter[tuple[str | None, str | None, str | None]],
    key: tuple[str | None, str | None, str | None],
    n: int = 1,
) -> None:
    """Count ``n`` changes in their totals row; a queue beyond TOTALS_LIMIT rows is
    summed with queue nil, so a tasks event stays small however many queues changed
    (a subscriber that does not read holds SUBSCRIBER_BUFFER of them)."""
    if key not in totals and len(totals) >= TOTALS_LIMIT and key[0] is not None:
        key = (None, key[1], key[2])
    totals[key] += n


def _first_state(spec: TaskSpec, now: float) -> str:
    """The state a new task was stored in (as the store decides it)."""
    if spec.depends_on:
        return "blocked"
    if spec.delay is not None or spec.run_at is not None:
        return "pending" if due_at(spec.delay, spec.run_at, now) is None else "scheduled"
    return "pending"
