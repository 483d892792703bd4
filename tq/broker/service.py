"""The broker's service layer: every operation once, whatever the edge.

Wire handlers (server.py) and, later, REST routes decode a request, call one
method here and encode the answer. Methods raise TQError subclasses; the
edges turn them into NACKs or problem documents.

Notifications are trio Events replaced on every fire ("generation events"):
``_work`` wakes long-polling claims when tasks become pending (here, or on
another broker of the cluster: the store's ``cluster.on_work``); per-task
waiters wake ``wait`` calls when a task changes state.

Several brokers on one database (``store.cluster`` set): the upkeep that must
run once per cluster (``reap``, ``promote``) runs only while this broker is the
cluster's leader, and a worker is lost when no broker heard from it (the
store's workers rows), not when this broker stopped hearing from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tq import PROTOCOL_VERSION, __version__
from tq.broker.activity import Activity
from tq.broker.auth import Auth, actor_of, history_actor
from tq.broker.caps import CapOps, cap_map
from tq.broker.coalesce import ByteBudget, Coalesced
from tq.broker.events import EventBus
from tq.broker.operations import OperatorOps
from tq.broker.registry import WorkerInfo, WorkerRegistry
from tq.broker.schedules import ScheduleOps
from tq.core.errors import (
    Forbidden,
    FrameTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    TQError,
    Unavailable,
)
from tq.core.limits import (  # noqa: F401  (MAX_CLAIM, MAX_LIST: re-exported)
    DEFAULT_LIST,
    MAX_CLAIM,
    MAX_LINKS,
    MAX_LIST,
    MAX_SCAN,
    MAX_WAIT,
)
from tq.core.progress import parse as parse_progress
from tq.core.retention import RetentionPolicy
from tq.core.states import is_terminal
from tq.core.task import (
    MAX_PAYLOAD_BYTES,
    MAX_SUBMIT,
    MAX_WARNINGS,
    ListFilter,
    Outcome,
    Task,
    TaskError,
    TaskSpec,
    TaskSpecIn,
    parse_priority,
)
from tq.core.when import due_at
from tq.protocol.answers import (
    HelloAnswer,
    LeaseMap,
    Reported,
    Stats,
    Submitted,
    SubmitWarning,
    WorkerMap,
    lease_map,
)
from tq.protocol.frames import pack
from tq.protocol.parse import typed
from tq.protocol.schema import Claim, Heartbeat, Hello, OutcomeIn, Query
from tq.security.roles import Principal, action_of
from tq.store.base import PROMOTE_BATCH, Store
from tq.store.claimplan import Aging, CapNote

PAUSED_REFRESH = 1.0  # seconds a broker trusts its copy of the paused queues
MIN_REFILL_SLEEP = 0.001  # seconds: a claim waiting on a rate bucket never spins
LARGE_FRAMES_BYTES = 8 * 1024 * 1024  # see BrokerService.large_frames
# what one worker registers (its hello): what a `workers` answer lists of it stays small
MAX_WORKERS_PER_KEY = 1000  # registered worker ids one API key may hold at once
MAX_LISTED_WORKERS = 1000  # workers in a `workers` answer (most recently seen first)
LISTED_NAMES = 10  # queues and types listed per worker in a `workers` answer
# A submit answer's size, bounded before the tasks are stored: per task {"id": <36-char
# id>, "created": bool} is 50 bytes of msgpack; the base covers the envelope and up to
# MAX_WARNINGS warnings (a type of <= 200 characters and a message of <= 450 bytes).
ANSWER_PER_TASK = 56
ANSWER_BASE = 64 + MAX_WARNINGS * 700
WAIT_REREAD = 5.0  # a cluster member's wait reads its task again this often (a lost wake-up)
SCAN_PAGE = 500  # ... in store pages of this many
YIELD_EVERY = 200  # specs validated between checkpoints: bounds the event-loop stall (~0.3 ms)


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    count: int = 0


def _check_version(msg: Hello) -> None:
    if msg.v != PROTOCOL_VERSION:
        raise InvalidRequest(
            f"protocol version {msg.v} is not supported; this broker speaks "
            f"version {PROTOCOL_VERSION}: upgrade tq on the older side"
        )


def _visible_queue(queue: str | None, principal: Principal | None) -> str | None:
    """The queue filter of a listing, within the queues the principal may see."""
    if principal is None or principal.queues is None:
        return queue
    if queue is not None:
        principal.check_queue(queue)
        return queue
    if len(principal.queues) == 1:
        return next(iter(principal.queues))
    raise Forbidden(
        f"key {principal.key_id} may list only queue(s) "
        f"{', '.join(sorted(principal.queues))}: pass one of them as the queue filter"
    )


def visible_queues(principal: Principal | None) -> Callable[[str], bool] | None:
    """The queue predicate of a queue-limited key; None when it sees every queue."""
    return None if principal is None or principal.queues is None else principal.may_use


def queue_counters(activity: Activity, may_use: Callable[[str], bool]) -> dict[str, int]:
    """``counters`` restricted to some queues, from the labelled totals (the broker-wide
    ``lease_expired`` and ``refused_results`` have no queue and are left out)."""
    out = dict.fromkeys(("submitted", "succeeded", "failed", "dead"), 0)
    for (queue, _type), events in activity.totals.items():
        if may_use(queue):
            out["submitted"] += events["submitted"]
            out["succeeded"] += events["succeeded"]
            out["failed"] += events["retried"]  # a failed attempt that will be retried
            out["dead"] += events["dead"]
    return out


@dataclass(frozen=True)
class TaskScan:
    """The filters of a list the store does not know: text and creation time."""

    search: str | None
    since: float | None
    until: float | None

    @classmethod
    def of(cls, msg: Query) -> TaskScan | None:
        search, since, until = msg.search, msg.since, msg.until
        if not search and since is None and until is None:
            return None
        return cls(search.casefold() if search else None, since, until)

    def matches(self, task: Task) -> bool:
        if self.since is not None and task.created_at < self.since:
            return False
        if self.until is not None and task.created_at > self.until:
            return False
        if self.search is None:
            return True
        error = task.error
        if error is not None and any(
            self.search in text.casefold() for text in (error.type, error.message, error.traceback)
        ):
            return True
        payload = json.dumps(task.payload, ensure_ascii=False, default=repr)
        return self.search in payload.casefold()


def worker_info(worker_id: str, msg: Hello, key_id: str | None = None) -> WorkerInfo:
    """The registry entry a worker's hello (with the key ``key_id``) describes; the
    fields' types, lengths and ranges are the declaration's (tq/protocol/schema.py)."""
    return WorkerInfo(
        key_id=key_id,
        id=worker_id,
        name=msg.name or worker_id,
        host=msg.host or "",
        pid=msg.pid or 0,
        queues=tuple(msg.queues or ("default",)),
        types=None if msg.types is None else tuple(msg.types),
        concurrency=msg.concurrency or 0,
    )


def _specs_of(raw_tasks: Sequence[TaskSpecIn | Any], first: int = 0) -> list[TaskSpec]:
    """The validated specs of a submit (InvalidRequest naming the index, nothing kept):
    decoded task specs (the wire, REST) or plain maps (checked here)."""
    specs = []
    for index, raw in enumerate(raw_tasks, start=first):
        try:
            specs.append(
                TaskSpec.of(raw) if type(raw) is TaskSpecIn else TaskSpec.from_mapping(raw)
            )
        except TQError as exc:
            prefix = f"task {index}: " if len(raw_tasks) > 1 or first else ""
            raise type(exc)(f"{prefix}{exc.message}; nothing was submitted") from None
    return specs


def _check_links(raw_tasks: Sequence[TaskSpecIn | Any]) -> None:
    """InvalidRequest when a submit's tasks name more than MAX_LINKS dependencies in all
    (each one an edge written in the submit's one transaction)."""
    links = 0
    for raw in raw_tasks:
        deps = raw.depends_on if type(raw) is TaskSpecIn else _deps_of(raw)
        links += len(deps) if isinstance(deps, list | tuple) else 0
    if links > MAX_LINKS:
        raise InvalidRequest(
            f"a submit names at most {MAX_LINKS} dependencies in all, this one {links}: "
            "split it, or let fewer tasks wait for many (a task between two large groups "
            "of a workflow turns N x M links into N + M); nothing was submitted"
        )


def _deps_of(raw: Any) -> Any:
    return raw.get("depends_on") if isinstance(raw, dict) else None


def _check_due(specs: Sequence[TaskSpec], now: float) -> bool:
    """Whether any spec is delayed; InvalidRequest naming the first one due too far ahead."""
    delayed = False
    for index, spec in enumerate(specs):
        if spec.delay is not None or spec.run_at is not None:
            try:
                due_at(spec.delay, spec.run_at, now)
            except InvalidRequest as exc:
                raise InvalidRequest(f"task {index}: {exc}; nothing was submitted") from None
            delayed = True
    return delayed


def submit_answer_bound(n: int) -> int:
    """The most bytes the answer to a submit of ``n`` tasks can take once encoded."""
    return ANSWER_BASE + n * ANSWER_PER_TASK


def unhandled_warning(task_type: str) -> str:
    return (
        f"no connected worker handles task type {task_type!r}: the task is stored and waits "
        f"(pending, or scheduled until due) until a worker with that handler connects "
        f"(e.g. tq worker --import MODULE, or --exec {task_type}=PROGRAM)"
    )


def parse_outcome(item: OutcomeIn | object) -> Outcome:
    """An outcome (its types and ranges checked by its declaration); plain data is
    decoded into ``OutcomeIn`` first."""
    if not isinstance(item, OutcomeIn):
        item = typed(OutcomeIn, item, "result")
    error = item.error
    return Outcome(
        id=item.id,
        token=item.token,
        status=item.status,
        result=item.result,
        error=TaskError.from_mapping(error) if error is not None else None,
        delay=item.delay,
    )


class BrokerService(OperatorOps, ScheduleOps, CapOps):  # operations.py, schedules.py, caps.py
    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: float,
        name: str = "tq",
        clock: Callable[[], float] = time.time,
        auth: Auth | None = None,
        max_payload: int = MAX_PAYLOAD_BYTES,
        aging: Aging | None = None,
    ) -> None:
        self.store = store
        self.aging = aging  # effective priority rises with the wait (tq.store.claimplan)
        self.capped_waiting = 0  # claims parked because a cap held tasks back
        self.lease_ttl = lease_ttl
        # keys, roles, rate limits, audit; principal None = unrestricted (--no-auth)
        self.auth = auth if auth is not None else Auth(store, enabled=False, clock=clock)
        self.max_payload = max_payload
        self.name = name
        self.clock = clock
        self.workers = WorkerRegistry()
        self.events = EventBus(clock)  # live events for subscribers (tq/broker/events.py)
        self.started_at = clock()
        self.closing = False
        self.in_flight = 0  # requests being handled, for a graceful drain
        self._work = trio.Event()
        self._due_changed = trio.Event()
        self._schedules_changed = trio.Event()
        # large frames and REST bodies are decoded in a thread, one at a time per broker
        self.decode_limiter = trio.CapacityLimiter(1)
        # bytes of frames over 64 KiB between their decoding and their answer, broker-wide:
        # what many connections sending large requests at once can make the broker hold
        self.large_frames = ByteBudget(LARGE_FRAMES_BYTES)
        self._store_stats = Coalesced(store.stats)
        self._store_depth = Coalesced(store.queue_depth)
        self._store_paused = Coalesced(store.paused_queues)
        self._paused: dict[str, float] = {}
        self._paused_until = -math.inf  # trio time when the paused queues are read again
        self._waiters: dict[str, _Waiter] = {}
        self.counters: dict[str, int] = {
            "submitted": 0,
            "succeeded": 0,
            "failed": 0,
            "dead": 0,
            "lease_expired": 0,
            "refused_results": 0,
        }
        self.activity = Activity()  # labelled counters, histograms, last minute (metrics)
        self.retention_deleted: dict[str, int] = {}  # finished state -> tasks expired
        self.cluster = getattr(store, "cluster", None)  # None: this broker is the cluster
        if self.cluster is not None:
            self.cluster.on_work = self._cluster_work
            self.cluster.on_done = self.fire  # tasks finished through another broker
            self.cluster.waited = self._waiters
            # task events: every broker's changes reach every broker's subscribers
            self.events.forward = self.cluster.forward_event
            self.cluster.events_wanted = lambda: self.events.wants_other_brokers
            self.cluster.on_events_wanted = self.events.set_remote
            self.cluster.on_events = self._events_from_other_brokers
            self.cluster.beats = self.workers.take_beats

    @property
    def runs_upkeep(self) -> bool:
        """Whether this broker runs the once-per-cluster upkeep (reaper, promoter) now."""
        return self.cluster is None or self.cluster.leader

    async def paused(self) -> dict[str, float]:
        """Paused queues (name -> since), read from the store at most every
        ``PAUSED_REFRESH`` seconds (at once after a pause or resume through this broker):
        another broker on the same store may pause a queue too."""
        now = trio.current_time()
        if now >= self._paused_until:
            self._paused = await self._store_paused.get()
            self._paused_until = now + PAUSED_REFRESH
        return self._paused

    def forget_paused(self) -> None:
        self._paused_until = -math.inf

    # -- notifications -------------------------------------------------
    def notify_work(self) -> None:
        self._work.set()
        self._work = trio.Event()

    def _cluster_work(self) -> None:
        """Another broker made tasks pending or stored tasks (a delayed submit among them):
        claims look again, and the promoter looks at the earliest due time again."""
        self.notify_work()
        self.notify_due()

    def notify_due(self) -> None:
        self._due_changed.set()
        self._due_changed = trio.Event()

    def due_changed(self) -> trio.Event:
        """The event the next ``notify_due`` sets (take it before reading due times)."""
        return self._due_changed

    def _events_from_other_brokers(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.events.from_other_broker(event)

    def fire(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            waiter = self._waiters.get(task_id)
            if waiter is not None:
                waiter.event.set()
                waiter.event = trio.Event()

    def _check_open(self) -> None:
        if self.closing:
            raise Unavailable("the broker is shutting down; retry against it once it is back")

    # -- operations ----------------------------------------------------
    async def login(self, msg: Hello) -> Principal | None:
        """Check a hello's version, key and role: who the session acts as (None: no auth)."""
        _check_version(msg)
        principal = await self.auth.authenticate(msg.key)
        if principal is not None:
            principal.authorize(action_of(msg))  # kind "worker" needs a worker (or admin) key
        return principal

    def hello(
        self, msg: Hello, worker_id: str | None, principal: Principal | None = None
    ) -> HelloAnswer:
        """The answer to a hello ``login`` accepted as ``principal``; a worker's hello
        (``worker_id`` set) registers it."""
        _check_version(msg)
        key_id = None if principal is None else principal.key_id
        if worker_id is not None:  # Forbidden if another key registered this worker id
            info = worker_info(worker_id, msg, key_id)
            if key_id is not None and info.id not in self.workers:
                held = sum(1 for w in self.workers.all() if w.key_id == key_id)
                if held >= MAX_WORKERS_PER_KEY:
                    raise Forbidden(
                        f"key {key_id} already holds {held} registered workers (at most "
                        f"{MAX_WORKERS_PER_KEY}); reuse worker ids (--name) or give "
                        "more workers their own key"
                    )
            info = self.workers.connect(info, self.clock(), self.auth.is_active)
            self.events.worker("joined", info, self.workers)
        return HelloAnswer(
            id=msg.id,
            v=PROTOCOL_VERSION,
            server=f"tq/{__version__}",
            broker=self.name,
            lease_ttl=self.lease_ttl,
            worker_id=worker_id,
            key_id=key_id,
            role=None if principal is None else principal.role,
        )

    async def submit(
        self,
        raw_tasks: list[Any],
        principal: Principal | None = None,
        *,
        answer_limit: int | None = None,
        large: bool = False,
    ) -> dict[str, Any]:
        """``submit_typed`` as plain data: ``{"tasks": [...], "warnings": [...]}``."""
        tasks, warnings = await self.submit_typed(
            raw_tasks, principal, answer_limit=answer_limit, large=large
        )
        return {"tasks": msgspec.to_builtins(tasks), "warnings": msgspec.to_builtins(warnings)}

    async def submit_typed(
        self,
        raw_tasks: list[Any],
        principal: Principal | None = None,
        *,
        answer_limit: int | None = None,
        large: bool = False,
    ) -> tuple[list[Submitted], list[SubmitWarning]]:
        """Store every task or none; the answer: ``tasks`` (id, created per task) and
        ``warnings`` (once per task type no connected worker handles, at most
        MAX_WARNINGS). ``answer_limit``: the largest answer the caller can deliver
        (its frame limit); a request whose answer could exceed it is refused before
        anything is stored, so a committed submit is always answered."""
        self._check_open()
        arrived = trio.current_time()
        if not raw_tasks:
            raise InvalidRequest("submit needs at least one task")
        if len(raw_tasks) > MAX_SUBMIT:
            raise InvalidRequest(
                f"a submit carries at most {MAX_SUBMIT} tasks, this one {len(raw_tasks)}: "
                "split it into several requests; nothing was submitted"
            )
        if answer_limit is not None and submit_answer_bound(len(raw_tasks)) > answer_limit:
            fits = max(1, (answer_limit - ANSWER_BASE) // ANSWER_PER_TASK)
            raise FrameTooLarge(
                f"the answer to a submit of {len(raw_tasks)} tasks could exceed this "
                f"connection's frame limit of {answer_limit} bytes: send at most {fits} "
                "tasks per request; nothing was submitted"
            )
        self.auth.take_submit(principal, len(raw_tasks))
        _check_links(raw_tasks)
        if large:  # a long walk over big payloads: in a thread, which yields the GIL
            specs = await trio.to_thread.run_sync(_specs_of, raw_tasks, limiter=self.decode_limiter)
        else:
            specs = []
            for start in range(0, len(raw_tasks), YIELD_EVERY):
                if start:
                    await trio.lowlevel.checkpoint()  # a bulk submit must not stall the loop
                specs += _specs_of(raw_tasks[start : start + YIELD_EVERY], start)
        if principal is not None:
            principal.check_queues({spec.queue for spec in specs})
            await self._check_keys_queues(specs, principal)
        self._check_payloads(specs)
        delayed = _check_due(specs, self.clock())
        results = await self.store.submit(specs, self.clock(), actor=history_actor(principal))
        self.counters["submitted"] += sum(r.created for r in results)
        self.activity.submit_latency.observe(trio.current_time() - arrived)
        now = self.clock()
        self.activity.submitted(
            ((s.queue, s.type) for s, r in zip(specs, results, strict=True) if r.created), now
        )
        self.events.submitted(specs, results)
        self.notify_work()
        if delayed:  # the promoter may sleep past this due time: it looks again
            self.notify_due()
        unhandled = sorted(await self._unhandled({spec.type for spec in specs}))
        return (
            [Submitted(id=r.id, created=r.created) for r in results],
            [SubmitWarning(type=t, message=unhandled_warning(t)) for t in unhandled[:MAX_WARNINGS]],
        )

    async def _unhandled(self, types: set[str]) -> set[str]:
        """``unhandled_types``, and with several brokers those no worker of the cluster
        handles either (advisory: a store error leaves this broker's answer)."""
        unhandled = self.unhandled_types(types)
        if not unhandled or self.cluster is None:
            return unhandled
        # the tasks are committed: the answer must not be cancelled away, nor wait long
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                handled = await self.cluster.worker_types()
            except TQError:
                return unhandled
            return set() if handled is None else unhandled - handled
        return unhandled

    def unhandled_types(self, types: set[str]) -> set[str]:
        """The task types no connected worker has a handler for."""
        handled: set[str] = set()
        for worker in self.workers.all():
            if worker.connections <= 0:
                continue
            if worker.types is None:  # takes any type
                return set()
            handled.update(worker.types)
        return types - handled

    async def claim(
        self, worker_id: str, msg: Claim, principal: Principal | None = None
    ) -> list[LeaseMap]:
        self._check_open()
        n, queues, type_list = msg.n, msg.queues, msg.types
        if principal is not None:
            principal.check_queues(queues)
        wait = 0.0 if msg.wait is None else min(msg.wait, MAX_WAIT)
        deadline = trio.current_time() + wait
        while not self.closing:
            work = self._work  # taken before the query: no lost wake-up
            paused = await self.paused()
            open_queues = [q for q in queues if q not in paused] if paused else queues
            leases = []
            note = CapNote()
            if open_queues:
                # never cancelled mid-write: a claim that committed must reach the worker
                leases = await self.store.claim(
                    worker_id,
                    open_queues,
                    type_list,
                    n,
                    self.clock(),
                    self.lease_ttl,
                    self.aging,
                    note,
                )
            if leases:
                self.workers.seen(worker_id, self.clock())
                self.events.claimed(leases)
                return [lease_map(lease) for lease in leases]
            now = trio.current_time()
            if now >= deadline:
                break
            # a queue paused through another broker is resumed there: look again now and then
            again = (
                min(deadline, now + PAUSED_REFRESH) if len(open_queues) < len(queues) else deadline
            )
            if note.refill_in is not None:  # a rate cap: sleep until its bucket has a token
                again = min(again, now + max(note.refill_in, MIN_REFILL_SLEEP))
            # capped: a finished task of the cap (reported here, or NOTIFY from another
            # broker) or a changed cap wakes the claim through notify_work
            self.capped_waiting += note.capped
            try:
                with trio.move_on_at(again):
                    await work.wait()
            finally:
                self.capped_waiting -= note.capped
        return []

    async def report(self, worker_id: str | None, items: Sequence[OutcomeIn]) -> list[Reported]:
        outcomes = [parse_outcome(item) for item in items]
        results = await self.store.complete(outcomes, self.clock())
        if worker_id is not None:
            self.workers.seen(worker_id, self.clock())
        retried = released = False
        dependents: list[str] = []
        for r in results:
            dependents += r.dependents  # released (pending now) or cancelled with it
            if not r.accepted:
                self.counters["refused_results"] += 1
            elif r.state in ("succeeded", "failed", "dead"):
                self.counters[r.state] += 1
                retried |= r.state == "failed"
            else:
                released |= r.state == "pending"  # "release": claimable again at once
        if retried or dependents:  # a released dependent may be scheduled (a step's delay)
            self.notify_due()
        if released or dependents or (self.capped_waiting and any(r.accepted for r in results)):
            self.notify_work()  # a finished task frees a place under its caps
        self.events.reported(results)
        await self.events.released(self.store, dependents, before="blocked")
        self.activity.reported(results, self.clock())
        self.fire([r.id for r in results if r.accepted] + dependents)
        return [
            Reported(id=r.id, accepted=r.accepted, state=r.state, reason=r.reason) for r in results
        ]

    async def heartbeat(self, worker: WorkerInfo, msg: Heartbeat) -> list[str]:
        worker_id = worker.id
        if worker_id not in self.workers:  # forgotten while silent: it is back
            info = self.workers.connect(worker, self.clock(), self.auth.is_active)
            self.events.worker("joined", info, self.workers)
        leases = msg.leases
        progress = parse_progress(msg.progress, dict(leases))  # rules joining the leases
        self.workers.seen(worker_id, self.clock(), msg.stats)
        self.events.worker("heartbeat", worker_id, self.workers)
        if not leases:
            return []
        lost = await self.store.extend_leases(
            worker_id, leases, self.clock(), self.lease_ttl, progress
        )
        if progress:
            gone = set(lost)
            self.events.progressed(
                {task_id: value for task_id, value in progress.items() if task_id not in gone}
            )
        return lost

    async def get(self, task_id: str, principal: Principal | None = None) -> Task:
        task = await self.store.get(task_id)
        if principal is not None:
            principal.check_queue(task.queue)
        return task

    async def list_tasks(
        self, msg: Query, principal: Principal | None = None
    ) -> tuple[list[Task], str | None]:
        """A page of tasks and the cursor of the next (None at the end).

        With ``search`` (text, case-insensitive, looked for in the error and the
        payload) or ``since``/``until`` (Unix seconds, bounds on ``created_at``),
        the store's pages are scanned and filtered here, at most MAX_SCAN tasks
        per call: the page may then hold fewer than ``limit`` tasks (even none)
        with a cursor that continues the scan where it stopped.
        """
        limit = DEFAULT_LIST if msg.limit is None else msg.limit  # nil equals absent
        fields: dict[str, Any] = {
            "state": msg.state,
            "type": msg.type,
            "queue": _visible_queue(msg.queue, principal),
            "after": msg.after,
        }
        order = msg.order or "oldest"
        scan = TaskScan.of(msg)
        if scan is None:
            tasks = await self.store.list(
                ListFilter(limit=limit, newest_first=order == "newest", **fields)
            )
            cursor = tasks[-1].id if len(tasks) == limit else None
            return tasks, cursor
        found: list[Task] = []
        scanned = 0
        while True:
            size = min(SCAN_PAGE, MAX_SCAN - scanned)
            page = await self.store.list(
                ListFilter(limit=size, newest_first=order == "newest", **fields)
            )
            scanned += len(page)
            for index, task in enumerate(page):
                if scan.matches(task):
                    found.append(task)
                    if len(found) == limit:
                        more = index < len(page) - 1 or len(page) == size
                        return found, task.id if more else None
            if len(page) < size:
                return found, None  # the store has no more
            fields["after"] = page[-1].id
            if scanned >= MAX_SCAN:
                return found, page[-1].id  # the scan goes on from here
            await trio.lowlevel.checkpoint()

    async def cancel(self, task_id: str, principal: Principal | None = None) -> Task:
        await self._check_task_queue(task_id, principal)
        before = await self.events.state_before(self.store, task_id)
        task = await self.store.cancel(task_id, self.clock(), actor=history_actor(principal))
        self.events.changed(task, before)
        if self.events.watching_tasks:
            await self._publish_cascade(task_id)
        self.notify_work()  # a dependent that runs whatever its dependencies' end may be free
        self.notify_due()  # ... or scheduled, when it has a delay of its own
        self.fire([task_id])
        await self.auth.record(actor_of(principal), "task.cancel", task_id, {"queue": task.queue})
        return task

    async def _publish_cascade(self, task_id: str) -> None:
        """The dependents a cancel moved (the store cancels or releases them in the
        cancel's transaction): read from the task's workflow, only while someone
        watches tasks (operator cancels are rare, never the hot path). Each of them
        was blocked, as the cancelled task had not finished."""
        try:
            tasks, edges, cut = await self.store.graph(task_id)
        except TQError:
            return
        waiting: dict[str, list[str]] = {}
        for task, dependency in edges:
            waiting.setdefault(dependency, []).append(task)
        down, todo = set(), [task_id]
        while todo:
            for dependent in waiting.get(todo.pop(), ()):
                if dependent not in down:
                    down.add(dependent)
                    todo.append(dependent)
        moved = [t for t in tasks if t.id in down and t.state.value != "blocked"]
        self.events.cascaded(moved, complete=not cut)

    async def retry(self, task_id: str, principal: Principal | None = None) -> Task:
        await self._check_task_queue(task_id, principal)
        before = await self.events.state_before(self.store, task_id)
        task = await self.store.retry(task_id, self.clock(), actor=history_actor(principal))
        self.events.changed(task, before)
        self.notify_work()
        self.fire([task_id])
        await self.auth.record(actor_of(principal), "task.retry", task_id, {"queue": task.queue})
        return task

    async def set_priority(
        self, task_id: str, priority: object, principal: Principal | None = None
    ) -> Task:
        """Change the priority of a task waiting to run (no state change: no event)."""
        value = parse_priority(priority)
        await self._check_task_queue(task_id, principal)
        return await self.store.set_priority(
            task_id, value, now=self.clock(), actor=history_actor(principal)
        )

    async def _check_task_queue(self, task_id: str, principal: Principal | None) -> None:
        if principal is not None and principal.queues is not None:
            await self.get(task_id, principal)

    async def _check_keys_queues(self, specs: Sequence[TaskSpec], principal: Principal) -> None:
        """A queue-limited key may not learn, through an idempotency key, the id of a task
        in a queue it may not see (a matching key answers that task's id)."""
        keys = [spec.idempotency_key for spec in specs if spec.idempotency_key is not None]
        if principal.queues is None or not keys:
            return
        for key, queue in (await self.store.queues_of_keys(keys)).items():
            if not principal.may_use(queue):
                raise Forbidden(
                    f"idempotency_key {key!r} is held by a task outside the queues of key "
                    f"{principal.key_id}: choose another key; nothing was submitted"
                )

    def _check_payloads(self, specs: Sequence[TaskSpec]) -> None:
        """The configured payload limit, when it is below the store's own ceiling."""
        if self.max_payload >= MAX_PAYLOAD_BYTES:
            return  # the store refuses anything larger itself, without encoding twice
        for index, spec in enumerate(specs):
            size = len(pack(spec.payload))
            if size > self.max_payload:
                raise PayloadTooLarge(
                    f"task {index}: payload is {size} bytes once encoded; this broker's limit "
                    f"is {self.max_payload} bytes; nothing was submitted"
                )

    async def wait(self, task_id: str, timeout: float, principal: Principal | None = None) -> bool:
        """Wait until the task is terminal or ``timeout`` passes; whether it timed out.

        Holds no task while it waits (each check reads the state and lets the row
        go), so many waits on a large task cost nothing until answered; the caller
        reads the task to answer."""
        await self._check_task_queue(task_id, principal)
        # read once before the deadline starts: a finished task is answered at once
        # even with timeout 0 (whose cancel would otherwise fire at the first read)
        if is_terminal((await self.store.get(task_id)).state):
            return False
        waiter = self._waiters.setdefault(task_id, _Waiter())
        waiter.count += 1
        try:
            with trio.move_on_after(timeout):
                reread = math.inf
                if self.cluster is not None:  # hear of it when another broker finishes it
                    await self.cluster.hear_finished()
                    reread = WAIT_REREAD
                while True:
                    event = waiter.event
                    if is_terminal((await self.store.get(task_id)).state):
                        return False
                    with trio.move_on_after(reread):
                        await event.wait()
            return True
        finally:
            waiter.count -= 1
            if waiter.count == 0:
                del self._waiters[task_id]

    async def stats(self, principal: Principal | None = None) -> Stats:
        """Broker-wide figures; a queue-limited key gets those of its queues only (no
        store file, no broker-wide counters)."""
        stats = await self._store_stats.get()  # one store read shared by concurrent callers
        now = self.clock()
        counts = stats.counts
        may_use = visible_queues(principal)
        store: dict[str, Any] | None = stats.brief()
        counters = dict(self.counters)
        if may_use is not None:
            counts = {q: c for q, c in counts.items() if may_use(q)}
            store, counters = None, queue_counters(self.activity, may_use)
        return Stats(
            broker=self.name,
            version=__version__,
            uptime=now - self.started_at,
            queues=counts,
            paused=sorted(q for q in await self.paused() if may_use is None or may_use(q)),
            caps=[cap_map(cap) for cap in await self.visible_caps(principal)],
            store=store,
            workers=len(self.workers.visible(may_use)),
            counters=counters,
            last_minute=self.activity.last_minute(now, may_use),
            history=self.activity.history(now, may_use),
        )

    def list_workers(self, principal: Principal | None = None) -> list[WorkerMap]:
        """Known workers sorted by id (the MAX_LISTED_WORKERS most recently seen); for a
        queue-limited key only those serving its queues. Each lists at most
        LISTED_NAMES queues and types (``queues_total``/``types_total`` say how many
        when more), so the answer stays a few MB whatever workers registered."""
        now = self.clock()
        may_use = visible_queues(principal)
        known = sorted(self.workers.visible(may_use), key=lambda w: -w.last_seen)
        return [
            worker.to_map(now, may_use, LISTED_NAMES)
            for worker in sorted(known[:MAX_LISTED_WORKERS], key=lambda w: w.id)
        ]

    def worker_disconnected(self, worker_id: str) -> None:
        """A worker's connection closed (it stays registered until it expires)."""
        self.workers.disconnect(worker_id)
        self.events.worker("left", worker_id, self.workers)

    # -- timers (called by loops.py) -----------------------------------
    async def reap(self, worker_timeout: float) -> list[str]:
        now = self.clock()
        lost = self.workers.expire(now, worker_timeout)
        for worker_id in lost:
            self.events.worker("lost", worker_id, self.workers)
        if not self.runs_upkeep:  # another broker leads: it releases (see the docstring)
            return []
        released = list(await self.store.release_expired(now))
        if self.cluster is not None:  # lost: silent to every broker (the workers rows)
            released += await self.cluster.release_lost_workers(worker_timeout)
        else:
            for worker_id in lost:
                released += await self.store.release_worker(worker_id, now)
        if released:
            self.counters["lease_expired"] += len(released)
            self.notify_work()
            self.notify_due()  # a dependent released with a delay of its own is scheduled
            self.fire(released)
            await self.events.released(self.store, released)
        return released

    async def expire(self, policy: RetentionPolicy, limit: int) -> int:
        """One retention batch (leader only): at most ``limit`` finished tasks whose TTL
        passed deleted in one transaction; how many."""
        if not self.runs_upkeep:
            return 0
        deleted = await self.store.expire_finished(policy, self.clock(), limit)
        for (_, state), n in deleted.items():
            self.retention_deleted[state] = self.retention_deleted.get(state, 0) + n
        return sum(deleted.values())

    async def promote(self, batch: int = PROMOTE_BATCH) -> int:
        """Due tasks to pending (leader only), ``batch`` per transaction until a batch comes
        back short; workers are woken after each batch, so the first run while the rest
        are still being promoted. How many in all."""
        total = 0
        while self.runs_upkeep:
            count = await self.store.promote_due(self.clock(), batch)
            if count:
                total += count
                self.notify_work()
                self.events.promoted(count)
            if count < batch:
                break
        return total
