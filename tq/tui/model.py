"""What the console knows about the broker, kept from snapshots and live events.

Pure: no Textual, no sockets; time is an argument (``now``, seconds since the
epoch on the console's clock). The app feeds it (``connected``,
``apply_event``, ``apply_stats``, ``apply_workers``, ``sample``) and the
screens read it.

Throughput is derived from the counts the broker pushes: every SAMPLE_SECONDS
the console records, per queue, how many tasks have finished (succeeded +
dead + cancelled) and keeps the rate since the previous sample, HISTORY
samples long. Counts are recounts, so the rates heal after a lagged spell.
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
    at: float
    message: str | None = None  # filled in by a later `get` (None: not fetched yet)


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
    failures: deque[Failure] = field(default_factory=lambda: deque(maxlen=FAILURES_KEPT))
    history: dict[str, deque[float]] = field(default_factory=dict)
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
        """A (re)connection's snapshot: hello ACK, stats, workers, tasks failing now."""
        self.link = LinkStatus(connected=True, connecting=False, since=now)
        self.server = dict(server)
        self.apply_stats(stats, now)
        self.apply_workers(workers, now)
        for task in sorted(failed, key=lambda t: t.started_at or t.created_at):
            self._failed(
                {"id": task.id, "type": task.type, "queue": task.queue, "to": task.state.value},
                task.started_at or task.created_at,
            )
            if task.error is not None:
                self.note_error(task.id, f"{task.error.type}: {task.error.message}")
        self._finished = None  # a fresh baseline: no spike for the time we were away
        self._sampled_at = None

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
            for change in data.get("changes") or ():
                if change.get("to") in FAILED:
                    self._failed(change, now)
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
        for old in list(self.failures):
            if old.id == task_id:  # one row per task: the latest failure
                self.failures.remove(old)
        self.failures.appendleft(
            Failure(task_id, change.get("type"), change.get("queue"), str(change["to"]), at)
        )

    def note_error(self, task_id: str, message: str) -> None:
        for failure in self.failures:
            if failure.id == task_id:
                failure.message = message

    def unexplained_failures(self, limit: int) -> list[str]:
        """Ids of the newest failures whose error message is not fetched yet."""
        return [f.id for f in list(self.failures)[:limit] if f.message is None]

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
        return series[-1] if series else None

    def queue_names(self) -> list[str]:
        return sorted(self.counts.keys() | self.history.keys())

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for counts in self.counts.values():
            for state, n in counts.items():
                out[state] = out.get(state, 0) + n
        return out
