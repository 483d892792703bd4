"""GET /metrics: the broker's Prometheus text exposition (prometheus-client).

Each broker has its own ``CollectorRegistry`` (never the global one, so
several brokers in one process do not clash) holding one custom collector
plus the process collector. Nothing is counted here: the service layer
records into plain Python (``tq.broker.activity``, ``service.counters``) and
the collector turns that into metric families at scrape time. The gauges
that need the store (queue depth, store files) are read once per scrape,
before rendering, with the cheap verbs (``queue_depth`` walks only the
indexes of unfinished tasks; ``probe`` stats the files): a scrape never
counts the history.

    tq_tasks_{submitted,succeeded,failed,retried,dead}_total{queue,type}
    tq_queue_depth{queue,state}       unfinished tasks (pending, running, failed, ...)
    tq_queue_paused{queue}            1 for a paused queue (paused queues only)
    tq_queue_cap_concurrency{queue}   a queue's concurrency cap (capped queues only)
    tq_tasks_running                  tasks leased to workers now
    tq_workers_connected / tq_workers_known
    tq_lease_expiries_total, tq_refused_results_total
    tq_retention_deleted_total{state} finished tasks deleted by retention (their TTL passed)
    tq_task_run_seconds{queue,type}   histogram: claim -> report
    tq_submit_latency_seconds         histogram: submit received -> durable ack
    tq_store_size_bytes, tq_store_wal_bytes, tq_broker_uptime_seconds, tq_broker_info
    tq_store_commits_total            write transactions the store committed (group commit)
    tq_store_committed_operations_total  write operations in them (mean batch: ratio of the two)
    tq_store_grouped_submits_total    single submits inserted with others by one statement
                                      (the store counters a store keeps; SQLite keeps all three)

Label values are bounded: queues and types beyond the caps of
tq.broker.activity (``MAX_QUEUES``, ``MAX_TYPES``, ``MAX_SERIES``) are
counted under the label value ``(other)`` (``OTHER``), queue depth
included, so a page's size does not grow with the names clients choose.
The ``(other)`` series of the task counters mix queues, so a key limited to
some queues does not see them. The page is rendered in a worker thread from
a snapshot copied on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tq import __version__
from tq.broker.activity import EVENTS, OTHER, Histogram
from tq.protocol.answers import QueueDepth

if TYPE_CHECKING:
    from tq.broker.service import BrokerService
    from tq.security.roles import Principal

MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_EVENT_HELP = {
    "submitted": "Tasks created by submits.",
    "succeeded": "Tasks a worker's report made succeeded.",
    "failed": "Attempts a worker's report made fail (retried + dead).",
    "retried": "Failed attempts after which another attempt was scheduled.",
    "dead": "Failed attempts after which the task was dead (no attempts left, or rejected).",
}


# the store's own counters (attributes of the store object, where it keeps them):
# attribute -> (metric family, help)
STORE_COUNTERS = {
    "commits": (
        "tq_store_commits",
        "Write transactions the store committed: one per group-commit batch (one fsync each "
        "with synchronous=full).",
    ),
    "committed_ops": (
        "tq_store_committed_operations",
        "Write operations (a submit request, a claim, a report, ...) in the committed "
        "transactions; over tq_store_commits_total, the mean batch.",
    ),
    "grouped_ops": (
        "tq_store_grouped_submits",
        "Single submits inserted together with others by one statement (concurrent "
        "one-task submits sharing a transaction).",
    ),
}


@dataclass
class _Snapshot:
    """Everything one page shows, copied on the event loop (cheap: bounded by the label
    caps of tq.broker.activity), so rendering can run in a thread without racing the
    loop's writers."""

    totals: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)
    run_time: list[tuple[str, str, Histogram]] = field(default_factory=list)
    submit_latency: Histogram = field(default_factory=lambda: Histogram(()))
    depth: list[tuple[str, str, int]] = field(default_factory=list)  # queue, state, n
    paused: list[str] = field(default_factory=list)
    capped: list[tuple[str, int]] = field(default_factory=list)  # queue, concurrency cap
    workers_connected: int = 0
    workers_known: int = 0
    lease_expiries: int = 0
    refused_results: int = 0
    retention_deleted: dict[str, int] = field(default_factory=dict)
    size: int = 0
    wal: int = 0
    store_counters: dict[str, int] = field(default_factory=dict)  # see STORE_COUNTERS
    uptime: float = 0.0
    broker: str = ""
    limited: bool = False  # a queue-limited key: no broker-wide families


def _copy(hist: Histogram) -> Histogram:
    return Histogram(hist.bounds, list(hist.counts), hist.total)


def take_snapshot(
    service: BrokerService, gauges: dict[str, Any], visible: Callable[[str], bool] | None
) -> _Snapshot:
    """The page's numbers now. Call on the event loop; never awaits."""
    activity = service.activity
    labels = activity.labels

    def show(queue: str) -> bool:  # OTHER mixes queues: only for keys that see every queue
        return visible is None or (queue != OTHER and visible(queue))

    folded: dict[tuple[str, str], int] = {}
    depth: list[QueueDepth] = gauges["queues"]
    paused = sorted({labels.queue(e.queue) for e in depth if e.paused})
    capped = sorted(  # a queue folded into OTHER has no cap of its own to show
        (name, e.cap.concurrency)
        for e in depth
        if e.cap is not None and e.cap.concurrency is not None
        if (name := labels.queue(e.queue)) != OTHER
    )
    for entry in depth:  # sorted by queue
        queue = labels.queue(entry.queue)
        for state, n in entry.states.items():
            folded[queue, state] = folded.get((queue, state), 0) + n
    known = service.workers.visible(visible)  # a limited key: workers of its queues only
    return _Snapshot(
        totals=[(q, t, dict(c)) for (q, t), c in activity.totals.items() if show(q)],
        run_time=[(q, t, _copy(h)) for (q, t), h in activity.run_time.items() if show(q)],
        submit_latency=_copy(activity.submit_latency),
        depth=[(q, state, n) for (q, state), n in folded.items()],
        paused=paused,
        capped=capped,
        workers_connected=sum(1 for w in known if w.connections > 0),
        workers_known=len(known),
        lease_expiries=service.counters.get("lease_expired", 0),
        refused_results=service.counters.get("refused_results", 0),
        retention_deleted=dict(service.retention_deleted),
        size=gauges["store"]["size"],
        wal=gauges["store"]["wal"],
        store_counters={
            name: int(value)
            for name in STORE_COUNTERS
            if isinstance(value := getattr(service.store, name, None), int)
        },
        uptime=service.clock() - service.started_at,
        broker=service.name,
        limited=visible is not None,
    )


