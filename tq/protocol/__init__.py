"""The tq wire protocol, sans-IO: bytes in, messages out, no sockets, no trio.

Contract: every peer (broker, worker, trio client, blocking client, console)
uses ``Connection`` from here. Frames are a 4-byte big-endian length and a
msgpack map; the length is checked against the limit before a byte of the
body is buffered or decoded. Imports only msgpack and tq.core.
docs/PROTOCOL.md is the normative description; keep the two in step.
"""

from tq.protocol.connection import Connection
from tq.protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from tq.protocol.messages import MESSAGE_TYPES, REQUEST_TYPES, Message, validate

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MESSAGE_TYPES",
    "REQUEST_TYPES",
    "Connection",
    "FrameDecoder",
    "Message",
    "encode_frame",
    "validate",
]
