"""How long finished tasks are kept: a time to live per finished state, per queue.

Contract: pure (no I/O, no clock); imports only tq.core. The broker deletes a
task (with its result) once it has been ``succeeded``, ``dead`` or ``cancelled``
for longer than its TTL; a TTL of 0 keeps such tasks forever. Unfinished tasks
have no TTL at all.

    policy = RetentionPolicy.of({"succeeded": 7 * DAY, "dead": 30 * DAY},
                                {("reports", "succeeded"): DAY})
    policy.ttl("reports", "succeeded") -> 86400.0   (the queue's own)
    policy.ttl("mail", "succeeded")    -> 604800.0  (the default)
    policy.ttl("mail", "cancelled")    -> 0.0       (kept forever)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tq.core.errors import InvalidRequest
from tq.core.states import State

DAY = 86400.0
FINISHED = (State.SUCCEEDED.value, State.DEAD.value, State.CANCELLED.value)
DEFAULT_TTLS = {"succeeded": 7 * DAY, "dead": 30 * DAY, "cancelled": 7 * DAY}


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """TTLs in seconds (0: forever): ``defaults`` per state, ``queues`` per (queue, state)."""

    defaults: tuple[tuple[str, float], ...] = ()
    queues: tuple[tuple[str, str, float], ...] = ()

    @classmethod
    def of(
        cls, defaults: Mapping[str, float], queues: Mapping[tuple[str, str], float] | None = None
    ) -> RetentionPolicy:
        for state in [*defaults, *(s for _, s in queues or {})]:
            if state not in FINISHED:
                raise InvalidRequest(
                    f"retention applies to finished states ({', '.join(FINISHED)}), not {state!r}"
                )
        for ttl in [*defaults.values(), *(queues or {}).values()]:
            if not 0 <= ttl < float("inf"):
                raise InvalidRequest(f"a retention TTL must be >= 0 seconds, not {ttl!r}")
        return cls(
            tuple(sorted(defaults.items())),
            tuple(sorted((q, s, t) for (q, s), t in (queues or {}).items())),
        )

    def ttl(self, queue: str, state: str) -> float:
        """Seconds a task of ``queue`` is kept once in ``state`` (0: forever)."""
        for q, s, t in self.queues:
            if q == queue and s == state:
                return t
        for s, t in self.defaults:
            if s == state:
                return t
        return 0.0

    @property
    def active(self) -> bool:
        """Whether any task can ever expire."""
        return any(t > 0 for _, t in self.defaults) or any(t > 0 for *_, t in self.queues)
