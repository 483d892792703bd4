"""Requests and answers shared by both clients: build a message, parse an ACK.

Each client method is ``call = api.x(...)``, then ``call.parse(await
send(call.message))``. Nothing here does I/O.

Answers are read through their declarations (tq/protocol/answers.py): ``parse``
converts the ACK into the Struct its request declares, strictly, before the
method reads it, so a malformed answer (a broker of another version, or
something posing as one) fails there with ``BadAnswer`` naming the field, not
with a KeyError deep inside. Methods then return what docs/PYTHON.md promises:
``Task`` objects, ids, and plain maps (``plain``) for the rest.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import msgspec

from tq import PROTOCOL_VERSION, __version__
from tq.core.errors import ConnectionFailed, InvalidRequest, Timeout, error_from_code
from tq.core.states import State
from tq.core.task import Task, TaskError
from tq.core.units import seconds
from tq.protocol import answers
from tq.protocol.frames import unpack
from tq.tracing import current_carrier

T = TypeVar("T")
MAX_SERVER_WAIT = 60.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and how to read its answer: ``read`` takes the declared answer
    Struct (``answers.ANSWERS``) of the request."""

    message: dict[str, Any]
    read: Callable[[Any], T]

    def parse(self, reply: Reply) -> T:
        """The ACK's fields, checked against the request's declared answer, as ``read``
        gives them; BadAnswer if the ACK does not fit. An ``AnswerBody`` is decoded
        straight into that declaration; a map (a large frame, a resent submit's
        rewritten answer) is converted."""
        t = str(self.message["t"])
        sub = self.message.get(answers.SUB_FIELD.get(t, ""))
        kind = answers.ANSWERS.get(answers.answer_key(t, sub))
        if kind is None:
            raise answers.BadAnswer(f"no answer is declared for {t} {sub!r}")
        return self.read(read_reply(reply, kind))


S = TypeVar("S", bound=msgspec.Struct)


def read_reply(reply: Reply, kind: type[S]) -> S:
    """An ACK as its declared answer ``kind``: an ``AnswerBody`` decoded straight into
    it, a map converted; BadAnswer naming the field if it does not fit."""
    if type(reply) is AnswerBody:
        return answers.decode_answer(reply.body, kind)
    return answers.convert_answer(reply, kind)


@dataclass(frozen=True, slots=True)
class AnswerBody:
    """An ACK's msgpack body, read no further than its envelope (``t``, ``id``): the
    request it answers knows its declaration, and ``Call.parse`` decodes the bytes
    straight into it (no map in between)."""

    body: bytes


Reply = dict[str, Any] | AnswerBody  # what a shell's exchange gives ``Call.parse``


def reply_map(reply: Reply) -> dict[str, Any]:
    """A reply as a plain map (what ``request`` returns; a resent submit's rewriting)."""
    if type(reply) is not AnswerBody:
        return reply  # type: ignore[return-value]
    obj = unpack(reply.body)
    if not isinstance(obj, dict):  # the envelope was read from it: never
        raise answers.BadAnswer("malformed answer from the broker: not a map")
    return obj


def plain(value: Any) -> Any:
    """A declared answer (or part of one) as plain maps and lists, values as they
    came (bytes stay bytes)."""
    return msgspec.to_builtins(value, builtin_types=(bytes, bytearray, memoryview))


def task_of(m: answers.TaskMap) -> Task:
    """A task answer map as a ``Task``."""
    error = m.error
    try:
        state = State(m.state)
    except ValueError:
        raise answers.BadAnswer(
            f"the broker sent task {m.id} in unknown state {m.state!r}"
        ) from None
    return Task(
        id=m.id,
        type=m.type,
        queue=m.queue,
        payload=m.payload,
        priority=m.priority,
        state=state,
        attempts=m.attempts,
        max_retries=m.max_retries,
        timeout=m.timeout,
        retry_base=m.retry_base,
        retry_cap=m.retry_cap,
        created_at=m.created_at,
        started_at=m.started_at,
        finished_at=m.finished_at,
        run_at=m.run_at,
        worker=m.worker,
        result=m.result,
        error=None if error is None else TaskError(error.type, error.message, error.traceback),
        idempotency_key=m.idempotency_key,
        trace=m.trace,
        progress=m.progress,
        progress_message=m.progress_message,
    )


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next: str | None  # cursor for the following page, None at the end


def raise_for_nack(reply: dict[str, Any]) -> dict[str, Any]:
    """The ACK; a NACK (checked against its declaration) raised as its TQError."""
    if reply.get("t") == "nack":
        raise_nack(answers.convert_answer(reply, answers.Nack))
    return reply


def raise_nack(nack: answers.Nack) -> NoReturn:
    """A NACK as its TQError."""
    raise error_from_code(nack.code, nack.message, nack.retry_after)


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

    def parse(reply: answers.SubmitAnswer) -> list[dict[str, Any]]:
        warned = {w.type: w.message for w in reply.warnings}
        items: list[dict[str, Any]] = [{"id": t.id, "created": t.created} for t in reply.tasks]
        if warned:
            for spec, item in zip(tasks, items, strict=False):
                message = warned.get(str(spec.get("type")))
                if message:
                    item["warning"] = message
        return items

    return Call({"t": "submit", "tasks": tasks}, parse)


def submit_many(specs: Sequence[Mapping[str, Any]]) -> Call[list[str]]:
    items = submit_items(specs)
    return Call(items.message, lambda r: [item["id"] for item in items.read(r)])


