"""Every request of the wire protocol, declared once as a msgspec Struct.

Contract: a frame body is decoded straight into one of these (``decode``); a
request that does not fit its declaration never reaches the broker's
handlers, and the error names the field. The same Structs are what the
service layer takes (claim, result, heartbeat, list take them directly; the
other handlers read them by name through ``Request.get``). docs/PROTOCOL.md's
field tables are checked against them (``tq.protocol.messages.FIELDS`` is
derived from them; tests/test_protocol_doc.py compares); the tables and the
OpenAPI schemas are still written by hand. Imports msgspec and tq.core only.

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
from tq.core.task import Priority, TaskSpecIn

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

    id: str
    token: Token
    status: Literal["ok", "retry", "reject", "release"]
    result: Any = None
    error: Any = None  # a map {type, message, traceback}; a non-map becomes its text
    delay: Seconds | None = None


# -- requests ---------------------------------------------------------------------------
class Hello(Request, tag="hello"):
    v: int
    kind: str
    name: Annotated[str, Meta(max_length=limits.MAX_WORKER_TEXT)] | None = None
    worker_id: str | None = None
    queues: Annotated[list[Text], Meta(max_length=limits.MAX_WORKER_QUEUES)] | None = None
    types: Annotated[list[Text], Meta(max_length=limits.MAX_WORKER_TYPES)] | None = None
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
    op: str  # create, list, revoke (checked after the role, like a query's kind)
    role: str | None = None  # create: required (checked by the handler)
    name: str | None = None
    queues: list[str] | None = None
    expires_at: Epoch | None = None
    key_id: str | None = None  # revoke: required (checked by the handler)


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


class Schedule(Request, tag="schedule"):
    op: str  # add, list, get, remove, pause, resume, run_now (checked after the role)
    name: str | None = None
    cron: str | None = None
    timezone: str | None = None
    task: dict[str, Any] | None = None
    missed: str | None = None


class CapOp(Request, tag="cap"):
    # set, remove, list (checked after the role); kind, name for set and remove, and the
    # limits' ranges and rate text ("5/s") are checked by tq.broker.caps
    op: str
    kind: str | None = None
    name: str | None = None
    concurrency: int | None = None
    rate: int | float | str | None = None  # tasks per second, or text R/s, R/m, R/h
    burst: float | None = None


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


def decode(body: bytes) -> Request:
    """One frame body as its typed request; msgspec's errors as they come (the caller
    classifies them, see tq.protocol.errors)."""
    return _decoder.decode(body)


def convert(obj: object) -> Request:
    """An already decoded map (a large frame, decoded with its containers counted) as
    its typed request."""
    return msgspec.convert(obj, AnyRequest, strict=True)
