"""The sans-IO protocol: frames, validation, limits, arbitrary bytes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq.core.errors import FrameTooLarge, InvalidRequest, ProtocolError, UnknownMessage
from tq.protocol import REQUEST_TYPES, Connection, FrameDecoder, encode_frame
from tq.protocol.connection import MessageError

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "tasks": st.lists(
                    st.fixed_dictionaries(
                        {"type": st.text(min_size=1, max_size=10), "payload": values}
                    ),
                    max_size=3,
                )
            }
        ),
        max_size=5,
    ),
    st.integers(min_value=1, max_value=64),
)
def test_messages_round_trip_in_any_chunking(bodies: list[dict], chunk: int) -> None:
    sender, receiver = Connection(), Connection()
    messages = [{"t": "submit", "id": i + 1, **b} for i, b in enumerate(bodies)]
    wire = b"".join(sender.send(m) for m in messages)
    got = []
    for start in range(0, len(wire), chunk):
        receiver.receive_data(wire[start : start + chunk])
        while (msg := receiver.next_message()) is not None:
            got.append(msg)
    assert got == messages


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decoder_fed_arbitrary_bytes_only_raises_protocol_errors(data: bytes) -> None:
    conn = Connection(max_frame=1024)
    try:
        conn.receive_data(data)
        while conn.next_message() is not None:
            pass
    except ProtocolError:
        pass  # every failure is a ProtocolError (MessageError is one too)


def test_oversize_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 100 bytes"):
        decoder.receive_data(struct.pack(">I", 101))
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": b"a" * 200}, max_frame=100)


def test_zero_length_and_garbage_frames_break_the_stream() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError, match="zero length"):
        conn.receive_data(struct.pack(">I", 0))
    conn = Connection()
    conn.receive_data(struct.pack(">I", 2) + b"\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        conn.next_message()
    assert conn.broken
    with pytest.raises(ProtocolError, match="broken"):
        conn.next_message()


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def test_unknown_type_and_bad_fields_are_answerable_by_id() -> None:
    conn = Connection()
    conn.receive_data(_frame({"t": "frobnicate", "id": 5}) + _frame({"t": "claim", "id": 6}))
    with pytest.raises(MessageError) as info:
        conn.next_message()
    assert info.value.request_id == 5 and isinstance(info.value.cause, UnknownMessage)
    with pytest.raises(MessageError) as info:
        conn.next_message()
    assert info.value.request_id == 6 and isinstance(info.value.cause, InvalidRequest)
    assert "field 'n'" in str(info.value)
    assert not conn.broken
    conn.receive_data(_frame({"t": "cancel", "id": 7, "task": "x"}))
    assert conn.next_message() == {"t": "cancel", "id": 7, "task": "x"}


def test_a_map_without_a_valid_id_breaks_the_stream() -> None:
    conn = Connection()
    conn.receive_data(_frame({"t": "submit", "id": -1, "tasks": []}))
    with pytest.raises(ProtocolError, match="'id'"):
        conn.next_message()
    assert conn.broken
    conn = Connection()
    conn.receive_data(_frame([1, 2]))
    with pytest.raises(ProtocolError, match="expected a map"):
        conn.next_message()


def test_nack_carries_code_and_retry_after() -> None:
    err = InvalidRequest("bad")
    err.retry_after = 2.0
    nack = Connection.nack(3, err)
    assert msgpack.unpackb(Connection().send(nack)[4:]) == {
        "t": "nack",
        "id": 3,
        "code": "invalid",
        "message": "bad",
        "retry_after": 2.0,
    }
    # retry_after is sent with rate_limited only: absent, not nil, when unset
    plain = Connection().send(Connection.nack(0, InvalidRequest("bad")))
    assert msgpack.unpackb(plain[4:]) == {"t": "nack", "id": 0, "code": "invalid", "message": "bad"}


def test_request_types_are_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    for kind in sorted(REQUEST_TYPES | {"ack", "nack"}):
        assert f"`{kind}`" in doc, f"docs/PROTOCOL.md does not describe {kind}"
