"""The task record, a validated submission, and the named priorities.

A submission arrives as a plain mapping (from the wire, the CLI or a file);
``TaskSpec.from_mapping`` checks every field and names the one that is wrong.
A ``Task`` is what the store returns: the submission plus its lifecycle.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from tq.core.errors import InvalidRequest
from tq.core.limits import (  # noqa: F401  (re-exported: where these were defined before)
    MAX_DEPENDENCIES,
    MAX_EPOCH,
    MAX_NAME_LENGTH,
    MAX_NUMBER,
    MAX_PAYLOAD_BYTES,
    MAX_PROGRESS_MESSAGE,
    MAX_RETRIES,
    MAX_SECONDS,
    MAX_SUBMIT,
    MAX_TRACE_FIELDS,
    MAX_TRACE_KEY,
    MAX_TRACE_VALUE,
    MAX_UNIQUE_FOR,
    MAX_UNIQUE_KEY,
    MAX_WARNINGS,
)
from tq.core.retry import DEFAULT_BASE, DEFAULT_CAP
from tq.core.states import State
from tq.core.typed import TASK_SPEC_STRUCT, doc, explain
from tq.core.values import check_plain

PRIORITY_NAMES: dict[str, int] = {"high": 200, "normal": 100, "low": 50}
DEFAULT_PRIORITY = PRIORITY_NAMES["normal"]
DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT = 300.0

# What a task whose dependency ended dead or cancelled does: "cancel" (it is cancelled
# too, naming the dependency), "run" (it runs once every dependency finished, however),
# "wait" (it stays blocked: a retried dependency that then succeeds releases it).
DEPENDENCY_POLICIES = ("cancel", "run", "wait")
# How a released task receives its dependencies' results: "result" (its first
# dependency's), "results" (a list of all of them, in depends_on order).
INPUTS = ("result", "results")


# -- the declarations of what arrives (the wire, REST, files, the CLI) -------------------
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=r"^[^\s,]+$",
        extra={
            "rule": f"a non-empty string of at most {MAX_NAME_LENGTH} characters, "
            "no spaces or commas"
        },
    ),
]
Priority = int | str  # 0..255 or a name; parse_priority reads both
TaskId = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]


class _TaskFieldsIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields a schedule's task shares with a submit's, declared once for both
    (``ScheduleTaskIn``, ``TaskSpecIn``): the same value is refused in the same words."""

    type: Annotated[Name, doc("the handler's name: no whitespace, no `,`")]
    queue: Annotated[Name | None, doc("same rule as `type`")] = None
    payload: Annotated[
        Any, doc("plain data (below); msgpack-encoded size ≤ 10 MiB (10 485 760 bytes)")
    ] = None
    priority: Annotated[
        Priority | None,
        doc(
            '0..255 (255 highest), or `"high"`=200, `"normal"`=100, `"low"`=50 '
            "(case-insensitive), or a decimal string",
            bounds="0..255",
        ),
    ] = None
    max_retries: Annotated[
        Annotated[int, Meta(ge=0, le=MAX_RETRIES)] | None,
        doc("retries after the first attempt before the task is `dead`"),
    ] = None
    timeout: Annotated[
        Annotated[float, Meta(ge=0.001, le=MAX_NUMBER)] | None,
        doc("seconds; enforced by the worker, not the broker"),
    ] = None
    retry_base: Annotated[
        Annotated[float, Meta(ge=0.0, le=MAX_NUMBER)] | None, doc("backoff base (s)")
    ] = None
    retry_cap: Annotated[
        Annotated[float, Meta(ge=0.0, le=MAX_NUMBER)] | None, doc("backoff cap (s)")
    ] = None


class ScheduleTaskIn(_TaskFieldsIn, kw_only=True, forbid_unknown_fields=True):
    """The task a schedule submits at each tick: the fields of a task spec a schedule
    may carry (no ``idempotency_key``: each tick's task gets its own), with the same
    declarations, so the same value is refused in the same words. Declared once for the
    wire's ``schedule`` request, REST and plain callers (tq.core.schedule)."""


