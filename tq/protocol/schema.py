"""Every request of the wire protocol, declared once as a msgspec Struct.

Contract: a frame body is decoded straight into one of these (``decode``); a
request that does not fit its declaration never reaches the broker's
handlers, and the error names the field. The same Structs are what the
service layer takes, from the wire, from REST (a JSON body is decoded
straight into a ``body_of`` declaration: the request's own fields) and from
the CLI's offline paths; no handler reads a request by name. docs/PROTOCOL.md's
field tables are checked against them (``tq.protocol.messages.FIELDS`` is
derived from them; tests/test_protocol_doc.py compares). Imports msgspec and
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
(a ``Meta(extra={"rule": ...})`` gives the words errors use for it), optional
ones as ``Annotated[T, Meta(...)] | None = None``; a request's undeclared field
is silently ignored, so a field the service reads must be declared here. Add
its row to docs/PROTOCOL.md (the test fails otherwise). A new request type is a
new Struct subclass of ``Request`` with ``tag="name"`` added to ``REQUESTS``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from tq.core import limits
from tq.core.errors import InvalidRequest
from tq.core.task import Name, Priority, TaskSpecIn
from tq.core.typed import describe, rule_of

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

    id: str
    token: Token
    status: Literal["ok", "retry", "reject", "release"]
    result: Any = None
    error: Any = None  # a map {type, message, traceback}; a non-map becomes its text
    delay: Seconds | None = None


# -- requests ---------------------------------------------------------------------------
class Hello(Request, tag="hello"):
    v: int  # must be PROTOCOL_VERSION (checked by the service, which says what to upgrade)
    kind: str  # "worker" for a worker session; anything else is a client
    name: Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None = None
    worker_id: Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None = None  # "": new
    queues: Annotated[list[Label], Meta(max_length=limits.MAX_WORKER_QUEUES)] | None = None
    types: Annotated[list[Label], Meta(max_length=limits.MAX_WORKER_TYPES)] | None = None
    host: Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None = None
    pid: Count | None = None
    concurrency: Count | None = None
    key: str | None = None  # required unless the broker runs --no-auth (checked at login)


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
    ]


class Claim(Request, tag="claim"):
    n: Annotated[int, Meta(ge=1, le=limits.MAX_CLAIM)]
    queues: list[Text]
    types: list[Text] | None = None
    wait: Seconds | None = None


class Result(Request, tag="result"):
    results: list[OutcomeIn]


class Heartbeat(Request, tag="heartbeat"):
    leases: Annotated[
        list[tuple[str, Token]],
        Meta(extra={"rule": "an array of [task id (a string), lease token (an integer)] pairs"}),
    ]
    stats: dict[str, Any] | None = None
    # the latest progress of running tasks; each item names a lease of ``leases`` (checked
    # by tq.core.progress.parse, with the rules that join the two)
    progress: (
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
        | None
    ) = None


QueryKind = Literal[
    "get", "list", "stats", "workers", "depth", "health", "explain", "workflow", "history"
]


class Query(Request, tag="query"):
    # a str, not QueryKind: the key's role is checked against it first (an unknown
    # kind is forbidden to a reader before it is invalid), then the handler names it
    q: str
    task: str | None = None  # get, explain, workflow, history: required (by the handler)
    state: str | None = None
    type: str | None = None
    queue: str | None = None
    limit: Annotated[int, Meta(ge=1, le=limits.MAX_LIST)] | None = None
    after: str | None = None
    order: Literal["oldest", "newest"] | None = None
    search: Annotated[str, Meta(max_length=limits.MAX_SEARCH)] | None = None
    since: Epoch | None = None
    until: Epoch | None = None


class Cancel(Request, tag="cancel"):
    task: str


class Retry(Request, tag="retry"):
    task: str


class Wait(Request, tag="wait"):
    task: str
    timeout: Seconds | None = None


class Purge(Request, tag="purge"):
    states: Annotated[
        list[str],
        Meta(extra={"rule": "an array of finished states (succeeded, dead, cancelled)"}),
    ]
    older_than: Annotated[float, Meta(ge=0.0, le=limits.MAX_NUMBER)]
    limit: BulkLimit | None = None
    dry_run: bool | None = None


class RetryMany(Request, tag="retry_many"):
    state: Annotated[str, Meta(extra={"rule": "a state name (failed, dead or cancelled)"})]
    limit: BulkLimit | None = None


class Keys(Request, tag="keys"):
    op: Annotated[str, ops("create", "list", "revoke")]
    role: Annotated[Literal["admin", "producer", "worker", "reader"], For("create")] | None = None
    name: Annotated[str, Meta(max_length=limits.MAX_KEY_NAME)] | None = None
    queues: Annotated[list[Name], Meta(min_length=1, max_length=limits.MAX_KEY_QUEUES)] | None = (
        None
    )
    expires_at: Epoch | None = None  # create: after now (checked when the key is made)
    key_id: (
        Annotated[str, Meta(min_length=1, max_length=limits.MAX_KEY_ID), For("revoke")] | None
    ) = None


class Audit(Request, tag="audit"):
    limit: Annotated[int, Meta(ge=1, le=limits.MAX_AUDIT_PAGE)] | None = None
    before: (
        Annotated[
            int,
            Meta(
                ge=0,
                le=limits.MAX_SEQ,
                extra={"rule": "an entry's seq (an integer 0..2^63-1, the previous page's next)"},
            ),
        ]
        | None
    ) = None


class SetPriority(Request, tag="set_priority"):
    task: str
    priority: Priority


class QueueOp(Request, tag="queue"):
    op: str  # pause, resume (checked after the role)
    queue: str


SCHEDULE_OPS = ("add", "list", "get", "remove", "pause", "resume", "run_now")
CAP_OPS = ("set", "remove", "list")
RATE_RULE = (
    f"a number of tasks per second > 0 and <= {limits.MAX_CAP_RATE:.0f}, or text R/s, R/m "
    "or R/h (e.g. 30/m)"
)


class Schedule(Request, tag="schedule"):
    op: Annotated[str, ops(*SCHEDULE_OPS)]
    name: Annotated[Name, For(*(op for op in SCHEDULE_OPS if op != "list"))] | None = None
    cron: (
        Annotated[str, Meta(min_length=1, max_length=limits.MAX_CRON_LENGTH), For("add")] | None
    ) = None  # five fields and their values are checked by tq.core.schedule
    timezone: Annotated[str, Meta(min_length=1, max_length=limits.MAX_TIMEZONE)] | None = None
    # the task each tick submits: a submit's task map, checked with its rules by
    # tq.core.schedule (which fields a schedule's task may carry)
    task: Annotated[dict[str, Any], For("add")] | None = None
    missed: Literal["skip", "once", "all"] | None = None


class CapOp(Request, tag="cap"):
    op: Annotated[str, ops(*CAP_OPS)]
    kind: Annotated[Literal["queue", "type"], For("set", "remove")] | None = None
    name: Annotated[Name, For("set", "remove")] | None = None
    concurrency: Annotated[int, Meta(ge=1, le=limits.MAX_CAP_CONCURRENCY)] | None = None
    # tasks per second, or text R/s, R/m, R/h (read by tq.broker.caps.parse_rate)
    rate: (
        Annotated[
            Annotated[float, Meta(gt=0.0, le=limits.MAX_CAP_RATE)]
            | Annotated[str, Meta(min_length=1, max_length=limits.MAX_RATE_TEXT)],
            Meta(extra={"rule": RATE_RULE}),
        ]
        | None
    ) = None
    burst: Annotated[float, Meta(ge=1.0, le=limits.MAX_CAP_RATE)] | None = None  # needs rate


class Subscribe(Request, tag="subscribe"):
    topics: list[str]


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
