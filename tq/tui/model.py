"""What the console knows about the broker, kept from snapshots and live events.

Pure: no Textual, no sockets; time is an argument (``now``, seconds since the
epoch on the console's clock). The app feeds it (``connected``,
``apply_event``, ``apply_stats``, ``apply_workers``, ``sample``) and the
screens read it.

Throughput is derived from the counts the broker pushes: every SAMPLE_SECONDS
the console records, per queue, how many tasks have finished (succeeded +
dead + cancelled) and keeps the rate since the previous sample, HISTORY
samples long. Counts are recounts, so the rates heal after a lagged spell.
Until the first sample, a queue's rate is the broker's own figure for the
last minute (``stats`` ``last_minute``: succeeded + dead), which is also the
first point of its sparkline: throughput from before the console opened.

Failures are kept newest first (by the broker's time of the failure, then
the task id: a later task first), at most FAILURES_KEPT; every row's error
message is fetched by the app (``unexplained_failures``, ``note_task``).

Stuck work: ``oldest`` holds each queue's oldest pending task (the app reads
it with a ``list`` query) and ``unserved`` says when no connected worker
takes a queue or the type of its oldest pending task.

Everything here has a fixed bound: failures FAILURES_KEPT, history HISTORY
samples per queue, queues as many as the broker reports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tq.client import Event
from tq.core.task import Task

STATES = ("pending", "running", "failed", "dead", "succeeded", "cancelled")
FINISHED = ("succeeded", "dead", "cancelled")
FAILED = ("failed", "dead")
SAMPLE_SECONDS = 5.0
HISTORY = 60  # samples: 5 minutes
FAILURES_KEPT = 100


@dataclass
class Failure:
    id: str
    type: str | None
    queue: str | None
    state: str
    at: float  # broker clock: when it failed (or died)
    message: str | None = None  # filled in by a later read (None: not fetched yet)
    why: str = ""  # for a dead task: "out of retries" or "not retried" (once read)


@dataclass(frozen=True)
class Pending:
    """A queue's oldest pending task (by submission)."""

    id: str
    type: str
    created_at: float


def why_dead(task: Task) -> str:
    """Why a dead task is dead, from what the task says: out of retries, or not retried."""
    if task.state.value != "dead":
        return ""
    return "out of retries" if task.attempts > task.max_retries else "not retried"


def error_text(task: Task) -> str:
    error = task.error
    return f"{error.type}: {error.message}" if error else "(no error recorded)"


@dataclass
class WorkerView:
    data: dict[str, Any]
    received: float  # console clock when ``data`` arrived

    def age(self, now: float) -> float:
        return float(self.data.get("heartbeat_age") or 0.0) + max(0.0, now - self.received)


@dataclass
class LinkStatus:
    connected: bool = False
    connecting: bool = True  # before the first attempt has finished
    reason: str = ""
    retry_at: float | None = None
    attempt: int = 0
    since: float = 0.0  # when the current status began