class TaskSpecIn(_TaskFieldsIn, kw_only=True, forbid_unknown_fields=True):
    """One task as submitted: every field a producer chooses, nil equal to absent.
    The checks that join several fields (and the payload's) are in ``TaskSpec.of``.
    Declared once for the wire (tq/protocol/schema.py), REST, files and the CLI."""

    idempotency_key: Annotated[TaskId | None, doc("see below")] = None
    trace: Annotated[
        dict[str, str] | None,
        doc(
            f"at most {MAX_TRACE_FIELDS} fields, keys 1..{MAX_TRACE_KEY} chars, values "
            f"≤ {MAX_TRACE_VALUE} chars, all printable ASCII (0x20..0x7E): the submitter's "
            "W3C trace context (`traceparent`, `tracestate`); the reference clients attach it "
            "when they submit inside an OpenTelemetry span, and the reference worker runs the "
            "handler in a child span"
        ),
    ] = None
    depends_on: Annotated[
        Annotated[list[TaskId], Meta(max_length=MAX_DEPENDENCIES)] | None,
        doc(
            "task ids, each named once: the task is `blocked` until every one has `succeeded` "
            '(below); `"#N"` names the N-th task (from 0) of the same request, which must come '
            "before this one"
        ),
    ] = None
    on_dependency_failure: Annotated[
        Literal["cancel", "run", "wait"] | None,
        doc(
            "when a dependency ends `dead` or `cancelled`: `cancel` (this task is cancelled "
            "too, error type `DependencyFailed` naming the dependency, and so on down the "
            "graph), `run` (it is released once every dependency has finished, whatever the "
            "end), `wait` (it stays `blocked`; a `retry` of the dependency that then succeeds "
            "releases it)"
        ),
    ] = None
    input: Annotated[
        Literal["result", "results"] | None,
        doc(
            "with `depends_on`: `result` (the first dependency's result) or `results` (an "
            "array of every dependency's result, in `depends_on` order) becomes the payload "
            "when the task is released; a map payload keeps its keys and gets the input under "
            '`"input"`; any other payload is refused'
        ),
    ] = None
    result_key: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        doc(
            "with `input`: take this key of each dependency's result (nil where a result is "
            "not a map or lacks it)"
        ),
    ] = None
    delay: Annotated[
        Annotated[
            float,
            Meta(
                ge=0.0,
                le=MAX_SECONDS,
                extra={"rule": f"a finite number of seconds 0..{MAX_SECONDS:.0f} (10 years)"},
            ),
        ]
        | None,
        doc(
            "seconds (at most 10 years): the task is due this long after the broker received "
            "the request (with `depends_on`: after its dependencies are done)"
        ),
    ] = None
    run_at: Annotated[
        Annotated[
            float,
            Meta(
                ge=0.0,
                le=MAX_EPOCH,
                extra={"rule": f"finite epoch seconds 0..{MAX_EPOCH:.0f} (1970..9999)"},
            ),
        ]
        | None,
        doc(
            "epoch seconds (UTC), finite, 0 (1970) up to 253 402 300 799 (9999) and at most "
            "315 360 000 s (10 years) after the broker's clock, else `invalid`: the task is "
            "due then. With `delay` too, the later of the two. With `depends_on`, both count "
            "from the moment the dependencies are done: due `delay` after that, not before "
            "`run_at`",
            bounds="",
        ),
    ] = None
    unique_for: Annotated[
        Annotated[
            float,
            Meta(
                ge=0.0,
                le=MAX_UNIQUE_FOR,
                extra={"rule": f"a number of seconds 0..{MAX_UNIQUE_FOR:.0f} (366 days)"},
            ),
        ]
        | None,
        doc("seconds (at most 366 days): a unique task (below)"),
    ] = None
    unique_key: Annotated[
        Annotated[str, Meta(min_length=1, max_length=MAX_UNIQUE_KEY)] | None,
        doc(
            "with `unique_for`: no NUL; the key that makes tasks the same (default: the type "
            "and the payload)"
        ),
    ] = None


TASK_SPEC_STRUCT.extend((TaskSpecIn, ScheduleTaskIn))
_SPEC_FIELDS = frozenset(TaskSpecIn.__struct_fields__)


_BAD_NAME_CHAR = re.compile(r"[\s,]")  # a queue or type name is one shell/CSV-safe word
_PLAIN_FIELDS = frozenset({"type", "queue", "payload"})  # most submissions: the fast path
_GOOD_NAMES: dict[str, None] = {}  # names that passed _name (bounded; see _plain_name)
_GOOD_NAMES_MAX = 4096


