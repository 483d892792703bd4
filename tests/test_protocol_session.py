"""The sans-IO session state machine (tq/protocol/session.py): pure unit tests and
hypothesis state machines for both sides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import protodoc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tq.core.errors import InvalidRequest, ProtocolError, TQError, Unavailable
from tq.protocol.messages import REQUEST_TYPES
from tq.protocol.session import (
    Answer,
    EventReceived,
    Farewell,
    Ignored,
    LocalProtocolError,
    Role,
    Session,
    State,
    session_for,
)
from tq.testing import running_broker

HELLO = {"t": "hello", "v": 1, "kind": "client"}


def ack(rid: int, **fields: Any) -> dict[str, Any]:
    return {"t": "ack", "id": rid, **fields}


def nack(rid: int, code: str = "invalid", message: str = "no") -> dict[str, Any]:
    return {"t": "nack", "id": rid, "code": code, "message": message}


def ready(role: Role = Role.CLIENT) -> Session:
    session = Session(role)
    kind = "worker" if role is Role.WORKER else "client"
    hello = session.send({**HELLO, "kind": kind})
    session.receive(ack(hello["id"], lease_ttl=30))
    return session


# -- the client side ------------------------------------------------------------------


def test_a_hello_accepted_makes_the_session_ready_and_keeps_the_answer() -> None:
    session = Session(Role.CLIENT)
    hello = session.send(HELLO)
    assert hello["id"] == 1 and session.outstanding == {1: "hello"}
    answer = session.receive(ack(1, lease_ttl=30))
    assert answer == Answer(1, "hello", ack(1, lease_ttl=30))
    assert session.state is State.READY and session.server == ack(1, lease_ttl=30)
    assert session.send({"t": "query", "q": "stats"})["id"] == 2


def test_a_request_before_hello_is_refused_locally() -> None:
    session = Session(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="the first message must be hello, not submit"):
        session.send({"t": "submit", "tasks": []})
    session.send(HELLO)
    with pytest.raises(LocalProtocolError, match="first message must be hello"):
        session.send({"t": "query", "q": "stats"})  # hello sent, not yet accepted
    with pytest.raises(LocalProtocolError, match="already waiting"):
        session.send(HELLO)
    assert session.outstanding == {1: "hello"}


def test_a_refused_hello_may_be_said_again_unless_the_broker_closes() -> None:
    session = Session(Role.CLIENT)
    session.send(HELLO)
    session.receive(nack(1, "invalid", "unsupported version"))
    assert session.state is State.AWAITING_HELLO
    session.send(HELLO)
    session.receive(nack(2, "unauthorized", "bad key"))
    assert session.state is State.CLOSING
    with pytest.raises(LocalProtocolError, match="closing"):
        session.send(HELLO)


def test_second_hello_and_second_subscription_are_refused() -> None:
    session = ready()
    with pytest.raises(LocalProtocolError, match="already said hello"):
        session.send(HELLO)
    sub = session.send({"t": "subscribe", "topics": ["tasks"]})
    with pytest.raises(LocalProtocolError, match="already has a subscription"):
        session.send({"t": "subscribe", "topics": ["counts"]})  # the first is not yet ACKed
    session.receive(ack(sub["id"], topics=["tasks"]))
    assert session.state is State.SUBSCRIBED and session.subscription == sub["id"]
    with pytest.raises(LocalProtocolError, match="already has a subscription"):
        session.send({"t": "subscribe", "topics": ["counts"]})
    unsub = session.send({"t": "unsubscribe"})
    session.receive(ack(unsub["id"]))
    assert session.state is State.READY and session.subscription is None
    session.send({"t": "subscribe", "topics": ["counts"]})


def test_a_refused_subscribe_leaves_the_session_ready() -> None:
    session = ready()
    sub = session.send({"t": "subscribe", "topics": ["bogus"]})
    assert isinstance(session.receive(nack(sub["id"])), Answer)
    assert session.state is State.READY
    session.send({"t": "subscribe", "topics": ["tasks"]})


def test_events_of_the_subscription_only() -> None:
    session = ready()
    sub = session.send({"t": "subscribe", "topics": ["tasks"]})["id"]
    early = {"t": "event", "id": sub, "seq": 1, "topic": "tasks"}
    assert isinstance(session.receive(early), Ignored)  # before the ACK: no subscription yet
    session.receive(ack(sub))
    assert session.receive(early) == EventReceived(early)
    assert isinstance(session.receive({**early, "id": sub + 100}), Ignored)


def test_the_hello_kind_follows_the_role_and_the_broker_judges_the_rest() -> None:
    # a client session may send claim: the broker answers by the key's role first
    # (forbidden) or says it is for workers; the client cannot know its role yet
    assert ready().send({"t": "claim", "n": 1, "queues": ["default"]})["id"] == 2
    assert ready(Role.WORKER).send({"t": "claim", "n": 1, "queues": ["default"]})["id"] == 2
    with pytest.raises(LocalProtocolError, match="kind worker"):
        Session(Role.WORKER).send(HELLO)
    with pytest.raises(LocalProtocolError, match="kind client"):
        Session(Role.CLIENT).send({**HELLO, "kind": "worker"})
    assert session_for("worker").role is Role.WORKER
    assert session_for("client").role is Role.CLIENT


def test_only_requests_are_sent_by_a_client() -> None:
    with pytest.raises(LocalProtocolError, match="ack is sent by the broker only"):
        ready().send({"t": "ack"})


def test_the_brokers_farewell_fails_what_is_outstanding_and_later_sends() -> None:
    session = ready()
    first = session.send({"t": "query", "q": "stats"})["id"]
    second = session.send({"t": "wait", "task": "x"})["id"]
    farewell = session.receive(nack(0, "unavailable", "the broker is shutting down"))
    assert isinstance(farewell, Farewell)
    assert farewell.failed == (first, second) and isinstance(farewell.error, Unavailable)
    assert session.state is State.CLOSING and not session.outstanding
    with pytest.raises(Unavailable, match="shutting down"):
        session.send({"t": "query", "q": "stats"})
    assert isinstance(session.receive(ack(first)), Ignored)  # failed already


def test_answers_after_close_still_match_and_nothing_new_is_sent() -> None:
    session = ready()
    rid = session.send({"t": "query", "q": "get", "task": "x"})["id"]
    session.close()
    with pytest.raises(LocalProtocolError, match="closing"):
        session.send({"t": "query", "q": "stats"})
    assert session.receive(ack(rid)) == Answer(rid, "query", ack(rid))
    assert session.connection_closed() == ()
    assert session.state is State.CLOSED


def test_a_broker_that_sends_a_request_breaks_the_session() -> None:
    with pytest.raises(ProtocolError, match="only clients send"):
        ready().receive({"t": "submit", "id": 5, "tasks": []})


# -- the broker side ------------------------------------------------------------------


def test_the_broker_side_enforces_hello_first_and_one_subscription() -> None:
    broker = Session(Role.BROKER)
    with pytest.raises(InvalidRequest, match="the first message must be hello, not submit"):
        broker.receive({"t": "submit", "id": 1, "tasks": []})
    broker.receive({**HELLO, "id": 2})
    broker.send(nack(2))  # refused (say, a wrong version): hello may come again
    assert broker.state is State.AWAITING_HELLO
    broker.receive({**HELLO, "id": 3})
    broker.send(ack(3))
    assert broker.state is State.READY
    with pytest.raises(InvalidRequest, match="already said hello"):
        broker.receive({**HELLO, "id": 4})
    with pytest.raises(InvalidRequest, match="event is sent by the broker only"):
        broker.receive({"t": "event", "id": 4})
    broker.receive({"t": "subscribe", "id": 5, "topics": ["tasks"]})
    broker.send(ack(5, topics=["tasks"]))
    assert broker.state is State.SUBSCRIBED
    broker.send({"t": "event", "id": 5, "seq": 1})
    with pytest.raises(LocalProtocolError, match="no subscription 6"):
        broker.send({"t": "event", "id": 6, "seq": 1})
    with pytest.raises(InvalidRequest, match="already has a subscription"):
        broker.receive({"t": "subscribe", "id": 6, "topics": ["counts"]})
    broker.receive({"t": "unsubscribe", "id": 7})
    broker.send(ack(7))
    assert broker.state is State.READY
    broker.send(nack(0, "unavailable", "bye"))
    assert broker.state is State.CLOSING
    with pytest.raises(Unavailable):
        broker.receive({"t": "query", "id": 8, "q": "stats"})


def test_the_broker_does_not_track_ordinary_request_ids() -> None:
    broker = Session(Role.BROKER)
    broker.receive({**HELLO, "id": 1})
    broker.send(ack(1))
    for _ in range(2):  # the same id twice: the client's to avoid, never the broker's
        broker.receive({"t": "query", "id": 9, "q": "stats"})
    assert broker.outstanding == {}


# -- properties -----------------------------------------------------------------------

CLIENT_KINDS = [*sorted(REQUEST_TYPES), "schedule"]  # and one this side does not know


class ClientSessionMachine(RuleBasedStateMachine):
    """Random sends and receives: the session never reaches an inconsistent state and
    every answer is matched to the request that carried its id."""

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(Role.CLIENT)
        self.sent: dict[int, str] = {}  # every id ever allocated -> its request type
        self.answered: set[int] = set()

    @rule(kind=st.sampled_from(CLIENT_KINDS))
    def send(self, kind: str) -> None:
        before = self.session.state
        message = {"t": kind, "kind": "client"} if kind == "hello" else {"t": kind}
        try:
            sent = self.session.send(message)
        except LocalProtocolError:
            assert self.session.state is before
            return
        except TQError as exc:  # the broker ended the session: its reason, every time
            assert exc is self.session.error
            assert self.session.state in (State.CLOSING, State.CLOSED)
            return
        rid = sent["id"]
        assert rid not in self.sent and rid > 0
        self.sent[rid] = kind
        assert before in (State.AWAITING_HELLO, State.READY, State.SUBSCRIBED)
        assert (kind == "hello") == (before is State.AWAITING_HELLO)

    @precondition(lambda self: bool(self.session.outstanding))
    @rule(data=st.data(), ok=st.booleans())
    def answer(self, data: st.DataObject, ok: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.session.outstanding)))
        got = self.session.receive(ack(rid) if ok else nack(rid))
        assert isinstance(got, Answer) and got.rid == rid and got.request == self.sent[rid]
        assert got.ok is ok
        self.answered.add(rid)

    @rule(rid=st.integers(min_value=1, max_value=60), ok=st.booleans())
    def stray_answer(self, rid: int, ok: bool) -> None:
        if rid in self.session.outstanding:
            return
        assert isinstance(self.session.receive(ack(rid) if ok else nack(rid)), Ignored)

    @rule(rid=st.integers(min_value=0, max_value=60))
    def event(self, rid: int) -> None:
        got = self.session.receive({"t": "event", "id": rid, "seq": 1})
        if self.session.state is State.SUBSCRIBED and rid == self.session.subscription:
            assert isinstance(got, EventReceived)
        else:
            assert isinstance(got, Ignored)

    @rule(code=st.sampled_from(["unavailable", "timeout", "unauthorized", "protocol"]))
    def farewell(self, code: str) -> None:
        outstanding = tuple(self.session.outstanding)
        got = self.session.receive(nack(0, code, "bye"))
        if self.session.state is State.CLOSED:
            assert isinstance(got, Ignored)
            return
        assert isinstance(got, Farewell) and got.failed == outstanding
        assert got.error.code == code

    @rule()
    def close(self) -> None:
        self.session.close()

    @rule()
    def connection_closed(self) -> None:
        outstanding = tuple(self.session.outstanding)
        assert self.session.connection_closed() == outstanding

    @invariant()
    def consistent(self) -> None:
        session = self.session
        assert isinstance(session.state, State)
        assert (session.subscription is not None) == (session.state is State.SUBSCRIBED)
        if session.subscription is not None:
            assert self.sent[session.subscription] == "subscribe"
        assert all(self.sent[rid] == kind for rid, kind in session.outstanding.items())
        assert not set(session.outstanding) & self.answered
        if session.state is State.CLOSED:
            assert not session.outstanding
        if session.state is State.AWAITING_HELLO:
            assert set(session.outstanding.values()) <= {"hello"}
        if session.state is not State.AWAITING_HELLO:
            assert "hello" not in session.outstanding.values() or session.state is State.CLOSING


class BrokerSessionMachine(RuleBasedStateMachine):
    """The broker side: random requests and answers never leave a subscription without
    SUBSCRIBED, nor a request before hello accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(Role.BROKER)
        self.next_id = 1
        self.received: dict[int, str] = {}

    @rule(kind=st.sampled_from([*CLIENT_KINDS, "ack", "event"]))
    def receive(self, kind: str) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        before = self.session.state
        try:
            self.session.receive({"t": kind, "id": rid})
        except (InvalidRequest, Unavailable):
            return
        assert before is not State.AWAITING_HELLO or kind == "hello"
        assert before is State.AWAITING_HELLO or kind != "hello"
        self.received[rid] = kind

    @precondition(lambda self: bool(self.received))
    @rule(data=st.data(), ok=st.booleans())
    def answer(self, data: st.DataObject, ok: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.received)))
        kind = self.received.pop(rid)
        before = self.session.state
        try:
            self.session.send(ack(rid) if ok else nack(rid))
        except LocalProtocolError:
            assert before is State.CLOSED
            return
        if kind == "subscribe" and ok and before is State.READY:
            assert self.session.state is State.SUBSCRIBED
            assert self.session.subscription == rid

    @rule()
    def farewell(self) -> None:
        try:
            self.session.send(nack(0, "unavailable", "bye"))
        except LocalProtocolError:
            assert self.session.state is State.CLOSED
            return
        assert self.session.state is State.CLOSING

    @rule()
    def connection_closed(self) -> None:
        self.session.connection_closed()

    @invariant()
    def consistent(self) -> None:
        session = self.session
        assert (session.subscription is not None) == (session.state is State.SUBSCRIBED)
        assert set(session.outstanding.values()) <= {"hello", "subscribe", "unsubscribe"}