@dataclass
class ConsoleState:
    address: str = ""
    link: LinkStatus = field(default_factory=LinkStatus)
    server: dict[str, Any] = field(default_factory=dict)  # the hello ACK
    stats: dict[str, Any] = field(default_factory=dict)  # the last `query stats`
    stats_at: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    counts_at: float = 0.0
    workers: dict[str, WorkerView] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)  # newest first, FAILURES_KEPT
    history: dict[str, deque[float]] = field(default_factory=dict)
    last_minute: dict[str, Any] = field(default_factory=dict)  # stats' last_minute
    oldest: dict[str, Pending] = field(default_factory=dict)  # queue -> oldest pending task
    lagged: int = 0  # events the broker (or the client) dropped for us, in total
    _finished: dict[str, int] | None = None
    _sampled_at: float | None = None

    # -- connection ----------------------------------------------------
    def connected(
        self,
        server: Mapping[str, Any],
        stats: Mapping[str, Any],
        workers: Iterable[Mapping[str, Any]],
        now: float,
        failed: Iterable[Task] = (),
    ) -> None:
        """A (re)connection's snapshot: hello ACK, stats, workers, tasks failing or dead.

        The failures are merged into those already shown: whatever failed while
        the console was away appears, with its error.
        """
        self.link = LinkStatus(connected=True, connecting=False, since=now)
        self.server = dict(server)
        self.apply_stats(stats, now)
        self.apply_workers(workers, now)
        self.merge_failures(failed)
        self._finished = None  # a fresh baseline: no spike for the time we were away
        self._sampled_at = None
        for queue in self.counts:  # throughput from before the console opened
            series = self.history.setdefault(queue, deque(maxlen=HISTORY))
            if not series and (before := self.last_minute_rate(queue)) is not None:
                series.append(before)

    def disconnected(self, reason: str, retry_in: float, attempt: int, now: float) -> None:
        since = self.link.since if not self.link.connected and self.link.since else now
        self.link = LinkStatus(
            connected=False,
            connecting=False,
            reason=reason,
            retry_at=now + retry_in,
            attempt=attempt,
            since=since,
        )

    @property
    def lease_ttl(self) -> float:
        ttl = self.server.get("lease_ttl")
        return float(ttl) if isinstance(ttl, int | float) and ttl > 0 else 30.0

    # -- snapshots -----------------------------------------------------
    def apply_stats(self, stats: Mapping[str, Any], now: float) -> None:
        self.stats = dict(stats)
        self.stats_at = now
        last = stats.get("last_minute")
        self.last_minute = dict(last) if isinstance(last, dict) else {}
        queues = stats.get("queues")
        if isinstance(queues, dict):
            self.counts = {q: dict(c) for q, c in queues.items()}
            self.counts_at = now

    def apply_workers(self, workers: Iterable[Mapping[str, Any]], now: float) -> None:
        self.workers = {str(w["id"]): WorkerView(dict(w), now) for w in workers}

    def uptime(self, now: float) -> float | None:
        up = self.stats.get("uptime")
        if not isinstance(up, int | float):
            return None
        return float(up) + (max(0.0, now - self.stats_at) if self.link.connected else 0.0)

    # -- events --------------------------------------------------------
    def apply_event(self, event: Event, now: float) -> None:
        data = event.data
        if event.topic == "counts" and isinstance(data.get("queues"), dict):
            self.counts = {q: dict(c) for q, c in data["queues"].items()}
            self.counts_at = now
        elif event.topic == "workers":
            self._apply_worker(data, now)
        elif event.topic == "tasks":
            at = event.time or now
            for change in data.get("changes") or ():
                if change.get("to") in FAILED:
                    self._failed(change, at)
        elif event.topic == "lagged":
            self.lagged += int(data.get("dropped") or 0)

    def _apply_worker(self, data: Mapping[str, Any], now: float) -> None:
        worker_id = str(data.get("worker_id"))
        info = data.get("worker")
        if data.get("kind") == "lost" or not isinstance(info, dict):
            self.workers.pop(worker_id, None)
        else:
            self.workers[worker_id] = WorkerView(dict(info), now)

    def _failed(self, change: Mapping[str, Any], at: float) -> None:
        task_id = str(change["id"])
        state = str(change["to"])
        old = next((f for f in self.failures if f.id == task_id), None)
        if old is not None:  # one row per task: the latest failure
            if old.at > at or (old.at == at and old.state == state):
                return  # the same failure again (a snapshot after an event)
            self.failures.remove(old)
        new = Failure(task_id, change.get("type"), change.get("queue"), state, at)
        self.failures.append(new)
        self.failures.sort(key=lambda f: (f.at, f.id), reverse=True)
        del self.failures[FAILURES_KEPT:]

    def merge_failures(self, tasks: Iterable[Task]) -> None:
        """Failed and dead tasks as read (a snapshot, or after an event too big to list)."""
        for task in tasks:
            if task.state.value not in FAILED:
                continue
            at = task.finished_at if task.state.value == "dead" else task.started_at
            self._failed(
                {"id": task.id, "type": task.type, "queue": task.queue, "to": task.state.value},
                at or task.created_at,
            )
            self.note_task(task)

    def note_error(self, task_id: str, message: str, why: str = "") -> None:
        for failure in self.failures:
            if failure.id == task_id:
                failure.message = message
                failure.why = why

    def note_task(self, task: Task) -> None:
        """A failure's error message (and why it is dead) from the task as read."""
        self.note_error(task.id, error_text(task), why_dead(task))

    def unexplained_failures(self, limit: int = FAILURES_KEPT) -> list[str]:
        """Ids of failures whose error message is not fetched yet, newest first."""
        return [f.id for f in self.failures if f.message is None][:limit]

    # -- throughput ----------------------------------------------------
    def sample(self, now: float) -> None:
        """Record a throughput sample (the app calls this every SAMPLE_SECONDS)."""
        if self._sampled_at is not None and now - self._sampled_at < SAMPLE_SECONDS / 2:
            return  # too soon (or a frozen clock): a sample needs time to pass
        finished = {q: sum(c.get(s, 0) for s in FINISHED) for q, c in self.counts.items()}
        if self._finished is not None and self._sampled_at is not None and self.link.connected:
            elapsed = max(1e-6, now - self._sampled_at)
            for queue in finished.keys() | self._finished.keys():
                done = finished.get(queue, 0) - self._finished.get(queue, 0)
                series = self.history.setdefault(queue, deque(maxlen=HISTORY))
                series.append(max(0, done) / elapsed)
        self._finished = finished
        self._sampled_at = now

    def rate(self, queue: str) -> float | None:
        series = self.history.get(queue)
        return series[-1] if series else self.last_minute_rate(queue)

    def last_minute_rate(self, queue: str) -> float | None:
        """The broker's figure: tasks that succeeded or died per second, last minute."""
        window = self.last_minute.get("window")
        per_queue = self.last_minute.get("queues")
        if not isinstance(window, int | float) or window <= 0 or not isinstance(per_queue, dict):
            return None
        events = per_queue.get(queue) or {}
        done = sum(int(events.get(e) or 0) for e in ("succeeded", "dead"))
        return done / window

    def queue_names(self) -> list[str]:
        """Queues by what needs attention: dead + failed, oldest pending, then name."""
        now_ages = {q: p.created_at for q, p in self.oldest.items()}

        def attention(queue: str) -> tuple[int, float, str]:
            counts = self.counts.get(queue, {})
            troubled = counts.get("dead", 0) + counts.get("failed", 0)
            waiting = now_ages.get(queue) if counts.get("pending") else None
            return (-troubled, waiting if waiting is not None else float("inf"), queue)

        return sorted(self.counts.keys() | self.history.keys(), key=attention)

    # -- stuck work ------------------------------------------------------
    def set_oldest(self, oldest: Mapping[str, Pending | None]) -> None:
        self.oldest = {q: p for q, p in oldest.items() if p is not None}

    def pending_age(self, queue: str, now: float) -> float | None:
        """How long the oldest pending task of ``queue`` has waited (None: none pending)."""
        if queue != "(all)" and not self.counts.get(queue, {}).get("pending"):
            return None
        found = [
            p.created_at
            for q, p in self.oldest.items()
            if (q == queue or queue == "(all)") and self.counts.get(q, {}).get("pending")
        ]
        return max(0.0, now - min(found)) if found else None

    def paused(self, queue: str) -> bool:
        """The queue hands nothing out (``tq queue pause``), as of the last stats poll."""
        return queue in (self.stats.get("paused") or ())

    def capped(self, queue: str) -> bool:
        """A cap on the queue is full (``tq cap``): as many of its tasks run as it allows,
        as of the last stats poll (a rate cap is not judged here)."""
        running = self.counts.get(queue, {}).get("running", 0)
        return any(
            cap.get("kind") == "queue"
            and cap.get("name") == queue
            and cap.get("concurrency") is not None
            and running >= cap["concurrency"]
            for cap in self.stats.get("caps") or ()
        )

    def unserved(self, queue: str) -> str:
        """ "" when a connected worker takes ``queue`` (and its oldest pending task's type);
        else what is missing: "no worker" or "no worker for <type>"."""
        if not self.counts.get(queue, {}).get("pending"):
            return ""
        serving = [
            w.data
            for w in self.workers.values()
            if w.data.get("connected", True) and queue in (w.data.get("queues") or ())
        ]
        if not serving:
            return "no worker"
        oldest = self.oldest.get(queue)
        if oldest is not None and not any(
            w.get("types") is None or oldest.type in w["types"] for w in serving
        ):
            return f"no worker for {oldest.type}"
        return ""

    def worker_types(self, queue: str) -> set[str] | None:
        """Task types some connected worker of ``queue`` handles (None: any type)."""
        types: set[str] = set()
        for w in self.workers.values():
            data = w.data
            if not data.get("connected", True) or queue not in (data.get("queues") or ()):
                continue
            if data.get("types") is None:
                return None
            types.update(data["types"])
        return types

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for counts in self.counts.values():
            for state, n in counts.items():
                out[state] = out.get(state, 0) + n
        return out
