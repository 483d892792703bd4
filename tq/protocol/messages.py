"""Message types and their fields: the tables docs/PROTOCOL.md describes.

A message is a msgpack map with ``t`` (type, a string) and ``id`` (an
unsigned integer chosen by the requester; the answer carries the same id).
Requests flow client->broker; ``ack`` and ``nack`` answer them. ``event``
is pushed by the broker, after the ACK of a ``subscribe``, with the id of
that ``subscribe`` (see tq/broker/events.py).

Requests are declared once, as Structs in tq/protocol/schema.py, and the
broker decodes them there (tq/protocol/parse.py); answers likewise in
tq/protocol/answers.py, which the clients read them through. ``FIELDS`` is
the summary of every message's top-level fields (allowed msgpack types,
required or not), generated from the Structs. ``validate`` checks a message's
envelope (and a request's fields, for peers that read plain maps). ``nil`` equals absent: a nil
optional field takes its default, a nil required field is missing. Fields
not declared are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgspec import inspect

from tq.core.errors import InvalidRequest, ProtocolError, UnknownMessage
from tq.core.limits import MAX_REQUEST_ID
from tq.protocol.answers import Nack
from tq.protocol.schema import BY_TAG

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


def _types(info: Any) -> tuple[type, ...]:
    """The python types msgpack decodes a declared field to (nil aside)."""
    if isinstance(info, inspect.UnionType):
        out: tuple[type, ...] = ()
        for t in info.types:
            if not isinstance(t, inspect.NoneType):
                out += tuple(x for x in _types(t) if x not in out)
        return out
    if isinstance(info, inspect.Metadata):
        return _types(info.type)
    simple = {
        inspect.IntType: INT,
        inspect.FloatType: NUMBER,
        inspect.StrType: STR,
        inspect.BoolType: BOOL,
        inspect.LiteralType: STR,
        inspect.ListType: ARRAY,
        inspect.TupleType: ARRAY,
        inspect.VarTupleType: ARRAY,
        inspect.DictType: MAP,
        inspect.StructType: MAP,
    }
    return simple.get(type(info), ())  # type: ignore[call-overload]


def _fields_of(struct: type) -> dict[str, Field]:
    info = inspect.type_info(struct)
    assert isinstance(info, inspect.StructType)
    return {
        f.encode_name: Field(_types(f.type), required=f.required)
        for f in info.fields
        if f.encode_name != "id"
    }


# generated from the declarations: requests (tq/protocol/schema.py) and the NACK
# (tq/protocol/answers.py); an ACK's and an event's fields depend on their request or
# topic (answers.ANSWERS, answers.EVENTS)
FIELDS: dict[str, dict[str, Field]] = {
    **{tag: _fields_of(struct) for tag, struct in BY_TAG.items()},
    "ack": {},
    "nack": _fields_of(Nack),
    "event": {},
}
ANSWER_TYPES = frozenset({"ack", "nack", "event"})
# type -> {field: allowed python types}, required fields only
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    kind: {name: f.types for name, f in fields.items() if f.required}
    for kind, fields in FIELDS.items()
}
REQUEST_TYPES = frozenset(FIELDS) - ANSWER_TYPES
MESSAGE_TYPES = frozenset(FIELDS)


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
    """Check the envelope and every declared field's type of a request; return the
    message. An answer's (``ack``, ``nack``, ``event``) envelope only: its fields are
    checked where they are read, against its declaration (tq/protocol/answers.py).

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
    if kind in ANSWER_TYPES:
        return obj
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
