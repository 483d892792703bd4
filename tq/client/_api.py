"""Requests and answers shared by both clients: build a message, parse an ACK.

Each client method is ``call = api.x(...)``, then ``call.parse(await
send(call.message))``. Nothing here does I/O.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tq import PROTOCOL_VERSION, __version__
from tq.core.errors import ConnectionFailed, InvalidRequest, Timeout, error_from_code
from tq.core.task import Task
from tq.core.units import seconds
from tq.tracing import current_carrier

T = TypeVar("T")
MAX_SERVER_WAIT = 60.0


@dataclass(frozen=True)
class Call(Generic[T]):
    message: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next: str | None  # cursor for the following page, None at the end


def raise_for_nack(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("t") == "nack":
        retry_after = reply.get("retry_after")
        raise error_from_code(
            str(reply.get("code", "error")),
            str(reply.get("message", "the broker refused the request")),
            retry_after if isinstance(retry_after, int | float) else None,
        )
    return reply


def hello(kind: str, name: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "t": "hello",
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "name": name or f"{socket.gethostname()}",
        "client": f"tq/{__version__}",
        **(extra or {}),
    }


def _seconds(value: float | str, what: str) -> float:
    try:
        return seconds(value, what)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def task_spec(
    type: str,
    payload: Any = None,
    *,
    queue: str | None = None,
    priority: int | str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    retry_base: float | None = None,
    retry_cap: float | None = None,
    trace: Mapping[str, str] | None = None,
    depends_on: Sequence[str] | None = None,
    on_dependency_failure: str | None = None,
    delay: float | None = None,
    run_at: float | None = None,
    unique_for: float | str | None = None,
    unique_key: str | None = None,
) -> dict[str, Any]:
    """A submission map with only the fields given (the broker fills defaults).
    ``depends_on``: ids of tasks this one waits for (it is blocked until they all
    succeeded); ``on_dependency_failure``: cancel (default), run or wait.
    ``delay`` (seconds from the broker's receipt) and/or ``run_at`` (epoch seconds):
    the task waits in state scheduled until the later of the two.
    ``unique_for``: seconds or a duration ("1h"): while a task of the same key
    (``unique_key``, default: type and payload) in the queue is unfinished, or this
    long after it was submitted, a submit answers its id instead of adding one."""
    spec: dict[str, Any] = {"type": type, "payload": payload}
    optional = {
        "queue": queue,
        "priority": priority,
        "max_retries": max_retries,
        "timeout": timeout,
        "idempotency_key": idempotency_key,
        "retry_base": retry_base,
        "retry_cap": retry_cap,
        "trace": None if trace is None else dict(trace),
        "depends_on": None if depends_on is None else list(depends_on),
        "on_dependency_failure": on_dependency_failure,
        "delay": delay,
        "run_at": run_at,
        "unique_for": None if unique_for is None else _seconds(unique_for, "unique_for"),
        "unique_key": unique_key,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def submit_items(specs: Sequence[Mapping[str, Any]]) -> Call[list[dict[str, Any]]]:
    """Submit; one answer map per task: ``id``, ``created`` and, if any, ``warning``
    (the broker says each warning once per task type; it is copied to that type's tasks)."""
    if not specs:
        raise InvalidRequest("submit_many needs at least one task")
    tasks = [dict(s) for s in specs]
    carrier = current_carrier()  # submitted inside an OpenTelemetry span: carry its context
    if carrier is not None:
        for task in tasks:
            task.setdefault("trace", carrier)

    def parse(reply: dict[str, Any]) -> list[dict[str, Any]]:
        warned = {
            w.get("type"): w.get("message")
            for w in reply.get("warnings") or ()
            if isinstance(w, dict)
        }
        items = [dict(item) for item in reply["tasks"]]
        if warned:
            for spec, item in zip(tasks, items, strict=False):
                message = warned.get(spec.get("type"))
                if message:
                    item["warning"] = message
        return items

    return Call({"t": "submit", "tasks": tasks}, parse)


def submit_many(specs: Sequence[Mapping[str, Any]]) -> Call[list[str]]:
    items = submit_items(specs)
    return Call(items.message, lambda r: [item["id"] for item in items.parse(r)])


def submit_workflow(document: Mapping[str, Any]) -> Call[list[str]]:
    """Submit a workflow document (tq.core.workflow) as one submit; the ids of its
    tasks in the document's order (every task after the ones it depends on)."""
    from tq.core.workflow import compile_workflow

    return submit_many(compile_workflow(document))


def workflow(task_id: str) -> Call[dict[str, Any]]:
    """The tasks linked to ``task_id`` by dependencies and the edges between them."""
    return Call({"t": "query", "q": "workflow", "task": task_id}, lambda r: dict(r["workflow"]))


def _task(reply: dict[str, Any]) -> Task:
    return Task.from_dict(reply["task"])


def get(task_id: str) -> Call[Task]:
    return Call({"t": "query", "q": "get", "task": task_id}, _task)


def cancel(task_id: str) -> Call[Task]:
    return Call({"t": "cancel", "task": task_id}, _task)


def retry(task_id: str) -> Call[Task]:
    return Call({"t": "retry", "task": task_id}, _task)


def list_tasks(
    *,
    state: str | None = None,
    type: str | None = None,
    queue: str | None = None,
    limit: int = 100,
    after: str | None = None,
    newest_first: bool = False,
) -> Call[TaskPage]:
    msg: dict[str, Any] = {"t": "query", "q": "list", "limit": limit}
    if newest_first:
        msg["order"] = "newest"
    for key, value in (("state", state), ("type", type), ("queue", queue), ("after", after)):
        if value is not None:
            msg[key] = value
    return Call(msg, lambda r: TaskPage([Task.from_dict(t) for t in r["tasks"]], r.get("next")))


def explain(task_id: str) -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "explain", "task": task_id}, lambda r: dict(r["explain"]))


