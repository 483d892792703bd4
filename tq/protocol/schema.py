"""Every request of the wire protocol, declared once as a msgspec Struct.

Contract: a frame body is decoded straight into one of these (``decode``); a
request that does not fit its declaration never reaches the broker's
handlers, and the error names the field. The same Structs are what the
service layer takes, from the wire, from REST (a JSON body is decoded
straight into a ``body_of`` declaration: the request's own fields) and from
the CLI's offline paths; no handler reads a request by name. docs/PROTOCOL.md's
field tables are generated from them (tq.protocol.docgen, ``python -m
tq.protocol.docgen --write``; a test fails when the page is stale), and so are
the OpenAPI document's request schemas (tq.http.openapi);
``tq.protocol.messages.FIELDS`` is derived from them. Imports msgspec and
tq.core only.

Rules the declarations carry, so no handler checks them again:

* types are strict: a bool is never an int or a number, a string never a
  number; ``float`` fields take ints (msgpack has both);
* numbers are finite and in range (``msgspec.Meta(ge=..., le=...)``: NaN and
  the infinities fail both bounds); every bound comes from tq.core.limits;
* nil equals absent: every optional field is ``X | None = None`` and its
  default is applied by the service; a required field sent as nil is refused;
* fields a request does not declare are ignored (forward compatible);
* requests with an ``op`` (keys, schedule, cap) declare their ops (``ops``)
  and the fields each op requires (``For("create")``). These two are checked
  by the service (``check_op``, ``check_required``), after the key's role was
  checked against the op (a reader is forbidden an admin op before it is told
  about its fields), in the words decoding uses: "keys message: field 'role'
  must be one of ...; op create requires it (nil or missing)".

Rules about several fields at once (``input`` needs ``depends_on``, a cap's
``burst`` needs its ``rate``, a query's ``task`` for ``get``), text with a
grammar (a cron expression, a rate "30/m", a time zone) and lookups (states,
stored schedules) stay in the service, which words its errors the same way.

How to add a field: add it to the Struct with its type and ``Meta`` bounds
(a ``Meta(extra={"rule": ...})`` gives the words errors use for it) and its
description, ``doc("what it means", default=...)`` (tq.core.typed.doc: the
meaning and default columns of the page, the OpenAPI description); optional
ones as ``Annotated[Annotated[T, Meta(...)] | None, doc(...)] = None``. A
request's undeclared field is silently ignored, so a field the service reads
must be declared here. Then run ``python -m tq.protocol.docgen --write``. A new
request type is a new Struct subclass of ``Request`` with ``tag="name"`` added
to ``REQUESTS``; put the generated-table markers in its section of
docs/PROTOCOL.md (the generator refuses a declaration without them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from tq.core import limits
from tq.core.errors import InvalidRequest
from tq.core.schedule import Cron, Missed, Zone
from tq.core.task import Name, Priority, ScheduleTaskIn, TaskSpecIn
from tq.core.typed import describe, doc, rule_of

# -- building blocks --------------------------------------------------------------------
RequestId = Annotated[int, Meta(ge=0, le=limits.MAX_REQUEST_ID)]
Text = Annotated[str, Meta(min_length=1)]  # a non-empty string
Seconds = Annotated[float, Meta(ge=0.0, le=limits.MAX_SECONDS)]
Epoch = Annotated[float, Meta(ge=0.0, le=limits.MAX_EPOCH)]
Token = Annotated[int, Meta(ge=0, le=limits.MAX_TOKEN)]
Count = Annotated[int, Meta(ge=0, le=limits.MAX_COUNT)]
BulkLimit = Annotated[int, Meta(ge=1, le=limits.BULK_MAX)]
Label = Annotated[str, Meta(min_length=1, max_length=limits.MAX_NAME_LENGTH)]  # a worker's


def For(*ops: str) -> Meta:
    """A field required by these ops of its request only; ``check_required`` checks it."""
    return Meta(extra={"required_for": ops})


def ops(*names: str) -> Meta:
    """The ops a request's ``op`` may name; ``check_op`` checks it, after the key's role
    (an op is forbidden to a reader before it is unknown)."""
    return Meta(extra={"ops": names, "rule": "one of " + ", ".join(names)})


class Request(msgspec.Struct, tag_field="t", kw_only=True):
    """What every request carries: its type ``t`` (the tag) and ``id``."""

    id: RequestId

    @property
    def t(self) -> str:
        return str(self.__struct_config__.tag)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, for the session rules (tq.protocol.session), which read
        typed requests and plain maps alike; nil and undeclared fields read as
        ``default``. Handlers read the declared attributes."""
        if name == "t":
            return self.t
        value = getattr(self, name, None)
        return default if value is None else value