class _TQCollector(Collector):
    """Metric families from a snapshot; touches nothing the event loop mutates."""

    def __init__(self) -> None:
        self.snapshot = _Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        for event in EVENTS:
            family = CounterMetricFamily(
                f"tq_tasks_{event}", _EVENT_HELP[event], labels=["queue", "type"]
            )
            for queue, type_, counts in sorted(snap.totals, key=_pair):
                family.add_metric([queue, type_], counts.get(event, 0))
            yield family
        depth = GaugeMetricFamily(
            "tq_queue_depth", "Unfinished tasks by queue and state.", labels=["queue", "state"]
        )
        running = 0
        for queue, state, n in sorted(snap.depth):
            depth.add_metric([queue, state], n)
            running += n if state == "running" else 0
        yield depth
        paused = GaugeMetricFamily(
            "tq_queue_paused", "1 for a paused queue: it hands nothing out.", labels=["queue"]
        )
        for queue in snap.paused:
            paused.add_metric([queue], 1)
        yield paused
        cap = GaugeMetricFamily(
            "tq_queue_cap_concurrency",
            "A queue's concurrency cap (tq cap): at most this many of its tasks run at once.",
            labels=["queue"],
        )
        for queue, concurrency in snap.capped:
            cap.add_metric([queue], concurrency)
        yield cap
        yield GaugeMetricFamily("tq_tasks_running", "Tasks leased to workers now.", value=running)
        yield GaugeMetricFamily(
            "tq_workers_connected", "Workers with an open connection.", value=snap.workers_connected
        )
        yield GaugeMetricFamily(
            "tq_workers_known",
            "Workers the broker knows (connected or not).",
            value=snap.workers_known,
        )
        if snap.limited:  # what follows is broker-wide: not for a queue-limited key
            yield from self._common(snap)
            return
        yield CounterMetricFamily(
            "tq_lease_expiries",
            "Leases that expired, or were released because their worker went silent.",
            value=snap.lease_expiries,
        )
        yield CounterMetricFamily(
            "tq_refused_results",
            "Worker reports refused by fencing (stale or expired lease).",
            value=snap.refused_results,
        )
        expired = CounterMetricFamily(
            "tq_retention_deleted",
            "Finished tasks deleted by retention once their TTL passed, by state.",
            labels=["state"],
        )
        for state in ("succeeded", "dead", "cancelled"):
            expired.add_metric([state], snap.retention_deleted.get(state, 0))
        yield expired
        run_time = HistogramMetricFamily(
            "tq_task_run_seconds",
            "Seconds from a task's claim to its worker's report.",
            labels=["queue", "type"],
        )
        for queue, type_, hist in sorted(snap.run_time, key=_pair):
            run_time.add_metric([queue, type_], hist.cumulative(), hist.total)
        yield run_time
        yield _histogram(
            "tq_submit_latency_seconds",
            "Seconds from a submit request's arrival to its durable acknowledgement.",
            snap.submit_latency,
        )
        yield GaugeMetricFamily(
            "tq_store_size_bytes", "Size of the task database file.", value=snap.size
        )
        yield GaugeMetricFamily(
            "tq_store_wal_bytes", "Size of the task database's write-ahead log.", value=snap.wal
        )
        for name, value in snap.store_counters.items():
            metric, documentation = STORE_COUNTERS[name]
            yield CounterMetricFamily(metric, documentation, value=value)
        yield from self._common(snap)

    @staticmethod
    def _common(snap: _Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tq_broker_uptime_seconds", "Seconds since the broker started.", value=snap.uptime
        )
        info = GaugeMetricFamily(
            "tq_broker_info",
            "The broker's name and tq version (always 1).",
            labels=["broker", "version"],
        )
        info.add_metric([snap.broker, __version__], 1)
        yield info


def _pair(row: tuple[str, str, Any]) -> tuple[str, str]:
    return row[0], row[1]


def _histogram(name: str, documentation: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], hist.cumulative(), hist.total)
    return family


class MetricsPage:
    """The /metrics body of one broker: its registry, refreshed from the store per scrape.

    The numbers are copied on the event loop (``take_snapshot``); the text is built
    in a worker thread (``trio.to_thread``), so a scrape never holds the loop for
    longer than the copy.
    """

    def __init__(self, service: BrokerService) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _TQCollector()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._lock = trio.Lock()  # one scrape at a time owns the collector's snapshot

    async def render(self, principal: Principal | None) -> tuple[bytes, str]:
        visible = None if principal is None or principal.queues is None else principal.may_use
        gauges = await self.service.gauges(principal)
        async with self._lock:
            self.collector.snapshot = take_snapshot(self.service, gauges, visible)
            body = await trio.to_thread.run_sync(generate_latest, self.registry)
        return body, MEDIA_TYPE
