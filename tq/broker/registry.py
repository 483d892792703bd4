"""Workers the broker knows: identity, capacity, host stats, liveness.

A worker id belongs to the API key that registered it (``WorkerInfo.key_id``)
for as long as the broker knows the worker: a hello with another key that
reuses the id is refused (``Forbidden``), so one worker key cannot take over
another's registry entry. The binding ends when the worker has been silent
long enough to be forgotten (``expire``), or when its key is no longer
active (revoked, expired: ``connect``'s ``active`` says), so rotating a
worker's key needs no wait once the old key is revoked.

Several brokers (a store with a ``cluster``): this registry is what this
broker knows, not the cluster's truth. The workers that said something to
this broker (hello, heartbeat, claim, report) since the last beat are handed
to the store (``take_beats``), which writes them as rows with the database's
clock; only the cluster's leader decides from those rows that a worker is
lost and releases its leases. ``expire`` here then only forgets a worker this
broker no longer hears from (it may heartbeat to another broker).

Who sees what: ``visible(may_use)`` and ``to_map(now, may_use)`` narrow the
list to the workers serving a queue a key may use, and each worker's queues
to those queues.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tq.core.errors import Forbidden
from tq.protocol.answers import WorkerMap
from tq.store.base import WorkerBeat

QueueFilter = Callable[[str], bool] | None  # a key's queue predicate; None: every queue


@dataclass
class WorkerInfo:
    id: str
    name: str
    host: str = ""
    pid: int = 0
    queues: tuple[str, ...] = ()
    types: tuple[str, ...] | None = None
    concurrency: int = 0
    running: int = 0
    cpu: float | None = None
    memory: int | None = None
    connected_at: float = 0.0
    last_seen: float = 0.0
    connections: int = 0
    key_id: str | None = None  # the API key that registered this worker id (None: no auth)

    def serves(self, may_use: QueueFilter) -> bool:
        return may_use is None or any(may_use(q) for q in self.queues)

    def to_map(
        self, now: float, may_use: QueueFilter = None, listed: int | None = None
    ) -> WorkerMap:
        """The worker as an answer lists it: the queues ``may_use`` accepts; with
        ``listed``, at most that many queues and types (``queues_total`` and
        ``types_total`` then say how many there are)."""
        queues = [q for q in self.queues if may_use is None or may_use(q)]
        types = None if self.types is None else list(self.types)
        queues_total = types_total = None
        if listed is not None:
            if len(queues) > listed:
                queues_total, queues = len(queues), queues[:listed]
            if types is not None and len(types) > listed:
                types_total, types = len(types), types[:listed]
        return WorkerMap(
            id=self.id,
            name=self.name,
            host=self.host,
            pid=self.pid,
            queues=queues,
            types=types,
            concurrency=self.concurrency,
            running=self.running,
            cpu=self.cpu,
            memory=self.memory,
            connected=self.connections > 0,
            connected_at=self.connected_at,
            last_seen=self.last_seen,
            heartbeat_age=max(0.0, now - self.last_seen),
            queues_total=queues_total,
            types_total=types_total,
        )


def _beat(info: WorkerInfo) -> WorkerBeat:
    facts = {
        "name": info.name,
        "host": info.host,
        "pid": info.pid,
        "queues": list(info.queues),
        "types": None if info.types is None else list(info.types),
        "concurrency": info.concurrency,
        "running": info.running,
    }
    return WorkerBeat(info.id, info.key_id, facts)


def _in_range(value: object, lo: float, hi: float) -> bool:
    """A finite int or float (never a bool) within [lo, hi]."""
    return not isinstance(value, bool) and isinstance(value, int | float) and lo <= value <= hi


class WorkerRegistry:
    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._heard: set[str] = set()  # ids heard from since the last take_beats

    def take_beats(self) -> list[WorkerBeat]:
        """The workers heard from since the last call (for the cluster's workers rows)."""
        heard, self._heard = self._heard, set()
        return [_beat(self._workers[i]) for i in sorted(heard) if i in self._workers]

    def connect(
        self, info: WorkerInfo, now: float, active: Callable[[str], bool] | None = None
    ) -> WorkerInfo:
        """Register (or re-register) a worker; Forbidden if its id belongs to another key
        (one that ``active`` says is still active, if given)."""
        known = self._workers.get(info.id)
        if (
            known is not None
            and known.key_id != info.key_id
            and (known.key_id is None or active is None or active(known.key_id))
        ):
            raise Forbidden(
                f"worker id {info.id!r} is in use by a worker with another API key; give this "
                "worker its own id (--name), or revoke the other key (rotating keys: revoke "
                "the old one before restarting the worker with the new one)"
            )
        if known is not None:
            info.connections = known.connections
        info.connections += 1
        info.connected_at = info.last_seen = now
        self._workers[info.id] = info
        self._heard.add(info.id)
        return info

    def disconnect(self, worker_id: str) -> None:
        info = self._workers.get(worker_id)
        if info is not None:
            info.connections = max(0, info.connections - 1)

    def seen(self, worker_id: str, now: float, stats: dict[str, Any] | None = None) -> None:
        info = self._workers.get(worker_id)
        if info is None:
            return
        info.last_seen = now
        self._heard.add(worker_id)
        if stats:
            # host facts a worker reports: kept only when finite and in range, so a
            # NaN or a huge value never reaches a reader (JSON has no NaN)
            cpu, mem, running = stats.get("cpu"), stats.get("memory"), stats.get("running")
            if _in_range(cpu, 0.0, 1e6):
                info.cpu = float(cpu)  # type: ignore[arg-type]
            if _in_range(mem, 0, 2**63 - 1) and isinstance(mem, int):
                info.memory = mem
            if _in_range(running, 0, 2**31 - 1) and isinstance(running, int):
                info.running = running

    def expire(self, now: float, timeout: float) -> list[str]:
        """Forget workers silent for longer than ``timeout``; their ids."""
        gone = [w.id for w in self._workers.values() if now - w.last_seen > timeout]
        for worker_id in gone:
            del self._workers[worker_id]
        return gone

    def all(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda w: w.id)

    def visible(self, may_use: QueueFilter) -> list[WorkerInfo]:
        """The workers serving at least one queue ``may_use`` accepts (all if None)."""
        return [w for w in self.all() if w.serves(may_use)]

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def __len__(self) -> int:
        return len(self._workers)