# -- outcomes (task specs: TaskSpecIn, tq/core/task.py) ---------------------------
class OutcomeIn(msgspec.Struct, kw_only=True):
    """One result of a ``result`` request."""

    id: Annotated[str, doc("task id")]
    token: Annotated[Token, doc("the lease's fencing token")]
    status: Literal["ok", "retry", "reject", "release"]
    result: Annotated[Any, doc("the value for `ok` (≤ 10 MiB encoded)")] = None
    # a map {type, message, traceback}; a non-map becomes its text
    error: Annotated[
        Any,
        doc(
            '`{"type": str, "message": str, "traceback": str}`; missing keys become '
            '`"Error"`, `""`, `""`; a non-map becomes `{"type":"Error","message":<its text>}`'
        ),
    ] = None
    delay: Annotated[
        Seconds | None, doc("`retry`: minimum seconds before the next attempt (else `invalid`)")
    ] = None


# -- requests ---------------------------------------------------------------------------
_INFO = "informational, shown in `query workers`"


class Hello(Request, tag="hello"):
    v: Annotated[
        int,
        doc("protocol version; must be `1`, else `nack` `invalid` (saying what to upgrade)"),
    ]
    kind: Annotated[str, doc('`"worker"` for a worker session; anything else is a client')]
    name: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None,
        doc("display name (workers only; ignored for clients)", default="worker id"),
    ] = None
    worker_id: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None,
        doc(
            'stable worker identity (`""`: the default); leases belong to it (workers only). '
            "It belongs to the key that registered it while the broker knows the worker and "
            "that key is active: another key reusing it gets `forbidden`",
            default="16 random hex chars",
        ),
    ] = None
    queues: Annotated[
        Annotated[list[Label], Meta(max_length=limits.MAX_WORKER_QUEUES)] | None,
        doc(f"{_INFO} (`[]`: the default)", default='`["default"]`'),
    ] = None
    types: Annotated[
        Annotated[list[Label], Meta(max_length=limits.MAX_WORKER_TYPES)] | None,
        doc(_INFO, default="nil (any)"),
    ] = None
    host: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None,
        doc("informational", default='`""`'),
    ] = None
    pid: Annotated[Count | None, doc("informational", default="0")] = None
    concurrency: Annotated[Count | None, doc("informational", default="0")] = None
    key: Annotated[
        str | None,
        doc(
            'API key `tq_<key id>_<secret>` (§12). A `kind: "worker"` hello needs a '
            "`worker` or `admin` key",
            req="yes (unless `--no-auth`)",
        ),
    ] = None  # required unless the broker runs --no-auth (checked at login)


class Submit(Request, tag="submit"):
    tasks: Annotated[
        list[TaskSpecIn],
        Meta(
            min_length=1,
            max_length=limits.MAX_SUBMIT,
            extra={
                "rule": f"an array of task maps, at least 1 and at most {limits.MAX_SUBMIT} "
                "tasks (split larger batches into several submits)"
            },
        ),
        doc("the tasks, all or nothing (task spec below)"),
    ]


