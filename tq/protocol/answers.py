"""Every answer of the wire protocol, declared once as a msgspec Struct.

Contract: what the broker sends (``ack`` per request type, ``nack``, and the
``event`` messages of a subscription) is declared here, field by field, in the
order the broker writes them, with the nil rules of docs/PROTOCOL.md version
1: a field the document says is always present is declared without a default
(nil, where allowed, is sent as nil); a field the document says is absent
unless set (a Lease's ``trace``, a NACK's ``retry_after``, a worker entry's
``queues_total``) has a default and its Struct ``omit_defaults``, so encoding a
Struct gives the bytes the broker always sent. The same Structs decode
answers on the client side (``decode_answer``): a malformed answer fails
there, naming the field, not deep inside the client. Imports msgspec and
tq.core only.

Every field carries ``Meta(description=...)``: the words the generated
docs/PROTOCOL.md tables and OpenAPI schemas use. ``ANSWERS`` maps each request
(its tag, or ``tag.op`` / ``query.q`` where the answer depends on the op) to
its ``ack`` Struct, as ``tq.protocol.schema.REQUESTS`` lists the requests;
``EVENTS`` maps each event topic to its Struct; ``Nack`` is the error answer.

Readers ignore fields they do not declare (forward compatible: a newer
broker may add fields). Open-ended maps the document describes with "..."
(a store's details, an explain reason's facts, an audit entry's detail) are
declared as maps.

How to add an answer field: add it to the Struct, in the position the broker
writes it, with its description; the broker builds its answers from these
Structs, so the wire follows.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tq.core import limits
from tq.core.errors import ProtocolError
from tq.core.task import Lease, Task, TaskError

# -- building blocks --------------------------------------------------------------------
RequestId = Annotated[
    int,
    Meta(
        ge=0,
        le=limits.MAX_REQUEST_ID,
        description="the id of the request this answers (0: the connection itself)",
    ),
]
Count = Annotated[int, Meta(ge=0)]
TaskIdText = Annotated[str, Meta(description="task id (UUIDv7)")]
Timestamp = Annotated[float, Meta(description="Unix seconds, broker clock")]
StateCounts = dict[str, dict[str, int]]  # queue -> state -> number of tasks


class Answer(msgspec.Struct, tag_field="t", tag="ack", kw_only=True):
    """What every ``ack`` carries: ``t`` "ack" (the tag) and the request's ``id``."""

    id: RequestId


class Entry(msgspec.Struct, kw_only=True):
    """A map inside an answer (a task, a lease, a worker, ...)."""


# -- entries: the maps answers are made of ------------------------------------------------
class TaskErrorMap(Entry):
    """A task's last error."""

    type: Annotated[
        str,
        Meta(
            description="the error's type (the exception class, or a broker-made type: "
            "LeaseExpired, WorkerLost, ResultRejected, DependencyFailed)"
        ),
    ]
    message: Annotated[str, Meta(description="the error's message")]
    traceback: Annotated[str, Meta(description="the traceback the worker sent, or empty")]


class TaskMap(Entry):
    """A task: its spec with defaults applied and its lifecycle (every field present)."""

    id: TaskIdText
    type: Annotated[str, Meta(description="task type")]
    queue: Annotated[str, Meta(description="queue")]
    payload: Annotated[Any, Meta(description="the payload as submitted (plain data)")]
    priority: Annotated[int, Meta(description="0..255, 255 highest")]
    state: Annotated[str, Meta(description="the task's state")]
    attempts: Annotated[int, Meta(description="claims since submit or the last retry")]
    max_retries: Annotated[int, Meta(description="retries allowed after the first attempt")]
    timeout: Annotated[float, Meta(description="seconds a worker lets the task run")]
    retry_base: Annotated[float, Meta(description="backoff base, seconds")]
    retry_cap: Annotated[float, Meta(description="backoff cap, seconds")]
    created_at: Annotated[float, Meta(description="submit time, Unix seconds")]
    started_at: Annotated[float | None, Meta(description="last claim, Unix seconds")]
    finished_at: Annotated[
        float | None, Meta(description="when it entered succeeded, dead or cancelled")
    ]
    run_at: Annotated[
        float | None,
        Meta(description="when a failed or scheduled task becomes pending (its due time)"),
    ]
    worker: Annotated[str | None, Meta(description="worker id of the last claim")]
    result: Annotated[Any, Meta(description="the ok value (nil otherwise)")]
    error: Annotated[TaskErrorMap | None, Meta(description="the last error")]
    idempotency_key: Annotated[str | None, Meta(description="as submitted")]
    trace: Annotated[dict[str, str] | None, Meta(description="the submitter's W3C trace context")]
    progress: Annotated[
        float | None, Meta(description="the latest fraction 0..1 its handler reported")
    ]
    progress_message: Annotated[str | None, Meta(description="the message reported with it")]


