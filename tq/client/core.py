"""The client core: one connection's request/answer logic, without I/O.

Every client (``Client`` on trio, ``AsyncioClient``, ``BlockingClient``) is a
thin shell that moves bytes for a ``ClientCore``:

    core = ClientCore(address, max_frame, hello_message)
    rid, frame = core.hello_frame()         # the hello, then any request:
    rid, frame = core.send(message)         # session rules checked, id allocated
    ... write frame; read bytes ...
    core.receive_data(data)
    while (item := core.next_received()) is not None:
        Answer -> the waiter of item.rid gets core.result(item) (a NACK raises)
        EventReceived -> the subscription's buffer
        Farewell -> the waiters of item.failed get core.error (the broker's reason)

The rules (hello first, one subscription, nothing after closing, answers
matched by id, id 0) are the session state machine's (tq/protocol/session.py);
the frames are ``Connection``'s. What the core adds: the connection's error,
kept once something broke it (every later request raises it), and the
translation of a transport failure into an error an operator can act on
(``io_error``). The client methods themselves are written once in
``_methods.py`` over a shell's ``_call``.

Where a shell connects is ``connect_targets``: the addresses to try in order.
A core lives as long as one connection: reconnecting (to the same broker or
another) is a new stream and a new ``ClientCore`` (a new session: hello first
again). What the old one leaves behind is exact: ``fail()`` and a
``Farewell`` name the requests sent and never answered (their outcome is
unknown), while a request the core refused to send raised before any byte.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tq.client import _api as api
from tq.client.options import split_addresses
from tq.config import parse_address
from tq.core.errors import TLSFailure, TQError
from tq.core.limits import MAX_REQUEST_ID
from tq.protocol import Connection, answers
from tq.protocol.answers import HelloAnswer, convert_answer
from tq.protocol.connection import MessageError
from tq.protocol.frames import INLINE_DECODE
from tq.protocol.session import Answer, Farewell, Received, Session, State, session_for
from tq.security.tls import describe_tls_error

RECEIVE_SIZE = 256 * 1024


class ClientCore:
    def __init__(self, address: str, max_frame: int, hello: Mapping[str, Any]) -> None:
        self.address = address
        self.hello = dict(hello)
        self.session: Session = session_for(str(self.hello.get("kind", "client")))
        self.conn = Connection(max_frame)
        self.error: TQError | None = None  # why the connection is unusable

    @property
    def server(self) -> dict[str, Any]:
        """The broker's hello ACK; empty before it."""
        return self.session.server

    @property
    def subscribed(self) -> bool:
        return self.session.state is State.SUBSCRIBED

    def hello_frame(self) -> tuple[int, bytes]:
        return self.send(self.hello)

    def send(self, message: Mapping[str, Any]) -> tuple[int, bytes]:
        """The id and frame of a request; raises the connection's error, or
        LocalProtocolError if the session does not allow the request now."""
        if self.error is not None:
            raise self.error
        msg = self.session.send(message)
        return msg["id"], self.conn.send(msg)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the broker (b"": it closed the connection)."""
        if not data:
            raise api.connection_lost(self.address)
        self.conn.receive_data(data)

    def next_received(self) -> Received | None:
        """The next message, as the session sees it; None until more bytes arrive.

        An ACK of an outstanding request (but hello's) is read no further than its
        envelope: its ``Answer`` carries the body, which ``result`` hands to the
        request's declaration as bytes (``api.AnswerBody``). A NACK is decoded straight
        into its declaration, an event of the subscription into its topic's
        (``api.CheckedEvent``). Anything else (hello's answer, a frame over
        INLINE_DECODE bytes, one whose envelope does not fit) is decoded as a map and
        checked as before. Raises the TQError that breaks the connection (a malformed
        frame)."""
        body = self.conn.next_body()
        if body is None:
            return None
        env = _envelope(body)
        if env is not None:
            if env.t == "ack":
                request = self.session.outstanding.get(env.id)
                if request is not None and request != "hello" and self.session.is_open:
                    item = self.session.receive({"t": "ack", "id": env.id})
                    return Answer(item.rid, item.request, item.reply, body)
            elif env.t == "nack":
                nack = _nack(body)
                if nack is not None:
                    return self._received(msgspec.to_builtins(nack))
            elif env.t == "event" and env.topic is not None and env.id == self.session.subscription:
                event = api.checked_event(body, env.topic)
                if event is not None:
                    return self._received(event)
        try:
            msg = self.conn.parse(body)
        except MessageError as exc:
            raise exc.cause from None
        return self._received(msg)

    def _received(self, msg: dict[str, Any]) -> Received:
        item = self.session.receive(msg)
        if isinstance(item, Answer) and item.request == "hello" and msg.get("t") == "ack":
            convert_answer(msg, HelloAnswer)  # checked: BadAnswer breaks the connection
        if isinstance(item, Farewell):
            self.error = item.error
        return item

    def result(self, answer: Answer) -> api.Reply:
        """The ACK (its body, for ``Call.parse`` to decode, or its map), or the NACK
        raised as its TQError."""
        if answer.body is not None:
            return api.AnswerBody(answer.body)
        return api.raise_for_nack(answer.reply)

    def fail(self, exc: TQError) -> tuple[int, ...]:
        """The connection is unusable: keep the first reason; the ids never answered."""
        if self.error is None:
            self.error = exc
        return self.session.connection_closed()

    def io_error(self, exc: BaseException) -> TQError:
        """What a failed read or write means to the user (the shell's own stream
        errors wrap these as ``__cause__``). A TLS error is a TLS failure (mutual TLS
        refused our certificate) unless the hello was answered and the broker just
        closed the connection: then it is a lost connection, which failover may
        retry (``failover.retriable``)."""
        if isinstance(exc, TQError):
            return exc
        if isinstance(exc, MessageError):
            return exc.cause
        cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
        if isinstance(cause, ssl.SSLError):  # e.g. mutual TLS refused our certificate
            if self.session.hello_accepted and api.closed_in_handshake(cause):
                return api.connection_lost(self.address)  # an EOF after the hello: lost
            return TLSFailure(describe_tls_error(cause, self.address, None))
        return api.connection_lost(self.address)


class _Envelope(msgspec.Struct):
    """What the core reads of an answer before it knows its declaration."""

    t: str
    id: Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]
    topic: str | None = None  # an event's


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_nack_decoder = msgspec.msgpack.Decoder(answers.Nack)


def _envelope(body: bytes) -> _Envelope | None:
    """The envelope of a body small enough to decode inline; None when it is larger or
    does not fit (then the body is decoded as a map, whose checks say what is wrong)."""
    if len(body) > INLINE_DECODE:
        return None
    try:
        return _envelope_decoder.decode(body)
    except msgspec.DecodeError:  # ValidationError too
        return None


def _nack(body: bytes) -> answers.Nack | None:
    try:
        return _nack_decoder.decode(body)
    except msgspec.DecodeError:
        return None  # the map path says what is wrong with it


def connect_targets(address: str) -> list[tuple[str, int, str]]:
    """(host, port, address) of each broker ``address`` lists, in the order to try.

    The one place a shell learns where to connect; each shell tries them with its
    own sockets and stops at the first that accepts."""
    return [(*parse_address(one), one) for one in split_addresses(address)]
