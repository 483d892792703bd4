"""What the broker has done lately: labelled counters, histograms, recent windows.

The service layer records here as it works (one call per submit or report
batch, never per row read); the REST side turns it into Prometheus metric
families at scrape time (tq/http/metrics.py) and ``stats`` reports the last
minute (per second, ``last_minute``) and the last hour (per minute,
``history``: HISTORY_MINUTES buckets of submitted/succeeded/failed/dead
counts and run-time sums, for the dashboard's charts). Plain Python on
purpose: no prometheus-client on the hot path, no import cost for brokers
without HTTP, and each broker has its own instance (several brokers in one
test process never share counters).

Events, per (queue, type):

    submitted  a task was created (an idempotent resubmission creates none)
    succeeded  a report made the task succeeded
    failed     a report made an attempt fail (whatever comes next)
    retried    ... and another attempt is scheduled (state failed)
    dead       ... and none is (state dead)

So ``failed = retried + dead``. Lease expiries are counted apart (the
reaper knows only task ids). Time is an argument (``now``, seconds).

Bounded whatever clients choose: queue and type names come from submitters,
so every structure keyed by them has a cap (``Labels``). The first
``MAX_QUEUES`` distinct queues and ``MAX_TYPES`` distinct types seen are
kept by name, and at most ``MAX_SERIES`` (queue, type) pairs; a later queue
or type is counted as ``OTHER``, and a new pair of kept names beyond
``MAX_SERIES`` as (queue, ``OTHER``). So the counters, the run-time
histograms, the one-minute window and the hourly history hold at most ``MAX_QUEUES + 1`` queues,
``MAX_TYPES + 1`` types and ``MAX_SERIES + MAX_QUEUES + MAX_TYPES + 1``
pairs, and /metrics at most that many series per family.
Nothing is forgotten: folded events still count, under ``OTHER``. The caps
hold for the life of the broker (a restart starts the count again).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tq.protocol.answers import ActivityHistory, LastMinute, MinuteRow

WINDOW = 60  # seconds of recent activity kept for throughput and failure rate
HISTORY_MINUTES = 60  # per-minute buckets kept for the last hour (``history``)
HISTORY_EVENTS = ("submitted", "succeeded", "failed", "dead")
EVENTS = ("submitted", "succeeded", "failed", "retried", "dead")
# seconds from claim to report
RUN_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# seconds from a submit request's arrival to its durable acknowledgement
SUBMIT_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)
# label caps (see the module docstring; docs/OPERATIONS.md "What to monitor")
MAX_QUEUES = 50  # distinct queue names kept by name
MAX_TYPES = 100  # distinct task types kept by name
MAX_SERIES = 500  # distinct (queue, type) pairs kept by name
OTHER = "(other)"  # what the rest is counted as (a real queue or type of that name too)
_BY_STATE = {
    "succeeded": ("succeeded",),
    "failed": ("failed", "retried"),
    "dead": ("failed", "dead"),
}


@dataclass
class Histogram:
    """Fixed buckets (upper bounds, ascending); ``counts[-1]`` is the +Inf bucket."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations <= it), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Labels:
    """The cap on distinct label values: names seen first are kept, the rest become OTHER."""

    def __init__(
        self, max_queues: int = MAX_QUEUES, max_types: int = MAX_TYPES, max_series: int = MAX_SERIES
    ) -> None:
        self.max_queues, self.max_types, self.max_series = max_queues, max_types, max_series
        self.queues: dict[str, None] = {}  # insertion order: first seen first
        self.types: dict[str, None] = {}
        self.series: set[tuple[str, str]] = set()  # pairs kept by name

    def queue(self, queue: str) -> str:
        """``queue`` if it is (or may become) kept, else OTHER."""
        if queue in self.queues:
            return queue
        if queue == OTHER or len(self.queues) >= self.max_queues:
            return OTHER
        self.queues[queue] = None
        return queue

    def _type(self, type_: str) -> str:
        if type_ in self.types:
            return type_
        if type_ == OTHER or len(self.types) >= self.max_types:
            return OTHER
        self.types[type_] = None
        return type_

    def pair(self, queue: str, type_: str) -> tuple[str, str]:
        """The (queue, type) a pair is counted as."""
        key = (queue, type_)
        if key in self.series:
            return key
        q, t = self.queue(queue), self._type(type_)
        if q == OTHER or t == OTHER:
            return q, t  # at most one (q, OTHER) per kept queue, one (OTHER, t) per kept type
        if len(self.series) >= self.max_series:
            return q, OTHER
        self.series.add(key)
        return key