class LeaseMap(Entry, omit_defaults=True):
    """A claimed task handed to a worker (``trace`` only when the task carries one)."""

    id: TaskIdText
    type: Annotated[str, Meta(description="task type")]
    queue: Annotated[str, Meta(description="queue")]
    payload: Annotated[Any, Meta(description="the payload")]
    priority: Annotated[int, Meta(description="0..255")]
    attempt: Annotated[int, Meta(description="1-based: this is the n-th claim")]
    max_retries: Annotated[int, Meta(description="retries allowed after the first attempt")]
    timeout: Annotated[float, Meta(description="seconds: stop the task after this")]
    token: Annotated[
        int,
        Meta(
            ge=0,
            le=limits.MAX_TOKEN,
            description="the fencing token (64-bit): send it back with the result",
        ),
    ]
    expires_at: Annotated[float, Meta(description="when the lease ends, broker clock")]
    trace: Annotated[
        dict[str, str] | None,
        Meta(description="the submitter's W3C trace context; absent when there is none"),
    ] = None


class Submitted(Entry):
    """One task of a submit, in request order."""

    id: TaskIdText
    created: Annotated[
        bool, Meta(description="false: an existing task matched (idempotency or unique key)")
    ]


class SubmitWarning(Entry):
    """A task type of the submit no connected worker handles."""

    type: Annotated[str, Meta(description="the task type")]
    message: Annotated[str, Meta(description="what that means, in words")]


class Reported(Entry):
    """What became of one outcome of a ``result``."""

    id: TaskIdText
    accepted: Annotated[bool, Meta(description="whether the outcome counted")]
    state: Annotated[
        str | None, Meta(description="the task's state after the report (nil: unknown id)")
    ]
    reason: Annotated[str, Meta(description="why it was refused (empty if accepted)")]


class WorkerMap(Entry, omit_defaults=True):
    """A worker the broker knows."""

    id: Annotated[str, Meta(description="worker id")]
    name: Annotated[str, Meta(description="display name")]
    host: Annotated[str, Meta(description="host name it reported")]
    pid: Annotated[int, Meta(description="process id it reported")]
    queues: Annotated[list[str], Meta(description="queues it serves (at most 10 listed)")]
    types: Annotated[
        list[str] | None, Meta(description="task types it handles (nil: any; at most 10 listed)")
    ]
    concurrency: Annotated[int, Meta(description="tasks it runs at once")]
    running: Annotated[int, Meta(description="tasks running, from its last heartbeat")]
    cpu: Annotated[float | None, Meta(description="CPU percent, from its last heartbeat")]
    memory: Annotated[int | None, Meta(description="memory bytes, from its last heartbeat")]
    connected: Annotated[bool, Meta(description="whether it has a connection open")]
    connected_at: Annotated[float, Meta(description="when it last said hello")]
    last_seen: Annotated[float, Meta(description="when the broker last heard from it")]
    heartbeat_age: Annotated[float, Meta(description="seconds since last_seen")]
    queues_total: Annotated[
        int | None, Meta(description="how many queues it serves; present when more than listed")
    ] = None
    types_total: Annotated[
        int | None, Meta(description="how many types it handles; present when more than listed")
    ] = None


class CapLimits(Entry):
    """A queue's cap, as ``depth`` shows it (nil: that limit is not set)."""

    concurrency: Annotated[int | None, Meta(description="at most this many running at once")]
    rate: Annotated[float | None, Meta(description="at most this many started per second")]
    burst: Annotated[float | None, Meta(description="the rate bucket's size, tasks")]


