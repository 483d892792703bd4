"""Workers the broker knows: identity, capacity, host stats, liveness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "queues": list(self.queues),
            "types": None if self.types is None else list(self.types),
            "concurrency": self.concurrency,
            "running": self.running,
            "cpu": self.cpu,
            "memory": self.memory,
            "connected": self.connections > 0,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "heartbeat_age": max(0.0, now - self.last_seen),
        }


def _in_range(value: object, lo: float, hi: float) -> bool:
    """A finite int or float (never a bool) within [lo, hi]."""
    return not isinstance(value, bool) and isinstance(value, int | float) and lo <= value <= hi


class WorkerRegistry:
    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}

    def connect(self, info: WorkerInfo, now: float) -> WorkerInfo:
        known = self._workers.get(info.id)
        if known is not None:
            info.connections = known.connections
        info.connections += 1
        info.connected_at = info.last_seen = now
        self._workers[info.id] = info
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

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def __len__(self) -> int:
        return len(self._workers)