class Claim(Request, tag="claim"):
    n: Annotated[int, Meta(ge=1, le=limits.MAX_CLAIM), doc("most tasks to lease")]
    queues: Annotated[list[Text], doc("queues to take from (empty array: nothing)")]
    types: Annotated[
        list[Text] | None,
        doc("only these task types (empty array: nothing)", default="nil (any type)"),
    ] = None
    wait: Annotated[
        Seconds | None,
        doc("long-poll seconds, silently capped at 60 (0: answer at once)", default="0"),
    ] = None


class Result(Request, tag="result"):
    results: Annotated[
        list[OutcomeIn], doc("may be empty; the reference worker sends ≤ 250 (outcome below)")
    ]


class Heartbeat(Request, tag="heartbeat"):
    leases: Annotated[
        list[tuple[str, Token]],
        Meta(extra={"rule": "an array of [task id (a string), lease token (an integer)] pairs"}),
        doc("`[task id, token]` of the leases to extend; may be empty (liveness only)"),
    ]
    stats: Annotated[
        dict[str, Any] | None,
        doc(
            "host stats; `cpu` (number), `memory` (int, bytes), `running` (int) appear in "
            "`query workers`; other keys ignored"
        ),
    ] = None
    # the latest progress of running tasks; each item names a lease of ``leases`` (checked
    # by tq.core.progress.parse, with the rules that join the two)
    progress: Annotated[
        Annotated[
            list[
                tuple[
                    str,
                    Token,
                    Annotated[float, Meta(ge=0.0, le=1.0)],
                    Annotated[str, Meta(max_length=limits.MAX_PROGRESS_MESSAGE)] | None,
                ]
            ],
            Meta(
                extra={
                    "rule": "an array of [task id, lease token, fraction 0..1, message "
                    f"(nil or at most {limits.MAX_PROGRESS_MESSAGE} characters)] items"
                }
            ),
        ]
        | None,
        doc(
            "`[task id, token, fraction, message]`: the latest progress of running tasks "
            "(below); each item names a lease of this heartbeat's `leases`, at most once",
            bounds="",
        ),
    ] = None


QueryKind = Literal[
    "get", "list", "stats", "workers", "depth", "health", "explain", "workflow", "history"
]
_LIST = "`list`"


class Query(Request, tag="query"):
    # a str, not QueryKind: the key's role is checked against it first (an unknown
    # kind is forbidden to a reader before it is invalid), then the handler names it
    q: Annotated[
        str,
        doc(
            '`"get"`, `"list"`, `"stats"`, `"workers"`, `"depth"`, `"health"`, `"explain"`, '
            '`"workflow"` or `"history"`; else `invalid`'
        ),
    ]
    task: Annotated[
        str | None, doc("task id", required_for=("get", "explain", "workflow", "history"))
    ] = None
    state: Annotated[
        str | None, doc(f"{_LIST} filter; unknown state: `invalid`", default="nil (all)")
    ] = None
    type: Annotated[str | None, doc(f"{_LIST} filter", default="nil (all)")] = None
    queue: Annotated[str | None, doc(f"{_LIST} filter", default="nil (all)")] = None
    limit: Annotated[
        Annotated[int, Meta(ge=1, le=limits.MAX_LIST)] | None,
        doc(f"{_LIST}: tasks per page", default=str(limits.DEFAULT_LIST)),
    ] = None
    after: Annotated[str | None, doc(f"{_LIST} cursor: a task id (unknown: `invalid`)")] = None
    order: Annotated[
        Literal["oldest", "newest"] | None,
        doc(f"{_LIST}: which first; else `invalid`", default='`"oldest"`'),
    ] = None
    search: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_SEARCH)] | None,
        doc(f"{_LIST}: text to look for (below)"),
    ] = None
    since: Annotated[
        Epoch | None, doc(f"{_LIST}: Unix seconds, a bound on `created_at` (below)")
    ] = None
    until: Annotated[
        Epoch | None, doc(f"{_LIST}: Unix seconds, a bound on `created_at` (below)")
    ] = None


TaskRef = Annotated[str, doc("task id")]


