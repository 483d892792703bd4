"""Message types and their fields: the tables docs/PROTOCOL.md describes.

A message is a msgpack map with ``t`` (type, a string) and ``id`` (an
unsigned integer chosen by the requester; the answer carries the same id).
Requests flow client->broker; ``ack`` and ``nack`` answer them. ``event``
is pushed by the broker, after the ACK of a ``subscribe``, with the id of
that ``subscribe`` (see tq/broker/events.py).

``FIELDS`` declares every top-level field the broker reads from each
message type: its allowed msgpack types and whether it is required.
``validate`` enforces both before a request reaches its handler, so a
wrong type is always an ``invalid`` NACK naming the field. ``nil`` equals
absent: a nil optional field takes its default, a nil required field is
missing. Fields not declared here are ignored. Value rules beyond the type
(ranges, known names) belong to the handlers. tests/test_protocol_doc.py
checks these tables against docs/PROTOCOL.md row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tq.core.errors import InvalidRequest, ProtocolError, UnknownMessage

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: the python types msgpack decodes it to."""

    types: tuple[type, ...]
    required: bool = False

    @property
    def type_name(self) -> str:
        names = {int: "int", float: "float", str: "str", list: "array", dict: "map", bool: "bool"}
        if self.types == (int, float):
            return "number"
        return " or ".join(names[t] for t in self.types)


INT, NUMBER, STR, ARRAY, MAP, BOOL = (int,), (int, float), (str,), (list,), (dict,), (bool,)


def req(types: tuple[type, ...]) -> Field:
    return Field(types, required=True)


def opt(types: tuple[type, ...]) -> Field:
    return Field(types)


FIELDS: dict[str, dict[str, Field]] = {
    "hello": {
        "v": req(INT),
        "kind": req(STR),
        "name": opt(STR),
        "worker_id": opt(STR),
        "queues": opt(ARRAY),
        "types": opt(ARRAY),
        "host": opt(STR),
        "pid": opt(INT),
        "concurrency": opt(INT),
        "key": opt(STR),  # required unless the broker runs --no-auth (checked at login)
    },
    "submit": {"tasks": req(ARRAY)},
    "claim": {"n": req(INT), "queues": req(ARRAY), "types": opt(ARRAY), "wait": opt(NUMBER)},
    "result": {"results": req(ARRAY)},
    "heartbeat": {"leases": req(ARRAY), "stats": opt(MAP), "progress": opt(ARRAY)},
    "query": {
        "q": req(STR),
        "task": opt(STR),  # get, explain: required (checked by the handler)
        "state": opt(STR),
        "type": opt(STR),
        "queue": opt(STR),
        "limit": opt(INT),
        "after": opt(STR),
        "order": opt(STR),
    },
    "cancel": {"task": req(STR)},
    "retry": {"task": req(STR)},
    "wait": {"task": req(STR), "timeout": opt(NUMBER)},
    "purge": {
        "states": req(ARRAY),
        "older_than": req(NUMBER),
        "limit": opt(INT),
        "dry_run": opt(BOOL),
    },
    "retry_many": {"state": req(STR), "limit": opt(INT)},
    "keys": {
        "op": req(STR),
        "role": opt(STR),  # create: required (checked by the handler)
        "name": opt(STR),
        "queues": opt(ARRAY),
        "expires_at": opt(NUMBER),
        "key_id": opt(STR),  # revoke: required (checked by the handler)
    },
    "audit": {"limit": opt(INT), "before": opt(INT)},
    "set_priority": {"task": req(STR), "priority": req((int, str))},
    "queue": {"op": req(STR), "queue": req(STR)},  # pause / resume
    "schedule": {  # add, list, get, remove, pause, resume, run_now (tq/broker/schedules.py)
        "op": req(STR),
        "name": opt(STR),
        "cron": opt(STR),
        "timezone": opt(STR),
        "task": opt(MAP),
        "missed": opt(STR),
    },
    "cap": {  # set, remove, list (tq/broker/caps.py)
        "op": req(STR),
        "kind": opt(STR),
        "name": opt(STR),
        "concurrency": opt(INT),
        "rate": opt((int, float, str)),
        "burst": opt(NUMBER),
    },
    "subscribe": {"topics": req(ARRAY)},  # live events on this connection (tq/broker/events.py)
    "unsubscribe": {},
    "ack": {},
    "nack": {"code": req(STR), "message": req(STR), "retry_after": opt(NUMBER)},
    "event": {},
}
# type -> {field: allowed python types}, required fields only
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    kind: {name: f.types for name, f in fields.items() if f.required}
    for kind, fields in FIELDS.items()
}
REQUEST_TYPES = frozenset(FIELDS) - {"ack", "nack", "event"}
MESSAGE_TYPES = frozenset(FIELDS)
MAX_REQUEST_ID = 2**63 - 1


def request_id(obj: object) -> int | None:
    """The ``id`` of a decoded map if it is a valid one, else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return None


def _type_ok(value: object, field: Field) -> bool:
    if isinstance(value, bool):  # a bool is an int to python, never to the protocol
        return bool in field.types
    return isinstance(value, field.types)


def validate(obj: object) -> Message:
    """Check the envelope and every declared field's type; return the message.

    Raises ProtocolError when the frame is not a map with a valid id (the
    peer cannot be answered), UnknownMessage for a missing, non-str or
    unknown ``t`` and InvalidRequest for a missing required field or a
    declared field of the wrong type (both answerable: the caller NACKs
    with the id).
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed message: expected a map, got {type(obj).__name__}")
    if request_id(obj) is None:
        raise ProtocolError("malformed message: 'id' must be an unsigned 63-bit integer")
    kind = obj.get("t")
    fields = FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise UnknownMessage(
            f"unknown message type {kind!r}; 't' must be one of: {', '.join(sorted(FIELDS))}"
        )
    for name, field in fields.items():
        value = obj.get(name)
        if value is None:
            if field.required:
                raise InvalidRequest(
                    f"{kind} message: field {name!r} ({field.type_name}) is required"
                )
            continue
        if not _type_ok(value, field):
            raise InvalidRequest(
                f"{kind} message: field {name!r} must be {field.type_name}, "
                f"not {_msgpack_type(value)}"
            )
    return obj


def _msgpack_type(value: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    names = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin"}
    names.update({list: "array", dict: "map"})
    return names.get(type(value), type(value).__name__)