def parse_priority(value: object) -> int:
    """0..255 or one of high/normal/low; InvalidRequest otherwise."""
    if isinstance(value, str):
        named = PRIORITY_NAMES.get(value.strip().lower())
        if named is not None:
            return named
        if not (value.isascii() and value.isdigit() and len(value) <= 3):
            # int() alone would take "1_0", " 7" and non-ASCII digits: not a decimal string
            raise InvalidRequest(
                f"priority {value!r} is not a number 0..255 or one of high, normal, low"
            )
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidRequest(f"priority {value!r} must be 0..255 (255 highest) or high/normal/low")
    return value


def _name(spec: Mapping[str, Any], key: str, default: str | None) -> str:
    value = spec.get(key)
    value = default if value is None else value
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"task {key} must be a non-empty string of at most 200 characters")
    if _BAD_NAME_CHAR.search(value):
        raise InvalidRequest(f"task {key} {value!r} must not contain spaces or commas")
    return value


def _plain_name(spec: dict[str, Any], key: str, default: str | None) -> str:
    """``_name``, remembering names that passed (a bulk submit repeats a few)."""
    value = spec.get(key)
    if value is None:
        value = default
    if type(value) is str and value in _GOOD_NAMES:
        return value
    value = _name(spec, key, default)
    if len(_GOOD_NAMES) >= _GOOD_NAMES_MAX:
        _GOOD_NAMES.clear()
    _GOOD_NAMES[value] = None
    return value


# W3C trace context is printable ASCII; the values become a handler's environment
# (a NUL there cannot even start the program)
_TRACE_TEXT = re.compile(r"[\x20-\x7e]*")


