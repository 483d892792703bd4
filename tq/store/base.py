"""The Store interface every backend implements (SQLite now, PostgreSQL later).

Durability contract: when ``submit``, ``complete``, ``cancel`` or ``retry``
returns, the change is committed (and fsynced as the backend's documented
``synchronous`` setting promises). Callers acknowledge to clients only then.

Time is an argument: every method that depends on the clock takes ``now``
(seconds since the epoch, float).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tq.core.task import Lease, ListFilter, Outcome, Task, TaskSpec


@dataclass(frozen=True, slots=True)
class SubmitResult:
    id: str
    created: bool  # False when an idempotency key matched an existing task


@dataclass(frozen=True, slots=True)
class OutcomeResult:
    """What became of one reported outcome."""

    id: str
    accepted: bool  # False: stale/unknown lease token (fencing), task unchanged
    state: str | None  # the task's state after the report (None if unknown id)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StoreStats:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # queue -> state -> n
    path: str = ""
    size_bytes: int = 0
    wal_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    async def submit(self, specs: Sequence[TaskSpec], now: float) -> list[SubmitResult]:
        """Insert tasks as pending; durable when it returns. Idempotency keys dedupe."""
        ...

    async def claim(
        self,
        worker: str,
        queues: Sequence[str],
        types: Sequence[str] | None,
        n: int,
        now: float,
        lease_ttl: float,
    ) -> list[Lease]:
        """Lease up to n pending tasks: highest priority first, then oldest."""
        ...

    async def complete(self, outcomes: Sequence[Outcome], now: float) -> list[OutcomeResult]:
        """Apply worker reports. A token that is not the task's live lease is refused."""
        ...

    async def extend_leases(
        self, worker: str, leases: Sequence[tuple[str, int]], now: float, lease_ttl: float
    ) -> list[str]:
        """Extend the given (id, token) leases; return the ids whose lease is lost."""
        ...

    async def release_expired(self, now: float) -> list[str]:
        """Return running tasks whose lease expired to pending (or dead); their ids."""
        ...

    async def release_worker(self, worker: str, now: float) -> list[str]:
        """Release every lease held by ``worker`` (it is gone); their ids."""
        ...

    async def promote_due(self, now: float) -> int:
        """Move failed/scheduled tasks whose run_at has come to pending."""
        ...

    async def next_due(self) -> float | None:
        """The earliest run_at among failed/scheduled tasks, or None."""
        ...

    async def cancel(self, task_id: str, now: float) -> Task:
        """Cancel a pending/failed/scheduled/running task. NotFound, InvalidTransition."""
        ...

    async def retry(self, task_id: str, now: float) -> Task:
        """Send a failed/dead/cancelled task back to pending."""
        ...

    async def get(self, task_id: str) -> Task:
        """NotFound if there is no such task."""
        ...

    async def list(self, flt: ListFilter) -> list[Task]:
        """Tasks matching the filter, in insertion order, after the cursor task ``flt.after``.

        Insertion order is id order for ids from one broker's clock. ``limit``
        must be 1..10000 and ``after`` an existing task id (else InvalidRequest).
        """
        ...

    async def stats(self) -> StoreStats: ...

    async def aclose(self) -> None: ...