class CapMap(Entry):
    """A cap on a queue or a task type (nil: that limit is not set)."""

    kind: Annotated[str, Meta(description="queue or type: what the cap limits")]
    name: Annotated[str, Meta(description="the queue or task type")]
    concurrency: Annotated[int | None, Meta(description="at most this many running at once")]
    rate: Annotated[float | None, Meta(description="at most this many started per second")]
    burst: Annotated[float | None, Meta(description="the rate bucket's size, tasks")]


class CapListed(CapMap, kw_only=True):
    """A cap as ``cap list`` gives it: with its running count."""

    running: Annotated[int, Meta(description="its tasks running now, counted up to 100000")]


class LastMinute(Entry):
    """Events over the last ``window`` seconds (this broker's)."""

    window: Annotated[int, Meta(description="seconds counted (60)")]
    total: Annotated[dict[str, int], Meta(description="event -> count")]
    queues: Annotated[dict[str, dict[str, int]], Meta(description="queue -> event -> count")]
    throughput: Annotated[float, Meta(description="finished attempts per second")]
    failure_rate: Annotated[
        float | None, Meta(description="failed / finished attempts (nil: none finished)")
    ]


class MinuteRow(Entry):
    """One minute of the activity history."""

    start: Annotated[int, Meta(description="the minute's Unix time")]
    submitted: Annotated[int, Meta(description="tasks submitted")]
    succeeded: Annotated[int, Meta(description="tasks succeeded")]
    failed: Annotated[int, Meta(description="attempts failed")]
    dead: Annotated[int, Meta(description="tasks dead")]
    runs: Annotated[int, Meta(description="attempts whose run time is known")]
    run_time: Annotated[float, Meta(description="their seconds from claim to report, summed")]


class ActivityHistory(Entry):
    """The last minutes of activity, oldest first (the last row: the current minute)."""

    minutes: Annotated[int, Meta(description="minutes kept (60)")]
    rows: Annotated[list[MinuteRow], Meta(description="one row per minute")]


class Stats(Entry):
    """Broker-wide figures (``query stats``)."""

    broker: Annotated[str, Meta(description="broker name")]
    version: Annotated[str, Meta(description="tq version")]
    uptime: Annotated[float, Meta(description="seconds since the broker started")]
    queues: Annotated[StateCounts, Meta(description="queue -> state -> count")]
    paused: Annotated[list[str], Meta(description="paused queues")]
    caps: Annotated[list[CapMap], Meta(description="the caps in force")]
    store: Annotated[
        dict[str, Any] | None,
        Meta(
            description="backend, location, size (and the backend's own); nil for a "
            "queue-limited key"
        ),
    ]
    workers: Annotated[int, Meta(description="workers known")]
    counters: Annotated[dict[str, int], Meta(description="counters since broker start")]
    last_minute: Annotated[LastMinute, Meta(description="events of the last minute")]
    history: Annotated[ActivityHistory, Meta(description="the last 60 minutes")]


class PriorityCount(Entry):
    """Unfinished tasks of one priority and state."""

    priority: Annotated[int, Meta(description="0..255")]
    state: Annotated[str, Meta(description="state")]
    count: Annotated[int, Meta(description="tasks")]


class QueueDepth(Entry):
    """One queue's unfinished tasks."""

    queue: Annotated[str, Meta(description="queue")]
    total: Annotated[int, Meta(description="unfinished tasks")]
    states: Annotated[dict[str, int], Meta(description="state -> count")]
    priorities: Annotated[list[PriorityCount], Meta(description="highest priority first")]
    paused: Annotated[bool, Meta(description="whether the queue is paused")]
    cap: Annotated[CapLimits | None, Meta(description="the queue's cap (nil: none)")]


class Depth(Entry):
    """Unfinished tasks per queue (``query depth``)."""

    queues: Annotated[list[QueueDepth], Meta(description="queues sorted by name")]


class CheckOk(Entry):
    ok: Annotated[bool, Meta(description="whether the check passed")]


