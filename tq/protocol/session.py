"""The session rules of the wire protocol as a sans-IO state machine (h11's manner).

One ``Session`` per connection, on each side, fed the messages the peer sent
(``receive``) and the ones this side sends (``send``); it moves bytes never,
it only says whether a message is allowed now and what it means:

    session = Session(Role.CLIENT)
    hello = session.send({"t": "hello", "v": 1, "kind": "client"})  # gets its "id"
    ...                                                            # the peer's ACK arrives
    answer = session.receive(ack)          # Answer(rid=1, request="hello", reply=ack)
    assert session.state is State.READY

Roles: ``CLIENT`` and ``WORKER`` (a client whose hello says ``kind: "worker"``)
send requests and allocate their ids (1, 2, ...); ``BROKER`` receives them and
answers. Whether a request is allowed to this session's key (its role, a
worker session for ``claim``) is the broker's to judge: the client does not
know its key's role before the hello.

States, as this side sees the session:

* ``AWAITING_HELLO``: no accepted hello yet. A client sends ``hello`` (one at a
  time) and nothing else; a broker NACKs anything else ("the first message must
  be hello") and stays here after a refused hello.
* ``READY``: hello accepted; requests and answers flow, pipelined.
* ``SUBSCRIBED``: READY with the one subscription a connection may hold; its
  events carry the ``subscribe``'s id. A second ``subscribe`` is refused.
* ``CLOSING``: no new requests. A client enters it by ``close()`` or when the
  broker ends the session (a connection-level NACK, id 0: shutting down, idle,
  a revoked key); the broker by sending such a NACK or a refusal that closes.
* ``CLOSED``: the connection is gone (``connection_closed()``); every request
  still outstanding failed.

What may happen next is checked on both sides: an illegal send raises
``LocalProtocolError`` before a byte is written (a request before hello, a
second subscribe, anything after closing; a type this side does not know goes
to the broker, which may be newer and otherwise answers ``unknown_message``); a
peer's illegal message raises
``InvalidRequest`` on the broker (it NACKs it and goes on: the texts are those
docs/PROTOCOL.md quotes) or
``ProtocolError`` on a client (a broker that sends a request is broken).

What the client side gets back from ``receive``: ``Answer`` (the ACK or NACK
of an outstanding request, with the request's type), ``EventReceived`` (an
event of this session's subscription), ``Farewell`` (the broker ends the
session: its error, and the ids that will never be answered) or ``Ignored``
(an answer to no outstanding request, an event of no subscription: the
protocol says to ignore them). The broker side only tracks the requests that
change the session (hello, subscribe, unsubscribe): other ids are the
client's to keep unique, and the broker answers them in any order.

Imports only tq.core and the message tables; no sockets, no clocks, no trio.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from tq.core.errors import (
    Forbidden,
    InvalidRequest,
    ProtocolError,
    Timeout,
    TQError,
    Unauthorized,
    Unavailable,
    error_from_code,
)
from tq.protocol.messages import REQUEST_TYPES, Message
from tq.protocol.schema import Request

ANSWERS = frozenset({"ack", "nack"})
BROKER_SENDS = frozenset({"ack", "nack", "event"})
# a hello NACKed with one of these codes is followed by the broker closing the connection
HELLO_CLOSES = frozenset({Unauthorized.code, Forbidden.code, Timeout.code})


class Role(Enum):
    CLIENT = "client"
    WORKER = "worker"
    BROKER = "broker"


class State(Enum):
    AWAITING_HELLO = "awaiting hello"
    READY = "ready"
    SUBSCRIBED = "subscribed"
    CLOSING = "closing"
    CLOSED = "closed"


class LocalProtocolError(InvalidRequest):
    """This side tried to send what the session does not allow now (nothing was sent)."""


@dataclass(frozen=True)
class Answer:
    """The ACK or NACK of an outstanding request (``request``: its ``t``)."""

    rid: int
    request: str
    reply: Message
    # the ACK's msgpack body when ``reply`` holds only its envelope (the client core reads
    # no further: the request's declared answer is decoded from it, tq.client._api)
    body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.reply.get("t") == "ack"


@dataclass(frozen=True)
class EventReceived:
    message: Message


@dataclass(frozen=True)
class Farewell:
    """The broker ends the session (a NACK with id 0); ``failed``: ids never answered."""

    error: TQError
    failed: tuple[int, ...]


@dataclass(frozen=True)
class Ignored:
    message: Message


Received = Answer | EventReceived | Farewell | Ignored


def hello_first(kind: str) -> str:
    return f"the first message must be hello, not {kind}"


SECOND_HELLO = (
    "this connection already said hello; a session has one hello: "
    "open a new connection to use another key or kind"
)
SECOND_SUBSCRIPTION = (
    "this connection already has a subscription: unsubscribe first, or open another connection"
)


def broker_only(kind: str) -> str:
    return f"{kind} is sent by the broker only, never to it"


@dataclass
class Session:
    role: Role
    state: State = State.AWAITING_HELLO
    error: TQError | None = None  # why the session closed, if the broker said so
    subscription: int | None = None  # the id of the subscribe whose events arrive
    hello_accepted: bool = False  # stays True once closing
    server: dict[str, Any] = field(default_factory=dict)  # the hello ACK, whole (client side)
    _outstanding: dict[int, str] = field(default_factory=dict)  # rid -> request type
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # -- what is outstanding -------------------------------------------------------
    @property
    def outstanding(self) -> Mapping[int, str]:
        """Requests sent (client side) or received (broker: hello and subscriptions
        only) and not answered yet: id -> type."""
        return self._outstanding

    def _pending(self, kind: str) -> int | None:
        return next((rid for rid, t in self._outstanding.items() if t == kind), None)

    @property
    def is_open(self) -> bool:
        return self.state in (State.READY, State.SUBSCRIBED)

    # -- the client side -----------------------------------------------------------
    def send(self, message: Mapping[str, Any]) -> Message:
        """Check a message this side sends; a client's request gets its id here.

        Returns the message to encode (a copy, with ``id`` for a request). Raises
        LocalProtocolError if the session does not allow it now."""
        if self.role is Role.BROKER:
            return self._broker_send(dict(message))
        kind = message.get("t")
        if not isinstance(kind, str) or kind in BROKER_SENDS:
            raise LocalProtocolError(broker_only(str(kind)))
        self._check_client_send(kind, message)
        rid = next(self._ids)
        self._outstanding[rid] = kind
        return {**message, "id": rid}

    def _check_client_send(self, kind: str, message: Mapping[str, Any]) -> None:
        if self.state is State.CLOSED or self.state is State.CLOSING:
            if self.error is not None:
                raise self.error
            raise LocalProtocolError(f"this session is {self.state.value}: no new requests")
        if self.state is State.AWAITING_HELLO:
            if kind != "hello":
                raise LocalProtocolError(
                    f"send hello first and wait for its answer: {hello_first(kind)}"
                )
            if self._pending("hello") is not None:
                raise LocalProtocolError("a hello is already waiting for its answer")
            worker = message.get("kind") == "worker"
            if worker != (self.role is Role.WORKER):
                raise LocalProtocolError(
                    f"a {self.role.value} session says hello with kind "
                    f"{'worker' if self.role is Role.WORKER else 'client'}, "
                    f"not {message.get('kind')!r}"
                )
            return
        if kind == "hello":
            raise LocalProtocolError(SECOND_HELLO)
        if kind == "subscribe" and (
            self.state is State.SUBSCRIBED or self._pending("subscribe") is not None
        ):
            raise LocalProtocolError(SECOND_SUBSCRIPTION)

    def receive(self, message: Message) -> Any:
        """Account for a message from the peer.

        Client side: an Answer, EventReceived, Farewell or Ignored. Broker side:
        the request itself, once it is allowed (else InvalidRequest to NACK)."""
        if self.role is Role.BROKER:
            return self._broker_receive(message)
        kind, rid = message.get("t"), message.get("id")
        if self.state is State.CLOSED:
            return Ignored(message)
        if kind == "event":
            if self.subscription is not None and rid == self.subscription:
                return EventReceived(message)
            return Ignored(message)
        if kind not in ANSWERS:
            raise ProtocolError(f"the broker sent {kind!r}, which only clients send")
        if rid == 0 and kind == "nack":
            return self._farewell(message)
        request = self._outstanding.pop(rid, None) if isinstance(rid, int) else None
        if request is None or not isinstance(rid, int):
            return Ignored(message)
        ok = kind == "ack"
        if request == "hello" and self.state is State.AWAITING_HELLO:
            if ok:
                self.state, self.hello_accepted = State.READY, True
                self.server = dict(message)
            elif message.get("code") in HELLO_CLOSES:
                self.state = State.CLOSING  # the broker closes after such a refusal
        elif request == "subscribe" and ok and self.state is State.READY:
            self.state, self.subscription = State.SUBSCRIBED, rid
        elif request == "unsubscribe" and ok and self.state is State.SUBSCRIBED:
            self.state, self.subscription = State.READY, None
        return Answer(rid, request, message)

    def _farewell(self, message: Message) -> Farewell:
        error = error_from_code(
            str(message.get("code", "error")),
            str(message.get("message", "the broker closed the session")),
        )
        failed = tuple(self._outstanding)
        self._outstanding.clear()
        self.error = error
        self.state, self.subscription = State.CLOSING, None
        return Farewell(error, failed)

    def close(self) -> None:
        """This side ends the session: no new requests (answers still match)."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSING

    def connection_closed(self) -> tuple[int, ...]:
        """The connection is gone; the ids that were never answered (now failed)."""
        failed = tuple(self._outstanding)
        self._outstanding.clear()
        self.state, self.subscription = State.CLOSED, None
        return failed

    # -- the broker side -----------------------------------------------------------
    def receive_request(self, request: Request) -> Request:
        """The broker side of ``receive`` for a decoded (typed) request."""
        self._broker_receive(request)
        return request

    def _broker_receive(self, message: Message | Request) -> Message | Request:
        kind, rid = message.get("t"), message.get("id")
        if self.state is State.CLOSING or self.state is State.CLOSED:
            raise Unavailable(
                f"this session is {self.state.value} (the broker said why with id 0): "
                "open a new connection"
            )
        if kind not in REQUEST_TYPES:
            raise InvalidRequest(broker_only(str(kind)))
        if self.state is State.AWAITING_HELLO:
            if kind != "hello":
                raise InvalidRequest(hello_first(str(kind)))
            self._outstanding = {k: v for k, v in self._outstanding.items() if v != "hello"}
        elif kind == "hello":
            raise InvalidRequest(SECOND_HELLO)
        elif kind == "subscribe":
            if self.state is State.SUBSCRIBED or self._pending("subscribe") is not None:
                raise InvalidRequest(SECOND_SUBSCRIPTION)
        elif kind != "unsubscribe":
            return message  # the client keeps these ids unique; not tracked here
        if isinstance(rid, int):
            self._outstanding[rid] = str(kind)
        return message

    def broker_sends(self, answer: msgspec.Struct) -> None:
        """Check an answer or event the broker is about to send (a declared Struct of
        tq/protocol/answers.py) and move the session's state; LocalProtocolError if
        the session does not allow it now."""
        self._broker_send({"t": type(answer).__struct_config__.tag, "id": answer.id})  # type: ignore[attr-defined]

    def _broker_send(self, message: Message) -> Message:
        kind, rid = message.get("t"), message.get("id")
        if self.state is State.CLOSED:
            raise LocalProtocolError("this session is closed")
        if kind == "event":
            if self.subscription is None or rid != self.subscription:
                raise LocalProtocolError(f"no subscription {rid!r} on this session")
            return message
        if kind not in ANSWERS:
            raise LocalProtocolError(f"{kind} is sent by clients only, never by the broker")
        if rid == 0:
            if kind == "nack":
                self.state, self.subscription = State.CLOSING, None
            return message
        request = self._outstanding.pop(rid, None) if isinstance(rid, int) else None
        ok = kind == "ack"
        if request == "hello" and ok and self.state is State.AWAITING_HELLO:
            self.state, self.hello_accepted = State.READY, True
        elif request == "subscribe" and ok and self.state is State.READY:
            self.state, self.subscription = State.SUBSCRIBED, rid
        elif request == "unsubscribe" and ok:
            self.state, self.subscription = (
                State.READY if self.is_open else self.state,
                None,
            )
        return message


def session_for(kind: str) -> Session:
    """A client-side session for a hello of ``kind`` (``worker`` or anything else)."""
    return Session(Role.WORKER if kind == "worker" else Role.CLIENT)