class Cancel(Request, tag="cancel"):
    task: TaskRef


class Retry(Request, tag="retry"):
    task: TaskRef


class Wait(Request, tag="wait"):
    task: TaskRef
    timeout: Annotated[Seconds | None, doc("seconds, silently capped at 60", default="60")] = None


class Purge(Request, tag="purge"):
    states: Annotated[
        list[str],
        Meta(extra={"rule": "an array of finished states (succeeded, dead, cancelled)"}),
        doc("finished states only: `succeeded`, `dead`, `cancelled` (else `invalid`)"),
    ]
    older_than: Annotated[
        float,
        Meta(ge=0.0, le=limits.MAX_NUMBER),
        doc("seconds: only tasks whose `finished_at` is earlier than now minus `older_than`"),
    ]
    limit: Annotated[
        BulkLimit | None,
        doc("most tasks deleted by this request", default=str(limits.BULK_DEFAULT)),
    ] = None
    dry_run: Annotated[bool | None, doc("count, delete nothing", default="false")] = None


class RetryMany(Request, tag="retry_many"):
    state: Annotated[
        str,
        Meta(extra={"rule": "a state name (failed, dead or cancelled)"}),
        doc("`failed`, `dead` or `cancelled` (else `invalid`)"),
    ]
    limit: Annotated[
        BulkLimit | None,
        doc("most tasks retried by this request", default=str(limits.BULK_DEFAULT)),
    ] = None


class Keys(Request, tag="keys"):
    op: Annotated[
        str,
        ops("create", "list", "revoke"),
        doc(
            "else `invalid` (checked after the key's role: an op a role may not use is "
            "`forbidden` first)"
        ),
    ]
    role: Annotated[
        Annotated[Literal["admin", "producer", "worker", "reader"], For("create")] | None,
        doc("the key's role"),
    ] = None
    name: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_KEY_NAME)] | None,
        doc("`create`: a label", default="the key id"),
    ] = None
    queues: Annotated[
        Annotated[list[Name], Meta(min_length=1, max_length=limits.MAX_KEY_QUEUES)] | None,
        doc(
            "`create`: limit the key to these queues (the rules of a queue name)",
            default="nil (all)",
        ),
    ] = None
    expires_at: Annotated[
        Epoch | None, doc("`create`: epoch seconds in the future", default="nil (never)")
    ] = None  # create: after now (checked when the key is made)
    key_id: Annotated[
        Annotated[str, Meta(min_length=1, max_length=limits.MAX_KEY_ID), For("revoke")] | None,
        doc("the public id of the key to revoke"),
    ] = None


class Audit(Request, tag="audit"):
    limit: Annotated[
        Annotated[int, Meta(ge=1, le=limits.MAX_AUDIT_PAGE)] | None,
        doc("entries", default=str(limits.DEFAULT_AUDIT_PAGE)),
    ] = None
    before: Annotated[
        Annotated[
            int,
            Meta(
                ge=0,
                le=limits.MAX_SEQ,
                extra={"rule": "an entry's seq (an integer 0..2^63-1, the previous page's next)"},
            ),
        ]
        | None,
        doc("cursor: only entries with `seq` < `before`"),
    ] = None


class SetPriority(Request, tag="set_priority"):
    task: TaskRef
    priority: Annotated[
        Priority,
        doc('as in `submit`: 0..255, `"high"`/`"normal"`/`"low"` or a decimal string'),
    ]


class QueueOp(Request, tag="queue"):
    # pause, resume (checked after the role)
    op: Annotated[str, doc('`"pause"` or `"resume"`; else `invalid`')]
    queue: Annotated[
        str, doc("a queue name (the rules of `submit`'s `queue`); it need not hold tasks")
    ]


SCHEDULE_OPS = ("add", "list", "get", "remove", "pause", "resume", "run_now")
CAP_OPS = ("set", "remove", "list")
RATE_RULE = (
    f"a number of tasks per second > 0 and <= {limits.MAX_CAP_RATE:.0f}, or text R/s, R/m "
    "or R/h (e.g. 30/m)"
)