class StoreCheck(Entry):
    ok: Annotated[bool, Meta(description="whether the store answered a read")]
    error: Annotated[str | None, Meta(description="why not")]
    latency: Annotated[float, Meta(description="seconds the read took")]


class HealthChecks(Entry):
    accepting: Annotated[CheckOk, Meta(description="not shutting down")]
    store: Annotated[StoreCheck, Meta(description="the store answers")]


class Listen(Entry):
    wire: Annotated[str, Meta(description="host:port of the wire protocol")]
    http: Annotated[str | None, Meta(description="the REST API's URL (nil: off)")]


class WorkerCount(Entry):
    known: Annotated[int, Meta(description="workers registered")]
    connected: Annotated[int, Meta(description="workers with a connection open")]


class BrokerMap(Entry):
    """A broker sharing the store."""

    id: Annotated[str, Meta(description="host-pid-random, new at each start")]
    address: Annotated[str | None, Meta(description="where it listens (nil until it does)")]
    http: Annotated[str | None, Meta(description="its REST API's URL")]
    version: Annotated[str, Meta(description="its tq version")]
    started_at: Annotated[float, Meta(description="when it started, database clock")]
    last_seen: Annotated[float, Meta(description="its last beat, database clock")]
    age: Annotated[float, Meta(description="seconds since that beat")]
    alive: Annotated[bool, Meta(description="false after 10 s without a beat")]
    role: Annotated[str, Meta(description="leader or follower")]
    self: Annotated[bool, Meta(description="the broker answering")]


class Health(Entry):
    """Everything an operator checks first (``query health``)."""

    healthy: Annotated[bool, Meta(description="false when shutting down or the store is silent")]
    checks: Annotated[HealthChecks, Meta(description="the checks")]
    broker: Annotated[str, Meta(description="broker name")]
    version: Annotated[str, Meta(description="tq version")]
    protocol: Annotated[int, Meta(description="protocol version")]
    started_at: Annotated[float, Meta(description="when the broker started")]
    uptime: Annotated[float, Meta(description="seconds since then")]
    listen: Annotated[Listen, Meta(description="where it listens")]
    store: Annotated[
        dict[str, Any] | None,
        Meta(description="what the backend says about itself (nil for a queue-limited key)"),
    ]
    workers: Annotated[WorkerCount, Meta(description="workers known and connected")]
    role: Annotated[str, Meta(description="leader or follower")]
    brokers: Annotated[
        list[BrokerMap] | None, Meta(description="every broker sharing the store, oldest first")
    ]
    brokers_error: Annotated[str | None, Meta(description="why brokers is nil")]


class Explanation(Entry):
    """Why a task is not running right now (``query explain``)."""

    task: TaskIdText
    state: Annotated[str, Meta(description="its state")]
    reasons: Annotated[
        list[dict[str, Any]],
        Meta(
            description="most telling first: each a map with code and message (str) and "
            "the reason's facts"
        ),
    ]


class Workflow(Entry):
    """The tasks linked to one by dependencies (``query workflow``)."""

    tasks: Annotated[list[TaskMap], Meta(description="the tasks")]
    edges: Annotated[
        list[tuple[str, str]], Meta(description="[task id, id of a task it depends on] pairs")
    ]
    truncated: Annotated[bool, Meta(description="the walk stopped at its bound")]


class Transition(Entry):
    """One transition of a task (``query history``)."""

    n: Annotated[int, Meta(description="numbers the task's transitions from 1")]
    at: Annotated[float, Meta(description="Unix seconds")]
    event: Annotated[str, Meta(description="what happened (submitted, leased, failed, ...)")]
    state: Annotated[str, Meta(description="the state after the transition")]
    actor: Annotated[str | None, Meta(description="who asked for it (nil: a worker or upkeep)")]
    worker: Annotated[str | None, Meta(description="the worker that held the lease")]
    token: Annotated[int | None, Meta(description="the lease's token")]
    error: Annotated[TaskErrorMap | None, Meta(description="the error, where one was reported")]
    run_at: Annotated[float | None, Meta(description="when the retry is due")]
    priority: Annotated[int | None, Meta(description="the priority (submitted, priority)")]


