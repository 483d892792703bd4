"""Every request of the wire protocol, declared once as a msgspec Struct.

Contract: a frame body is decoded straight into one of these (``decode``); a
request that does not fit its declaration never reaches the broker's
handlers, and the error names the field. The same Structs are what the
service layer takes (claim, result, heartbeat, list take them directly; the
other handlers read them by name through ``Request.get``). docs/PROTOCOL.md's
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
* fields a request does not declare are ignored (forward compatible).

Rules about several fields at once (``input`` needs ``depends_on``, a
query's ``task`` for ``get``) and lookups (states, roles) stay in the service.

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
from tq.core.task import Priority, TaskSpecIn
from tq.core.typed import doc

# -- building blocks --------------------------------------------------------------------
RequestId = Annotated[int, Meta(ge=0, le=limits.MAX_REQUEST_ID)]
Text = Annotated[str, Meta(min_length=1)]  # a non-empty string
Seconds = Annotated[float, Meta(ge=0.0, le=limits.MAX_SECONDS)]
Epoch = Annotated[float, Meta(ge=0.0, le=limits.MAX_EPOCH)]
Token = Annotated[int, Meta(ge=0, le=limits.MAX_TOKEN)]
Count = Annotated[int, Meta(ge=0, le=limits.MAX_COUNT)]
BulkLimit = Annotated[int, Meta(ge=1, le=limits.BULK_MAX)]


class Request(msgspec.Struct, tag_field="t", kw_only=True):
    """What every request carries: its type ``t`` (the tag) and ``id``."""

    id: RequestId

    @property
    def t(self) -> str:
        return str(self.__struct_config__.tag)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, for code that reads a request like a map (session rules,
        role checks); nil and undeclared fields read as ``default``."""
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
    v: Annotated[int, doc("protocol version; must be `1`, else `nack` `invalid`")]
    kind: Annotated[str, doc('`"worker"` for a worker session; anything else is a client')]
    name: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None,
        doc("display name (workers only; ignored for clients)", default="worker id"),
    ] = None
    worker_id: Annotated[
        str | None,
        doc(
            "stable worker identity; leases belong to it (workers only). It belongs to the "
            "key that registered it while the broker knows the worker and that key is "
            "active: another key reusing it gets `forbidden`",
            default="16 random hex chars",
        ),
    ] = None
    queues: Annotated[
        Annotated[list[Text], Meta(max_length=limits.MAX_WORKER_QUEUES)] | None,
        doc(_INFO, default='`["default"]`'),
    ] = None
    types: Annotated[
        Annotated[list[Text], Meta(max_length=limits.MAX_WORKER_TYPES)] | None,
        doc(_INFO, default="nil (any)"),
    ] = None
    host: Annotated[
        Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None,
        doc("informational", default='`""`'),
    ] = None
    pid: Annotated[
        Count | None, doc("informational (else `invalid`, the connection stays open)", default="0")
    ] = None
    concurrency: Annotated[
        Count | None, doc("informational (else `invalid`, the connection stays open)", default="0")
    ] = None
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
    # create, list, revoke (checked after the role, like a query's kind)
    op: Annotated[str, doc("`create`, `list` or `revoke`; else `invalid`")]
    role: Annotated[
        str | None,
        doc("`admin`, `producer`, `worker` or `reader`", required_for=("create",)),
    ] = None  # create: required (checked by the handler)
    name: Annotated[
        str | None, doc("`create`: a label, ≤ 200 characters", default="the key id")
    ] = None
    queues: Annotated[
        list[str] | None, doc("`create`: limit the key to these queues", default="nil (all)")
    ] = None
    expires_at: Annotated[
        Epoch | None, doc("`create`: epoch seconds in the future", default="nil (never)")
    ] = None
    key_id: Annotated[
        str | None, doc("the public id of the key to revoke", required_for=("revoke",))
    ] = None  # revoke: required (checked by the handler)


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


class Schedule(Request, tag="schedule"):
    # add, list, get, remove, pause, resume, run_now (checked after the role)
    op: Annotated[
        str,
        doc("`add`, `list`, `get`, `remove`, `pause`, `resume` or `run_now`; else `invalid`"),
    ]
    name: Annotated[
        str | None,
        doc(
            "the schedule's name (the rules of a queue name)",
            required_for=("add", "get", "remove", "pause", "resume", "run_now"),
        ),
    ] = None
    cron: Annotated[
        str | None,
        doc(
            "five fields: minute hour day-of-month month day-of-week (`*/5 * * * *`, "
            "`0 9 * * MON-FRI`), read as Debian's cron does (cronsim), DST transitions "
            "included",
            required_for=("add",),
        ),
    ] = None
    timezone: Annotated[
        str | None, doc("an IANA zone the expression is read in", default="`UTC`")
    ] = None
    task: Annotated[
        dict[str, Any] | None,
        doc(
            "what each tick submits: `type` (required), `payload`, `queue`, `priority`, "
            "`max_retries`, `timeout`, `retry_base`, `retry_cap`, with `submit`'s rules (no "
            "`idempotency_key`: each tick's task gets `tq-schedule:NAME:TICK`, TICK its Unix "
            "time, so a tick inserts at most one task)",
            required_for=("add",),
        ),
    ] = None
    missed: Annotated[
        str | None,
        doc(
            "ticks missed while no broker ran (older than 60 s when a broker gets to them): "
            "`skip` (dropped), `once` (one task for them all) or `all` (one per tick, at "
            "most 100, the latest)",
            default="`skip`",
        ),
    ] = None


class CapOp(Request, tag="cap"):
    # set, remove, list (checked after the role); kind, name for set and remove, and the
    # limits' ranges and rate text ("5/s") are checked by tq.broker.caps
    op: Annotated[str, doc("`set`, `remove` or `list`; else `invalid`")]
    kind: Annotated[
        str | None,
        doc("`queue` or `type`: what the cap limits", required_for=("set", "remove")),
    ] = None
    name: Annotated[
        str | None,
        doc("the queue or task type (the rules of a queue name)", required_for=("set", "remove")),
    ] = None
    concurrency: Annotated[
        int | None,
        doc("`set`: 1..1000000, at most this many of its tasks `running` at once"),
    ] = None
    rate: Annotated[
        int | float | str | None,
        doc(
            "`set`: at most this many of its tasks started per second, > 0 and ≤ 1000000; a "
            'number, or text `R/s`, `R/m` or `R/h` (`"30/m"` is 0.5)'
        ),
    ] = None  # tasks per second, or text R/s, R/m, R/h
    burst: Annotated[
        float | None,
        doc(
            "`set`, with `rate`: the rate bucket's size, 1..1000000 tasks",
            default="the larger of 1 and `rate`",
        ),
    ] = None


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


def decode(body: bytes) -> Request:
    """One frame body as its typed request; msgspec's errors as they come (the caller
    classifies them, see tq.protocol.errors)."""
    return _decoder.decode(body)


def convert(obj: object) -> Request:
    """An already decoded map (a large frame, decoded with its containers counted) as
    its typed request."""
    return msgspec.convert(obj, AnyRequest, strict=True)
