"""A sans-IO protocol connection: feed bytes, take messages, encode messages.

    conn = Connection()
    conn.receive_data(chunk)          # may raise FrameTooLarge / ProtocolError
    while (msg := conn.next_message()) is not None: ...
    wire_bytes = conn.send({"t": "ack", "id": 7})

A peer that must bound what a frame costs to decode (the broker) takes the
body and parses it in two steps, so that it can decide where a large frame
is decoded: ``body = conn.next_body()``, then ``conn.parse_request(body)``,
which gives the typed request (tq/protocol/schema.py).
``limit_incoming`` lowers the limit on frames received without changing the
limit on frames sent (a reader's requests are small, its answers are not).

Errors are of two kinds. Stream errors (oversize or malformed length, bytes
that are not msgpack, a map with no valid id) leave the stream unusable:
``next_message`` raises ProtocolError and the peer should NACK with id 0 and
close. Message errors (unknown ``t``, missing field) raise with ``.request_id``
set: answer with a NACK carrying that id and keep the connection.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tq.core.errors import ProtocolError, TQError
from tq.protocol.answers import Nack
from tq.protocol.answers import encode as encode_answer
from tq.protocol.frames import (
    DEFAULT_MAX_FRAME,
    INLINE_DECODE,
    FrameDecoder,
    encode_frame,
    frame_of,
    unpack,
    unpack_bounded,
)
from tq.protocol.messages import Message, request_id, validate
from tq.protocol.parse import MessageError, parse_request
from tq.protocol.schema import Request

__all__ = ["Connection", "MessageError"]


class Connection:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.broken = False

    def set_max_frame(self, max_frame: int) -> None:
        """Change the frame limit, e.g. raise it once the peer's hello is accepted."""
        self.max_frame = max_frame
        self._decoder.max_frame = max_frame

    def limit_incoming(self, max_frame: int) -> None:
        """Lower the limit on received frames only (sent frames keep ``max_frame``)."""
        self._decoder.max_frame = min(max_frame, self.max_frame)

    @property
    def max_incoming(self) -> int:
        return self._decoder.max_frame

    def receive_data(self, data: bytes) -> None:
        try:
            self._decoder.receive_data(data)
        except ProtocolError:
            self.broken = True
            raise

    def next_message(self) -> Message | None:
        body = self.next_body()
        return None if body is None else self.parse(body)

    def next_body(self) -> bytes | None:
        """The next complete frame body, undecoded, or None until more data arrives."""
        if self.broken:
            raise ProtocolError("connection is broken by an earlier protocol error")
        try:
            return self._decoder.next_frame()
        except ProtocolError:
            self.broken = True
            raise

    def parse(self, body: bytes) -> Message:
        """Decode and validate one body; bodies over INLINE_DECODE bytes are decoded with
        their maps and arrays counted (``unpack_bounded``). Thread-safe for one body."""
        try:
            obj = unpack(body) if len(body) <= INLINE_DECODE else unpack_bounded(body)
        except ProtocolError:
            self.broken = True
            raise
        rid = request_id(obj)
        if rid is None:
            self.broken = True
            return validate(obj)  # raises the stream-level ProtocolError
        try:
            return validate(obj)
        except TQError as exc:
            raise MessageError(exc, rid) from None

    def parse_request(self, body: bytes) -> Request:
        """Decode one request body straight into its typed declaration (the broker's
        side; tq/protocol/parse.py). Thread-safe for one body."""
        try:
            return parse_request(body)
        except MessageError:
            raise
        except ProtocolError:
            self.broken = True
            raise

    def send(self, message: dict[str, Any] | msgspec.Struct) -> bytes:
        """One frame: a map, or a declared answer (tq/protocol/answers.py), which
        encodes itself."""
        if isinstance(message, msgspec.Struct):
            return frame_of(encode_answer(message), self.max_frame)
        return encode_frame(message, self.max_frame)

    @staticmethod
    def nack(rid: int, exc: TQError) -> Nack:
        """The NACK that answers request ``rid`` (0: the connection) with ``exc``."""
        return Nack(id=rid, code=exc.code, message=exc.message, retry_after=exc.retry_after)