class KeyInfo(Entry):
    """An API key as an operator sees it: never the secret or its hash."""

    id: Annotated[str, Meta(description="the public key id")]
    name: Annotated[str, Meta(description="its label")]
    role: Annotated[str, Meta(description="admin, producer, worker or reader")]
    queues: Annotated[list[str] | None, Meta(description="the queues it is limited to (nil: all)")]
    created_at: Annotated[float, Meta(description="Unix seconds")]
    expires_at: Annotated[float | None, Meta(description="Unix seconds (nil: never)")]
    revoked_at: Annotated[float | None, Meta(description="Unix seconds (nil: not revoked)")]
    state: Annotated[str, Meta(description="active, revoked or expired")]


class AuditEntry(Entry):
    """One audit log entry."""

    seq: Annotated[int, Meta(description="its sequence number (the cursor)")]
    at: Annotated[float, Meta(description="Unix seconds")]
    actor: Annotated[str, Meta(description="key id, local, broker or anonymous")]
    action: Annotated[str, Meta(description="e.g. key.create, task.cancel")]
    target: Annotated[str, Meta(description="what was acted upon")]
    detail: Annotated[dict[str, Any], Meta(description="the action's facts")]


class ScheduleMap(Entry):
    """A recurring schedule."""

    name: Annotated[str, Meta(description="its name")]
    cron: Annotated[str, Meta(description="the cron expression")]
    timezone: Annotated[str, Meta(description="the IANA zone it is read in")]
    task: Annotated[dict[str, Any], Meta(description="what each tick submits")]
    missed: Annotated[str, Meta(description="skip, once or all")]
    paused: Annotated[bool, Meta(description="whether it is paused")]
    paused_at: Annotated[float | None, Meta(description="since when")]
    next_at: Annotated[float | None, Meta(description="the next tick (nil while paused)")]
    last_fired_at: Annotated[float | None, Meta(description="when it last fired")]
    last_task: Annotated[str | None, Meta(description="the task it last submitted")]
    fired: Annotated[int, Meta(description="tasks it submitted")]
    created_at: Annotated[float, Meta(description="Unix seconds")]
    updated_at: Annotated[float, Meta(description="Unix seconds")]
    description: Annotated[str, Meta(description="the expression in English words")]
    next_runs: Annotated[list[float], Meta(description="the next five ticks (none while paused)")]


# -- answers (ack) ----------------------------------------------------------------------
class HelloAnswer(Answer, kw_only=True):
    v: Annotated[int, Meta(description="protocol version (1)")]
    server: Annotated[str, Meta(description='"tq/<version>"')]
    broker: Annotated[str, Meta(description="broker name")]
    lease_ttl: Annotated[float, Meta(description="seconds a lease lasts")]
    worker_id: Annotated[str | None, Meta(description="the worker's id (nil for a client)")]
    key_id: Annotated[str | None, Meta(description="the key the session acts as (nil: no auth)")]
    role: Annotated[str | None, Meta(description="that key's role (nil: no auth)")]


class SubmitAnswer(Answer, kw_only=True):
    tasks: Annotated[list[Submitted], Meta(description="in request order")]
    warnings: Annotated[list[SubmitWarning], Meta(description="task types no worker handles")]


class ClaimAnswer(Answer, kw_only=True):
    tasks: Annotated[list[LeaseMap], Meta(description="the leases (empty: nothing to do)")]


class ResultAnswer(Answer, kw_only=True):
    results: Annotated[list[Reported], Meta(description="in request order")]


class HeartbeatAnswer(Answer, kw_only=True):
    lost: Annotated[list[str], Meta(description="task ids whose lease was not extended")]


class TaskAnswer(Answer, kw_only=True):
    """``query get``, ``cancel``, ``retry``, ``set_priority``: one task."""

    task: Annotated[TaskMap, Meta(description="the task (after the change)")]


class ListAnswer(Answer, kw_only=True):
    tasks: Annotated[list[TaskMap], Meta(description="a page of tasks")]
    next: Annotated[str | None, Meta(description="the cursor of the next page (nil: the end)")]


class StatsAnswer(Answer, kw_only=True):
    stats: Annotated[Stats, Meta(description="broker-wide figures")]


class WorkersAnswer(Answer, kw_only=True):
    workers: Annotated[list[WorkerMap], Meta(description="sorted by id")]