TestClientSession = ClientSessionMachine.TestCase
TestClientSession.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBrokerSession = BrokerSessionMachine.TestCase
TestBrokerSession.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- the broker's session follows the same rules on the wire ---------------------------


@pytest.mark.slow
@pytest.mark.trio
async def test_the_broker_refuses_a_second_subscription_on_the_wire(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await protodoc.session(broker)
        first = await raw.ask({"t": "subscribe", "id": 2, "topics": ["tasks"]})
        assert first is not None and first["t"] == "ack"
        second = await raw.ask({"t": "subscribe", "id": 3, "topics": ["counts"]})
        assert second is not None and second["t"] == "nack" and second["code"] == "invalid"
        assert "already has a subscription" in second["message"]
        done = await raw.ask({"t": "unsubscribe", "id": 4})
        assert done is not None and done["t"] == "ack"
        again = await raw.ask({"t": "subscribe", "id": 5, "topics": ["counts"]})
        assert again is not None and again["t"] == "ack", "one subscription at a time"
        await raw.send(protodoc.frame({"t": "ack", "id": 6}))
        while (stray := await raw.read()) is not None and stray["t"] == "event":
            pass  # the counts subscription's first event may come first
        assert stray is not None and stray["id"] == 6 and stray["code"] == "invalid"
        assert "sent by the broker only" in stray["message"]
        await raw.aclose()
