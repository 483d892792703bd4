"""Message types and their required fields.

A message is a msgpack map with ``t`` (type, a string) and ``id`` (an
unsigned integer chosen by the requester; the answer carries the same id).
Requests flow client->broker; ``ack`` and ``nack`` answer them. ``event``
is pushed by the broker, after the ACK of a ``subscribe``, with the id of
that ``subscribe`` (see tq/broker/events.py). Field tables here
are the single source of truth that docs/PROTOCOL.md describes.
"""

from __future__ import annotations

from typing import Any

from tq.core.errors import InvalidRequest, ProtocolError, UnknownMessage

Message = dict[str, Any]

# type -> {field: allowed python types}; only required fields are listed.
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"v": (int,), "kind": (str,)},
    "submit": {"tasks": (list,)},
    "claim": {"n": (int,), "queues": (list,)},
    "result": {"results": (list,)},
    "heartbeat": {"leases": (list,)},
    "query": {"q": (str,)},
    "cancel": {"task": (str,)},
    "retry": {"task": (str,)},
    "wait": {"task": (str,)},
    "subscribe": {"topics": (list,)},  # live events on this connection (tq/broker/events.py)
    "unsubscribe": {},
    "set_priority": {"task": (str,), "priority": (int, str)},
    "keys": {"op": (str,)},  # admin: API key management (create, list, revoke)
    "audit": {},  # admin: the audit log, newest first
    "purge": {"states": (list,)},  # operator: delete old finished tasks (issue 5)
    "retry_many": {"state": (str,)},  # operator: a whole state back to pending (issue 5)
    "ack": {},
    "nack": {"code": (str,), "message": (str,)},
    "event": {},
}
REQUEST_TYPES = frozenset(REQUIRED) - {"ack", "nack", "event"}
MESSAGE_TYPES = frozenset(REQUIRED)
MAX_REQUEST_ID = 2**63 - 1


def request_id(obj: object) -> int | None:
    """The ``id`` of a decoded map if it is a valid one, else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return None


def validate(obj: object) -> Message:
    """Check envelope and required fields; return the message.

    Raises ProtocolError when the frame is not a map with a valid id (the
    peer cannot be answered), UnknownMessage for an unknown ``t`` and
    InvalidRequest for a missing or mistyped field (both answerable: the
    caller NACKs with the id).
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed message: expected a map, got {type(obj).__name__}")
    if request_id(obj) is None:
        raise ProtocolError("malformed message: 'id' must be an unsigned 63-bit integer")
    kind = obj.get("t")
    fields = REQUIRED.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise UnknownMessage(
            f"unknown message type {kind!r}; known types: {', '.join(sorted(REQUIRED))}"
        )
    for name, types in fields.items():
        value = obj.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(t.__name__ for t in types)
            raise InvalidRequest(f"{kind} message: field {name!r} must be {expected}")
    return obj