class DepthAnswer(Answer, kw_only=True):
    depth: Annotated[Depth, Meta(description="unfinished tasks per queue")]


class HealthAnswer(Answer, kw_only=True):
    health: Annotated[Health, Meta(description="the broker's health")]


class ExplainAnswer(Answer, kw_only=True):
    explain: Annotated[Explanation, Meta(description="why the task is not running")]


class WorkflowAnswer(Answer, kw_only=True):
    workflow: Annotated[Workflow, Meta(description="the linked tasks and their edges")]


class HistoryAnswer(Answer, kw_only=True):
    task: TaskIdText
    history: Annotated[list[Transition], Meta(description="its transitions, oldest first")]
    limit: Annotated[int, Meta(description="rows kept per task")]


class WaitAnswer(Answer, kw_only=True):
    task: Annotated[TaskMap, Meta(description="the task")]
    timed_out: Annotated[bool, Meta(description="false: the task is terminal")]


class PurgeAnswer(Answer, kw_only=True):
    purged: Annotated[int, Meta(description="tasks deleted now")]
    matched: Annotated[int, Meta(description="with dry_run: would be deleted; else = purged")]
    more: Annotated[bool, Meta(description="purged = limit: repeat")]


class RetryManyAnswer(Answer, kw_only=True):
    retried: Annotated[list[str], Meta(description="task ids sent back to pending")]
    more: Annotated[bool, Meta(description="limit were retried: repeat")]


class KeyCreatedAnswer(Answer, kw_only=True):
    key: Annotated[str, Meta(description="the whole key, returned this once only")]
    info: Annotated[KeyInfo, Meta(description="the key's info")]


class KeyListAnswer(Answer, kw_only=True):
    keys: Annotated[list[KeyInfo], Meta(description="every key, oldest first")]


class KeyRevokedAnswer(Answer, kw_only=True):
    info: Annotated[KeyInfo, Meta(description="the revoked key's info")]


class AuditAnswer(Answer, kw_only=True):
    entries: Annotated[list[AuditEntry], Meta(description="newest first")]
    next: Annotated[int | None, Meta(description="the last seq if the page is full, else nil")]


class QueueAnswer(Answer, kw_only=True):
    queue: Annotated[str, Meta(description="the queue")]
    paused: Annotated[bool, Meta(description="its state now")]
    changed: Annotated[bool, Meta(description="false if it already was so")]


class ScheduleAddAnswer(Answer, kw_only=True):
    schedule: Annotated[ScheduleMap, Meta(description="the schedule")]
    created: Annotated[bool, Meta(description="false: an existing schedule was redeclared")]


class ScheduleListAnswer(Answer, kw_only=True):
    schedules: Annotated[list[ScheduleMap], Meta(description="every schedule, by name")]


class ScheduleAnswer(Answer, kw_only=True):
    schedule: Annotated[ScheduleMap, Meta(description="the schedule")]


class ScheduleRemoveAnswer(Answer, kw_only=True):
    removed: Annotated[bool, Meta(description="false if there was no such schedule")]


class ScheduleChangeAnswer(Answer, kw_only=True):
    schedule: Annotated[ScheduleMap, Meta(description="the schedule")]
    changed: Annotated[bool, Meta(description="false if it already was so")]


class ScheduleRunAnswer(Answer, kw_only=True):
    schedule: Annotated[ScheduleMap, Meta(description="the schedule")]
    task: Annotated[str, Meta(description="the new task's id")]


class CapSetAnswer(Answer, kw_only=True):
    cap: Annotated[CapMap, Meta(description="the cap as stored")]


class CapRemoveAnswer(Answer, kw_only=True):
    kind: Annotated[str, Meta(description="queue or type")]
    name: Annotated[str, Meta(description="the queue or task type")]
    removed: Annotated[bool, Meta(description="false if there was no such cap")]


class CapListAnswer(Answer, kw_only=True):
    caps: Annotated[list[CapListed], Meta(description="every cap, by kind then name")]


class SubscribeAnswer(Answer, kw_only=True):
    topics: Annotated[list[str], Meta(description="the topics subscribed, sorted")]