class Activity:
    def __init__(self, labels: Labels | None = None) -> None:
        self.labels = labels or Labels()
        self.totals: dict[tuple[str, str], Counter[str]] = {}  # (queue, type) -> event -> n
        self.run_time: dict[tuple[str, str], Histogram] = {}
        self.submit_latency = Histogram(SUBMIT_LATENCY_BUCKETS)
        self._recent: deque[tuple[int, Counter[tuple[str, str]]]] = deque()  # (second, ...)
        # (minute, (queue, event or "runs") -> n, queue -> run-time seconds), oldest first
        self._minutes: deque[tuple[int, Counter[tuple[str, str]], dict[str, float]]] = deque()

    # -- recording --------------------------------------------------------
    def record(self, queue: str, type_: str, event: str, now: float, n: int = 1) -> None:
        queue, type_ = self.labels.pair(queue, type_)
        self.totals.setdefault((queue, type_), Counter())[event] += n
        second = int(now)
        if not self._recent or self._recent[-1][0] != second:
            self._recent.append((second, Counter()))
            while self._recent[0][0] <= second - WINDOW:
                self._recent.popleft()
        self._recent[-1][1][(queue, event)] += n
        if event in HISTORY_EVENTS:
            self._minute(now)[1][(queue, event)] += n

    def _minute(self, now: float) -> tuple[int, Counter[tuple[str, str]], dict[str, float]]:
        """The history bucket of ``now``'s minute (older ones beyond the hour dropped)."""
        minute = int(now) // 60
        if not self._minutes or self._minutes[-1][0] < minute:
            self._minutes.append((minute, Counter(), {}))
            while self._minutes[0][0] <= minute - HISTORY_MINUTES:
                self._minutes.popleft()
        return self._minutes[-1]

    def submitted(self, pairs: Iterable[tuple[str, str]], now: float) -> None:
        """(queue, type) of each task a submit created."""
        for (queue, type_), n in Counter(pairs).items():
            self.record(queue, type_, "submitted", now, n)

    def reported(self, results: Iterable[Any], now: float) -> None:
        """Accepted outcomes (``OutcomeResult``s): events and run time."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for r in results:
            events = _BY_STATE.get(r.state or "") if r.accepted else None
            if not events or r.queue is None or r.type is None:
                continue
            for event in events:
                counts[r.queue, r.type, event] += 1
            if r.started_at is not None:
                key = self.labels.pair(r.queue, r.type)
                if key not in self.run_time:
                    self.run_time[key] = Histogram(RUN_TIME_BUCKETS)
                run = max(0.0, now - r.started_at)
                self.run_time[key].observe(run)
                _, minute_counts, sums = self._minute(now)
                minute_counts[(key[0], "runs")] += 1
                sums[key[0]] = sums.get(key[0], 0.0) + run
        for (queue, type_, event), n in counts.items():
            self.record(queue, type_, event, now, n)

    # -- reading ----------------------------------------------------------
    def last_minute(self, now: float, visible: Callable[[str], bool] | None = None) -> LastMinute:
        """Events per queue and in total over the last WINDOW seconds, throughput
        (finished attempts per second) and failure rate (failed / finished attempts).

        ``visible``: when given, only the queues it accepts are counted.
        """
        since = int(now) - WINDOW
        queues: dict[str, dict[str, int]] = {}
        for second, counts in self._recent:
            if second <= since:
                continue
            for (queue, event), n in counts.items():
                if visible is not None and not visible(queue):
                    continue
                row = queues.setdefault(queue, dict.fromkeys(EVENTS, 0))
                row[event] += n
        total = dict.fromkeys(EVENTS, 0)
        for row in queues.values():
            for event, n in row.items():
                total[event] += n
        finished = total["succeeded"] + total["failed"]
        return LastMinute(
            window=WINDOW,
            total=total,
            queues=queues,
            throughput=finished / WINDOW,
            failure_rate=total["failed"] / finished if finished else None,
        )

    def history(self, now: float, visible: Callable[[str], bool] | None = None) -> ActivityHistory:
        """The last HISTORY_MINUTES minutes, oldest first, one row per minute (empty ones
        too): ``start`` (Unix time of the minute), the events of HISTORY_EVENTS, ``runs``
        (attempts whose run time is known) and ``run_time`` (their seconds, summed).

        ``visible``: when given, only the queues it accepts are counted.
        """
        current = int(now) // 60
        by_minute = {m: (counts, sums) for m, counts, sums in self._minutes}
        rows = []
        empty: tuple[Counter[tuple[str, str]], dict[str, float]] = (Counter(), {})
        for minute in range(current - HISTORY_MINUTES + 1, current + 1):
            counts, sums = by_minute.get(minute, empty)
            events = dict.fromkeys((*HISTORY_EVENTS, "runs"), 0)
            for (queue, event), n in counts.items():
                if visible is None or visible(queue):
                    events[event] += n
            run_time = 0.0
            for queue, seconds in sums.items():
                if visible is None or visible(queue):
                    run_time += seconds
            rows.append(
                MinuteRow(
                    start=minute * 60,
                    submitted=events["submitted"],
                    succeeded=events["succeeded"],
                    failed=events["failed"],
                    dead=events["dead"],
                    runs=events["runs"],
                    run_time=run_time,
                )
            )
        return ActivityHistory(minutes=HISTORY_MINUTES, rows=rows)