def submit_workflow(document: Mapping[str, Any]) -> Call[list[str]]:
    """Submit a workflow document (tq.core.workflow) as one submit; the ids of its
    tasks in the document's order (every task after the ones it depends on)."""
    from tq.core.workflow import compile_workflow

    return submit_many(compile_workflow(document))


def workflow(task_id: str) -> Call[dict[str, Any]]:
    """The tasks linked to ``task_id`` by dependencies and the edges between them."""
    return Call({"t": "query", "q": "workflow", "task": task_id}, lambda r: plain(r.workflow))


def _task(reply: answers.TaskAnswer) -> Task:
    return task_of(reply.task)


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
    return Call(msg, lambda r: TaskPage([task_of(t) for t in r.tasks], r.next))


def explain(task_id: str) -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "explain", "task": task_id}, lambda r: plain(r.explain))


def history(task_id: str) -> Call[list[dict[str, Any]]]:
    return Call({"t": "query", "q": "history", "task": task_id}, lambda r: plain(r.history))


def stats() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "stats"}, lambda r: plain(r.stats))


def workers() -> Call[list[dict[str, Any]]]:
    return Call({"t": "query", "q": "workers"}, lambda r: plain(r.workers))


# -- operator surface -------------------------------------------------------------


def queue_depth() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "depth"}, lambda r: plain(r.depth))


def cluster_status() -> Call[dict[str, Any]]:
    return Call({"t": "query", "q": "health"}, lambda r: plain(r.health))


def purge(
    states: Sequence[str], older_than: float, *, limit: int | None = None, dry_run: bool = False
) -> Call[dict[str, Any]]:
    msg: dict[str, Any] = {"t": "purge", "states": list(states), "older_than": older_than}
    if limit is not None:
        msg["limit"] = limit
    if dry_run:
        msg["dry_run"] = True
    return Call(msg, lambda r: {"purged": r.purged, "matched": r.matched, "more": r.more})


def retry_many(state: str, *, limit: int | None = None) -> Call[dict[str, Any]]:
    msg: dict[str, Any] = {"t": "retry_many", "state": state}
    if limit is not None:
        msg["limit"] = limit
    return Call(msg, lambda r: {"retried": r.retried, "more": r.more})


def set_priority(task_id: str, priority: int | str) -> Call[Task]:
    return Call({"t": "set_priority", "task": task_id, "priority": priority}, _task)


def schedule(op: str, **fields: Any) -> Call[dict[str, Any]]:
    """A ``schedule`` request (op: add, list, get, remove, pause, resume, run_now); the
    ACK's fields as they are (``schedule``, ``schedules``, ``created``, ``changed``...)."""
    message = {"t": "schedule", "op": op, **{k: v for k, v in fields.items() if v is not None}}
    return Call(message, _fields)


def _fields(reply: answers.Answer) -> dict[str, Any]:
    """An ACK's own fields (no ``t``, ``id``) as plain maps."""
    out: dict[str, Any] = plain(reply)
    out.pop("t", None)
    out.pop("id", None)
    return out


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
    return Call(message, lambda r: plain(r.cap))


def remove_cap(kind: str, name: str) -> Call[bool]:
    message = {"t": "cap", "op": "remove", "kind": kind, "name": name}
    return Call(message, lambda r: r.removed)


def list_caps() -> Call[list[dict[str, Any]]]:
    return Call({"t": "cap", "op": "list"}, lambda r: plain(r.caps))


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
    return Call(message, lambda r: {"queue": r.queue, "paused": r.paused, "changed": r.changed})


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


class CheckedEvent(dict[str, Any]):
    """An event map the client core decoded from its bytes through its topic's
    declaration (``checked_event``): ``parse_event`` takes it as it is."""


def checked_event(body: bytes, topic: str) -> CheckedEvent | None:
    """An event's body decoded straight into its topic's declaration, as the map
    ``parse_event`` reads; None for a topic not declared here (a newer broker's) or a
    body that does not fit (``parse_event`` then says what is wrong, to the consumer)."""
    kind = answers.EVENTS.get(topic)
    if kind is None:
        return None
    try:
        typed = answers.decode_answer(body, kind)
    except answers.BadAnswer:
        return None
    out = CheckedEvent(_fields(typed))
    out["t"], out["id"] = "event", typed.id
    return out


def parse_event(msg: Mapping[str, Any]) -> Event:
    """An event, checked against its topic's declaration (an unknown topic, from a
    newer broker, passes as it is; BadAnswer for a malformed one)."""
    kind = answers.EVENTS.get(str(msg.get("topic")))
    if kind is not None and "local" not in msg and type(msg) is not CheckedEvent:
        msg = _fields(answers.convert_answer(msg, kind))
        msg["t"] = "event"
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
    return Call({"t": "subscribe", "topics": wanted}, lambda r: r.topics)


def unsubscribe() -> Call[None]:
    return Call({"t": "unsubscribe"}, lambda r: None)


def wait_step(task_id: str, remaining: float | None) -> Call[tuple[Task, bool]]:
    """One server-side wait of at most MAX_SERVER_WAIT; (task, timed_out)."""
    step = MAX_SERVER_WAIT if remaining is None else max(0.0, min(remaining, MAX_SERVER_WAIT))
    return Call(
        {"t": "wait", "task": task_id, "timeout": step},
        lambda r: (task_of(r.task), r.timed_out),
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