class Schedule(Request, tag="schedule"):
    op: Annotated[str, ops(*SCHEDULE_OPS), doc("else `invalid` (checked after the key's role)")]
    name: Annotated[
        Annotated[Name, For(*(op for op in SCHEDULE_OPS if op != "list"))] | None,
        doc("the schedule's name (the rules of a queue name)"),
    ] = None
    cron: Annotated[
        Annotated[Cron, For("add")] | None,
        doc(
            "five fields: minute hour day-of-month month day-of-week (`*/5 * * * *`, "
            "`0 9 * * MON-FRI`), read as Debian's cron does (cronsim), DST transitions "
            "included"
        ),
    ] = None  # five fields and their values are checked by tq.core.schedule
    timezone: Annotated[
        Zone | None,
        doc("an IANA zone the expression is read in", default="`UTC`"),
    ] = None
    # the task each tick submits: the fields of a submit's task spec a schedule may carry,
    # declared with its rules (the rules joining fields: tq.core.schedule, as a submit's)
    task: Annotated[
        Annotated[ScheduleTaskIn, For("add")] | None,
        doc(
            "what each tick submits: `type` (required), `payload`, `queue`, `priority`, "
            "`max_retries`, `timeout`, `retry_base`, `retry_cap`, with `submit`'s rules and "
            "words (`schedule message: field 'task': task priority must be ...`); any other "
            "field is refused as an unknown task field (no `idempotency_key`: each tick's task "
            "gets `tq-schedule:NAME:TICK`, TICK its Unix time, so a tick inserts at most one "
            "task)"
        ),
    ] = None
    missed: Annotated[
        Missed | None,
        doc(
            "ticks missed while no broker ran (older than 60 s when a broker gets to them): "
            "`skip` (dropped), `once` (one task for them all) or `all` (one per tick, at "
            "most 100, the latest)",
            default="`skip`",
        ),
    ] = None


class CapOp(Request, tag="cap"):
    op: Annotated[str, ops(*CAP_OPS), doc("else `invalid` (checked after the key's role)")]
    kind: Annotated[
        Annotated[Literal["queue", "type"], For("set", "remove")] | None,
        doc("what the cap limits"),
    ] = None
    name: Annotated[
        Annotated[Name, For("set", "remove")] | None,
        doc("the queue or task type (the rules of a queue name)"),
    ] = None
    concurrency: Annotated[
        Annotated[int, Meta(ge=1, le=limits.MAX_CAP_CONCURRENCY)] | None,
        doc("`set`: at most this many of its tasks `running` at once"),
    ] = None
    # tasks per second, or text R/s, R/m, R/h (read by tq.broker.caps.parse_rate)
    rate: Annotated[
        Annotated[
            Annotated[float, Meta(gt=0.0, le=limits.MAX_CAP_RATE)]
            | Annotated[str, Meta(min_length=1, max_length=limits.MAX_RATE_TEXT)],
            Meta(extra={"rule": RATE_RULE}),
        ]
        | None,
        doc(
            "`set`: at most this many of its tasks started per second; a number, or text "
            '`R/s`, `R/m` or `R/h` (`"30/m"` is 0.5), its value in the same range'
        ),
    ] = None
    burst: Annotated[
        Annotated[float, Meta(ge=1.0, le=limits.MAX_CAP_RATE)] | None,
        doc(
            "`set`, with `rate` only: the rate bucket's size, tasks",
            default="the larger of 1 and `rate`",
        ),
    ] = None  # needs rate


class Subscribe(Request, tag="subscribe"):
    topics: Annotated[list[str], doc("one or more of `tasks`, `workers`, `counts`, `progress`")]


class Unsubscribe(Request, tag="unsubscribe"):
    pass