class UnsubscribeAnswer(Answer, kw_only=True):
    """No fields."""


# -- the error answer -------------------------------------------------------------------
class Nack(msgspec.Struct, tag_field="t", tag="nack", kw_only=True, omit_defaults=True):
    """A request refused (or, with id 0, the connection)."""

    id: RequestId
    code: Annotated[str, Meta(description="stable error code")]
    message: Annotated[str, Meta(description="human-readable, actionable text (not stable)")]
    retry_after: Annotated[
        float | None,
        Meta(description="seconds to wait before retrying; sent with rate_limited only"),
    ] = None


# -- events (broker to subscriber) ------------------------------------------------------
class Event(msgspec.Struct, tag_field="t", tag="event", kw_only=True):
    """What every event carries; the topic's fields follow."""

    id: Annotated[int, Meta(ge=0, description="the id of the subscribe request")]
    seq: Annotated[int, Meta(description="1, 2, ... per subscription, no gaps")]
    topic: Annotated[str, Meta(description="the topic")]
    time: Annotated[float, Meta(description="broker clock")]


class TaskChange(Entry):
    id: Annotated[str | None, Meta(description="task id")]
    type: Annotated[str | None, Meta(description="task type")]
    queue: Annotated[str | None, Meta(description="queue")]
    from_: Annotated[str | None, Meta(description="the state before (nil: a new task)")] = (
        msgspec.field(name="from")
    )
    to: Annotated[str | None, Meta(description="the state after")]


class TaskTotal(Entry):
    queue: Annotated[str | None, Meta(description="queue (nil: not known cheaply)")]
    from_: Annotated[str | None, Meta(description="the state before")] = msgspec.field(name="from")
    to: Annotated[str | None, Meta(description="the state after")]
    n: Annotated[int, Meta(description="changes")]


class ProgressItem(Entry):
    id: TaskIdText
    progress: Annotated[float, Meta(description="fraction 0..1")]
    message: Annotated[str | None, Meta(description="the message reported with it")]


class TasksEvent(Event, kw_only=True):
    changes: Annotated[
        list[TaskChange],
        Meta(description="every change of the interval when at most 100, else empty"),
    ]
    more: Annotated[int, Meta(description="changes not listed")]
    totals: Annotated[
        list[TaskTotal], Meta(description="every change, summed by queue, from and to")
    ]


class WorkersEvent(Event, kw_only=True):
    kind: Annotated[str, Meta(description="joined, heartbeat, left or lost")]
    worker_id: Annotated[str, Meta(description="worker id")]
    worker: Annotated[WorkerMap | None, Meta(description="the worker map (nil for lost)")]


class CountsEvent(Event, kw_only=True):
    queues: Annotated[StateCounts, Meta(description="queue -> state -> count")]


class ProgressEvent(Event, kw_only=True):
    tasks: Annotated[list[ProgressItem], Meta(description="latest progress per task")]
    more: Annotated[int, Meta(description="reports left out (beyond 100 tasks)")]


class LaggedEvent(Event, kw_only=True):
    dropped: Annotated[int, Meta(description="events this subscriber lost")]


EVENTS: dict[str, type[Event]] = {
    "tasks": TasksEvent,
    "workers": WorkersEvent,
    "counts": CountsEvent,
    "progress": ProgressEvent,
    "lagged": LaggedEvent,
}

