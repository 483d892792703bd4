r"""Task states and their legal transitions: the one table that owns them.

    submit ──> pending ──claim──> running ──succeed──> succeeded
                 ^  \               │  \──fail (attempts left)──> failed ──due──> pending
                 │   \              │   \─fail (none left)/reject─> dead
                 │    \─cancel──>   │    \─lease expired──> pending (or dead when none left)
                 │     cancelled <──┴─cancel
    scheduled ──due──> pending          blocked ──deps done──> pending

``failed`` is "the last attempt failed and a retry is due at run_at";
``dead`` is terminal (the dead-letter state); ``tq retry`` sends failed/dead
tasks back to pending. Nothing outside this module decides whether a state
change is legal: the store asks ``next_state`` before every write.
"""

from __future__ import annotations

from enum import StrEnum

from tq.core.errors import InvalidTransition


class State(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    SCHEDULED = "scheduled"
    BLOCKED = "blocked"


class Event(StrEnum):
    CLAIM = "claim"
    SUCCEED = "succeed"
    FAIL_RETRY = "fail_retry"  # failed, attempts left: wait for backoff
    FAIL_FINAL = "fail_final"  # failed with no attempts left, or rejected: dead
    LEASE_EXPIRED_RETRY = "lease_expired_retry"
    LEASE_EXPIRED_FINAL = "lease_expired_final"
    DUE = "due"  # a failed/scheduled task's run_at has come
    UNBLOCK = "unblock"
    UNBLOCK_LATER = "unblock_later"  # dependencies done, the task's own due time not yet
    RELEASE = "release"  # a worker gives a lease back unrun (shutdown): attempt not counted
    CANCEL = "cancel"
    RETRY = "retry"  # operator: send a failed/dead/cancelled task back to pending


TERMINAL: frozenset[State] = frozenset({State.SUCCEEDED, State.DEAD, State.CANCELLED})

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PENDING, Event.CLAIM): State.RUNNING,
    (State.PENDING, Event.CANCEL): State.CANCELLED,
    (State.RUNNING, Event.SUCCEED): State.SUCCEEDED,
    (State.RUNNING, Event.FAIL_RETRY): State.FAILED,
    (State.RUNNING, Event.FAIL_FINAL): State.DEAD,
    (State.RUNNING, Event.LEASE_EXPIRED_RETRY): State.PENDING,
    (State.RUNNING, Event.LEASE_EXPIRED_FINAL): State.DEAD,
    (State.RUNNING, Event.RELEASE): State.PENDING,
    (State.RUNNING, Event.CANCEL): State.CANCELLED,
    (State.FAILED, Event.DUE): State.PENDING,
    (State.FAILED, Event.CANCEL): State.CANCELLED,
    (State.FAILED, Event.RETRY): State.PENDING,
    (State.DEAD, Event.RETRY): State.PENDING,
    (State.CANCELLED, Event.RETRY): State.PENDING,
    (State.SCHEDULED, Event.DUE): State.PENDING,
    (State.SCHEDULED, Event.CANCEL): State.CANCELLED,
    (State.BLOCKED, Event.UNBLOCK): State.PENDING,
    (State.BLOCKED, Event.UNBLOCK_LATER): State.SCHEDULED,
    (State.BLOCKED, Event.CANCEL): State.CANCELLED,
}


_CANNOT = {  # what an operator reads when a request does not apply
    Event.CANCEL: "cannot be cancelled: only pending, blocked, scheduled, failed or running "
    "tasks can",
    Event.RETRY: "cannot be retried: only failed, dead or cancelled tasks can",
    Event.SUCCEED: "cannot succeed: it is not running",
    Event.FAIL_RETRY: "cannot fail: it is not running",
    Event.FAIL_FINAL: "cannot fail: it is not running",
    Event.RELEASE: "cannot be released: it is not running",
}


def next_state(state: State | str, event: Event) -> State:
    """The state after ``event`` in ``state``; InvalidTransition if illegal."""
    current = State(state)
    try:
        return TRANSITIONS[(current, event)]
    except KeyError:
        cannot = _CANNOT.get(event, f"cannot {event.value}")
        raise InvalidTransition(f"a {current.value} task {cannot}") from None


def sources(event: Event) -> frozenset[State]:
    """Every state from which ``event`` is legal (for the store's WHERE clauses)."""
    return frozenset(s for (s, e) in TRANSITIONS if e is event)


def is_terminal(state: State | str) -> bool:
    return State(state) in TERMINAL