def history(task_id: str) -> Call[list[dict[str, Any]]]:
    return Call({"t": "query", "q": "history", "task": task_id}, lambda r: list(r["history"]))


def stats() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "stats"}, lambda r: dict(r["stats"]))


def workers() -> Call[list[dict[str, Any]]]:
    return Call({"t": "query", "q": "workers"}, lambda r: list(r["workers"]))


# -- operator surface -------------------------------------------------------------


def queue_depth() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "depth"}, lambda r: dict(r["depth"]))


def cluster_status() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "health"}, lambda r: dict(r["health"]))


def purge(
    states: Sequence[str], older_than: float, *, limit: int | None = None, dry_run: bool = False
) -> Call[dict[str, Any]]:
    msg: dict[str, Any] = {"t": "purge", "states": list(states), "older_than": older_than}
    if limit is not None:
        msg["limit"] = limit
    if dry_run:
        msg["dry_run"] = True
    return Call(msg, lambda r: {k: r[k] for k in ("purged", "matched", "more")})


def retry_many(state: str, *, limit: int | None = None) -> Call[dict[str, Any]]:
    msg: dict[str, Any] = {"t": "retry_many", "state": state}
    if limit is not None:
        msg["limit"] = limit
    return Call(msg, lambda r: {"retried": list(r["retried"]), "more": bool(r["more"])})


def set_priority(task_id: str, priority: int | str) -> Call[Task]:
    return Call({"t": "set_priority", "task": task_id, "priority": priority}, _task)


def schedule(op: str, **fields: Any) -> Call[dict[str, Any]]:
    """A ``schedule`` request (op: add, list, get, remove, pause, resume, run_now); the
    ACK's fields as they are (``schedule``, ``schedules``, ``created``, ``changed``...)."""
    message = {"t": "schedule", "op": op, **{k: v for k, v in fields.items() if v is not None}}
    return Call(message, lambda r: {k: v for k, v in r.items() if k not in ("t", "id")})


def set_cap(
    kind: str,
    name: str,
    concurrency: int | None = None,
    rate: float | str | None = None,
    burst: float | None = None,
) -> Call[dict[str, Any]]:
    """A ``cap`` set request; the stored cap (kind, name, concurrency, rate, burst)."""
    fields: dict[str, Any] = {"concurrency": concurrency, "rate": rate, "burst": burst}
    message: dict[str, Any] = {"t": "cap", "op": "set", "kind": kind, "name": name}
    message.update({k: v for k, v in fields.items() if v is not None})
    return Call(message, lambda r: dict(r["cap"]))


def remove_cap(kind: str, name: str) -> Call[bool]:
    message = {"t": "cap", "op": "remove", "kind": kind, "name": name}
    return Call(message, lambda r: bool(r["removed"]))


def list_caps() -> Call[list[dict[str, Any]]]:
    return Call({"t": "cap", "op": "list"}, lambda r: list(r["caps"]))