REQUESTS: tuple[type[Request], ...] = (
    Hello,
    Submit,
    Claim,
    Result,
    Heartbeat,
    Query,
    Cancel,
    Retry,
    Wait,
    Purge,
    RetryMany,
    Keys,
    Audit,
    SetPriority,
    QueueOp,
    Schedule,
    CapOp,
    Subscribe,
    Unsubscribe,
)
AnyRequest = Union[REQUESTS]  # type: ignore[valid-type]  # noqa: UP007  # tagged on "t"
BY_TAG: dict[str, type[Request]] = {str(r.__struct_config__.tag): r for r in REQUESTS}
REQUEST_TYPES = frozenset(BY_TAG)

_decoder = msgspec.msgpack.Decoder(AnyRequest)


def body_of(request: type[Request], *names: str) -> type[msgspec.Struct]:
    """A REST body: these fields of ``request``, with their declared types, bounds and
    defaults (``BODY_OF`` maps it to the request, whose words its errors use: ``cap
    message: field 'rate' ...``). A JSON body is decoded straight into it; fields it
    does not declare are ignored, as on the wire."""
    fields = {f.name: f for f in msgspec.structs.fields(request)}
    body = msgspec.defstruct(
        f"{request.__name__}Body",
        [(n, fields[n].type, fields[n].default) for n in names],
        kw_only=True,
    )
    BODY_OF[body] = request
    return body


BODY_OF: dict[type[msgspec.Struct], type[Request]] = {}


def decode(body: bytes) -> Request:
    """One frame body as its typed request; msgspec's errors as they come (the caller
    classifies them, see tq.protocol.errors)."""
    return _decoder.decode(body)


def convert(obj: object) -> Request:
    """An already decoded map (a large frame, decoded with its containers counted) as
    its typed request."""
    return msgspec.convert(obj, AnyRequest, strict=True)


# -- the rules of ops (checked by the service, after the key's role) ----------------------
def _extra(info: Any) -> dict[str, Any]:
    """The ``Meta(extra=...)`` of a declared field (nil aside), merged."""
    out: dict[str, Any] = {}
    if isinstance(info, msgspec.inspect.UnionType):
        for part in info.types:
            out.update(_extra(part))
    elif isinstance(info, msgspec.inspect.Metadata):
        out.update(_extra(info.type))
        out.update(info.extra or {})
    return out


def _op_rules(struct: type[Request]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    extras = {f.encode_name: _extra(f.type) for f in info.fields}
    known = tuple(extras.get("op", {}).get("ops", ()))
    required = {
        name: tuple(extra["required_for"])
        for name, extra in extras.items()
        if "required_for" in extra
    }
    return known, required


_FIELD_TYPES = {
    r: {f.encode_name: f.type for f in msgspec.inspect.type_info(r).fields}  # type: ignore[attr-defined]
    for r in REQUESTS
}
# request -> (its ops, {field: the ops that require it}), for requests declared with ``ops``
OP_RULES = {r: rules for r in REQUESTS if (rules := _op_rules(r))[0]}


OpRequest = Union[Keys, Schedule, CapOp]  # noqa: UP007  (requests declared with ``ops``)


def check_op(msg: OpRequest) -> str:
    """``msg.op`` if its declaration names it (``ops``); InvalidRequest naming the field,
    the ops and the value otherwise."""
    op = msg.op
    known, _ = OP_RULES[type(msg)]
    if op not in known:
        raise InvalidRequest(
            f"{msg.t} message: field 'op' must be one of {', '.join(known)}, got {describe(op)}"
        )
    return op


def check_required(msg: OpRequest) -> None:
    """The fields ``msg``'s op requires (``For``) are there; InvalidRequest naming the
    first missing one, its rule and the op otherwise (nil equals absent)."""
    op = msg.op
    for name, needed_by in OP_RULES[type(msg)][1].items():
        if op in needed_by and getattr(msg, name) is None:
            rule = rule_of(_FIELD_TYPES[type(msg)][name])
            raise InvalidRequest(
                f"{msg.t} message: field '{name}' must be {rule}; op {op} requires it "
                "(nil or missing)"
            )