def parse_trace(value: object) -> dict[str, str] | None:
    """A task's ``trace``: nil, or a small map of strings (W3C trace context fields)."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_TRACE_FIELDS
        or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and 0 < len(k) <= 64
            and len(v) <= MAX_TRACE_VALUE
            and _TRACE_TEXT.fullmatch(k + v) is not None
            for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            f"task trace must be a map of at most {MAX_TRACE_FIELDS} string fields "
            f"(e.g. traceparent) with values of at most {MAX_TRACE_VALUE} characters "
            "of printable ASCII"
        )
    return dict(value) or None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A validated submission: everything a producer chooses about a task."""

    type: str
    queue: str = DEFAULT_QUEUE
    payload: Any = None
    priority: int = DEFAULT_PRIORITY
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    retry_base: float = DEFAULT_BASE
    retry_cap: float = DEFAULT_CAP
    idempotency_key: str | None = None
    trace: dict[str, str] | None = None  # W3C trace context of the submitter (tq.tracing)
    # ids of tasks this one waits for, or "#N": the N-th task (from 0) of the same submit,
    # which must come before this one (so one submit cannot form a cycle)
    depends_on: tuple[str, ...] | None = None
    on_dependency_failure: str = "cancel"  # one of DEPENDENCY_POLICIES
    input: str | None = None  # one of INPUTS: dependencies' results become the payload
    result_key: str | None = None  # with input: take this key of each (map) result
    # delayed: due ``delay`` seconds after the broker receives it and/or at ``run_at``
    # (epoch seconds), the later of the two (tq.core.when.due_at); stored as scheduled
    delay: float | None = None
    run_at: float | None = None
    # unique tasks (tq.core.unique): seconds the key is held after the submit, and the
    # key itself ("key:" + an explicit unique_key, or "auto:" + a digest of type + payload)
    unique_for: float | None = None
    unique_key: str | None = None

    @classmethod
    def from_mapping(cls, spec: object) -> TaskSpec:
        """A task given as plain data (JSON, a file, the CLI): decoded into
        ``TaskSpecIn`` (errors name the field and its rule), then ``of``."""
        if type(spec) is dict and spec.keys() <= _PLAIN_FIELDS:
            # The common case (type, payload, maybe queue): same rules, fewer steps.
            payload = spec.get("payload")
            try:
                check_plain(payload, "task payload")
                return cls(
                    type=_plain_name(spec, "type", None),
                    queue=_plain_name(spec, "queue", DEFAULT_QUEUE),
                    payload=payload,
                )
            except InvalidRequest:
                pass  # the full path below says it, in the same order as every path
        if not isinstance(spec, Mapping):
            raise InvalidRequest(f"a task must be a map, got {type(spec).__name__}")
        unknown = spec.keys() - _SPEC_FIELDS
        if unknown:
            raise InvalidRequest(
                f"unknown task field {', '.join(sorted(map(str, unknown)))}; "
                f"known: {', '.join(sorted(_SPEC_FIELDS))}"
            )
        try:
            typed = msgspec.convert(dict(spec), TaskSpecIn, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(explain(exc, TaskSpecIn, spec, what="task")) from None
        except RecursionError:  # only the payload nests: say it as check_plain does
            check_plain(spec.get("payload"), "task payload")
            raise InvalidRequest("task is nested too deeply to decode") from None
        return cls.of(typed)

    @classmethod
    def of(cls, spec: TaskSpecIn) -> TaskSpec:
        """The submission a decoded task spec describes: defaults for nil fields, the
        payload's plain-data rule, the priority's names, the rules joining fields."""
        payload = spec.payload
        check_plain(payload, "task payload")
        deps = spec.depends_on
        if deps is None and spec.on_dependency_failure is None and spec.input is None:
            if spec.result_key is not None:
                raise InvalidRequest("task result_key must be a non-empty string, and needs input")
            dependency: dict[str, Any] = {}
        else:
            dependency = _dependency_fields(spec, payload)
        priority = spec.priority
        return cls(
            type=spec.type,
            queue=DEFAULT_QUEUE if spec.queue is None else spec.queue,
            payload=payload,
            priority=DEFAULT_PRIORITY if priority is None else parse_priority(priority),
            max_retries=DEFAULT_MAX_RETRIES if spec.max_retries is None else spec.max_retries,
            timeout=DEFAULT_TIMEOUT if spec.timeout is None else spec.timeout,
            retry_base=DEFAULT_BASE if spec.retry_base is None else spec.retry_base,
            retry_cap=DEFAULT_CAP if spec.retry_cap is None else spec.retry_cap,
            idempotency_key=spec.idempotency_key,
            trace=parse_trace(spec.trace),
            **dependency,
            **_delay_fields(spec),
            **_unique_fields(spec),
        )


def _delay_fields(spec: TaskSpecIn) -> dict[str, Any]:
    """delay and run_at (their ranges are the declaration's; the range ahead of now is
    checked at submit: ``due_at``)."""
    if spec.delay is None and spec.run_at is None:
        return {}
    # with depends_on: due ``delay`` after the dependencies are done, not before run_at
    return {"delay": spec.delay, "run_at": spec.run_at}


def _dependency_fields(spec: TaskSpecIn, payload: Any) -> dict[str, Any]:
    """depends_on, on_dependency_failure, input and result_key, checked together
    (their types and sizes are the declaration's)."""
    deps = spec.depends_on or []
    given, key = spec.input, spec.result_key
    for dep in deps:
        if "\x00" in dep:
            raise InvalidRequest(f"task depends_on holds {dep!r}, which is not a task id")
    if len(set(deps)) < len(deps):
        raise InvalidRequest("task depends_on names a task twice")
    if given is not None and not deps:
        raise InvalidRequest("task input needs depends_on: the results come from dependencies")
    if given is not None and payload is not None and not isinstance(payload, dict):
        raise InvalidRequest(
            "a task with input takes no payload (the input becomes it) or a map payload "
            '(the input goes under its key "input")'
        )
    if key is not None and given is None:
        raise InvalidRequest("task result_key must be a non-empty string, and needs input")
    return {
        "depends_on": tuple(deps) or None,
        "on_dependency_failure": spec.on_dependency_failure or "cancel",
        "input": given,
        "result_key": key,
    }


def _unique_fields(spec: TaskSpecIn) -> dict[str, Any]:
    """unique_for (seconds) and unique_key, checked together (their types and ranges are
    the declaration's); the key as stored."""
    window, key = spec.unique_for, spec.unique_key
    if window is None and key is None:
        return {}
    if window is None:
        raise InvalidRequest("task unique_key needs unique_for (how long the key is held)")
    if key is not None and "\x00" in key:
        raise InvalidRequest(
            f"task unique_key must be a non-empty string of at most {MAX_UNIQUE_KEY} "
            "characters, without NUL"
        )
    return {"unique_for": window, "unique_key": None if key is None else "key:" + key}


def unique_key_of(spec: TaskSpec) -> str | None:
    """The key a unique task holds: its explicit ``unique_key`` ("key:..."), else
    "auto:" + the SHA-256 of its type and canonical payload (map keys sorted, so two
    payloads equal as data give one key whatever their order); None if not unique."""
    if spec.unique_for is None:
        return None
    if spec.unique_key is not None:
        return spec.unique_key
    text = json.dumps(
        [spec.type, _canonical(spec.payload)],
        ensure_ascii=False,
        allow_nan=True,
        separators=(",", ":"),
    )
    return "auto:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _canonical(value: Any) -> Any:
    """Plain data as JSON-able data with one form per value (bytes, floats and maps
    tagged, so that no two different payloads share a form). Depth is bounded by
    ``check_plain``, which every payload passed."""
    kind = type(value)
    if kind is dict:
        items = [
            [("s" if type(k) is str else "i") + str(k), _canonical(v)] for k, v in value.items()
        ]
        return {"m": sorted(items, key=lambda item: item[0])}
    if kind is list or kind is tuple:
        return [_canonical(v) for v in value]
    if kind is bytes:
        return {"b": value.hex()}
    if kind is float:
        return {"f": repr(value)}
    return value


@dataclass(frozen=True, slots=True)
class TaskError:
    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_mapping(cls, data: object) -> TaskError:
        if not isinstance(data, Mapping):
            return cls("Error", str(data))
        return cls(
            type=str(data.get("type") or "Error"),
            message=str(data.get("message") or ""),
            traceback=str(data.get("traceback") or ""),
        )


@dataclass(frozen=True, slots=True)
class Task:
    """A task as stored: its spec plus its lifecycle."""

    id: str
    type: str
    queue: str
    payload: Any
    priority: int
    state: State
    attempts: int
    max_retries: int
    timeout: float
    retry_base: float
    retry_cap: float
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    run_at: float | None = None
    worker: str | None = None
    result: Any = None
    error: TaskError | None = None
    idempotency_key: str | None = None
    trace: dict[str, str] | None = None
    progress: float | None = None  # the latest fraction 0..1 its handler reported
    progress_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the wire, JSON and YAML (state as its string).

        Built by hand: ``dataclasses.asdict`` deep-copies payload and result,
        which cost more than the rest of a ``get`` answer.
        """
        error = self.error
        return {
            "id": self.id,
            "type": self.type,
            "queue": self.queue,
            "payload": self.payload,
            "priority": self.priority,
            "state": self.state.value,
            "attempts": self.attempts,
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            "retry_base": self.retry_base,
            "retry_cap": self.retry_cap,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_at": self.run_at,
            "worker": self.worker,
            "result": self.result,
            "error": None
            if error is None
            else {"type": error.type, "message": error.message, "traceback": error.traceback},
            "idempotency_key": self.idempotency_key,
            "trace": self.trace,
            "progress": self.progress,
            "progress_message": self.progress_message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """The inverse of ``to_dict`` (unknown keys from newer brokers are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["state"] = State(known["state"])
        error = known.get("error")
        known["error"] = TaskError.from_mapping(error) if error is not None else None
        return cls(**known)


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed task handed to a worker: run it, then report with ``token``."""

    id: str
    type: str
    queue: str
    payload: Any
    priority: int
    attempt: int
    max_retries: int
    timeout: float
    token: int
    expires_at: float
    trace: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        # by hand: asdict() deep-copies the payload, and this is on the claim hot path
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "queue": self.queue,
            "payload": self.payload,
            "priority": self.priority,
            "attempt": self.attempt,
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            "token": self.token,
            "expires_at": self.expires_at,
        }
        if self.trace is not None:  # only then: a worker older than the field may run it
            out["trace"] = self.trace
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """One worker report for one lease.

    ``status`` is "ok" (result is the value), "retry" (failed, retry with
    backoff while attempts remain), "reject" (failed, do not retry) or
    "release" (not run: give the lease back, the attempt does not count).
    """

    id: str
    token: int
    status: str
    result: Any = None
    error: TaskError | None = None
    delay: float | None = None  # "retry": at least this long before the next attempt

    STATUSES = ("ok", "retry", "reject", "release")


@dataclass(frozen=True, slots=True)
class ListFilter:
    state: str | None = None
    type: str | None = None
    queue: str | None = None
    limit: int = 100
    after: str | None = None  # cursor: list tasks past this id, in the listing's order
    newest_first: bool = False  # order by submission, newest first (default oldest first)