def schedule_task(
    task_type: str,
    payload: Any = None,
    *,
    queue: str | None = None,
    priority: int | str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The task map of a schedule (what each tick submits)."""
    task = {"type": task_type, "payload": payload, "queue": queue, "priority": priority}
    task.update(max_retries=max_retries, timeout=timeout)
    return {k: v for k, v in task.items() if v is not None}


def pause_queue(queue: str, paused: bool = True) -> Call[dict[str, Any]]:
    message = {"t": "queue", "op": "pause" if paused else "resume", "queue": queue}
    return Call(message, lambda r: {k: r[k] for k in ("queue", "paused", "changed")})


# -- live events (docs/PROTOCOL.md: subscribe, event) ---------------------------------

TOPICS = ("tasks", "workers", "counts")
_ENVELOPE = frozenset({"t", "id", "seq", "topic", "time"})


@dataclass(frozen=True)
class Event:
    """One broker event: ``topic`` ("tasks", "workers", "counts" or "lagged") and its
    fields in ``data`` (e.g. ``data["changes"]``); ``seq`` counts the subscription's
    events from 1 (0 for a "lagged" marker made by the client itself)."""

    topic: str
    seq: int
    time: float
    data: dict[str, Any]


def parse_event(msg: Mapping[str, Any]) -> Event:
    seq, when = msg.get("seq"), msg.get("time")
    return Event(
        topic=str(msg.get("topic", "")),
        seq=seq if isinstance(seq, int) else 0,
        time=float(when) if isinstance(when, int | float) else 0.0,
        data={k: v for k, v in msg.items() if k not in _ENVELOPE},
    )


def lagged_marker(msg: Mapping[str, Any], dropped: int) -> dict[str, Any]:
    """The client's own ``lagged`` event: ``dropped`` events were lost before ``msg``
    because the consumer fell behind (the broker's marker has the same shape)."""
    return {
        "t": "event",
        "id": msg.get("id", 0),
        "seq": 0,
        "topic": "lagged",
        "time": msg.get("time", 0.0),
        "dropped": dropped,
        "local": True,
    }


def subscribe(topics: Sequence[str]) -> Call[list[str]]:
    wanted = list(topics)
    return Call({"t": "subscribe", "topics": wanted}, lambda r: list(r.get("topics", wanted)))


def unsubscribe() -> Call[None]:
    return Call({"t": "unsubscribe"}, lambda r: None)


def wait_step(task_id: str, remaining: float | None) -> Call[tuple[Task, bool]]:
    """One server-side wait of at most MAX_SERVER_WAIT; (task, timed_out)."""
    step = MAX_SERVER_WAIT if remaining is None else max(0.0, min(remaining, MAX_SERVER_WAIT))
    return Call(
        {"t": "wait", "task": task_id, "timeout": step},
        lambda r: (Task.from_dict(r["task"]), bool(r.get("timed_out"))),
    )


def wait_timed_out(task: Task, timeout: float | None) -> Timeout:
    return Timeout(
        f"task {task.id} is still {task.state.value} after {timeout:g}s; "
        "wait longer with --timeout or check it with `tq status`"
    )


HANDSHAKE_CLOSED = ("eof occurred", "unexpected eof", "connection reset")


def closed_in_handshake(exc: BaseException) -> bool:
    """The broker closed the connection during the TLS handshake (EOF or reset)."""
    if isinstance(exc, ConnectionResetError | EOFError):
        return True
    text = " ".join(str(p) for p in (getattr(exc, "reason", None), exc) if p).lower()
    return any(n in text for n in HANDSHAKE_CLOSED)


def shutting_down(address: str) -> ConnectionFailed:
    """A broker that dropped a handshake and then refused a new connection is going
    away: say that, not a TLS problem (the worker's log says the same)."""
    return ConnectionFailed(
        f"the broker at {address} is shutting down (it closed the connection during the "
        "TLS handshake and no longer accepts connections); try again once it is back"
    )


def connection_lost(address: str) -> ConnectionFailed:
    return ConnectionFailed(f"connection to the broker at {address} was lost; is it still running?")


def connect_failed(address: str, exc: OSError) -> ConnectionFailed:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ConnectionFailed(
        f"cannot connect to the broker at {address}: {reason}; "
        "is `tq broker` (or `tq up`) running there? set --broker HOST:PORT or TQ_BROKER"
    )


def missing_ca(address: str) -> ConnectionFailed:
    return ConnectionFailed(
        f"no CA certificate to verify the broker at {address}: pass --ca with the "
        "broker's ca.pem (the broker prints its path at start), or --insecure if the "
        "broker runs with --insecure"
    )
