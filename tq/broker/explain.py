"""Why a task is not running right now: ``explain`` (pure: no I/O).

The service gathers the facts (the task, how many pending tasks of its queue a
claim takes first, the workers this broker knows) and this module turns them
into reasons, most telling first. Each reason is a map with a ``code``, a
``message`` in words and the facts behind it, so a script can act on the code
and a person can read the message:

==================  ==========================================================
code                when
==================  ==========================================================
``finished``        succeeded, dead or cancelled: it will not run again
                    unless retried
``running``         leased to a worker now (``worker``, ``since``,
                    ``heartbeat_age``, ``lease_expires_at``)
``worker_silent``   that worker has not sent a heartbeat for longer than
                    half a lease: its lease may expire and the task be retried
``scheduled``       waits until ``due`` (a delayed task)
``retry_due``       attempt ``attempts`` failed; pending again at ``due``
``blocked``         waits for other tasks to finish first (``waiting_for``:
                    the ids of its dependencies not met yet)
``paused``          its queue is paused (``queue``, ``since``): nothing in it
                    is handed out until it is resumed
``no_worker``       no connected worker takes its queue
``no_handler``      workers take its queue, none handles its type
``capped``          its queue's or type's concurrency cap is full (``kind``,
                    ``name``, ``running``, ``concurrency``)
``rate_capped``     its queue's or type's rate bucket is empty (``kind``,
                    ``name``, ``rate``, ``due``: when it holds a token again)
``workers_busy``    every worker that could run it is running as many tasks
                    as its concurrency allows
``behind``          ``higher`` pending tasks of higher priority and ``older``
                    older ones of its priority come first in its queue
``next``            nothing ahead of it: a free worker claims it next
==================  ==========================================================

Only what this broker knows of workers is used (a worker connected to
another broker on the same PostgreSQL store is not seen here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tq.broker.caps import rate_text
from tq.broker.registry import WorkerInfo
from tq.core.task import Task
from tq.protocol.answers import Explanation
from tq.store.claimplan import Cap

SILENT_FRACTION = 0.5  # of the lease: a heartbeat older than this is worth saying


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "at an unknown time"
    delta = at - now
    if abs(delta) < 1:
        return "now"
    span = _span(abs(delta))
    return f"in {span}" if delta > 0 else f"{span} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def explain(
    task: Task,
    ahead: tuple[int, int] | None,
    ahead_limit: int,
    workers: Sequence[WorkerInfo],
    now: float,
    lease_ttl: float,
    paused_at: float | None = None,
    unmet: Sequence[str] | None = None,
    caps: Sequence[tuple[Cap, int]] = (),
) -> Explanation:
    """The answer of ``query explain`` (its task, state and reasons, most telling first);
    ``paused_at``: when the task's queue was paused (None: it is not); ``unmet``: a
    blocked task's dependencies not met yet; ``caps``: the caps of its queue and type,
    each with the running count of what it caps (counted up to its concurrency)."""
    reasons: list[dict[str, Any]] = []
    state = str(task.state)
    if paused_at is not None and state in ("pending", "scheduled", "failed", "blocked"):
        reasons.append(
            {
                "code": "paused",
                "message": f"queue {task.queue!r} is paused (since {_when(paused_at, now)}): "
                f"nothing in it is handed out until `tq queue resume {task.queue}`",
                "queue": task.queue,
                "since": paused_at,
            }
        )
    if state in ("succeeded", "dead", "cancelled"):
        verb = "ended " if state != "succeeded" else ""
        ended = f"it {verb}{state} {_when(task.finished_at, now)}"
        detail = ""
        if task.error is not None and state == "dead":
            detail = f" ({task.error.type}: {task.error.message})"
        reasons.append(
            {
                "code": "finished",
                "message": f"{ended} after {task.attempts} attempt(s){detail}; "
                "`tq retry` sends it back to pending",
                "finished_at": task.finished_at,
            }
        )
    elif state == "running":
        reasons.extend(_running(task, workers, now, lease_ttl))
    elif state == "scheduled":
        reasons.append(
            {
                "code": "scheduled",
                "message": f"scheduled: it becomes pending {_when(task.run_at, now)}",
                "due": task.run_at,
            }
        )
    elif state == "failed":
        why = "" if task.error is None else f" ({task.error.type}: {task.error.message})"
        reasons.append(
            {
                "code": "retry_due",
                "message": f"attempt {task.attempts} failed{why}; it is retried "
                f"{_when(task.run_at, now)}",
                "due": task.run_at,
                "attempts": task.attempts,
            }
        )
    elif state == "blocked":
        waiting = list(unmet or ())
        more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        shown = ", ".join(waiting[:5]) + more
        message = "it waits for other tasks to finish first" + (f": {shown}" if waiting else "")
        reasons.append({"code": "blocked", "message": message, "waiting_for": waiting})
    elif state == "pending":
        reasons.extend(_capped(caps, now))
        reasons.extend(_pending(task, ahead, ahead_limit, workers, bool(reasons)))
    return Explanation(task=task.id, state=state, reasons=reasons)


def _running(
    task: Task, workers: Sequence[WorkerInfo], now: float, lease_ttl: float
) -> list[dict[str, Any]]:
    worker = next((w for w in workers if w.id == task.worker), None)
    age = None if worker is None else max(0.0, now - worker.last_seen)
    where = task.worker if worker is None else f"{worker.name} on {worker.host or '?'}"
    out: list[dict[str, Any]] = [
        {
            "code": "running",
            "message": f"it is running: leased to worker {where} since "
            f"{_when(task.started_at, now)}"
            + ("" if age is None else f", last heartbeat {_span(age)} ago"),
            "worker": task.worker,
            "since": task.started_at,
            "heartbeat_age": age,
        }
    ]
    if worker is None or (age is not None and age > lease_ttl * SILENT_FRACTION):
        out.append(
            {
                "code": "worker_silent",
                "message": f"worker {task.worker} "
                + ("is not known to this broker" if worker is None else "has been silent")
                + ": if its lease expires the task goes back to its queue (or dies, "
                "with no attempts left)",
                "worker": task.worker,
            }
        )
    return out


def _capped(caps: Sequence[tuple[Cap, int]], now: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for cap, running in caps:
        what = f"{cap.kind} {cap.name!r}"
        if cap.concurrency is not None and running >= cap.concurrency:
            out.append(
                {
                    "code": "capped",
                    "message": f"concurrency cap of {what} is full: {running} running of "
                    f"{cap.concurrency} at most; it is claimed when one of them ends",
                    "kind": cap.kind,
                    "name": cap.name,
                    "running": running,
                    "concurrency": cap.concurrency,
                }
            )
        if cap.rate is not None and cap.refilled(now) < 1:
            due = cap.next_token_at(now)
            out.append(
                {
                    "code": "rate_capped",
                    "message": f"rate cap of {what} ({rate_text(cap.rate)}) has no token left: "
                    f"the next one is due {_when(due, now)}",
                    "kind": cap.kind,
                    "name": cap.name,
                    "rate": cap.rate,
                    "due": due,
                }
            )
    return out


def _pending(
    task: Task,
    ahead: tuple[int, int] | None,
    ahead_limit: int,
    workers: Sequence[WorkerInfo],
    held: bool = False,
) -> list[dict[str, Any]]:
    """``held``: a reason before these (a pause, a cap) holds the task back."""
    out: list[dict[str, Any]] = []
    connected = [w for w in workers if w.connections > 0]
    serving = [w for w in connected if task.queue in w.queues]
    able = [w for w in serving if w.types is None or task.type in w.types]
    if not serving:
        out.append(
            {
                "code": "no_worker",
                "message": f"no connected worker takes queue {task.queue!r}: start one "
                f"(`tq worker --queues {task.queue}`)",
                "queue": task.queue,
            }
        )
    elif not able:
        out.append(
            {
                "code": "no_handler",
                "message": f"{len(serving)} connected worker(s) take queue {task.queue!r} "
                f"but none handles type {task.type!r}",
                "queue": task.queue,
                "type": task.type,
            }
        )
    elif all(w.running >= w.concurrency > 0 for w in able):
        used = sum(w.running for w in able)
        slots = sum(w.concurrency for w in able)
        out.append(
            {
                "code": "workers_busy",
                "message": f"every worker that can run it is busy ({used} of {slots} slots in use)",
                "running": used,
                "slots": slots,
            }
        )
    if ahead is not None:
        higher, older = ahead
        if higher or older:

            def count(n: int) -> str:
                return f"at least {n}" if n >= ahead_limit else str(n)

            out.append(
                {
                    "code": "behind",
                    "message": f"waiting behind {count(higher)} pending task(s) of higher "
                    f"priority and {count(older)} older one(s) of priority {task.priority} "
                    f"in queue {task.queue!r}",
                    "higher": higher,
                    "older": older,
                    "at_least": higher >= ahead_limit or older >= ahead_limit,
                }
            )
        elif not out and not held:
            out.append(
                {"code": "next", "message": "nothing is ahead of it: a free worker claims it next"}
            )
    return out
