"""Who may do what: the one table of roles, and the principal a session acts as.

``ALLOWED`` maps an action (a request type, or ``query:<q>`` and
``keys:<op>`` for requests with kinds) to the roles that may perform it.
The broker session checks it before dispatching a request; REST routes
check the same table. An action missing from the table is refused to
every role but admin (fail closed). Queue limits (a key restricted to some
queues) are checked by the broker's service layer with
``Principal.check_queue``, because only it knows which queue a task is in.

    producer  submit; read, wait for, cancel and re-prioritise tasks (of its queues)
    worker    hello as a worker, claim, result, heartbeat (from its queues)
    reader    read-only queries, wait and live events
    admin     everything, including key management and the audit log
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tq.core.auth import ApiKey
from tq.core.errors import Forbidden

if TYPE_CHECKING:
    from tq.protocol.schema import Request

_READ = frozenset({"admin", "producer", "reader"})
_WORK = frozenset({"admin", "worker"})
_ADMIN = frozenset({"admin"})

ALLOWED: dict[str, frozenset[str]] = {
    "hello:worker": _WORK,
    "submit": frozenset({"admin", "producer"}),
    "claim": _WORK,
    "result": _WORK,
    "heartbeat": _WORK,
    "query:get": _READ,
    "query:list": _READ,
    "query:stats": _READ,
    "query:workers": _READ,
    "query:depth": _READ,  # operator surface
    "query:health": _READ,
    "query:explain": _READ,  # why a task is not running (tq/broker/explain.py)
    "query:workflow": _READ,  # the tasks linked to one by dependencies
    "query:history": _READ,  # every transition of a task (tq/store/history_sql.py)
    "wait": _READ,
    "subscribe": _READ,  # live events (tq/broker/events.py)
    "unsubscribe": _READ,
    "cancel": frozenset({"admin", "producer"}),
    "set_priority": frozenset({"admin", "producer"}),
    "retry": _ADMIN,
    "retry_many": _ADMIN,  # operator bulk actions
    "queue:pause": _ADMIN,  # a paused queue hands nothing out
    "queue:resume": _ADMIN,
    "schedule:list": _READ,  # recurring schedules (tq/broker/schedules.py)
    "schedule:get": _READ,
    "schedule:add": _ADMIN,
    "schedule:remove": _ADMIN,
    "schedule:pause": _ADMIN,
    "schedule:resume": _ADMIN,
    "schedule:run_now": _ADMIN,
    "cap:list": _READ,  # concurrency and rate caps (tq/broker/caps.py)
    "cap:set": _ADMIN,
    "cap:remove": _ADMIN,
    "purge": _ADMIN,
    "keys:create": _ADMIN,
    "keys:list": _ADMIN,
    "keys:revoke": _ADMIN,
    "audit": _ADMIN,
}


# Actions that cannot be narrowed to a key's queues: refused to queue-limited keys.
QUEUE_BLIND = frozenset({"subscribe"})  # live events cover every queue


def action_of(msg: Request) -> str:
    """The ``ALLOWED`` key of a typed request (tq/protocol/schema.py)."""
    kind = msg.t
    if kind == "query":
        return f"query:{getattr(msg, 'q', None)}"
    if kind in ("keys", "queue", "schedule", "cap"):
        return f"{kind}:{getattr(msg, 'op', None)}"
    if kind == "hello":
        return "hello:worker" if getattr(msg, "kind", None) == "worker" else "hello"
    return kind


def allowed(role: str, action: str) -> bool:
    if action == "hello" or role == "admin":
        return True
    return role in ALLOWED.get(action, _ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity a session (or REST request) acts as."""

    key_id: str
    name: str
    role: str
    queues: frozenset[str] | None  # None: every queue

    @classmethod
    def of(cls, key: ApiKey) -> Principal:
        queues = None if key.queues is None else frozenset(key.queues)
        return cls(key.id, key.name, key.role, queues)

    def authorize(self, action: str) -> None:
        """Forbidden unless this principal's role may perform ``action``."""
        if not allowed(self.role, action):
            may = sorted(a for a, roles in ALLOWED.items() if self.role in roles)
            raise Forbidden(
                f"key {self.key_id} ({self.role}) may not {action.replace(':', ' ')}; "
                f"a {self.role} key may: {', '.join(may)}"
            )
        if action in QUEUE_BLIND and self.queues is not None:
            raise Forbidden(
                f"key {self.key_id} is limited to some queues, and {action} would show "
                "every queue: use a key without --queues"
            )

    def may_use(self, queue: str) -> bool:
        return self.queues is None or queue in self.queues

    def check_queue(self, queue: str) -> None:
        if not self.may_use(queue):
            raise Forbidden(
                f"key {self.key_id} is limited to queue(s) {', '.join(sorted(self.queues or ()))}"
                f", not {queue!r}"
            )

    def check_queues(self, queues: Iterable[str]) -> None:
        for queue in queues:
            self.check_queue(queue)
