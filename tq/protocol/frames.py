"""Length-prefixed msgpack frames.

    frame = length:uint32 big-endian || body:msgpack map (length bytes)

``FrameDecoder`` checks the announced length against ``max_frame`` as soon
as the 4 header bytes are in, before buffering the body, so an oversize
frame costs nothing but its header. A zero length is malformed.

Decoding cost is bounded by the frame's size: a msgpack map or array can be
one byte on the wire and ~70 bytes as a Python object, so ``unpack_bounded``
allows at most ``CONTAINER_BASE + len(body) // BYTES_PER_CONTAINER`` of them
(a frame of 16 MiB of empty maps would otherwise cost ~1.3 GiB). It calls
back into Python once per map or array, which also gives other threads the
interpreter between containers when it runs off the event loop.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from tq.core.errors import FrameTooLarge, InvalidRequest, ProtocolError
from tq.core.limits import MAX_FRAME as DEFAULT_MAX_FRAME

HEADER = struct.Struct(">I")
INLINE_DECODE = 64 * 1024  # frames up to this size decode without a container count
CONTAINER_BASE = 1024  # maps and arrays any frame may hold ...
BYTES_PER_CONTAINER = 3  # ... plus one per this many bytes ([[1, 2], ...] still fits)

_packer_opts = {"use_bin_type": True, "datetime": False}


def pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, **_packer_opts)
    except OverflowError as exc:
        where = _too_large(obj, "")
        if where is None:
            raise ProtocolError(f"message cannot be encoded as msgpack: {exc}") from None
        path, value = where
        raise InvalidRequest(
            f"{path or 'the message'} is {value}, beyond any 64-bit integer the protocol "
            "carries: send a value in the range the field names"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message cannot be encoded as msgpack: {exc}") from None


def _too_large(obj: Any, path: str) -> tuple[str, int] | None:
    """The path (``field 'max_retries'``, ``field 'tasks'[0].timeout``) and value of the
    first integer msgpack cannot hold, if any."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        return (path, obj) if not -(2**63) <= obj < 2**64 else None
    items: Any = ()
    if isinstance(obj, dict):
        items = ((f"field '{k}'" if not path else f"{path}.{k}", v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    for where, value in items:
        found = _too_large(value, where)
        if found is not None:
            return found
    return None


def encode_frame(obj: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return frame_of(pack(obj), max_frame)


def frame_of(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """An encoded body with its length header, refused (FrameTooLarge) over the limit."""
    if len(body) > max_frame:
        raise FrameTooLarge(
            f"frame of {len(body)} bytes exceeds the limit of {max_frame} bytes; "
            "send fewer or smaller tasks per request"
        )
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise ProtocolError("malformed frame: trailing bytes after the msgpack map") from None
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"malformed frame: not valid msgpack ({exc})") from None


class TooManyContainers(ProtocolError):
    """A frame holds more maps and arrays than its size allows."""


def container_budget(size: int) -> int:
    return CONTAINER_BASE + size // BYTES_PER_CONTAINER


def unpack_bounded(body: bytes) -> Any:
    """``unpack``, refusing a frame with more maps and arrays than ``container_budget``."""
    budget = container_budget(len(body))
    count = 0

    def counted(obj: Any) -> Any:
        nonlocal count
        count += 1
        if count > budget:
            raise TooManyContainers(
                f"malformed frame: more than {budget} maps and arrays in {len(body)} bytes "
                f"(at most {CONTAINER_BASE} plus one per {BYTES_PER_CONTAINER} bytes); "
                "send larger values or fewer of them"
            )
        return obj

    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=False, object_hook=counted, list_hook=counted
        )
    except TooManyContainers:
        raise
    except msgpack.ExtraData:
        raise ProtocolError("malformed frame: trailing bytes after the msgpack map") from None
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"malformed frame: not valid msgpack ({exc})") from None


class FrameDecoder:
    """Accumulates bytes; yields complete frame bodies."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length once the header is read

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        self._check_header()

    def _check_header(self) -> None:
        if self._need is None and len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length == 0:
                raise ProtocolError("malformed frame: zero length")
            if length > self.max_frame:
                raise FrameTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
                )
            self._need = length

    def next_frame(self) -> bytes | None:
        """The next complete body, or None until more data arrives."""
        if self._need is None or len(self._buf) < HEADER.size + self._need:
            return None
        end = HEADER.size + self._need
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        self._need = None
        self._check_header()
        return body

    @property
    def buffered(self) -> int:
        return len(self._buf)
