"""The client core (tq/client/core.py) and the API written once (tq/client/_methods.py):
pure unit tests of the core with frames made by hand, and checks that every shell
has the same methods."""

from __future__ import annotations

import inspect
import ssl
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq.client import _api as api
from tq.client import failover as fo
from tq.client._methods import AsyncMethods
from tq.client._methods_sync import SyncMethods
from tq.client.aio import Client
from tq.client.core import ClientCore, connect_targets
from tq.client.sync import BlockingClient
from tq.core.errors import (
    ConfigError,
    ConnectionFailed,
    NotFound,
    ProtocolError,
    RateLimited,
    TLSFailure,
    Unavailable,
)
from tq.protocol import Connection
from tq.protocol.answers import BadAnswer
from tq.protocol.frames import INLINE_DECODE
from tq.protocol.session import (
    Answer,
    EventReceived,
    Farewell,
    Ignored,
    LocalProtocolError,
    State,
)

ROOT = Path(__file__).resolve().parent.parent
WIRE = Connection()
HELLO_ACK = {
    "v": 1,
    "server": "tq/0.1.0",
    "broker": "tq",
    "lease_ttl": 30.0,
    "worker_id": None,
    "key_id": None,
    "role": None,
}


def ready_core(kind: str = "client") -> ClientCore:
    core = ClientCore("127.0.0.1:7470", 1 << 20, api.hello(kind, "t"))
    rid, frame = core.hello_frame()
    assert decode(frame)["t"] == "hello"
    core.receive_data(WIRE.send({"t": "ack", "id": rid, **HELLO_ACK}))
    assert isinstance(core.next_received(), Answer)
    return core


def decode(frame: bytes) -> dict:
    conn = Connection()
    conn.receive_data(frame)
    msg = conn.next_message()
    assert msg is not None
    return msg


def test_the_generated_blocking_api_is_up_to_date() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/unasync.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_every_client_has_the_api_written_once() -> None:
    names = [n for n, _ in inspect.getmembers(AsyncMethods, inspect.isfunction) if n[0] != "_"]
    assert {"submit", "submit_many", "wait", "list", "purge", "retry_many"} <= set(names)
    for name in names:
        written = inspect.signature(getattr(AsyncMethods, name))
        assert inspect.signature(getattr(SyncMethods, name)) == written
        assert getattr(Client, name) is getattr(AsyncMethods, name), name
        assert getattr(BlockingClient, name) is getattr(SyncMethods, name), name
        assert inspect.iscoroutinefunction(getattr(Client, name))
        assert not inspect.iscoroutinefunction(getattr(BlockingClient, name))


def test_answers_reach_their_request_and_nacks_raise() -> None:
    core = ready_core()
    assert core.server == {"t": "ack", "id": 1, **HELLO_ACK}
    first, frame = core.send(api.get("a").message)
    second, _ = core.send(api.stats().message)
    assert decode(frame) == {"t": "query", "q": "get", "task": "a", "id": first}
    answers = WIRE.send({"t": "ack", "id": second, "stats": {}}) + WIRE.send(
        {"t": "nack", "id": first, "code": "not_found", "message": "no task with id a"}
    )
    core.receive_data(answers[:5])  # bytes arrive in any pieces
    assert core.next_received() is None
    core.receive_data(answers[5:])
    stats = core.next_received()
    assert isinstance(stats, Answer) and stats.rid == second and stats.request == "query"
    # an ACK is read no further than its envelope; the request's declaration reads it
    reply = core.result(stats)
    assert reply == api.AnswerBody(answers[4 : 4 + len(reply.body)])  # type: ignore[union-attr]
    assert api.reply_map(reply) == {"t": "ack", "id": second, "stats": {}}
    missing = core.next_received()
    assert isinstance(missing, Answer) and missing.rid == first
    with pytest.raises(NotFound, match="no task with id a"):
        core.result(missing)


