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
    tq_tasks_running                  tasks leased to workers now
    tq_workers_connected / tq_workers_known
    tq_lease_expiries_total, tq_refused_results_total
    tq_task_run_seconds{queue,type}   histogram: claim -> report
    tq_submit_latency_seconds         histogram: submit received -> durable ack
    tq_store_size_bytes, tq_store_wal_bytes, tq_broker_uptime_seconds, tq_broker_info
"""

from __future__ import annotations

from collections.abc import Iterator
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
from tq.broker.activity import EVENTS, Histogram

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


@dataclass
class _Snapshot:
    depth: list[tuple[str, str, int]] = field(default_factory=list)  # queue, state, n
    size: int = 0
    wal: int = 0
    visible: Any = None  # a queue predicate, or None for every queue


class _TQCollector(Collector):
    def __init__(self, service: BrokerService) -> None:
        self.service = service
        self.snapshot = _Snapshot()

    def collect(self) -> Iterator[Metric]:
        service, snap = self.service, self.snapshot
        show = snap.visible or (lambda queue: True)
        activity = service.activity
        for event in EVENTS:
            family = CounterMetricFamily(
                f"tq_tasks_{event}", _EVENT_HELP[event], labels=["queue", "type"]
            )
            for (queue, type_), counts in sorted(activity.totals.items()):
                if show(queue):
                    family.add_metric([queue, type_], counts.get(event, 0))
            yield family
        depth = GaugeMetricFamily(
            "tq_queue_depth", "Unfinished tasks by queue and state.", labels=["queue", "state"]
        )
        running = 0
        for queue, state, n in snap.depth:
            depth.add_metric([queue, state], n)
            running += n if state == "running" else 0
        yield depth
        yield GaugeMetricFamily("tq_tasks_running", "Tasks leased to workers now.", value=running)
        known = service.workers.all()
        yield GaugeMetricFamily(
            "tq_workers_connected",
            "Workers with an open connection.",
            value=sum(1 for w in known if w.connections > 0),
        )
        yield GaugeMetricFamily(
            "tq_workers_known", "Workers the broker knows (connected or not).", value=len(known)
        )
        yield CounterMetricFamily(
            "tq_lease_expiries",
            "Leases that expired, or were released because their worker went silent.",
            value=service.counters.get("lease_expired", 0),
        )
        yield CounterMetricFamily(
            "tq_refused_results",
            "Worker reports refused by fencing (stale or expired lease).",
            value=service.counters.get("refused_results", 0),
        )
        run_time = HistogramMetricFamily(
            "tq_task_run_seconds",
            "Seconds from a task's claim to its worker's report.",
            labels=["queue", "type"],
        )
        for (queue, type_), hist in sorted(activity.run_time.items()):
            if show(queue):
                run_time.add_metric([queue, type_], hist.cumulative(), hist.total)
        yield run_time
        yield _histogram(
            "tq_submit_latency_seconds",
            "Seconds from a submit request's arrival to its durable acknowledgement.",
            activity.submit_latency,
        )
        yield GaugeMetricFamily(
            "tq_store_size_bytes", "Size of the task database file.", value=snap.size
        )
        yield GaugeMetricFamily(
            "tq_store_wal_bytes", "Size of the task database's write-ahead log.", value=snap.wal
        )
        yield GaugeMetricFamily(
            "tq_broker_uptime_seconds",
            "Seconds since the broker started.",
            value=service.clock() - service.started_at,
        )
        info = GaugeMetricFamily(
            "tq_broker_info",
            "The broker's name and tq version (always 1).",
            labels=["broker", "version"],
        )
        info.add_metric([service.name, __version__], 1)
        yield info


def _histogram(name: str, documentation: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], hist.cumulative(), hist.total)
    return family


class MetricsPage:
    """The /metrics body of one broker: its registry, refreshed from the store per scrape."""

    def __init__(self, service: BrokerService) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _TQCollector(service)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._lock = trio.Lock()  # one scrape at a time owns the snapshot

    async def render(self, principal: Principal | None) -> tuple[bytes, str]:
        visible = None if principal is None or principal.queues is None else principal.may_use
        gauges = await self.service.gauges(principal)
        rows = [
            (entry["queue"], state, n)
            for entry in gauges["queues"]
            for state, n in sorted(entry["states"].items())
        ]
        store = gauges["store"]
        async with self._lock:
            self.collector.snapshot = _Snapshot(rows, store["size"], store["wal"], visible)
            body = generate_latest(self.registry)
        return body, MEDIA_TYPE
