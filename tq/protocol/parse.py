"""From a frame body to a typed request, and from msgspec's errors to tq's.

``parse_request(body)`` decodes straight into the request's Struct (one pass
in C). Only when that fails is the body decoded again, as plain data, to
classify the failure the way docs/PROTOCOL.md says:

* not a map, or no valid ``id``: ProtocolError (the stream is unusable);
* a missing, non-string or unknown ``t``: UnknownMessage (answerable by id);
* anything else: InvalidRequest naming the field, the rule and what came.

``explain`` turns a msgspec ValidationError into that text, reading the rule
from the declaration (tq.protocol.schema) and the offending value from the
plain data. Imports msgspec and tq.core/tq.protocol only.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from tq.core.errors import InvalidRequest, ProtocolError, TQError, UnknownMessage
from tq.core.typed import explain, type_name
from tq.core.values import MAX_DEPTH
from tq.protocol import schema
from tq.protocol.frames import INLINE_DECODE, unpack, unpack_bounded
from tq.protocol.session import broker_only

T = TypeVar("T")


class MessageError(ProtocolError):
    """A well-framed message that cannot be processed; answerable by id."""

    def __init__(self, cause: TQError, rid: int) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.code = cause.code
        self.request_id = rid


def request_id(obj: object) -> int | None:
    """The ``id`` of a decoded map if it is a valid one, else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if type(rid) is int and 0 <= rid <= schema.limits.MAX_REQUEST_ID:
            return rid
    return None


def parse_request(body: bytes) -> schema.Request:
    """The typed request in ``body``; ProtocolError (stream) or MessageError (by id).
    Bodies over INLINE_DECODE bytes are decoded with their maps and arrays counted
    first. Thread-safe."""
    if len(body) <= INLINE_DECODE:
        try:
            return schema.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            return _refuse(unpack(body), exc)
    obj = unpack_bounded(body)
    try:
        return schema.convert(obj)
    except (msgspec.ValidationError, RecursionError) as exc:
        return _refuse(obj, exc)


def _refuse(obj: object, exc: Exception) -> schema.Request:
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed message: expected a map, got {type_name(obj)}")
    rid = request_id(obj)
    if rid is None:
        raise ProtocolError("malformed message: 'id' must be an unsigned 63-bit integer")
    kind = obj.get("t")
    if kind in ("ack", "nack", "event"):  # the session's rule (tq.protocol.session)
        raise MessageError(InvalidRequest(broker_only(kind)), rid)
    if not isinstance(kind, str) or kind not in schema.BY_TAG:
        raise MessageError(UnknownMessage(unknown_type(kind)), rid)
    if isinstance(exc, RecursionError):  # msgpack read it; the typed decode could not
        raise MessageError(InvalidRequest(too_deep(kind)), rid)
    raise MessageError(InvalidRequest(explain(exc, schema.BY_TAG[kind], obj)), rid)


def too_deep(what: str) -> str:
    return (
        f"{what}: a value is nested too deeply to decode; payloads and results may nest "
        f"at most {MAX_DEPTH} levels of maps and arrays"
    )


def unknown_type(kind: object) -> str:
    known = sorted(schema.REQUEST_TYPES | {"ack", "nack", "event"})
    return f"unknown message type {kind!r}; 't' must be one of: {', '.join(known)}"


def typed(struct: type[T], data: Any, what: str | None = None) -> T:
    """``data`` (plain data from JSON, a query string, a file) as ``struct``, strict;
    InvalidRequest naming the field otherwise (``what`` names the thing: "list")."""
    try:
        return msgspec.convert(data, struct, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc, struct, data, what=what)) from None
    except RecursionError:
        raise InvalidRequest(too_deep(what or struct.__name__)) from None