def test_a_request_the_session_forbids_is_refused_before_a_byte_is_sent() -> None:
    core = ClientCore("127.0.0.1:7470", 1 << 20, api.hello("client", "t"))
    with pytest.raises(LocalProtocolError, match="first message must be hello"):
        core.send(api.stats().message)
    core = ready_core()
    sub, _ = core.send(api.subscribe(["tasks"]).message)
    with pytest.raises(LocalProtocolError, match="already has a subscription"):
        core.send(api.subscribe(["counts"]).message)
    assert ready_core("worker").send({"t": "claim", "n": 1, "queues": ["q"]})[0] == 2
    core.receive_data(WIRE.send({"t": "ack", "id": sub, "topics": ["tasks"]}))
    assert isinstance(core.next_received(), Answer) and core.subscribed
    event = {"t": "event", "id": sub, "seq": 1, "topic": "tasks", "time": 1.0}
    core.receive_data(WIRE.send(event))
    assert core.next_received() == EventReceived(event)


def test_a_type_the_client_does_not_know_goes_to_the_broker() -> None:
    rid, frame = ready_core().send({"t": "schedule", "every": 5})  # a newer broker's request
    assert msgpack.unpackb(frame[4:]) == {"t": "schedule", "every": 5, "id": rid}


def test_the_brokers_farewell_becomes_the_connections_error() -> None:
    core = ready_core()
    rid, _ = core.send(api.stats().message)
    bye = {"t": "nack", "id": 0, "code": "unavailable", "message": "the broker is shutting down"}
    core.receive_data(WIRE.send(bye))
    farewell = core.next_received()
    assert isinstance(farewell, Farewell) and farewell.failed == (rid,)
    assert isinstance(core.error, Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        core.send(api.stats().message)


def test_a_broken_stream_and_a_closed_connection() -> None:
    core = ready_core()
    with pytest.raises(ProtocolError, match="zero length"):
        core.receive_data(b"\x00\x00\x00\x00")
    core = ready_core()
    core.receive_data(WIRE.send({"t": "ack", "id": 7})[:4] + b"\xc1" * 11)  # not msgpack
    with pytest.raises(ProtocolError):
        core.next_received()
    with pytest.raises(ConnectionFailed, match="was lost"):
        ready_core().receive_data(b"")
    core = ready_core()
    rid, _ = core.send(api.stats().message)
    assert core.fail(ConnectionFailed("gone")) == (rid,)
    assert core.session.state is State.CLOSED
    with pytest.raises(ConnectionFailed, match="gone"):
        core.send(api.stats().message)
    assert isinstance(core.io_error(OSError("reset")), ConnectionFailed)


def test_an_eof_after_the_hello_is_a_lost_connection_failover_may_retry() -> None:
    """Mutual TLS refusing our certificate shows as a TLS error before the hello's
    answer; the same EOF once the hello was answered is a broker that went away."""
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    before = ClientCore("127.0.0.1:7470", 1 << 20, api.hello("client", "t"))
    assert isinstance(before.io_error(eof), TLSFailure)
    after = ready_core().io_error(eof)
    assert not isinstance(after, TLSFailure) and fo.retriable(after)
    assert "was lost" in str(after)


def test_connect_targets_lists_every_address_in_order() -> None:
    assert connect_targets("b1:7470, b2:7471") == [
        ("b1", 7470, "b1:7470"),
        ("b2", 7471, "b2:7471"),
    ]
    with pytest.raises(ConfigError, match="no broker address"):
        connect_targets(" ")
    with pytest.raises(ConfigError, match="entry 1 of 2 is empty"):  # checked one by one
        connect_targets(" , ")


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_answers_in_any_order_and_any_pieces_reach_their_requests(
    n: int, data: st.DataObject
) -> None:
    core = ready_core()
    sent = {core.send(api.get(f"task-{i}").message)[0]: f"task-{i}" for i in range(n)}
    order = data.draw(st.permutations(sorted(sent)))
    wire = b"".join(WIRE.send({"t": "ack", "id": rid, "for": sent[rid]}) for rid in order)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    got: list[Answer] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if start < end:
            core.receive_data(wire[start:end])
        while (item := core.next_received()) is not None:
            assert isinstance(item, Answer)
            got.append(item)
    assert [a.rid for a in got] == list(order)
    assert all(api.reply_map(core.result(a))["for"] == sent[a.rid] for a in got)
    assert not core.session.outstanding


def test_an_ack_is_decoded_straight_into_its_requests_declaration() -> None:
    """The core reads an ACK's envelope only; ``Call.parse`` decodes its bytes into the
    declared answer: what fits is read, what does not is BadAnswer naming the field, a
    frame over INLINE_DECODE bytes and a stray id take the map path, and a NACK is
    decoded into its declaration and raised."""
    core = ready_core()
    call = api.get("a")
    rid, _ = core.send(call.message)
    core.receive_data(WIRE.send({"t": "ack", "id": rid, "task": {"id": "a"}}))
    item = core.next_received()
    assert isinstance(item, Answer) and item.body is not None
    with pytest.raises(BadAnswer, match=r"malformed answer to query get .*\$\.task"):
        call.parse(core.result(item))
    many = api.retry_many("dead")
    ok = {"retried": ["a"], "more": False}
    rid, _ = core.send(many.message)
    core.receive_data(WIRE.send({"t": "ack", "id": rid, **ok}))
    item = core.next_received()
    assert isinstance(item, Answer) and many.parse(core.result(item)) == ok
    # a large answer: decoded as a map, with its containers counted, then converted
    rid, _ = core.send(many.message)
    big = {"t": "ack", "id": rid, **ok, "pad": "x" * (INLINE_DECODE + 1)}
    core.receive_data(WIRE.send(big))
    item = core.next_received()
    assert isinstance(item, Answer) and item.body is None
    assert many.parse(core.result(item)) == ok
    # an ACK of no outstanding request is ignored, whatever it holds
    core.receive_data(WIRE.send({"t": "ack", "id": 999, "retried": 5}))
    assert isinstance(core.next_received(), Ignored)
    # a NACK: decoded into its declaration; one that does not fit is BadAnswer
    rid, _ = core.send(many.message)
    core.receive_data(
        WIRE.send({"t": "nack", "id": rid, "code": "rate_limited", "message": "slow down"})
        + WIRE.send({"t": "nack", "id": rid + 1, "code": 5, "message": "?"})
    )
    item = core.next_received()
    assert isinstance(item, Answer) and item.body is None
    with pytest.raises(RateLimited, match="slow down"):
        core.result(item)
    core.send(many.message)
    item = core.next_received()
    assert isinstance(item, Answer)
    with pytest.raises(BadAnswer, match="code"):
        core.result(item)


def test_an_event_is_decoded_straight_into_its_topics_declaration() -> None:
    """An event of the subscription is decoded from its bytes into its topic's
    declaration (``CheckedEvent``), read as the map path reads it; one that does not
    fit, or of a topic this client does not know, takes the map path, and the
    consumer's ``parse_event`` says what is wrong (the connection lives on)."""
    core = ready_core()
    sub, _ = core.send(api.subscribe(["counts"]).message)
    core.receive_data(WIRE.send({"t": "ack", "id": sub, "topics": ["counts"]}))
    assert isinstance(core.next_received(), Answer) and core.subscribed
    envelope = {"t": "event", "id": sub, "seq": 1, "topic": "counts", "time": 2.5}
    good = {**envelope, "queues": {"q": {"pending": 3}}}
    core.receive_data(WIRE.send(good) + WIRE.send({**envelope, "queues": 7}))
    item = core.next_received()
    assert isinstance(item, EventReceived) and type(item.message) is api.CheckedEvent
    assert api.parse_event(item.message) == api.parse_event(good)
    assert api.parse_event(item.message).data == {"queues": {"q": {"pending": 3}}}
    bad = core.next_received()
    assert isinstance(bad, EventReceived) and type(bad.message) is dict
    with pytest.raises(BadAnswer, match="queues"):
        api.parse_event(bad.message)
    newer = {**envelope, "topic": "weather", "sun": True}
    core.receive_data(WIRE.send(newer))
    item = core.next_received()
    assert isinstance(item, EventReceived) and api.parse_event(item.message).data == {"sun": True}