# -- the registry -----------------------------------------------------------------------
# request tag (or "tag.op" / "query.q" where the answer depends on it) -> its ack
ANSWERS: dict[str, type[Answer]] = {
    "hello": HelloAnswer,
    "submit": SubmitAnswer,
    "claim": ClaimAnswer,
    "result": ResultAnswer,
    "heartbeat": HeartbeatAnswer,
    "query.get": TaskAnswer,
    "query.list": ListAnswer,
    "query.stats": StatsAnswer,
    "query.workers": WorkersAnswer,
    "query.depth": DepthAnswer,
    "query.health": HealthAnswer,
    "query.explain": ExplainAnswer,
    "query.workflow": WorkflowAnswer,
    "query.history": HistoryAnswer,
    "cancel": TaskAnswer,
    "retry": TaskAnswer,
    "wait": WaitAnswer,
    "purge": PurgeAnswer,
    "retry_many": RetryManyAnswer,
    "keys.create": KeyCreatedAnswer,
    "keys.list": KeyListAnswer,
    "keys.revoke": KeyRevokedAnswer,
    "audit": AuditAnswer,
    "set_priority": TaskAnswer,
    "queue.pause": QueueAnswer,
    "queue.resume": QueueAnswer,
    "schedule.add": ScheduleAddAnswer,
    "schedule.list": ScheduleListAnswer,
    "schedule.get": ScheduleAnswer,
    "schedule.remove": ScheduleRemoveAnswer,
    "schedule.pause": ScheduleChangeAnswer,
    "schedule.resume": ScheduleChangeAnswer,
    "schedule.run_now": ScheduleRunAnswer,
    "cap.set": CapSetAnswer,
    "cap.remove": CapRemoveAnswer,
    "cap.list": CapListAnswer,
    "subscribe": SubscribeAnswer,
    "unsubscribe": UnsubscribeAnswer,
}
SUB_FIELD = {"query": "q", "keys": "op", "queue": "op", "schedule": "op", "cap": "op"}


def answer_key(tag: str, sub: str | None = None) -> str:
    """The ``ANSWERS`` key of a request: its tag, or ``tag.op`` (``query.q``)."""
    return tag if tag not in SUB_FIELD else f"{tag}.{sub}"


def answer_type(tag: str, sub: str | None = None) -> type[Answer]:
    """The ack Struct of a request (KeyError for an unknown one)."""
    return ANSWERS[answer_key(tag, sub)]


# -- building answers (the broker) ------------------------------------------------------
def task_map(task: Task) -> TaskMap:
    """A stored task as its answer map."""
    return TaskMap(
        id=task.id,
        type=task.type,
        queue=task.queue,
        payload=task.payload,
        priority=task.priority,
        state=task.state.value,
        attempts=task.attempts,
        max_retries=task.max_retries,
        timeout=task.timeout,
        retry_base=task.retry_base,
        retry_cap=task.retry_cap,
        created_at=task.created_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        run_at=task.run_at,
        worker=task.worker,
        result=task.result,
        error=task_error_map(task.error),
        idempotency_key=task.idempotency_key,
        trace=task.trace,
        progress=task.progress,
        progress_message=task.progress_message,
    )


def task_error_map(error: TaskError | None) -> TaskErrorMap | None:
    """A task's (or a history row's) last error as its answer map."""
    if error is None:
        return None
    return TaskErrorMap(type=error.type, message=error.message, traceback=error.traceback)


def lease_map(lease: Lease) -> LeaseMap:
    """A lease as its answer map (``trace`` left out when the task has none)."""
    return LeaseMap(
        id=lease.id,
        type=lease.type,
        queue=lease.queue,
        payload=lease.payload,
        priority=lease.priority,
        attempt=lease.attempt,
        max_retries=lease.max_retries,
        timeout=lease.timeout,
        token=lease.token,
        expires_at=lease.expires_at,
        trace=lease.trace,
    )


class BadAnswer(ProtocolError):
    """An answer that does not fit its declaration (see ``decode_answer``): the broker
    (or something posing as it) does not speak this protocol version."""


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def encode(answer: msgspec.Struct) -> bytes:
    """One answer's msgpack body (no frame header); ProtocolError if a value in it
    (a payload, a result) is not msgpack data."""
    try:
        return _encoder.encode(answer)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"message cannot be encoded as msgpack: {exc}") from None


def convert_answer(obj: object, kind: type[msgspec.Struct]) -> Any:
    """An already decoded answer map as its Struct; BadAnswer naming the field."""
    try:
        return msgspec.convert(obj, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise BadAnswer(f"malformed {_what(kind)} from the broker: {exc}") from None


def decode_answer(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """One answer body as its Struct; BadAnswer naming the field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise BadAnswer(f"malformed {_what(kind)} from the broker: {exc}") from None


def _what(kind: type) -> str:
    for key, struct in ANSWERS.items():
        if struct is kind:
            return f"answer to {key.replace('.', ' ')}"
    return kind.__name__
