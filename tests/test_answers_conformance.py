"""Every answer a live broker sends fits its declaration (tq/protocol/answers.py).

A broker over TLS with a real SQLite file is driven through every request type
(and every ``q`` / ``op``), a worker session's claim, heartbeat and result, a
NACK, and a subscription's events. Each answer's body is decoded strictly with
the Struct its request declares, and must encode back to the very bytes the
broker sent: no field the declaration lacks, none missing, absent and nil as
declared. The reference client's reading of a malformed answer (a hostile
broker) is checked too: a clear BadAnswer naming the field.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import trio

from tq.client import _api as api
from tq.client.core import ClientCore
from tq.core.errors import ProtocolError
from tq.protocol import Connection, answers
from tq.protocol.session import Answer
from tq.testing import RunningBroker, running_broker


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Wire:
    """One raw connection; answers read as bodies, checked against their declaration."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection()
        self.rid = 100
        self.seen: set[str] = set()
        self.events: list[bytes] = []

    async def body(self) -> bytes:
        with trio.fail_after(15):
            while (body := self.conn.next_body()) is None:
                data = await self.stream.receive_some(65536)
                assert data, "the broker closed the connection"
                self.conn.receive_data(bytes(data))
        return body

    async def ask(self, msg: dict[str, Any], expect: str = "ack") -> Any:
        """Send ``msg``; its answer decoded strictly (events arriving meanwhile kept)."""
        self.rid += 1
        rid = self.rid
        await self.stream.send_all(_frame({**msg, "id": rid}))
        while True:
            body = await self.body()
            head = msgpack.unpackb(body)
            if head["t"] == "event":
                self.events.append(body)
                continue
            assert head["id"] == rid and head["t"] == expect, head
            t = msg["t"]
            sub = msg.get(answers.SUB_FIELD.get(t, ""))
            kind: type[msgspec.Struct] = answers.Nack
            if expect == "ack":
                kind = answers.answer_type(t, sub)
                self.seen.add(answers.answer_key(t, sub))
            return strict(body, kind)


def strict(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """``body`` as ``kind``, decoded strictly, and re-encoded to the same bytes."""
    typed = answers.decode_answer(body, kind)
    assert answers.encode(typed) == body, (kind.__name__, msgpack.unpackb(body))
    return typed


async def _connect(broker: RunningBroker, kind: str = "client", **hello: Any) -> Wire:
    from tq.client.aio import open_stream

    stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
    wire = Wire(stream)
    msg = {"t": "hello", "v": 1, "kind": kind, "key": broker.settings.key, **hello}
    ack = await wire.ask(msg)
    assert isinstance(ack, answers.HelloAnswer) and ack.role == "admin"
    return wire


@pytest.mark.trio
async def test_every_answer_of_a_live_broker_fits_its_declaration(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        admin = await _connect(broker)
        watcher = await _connect(broker)
        sub = await watcher.ask(
            {"t": "subscribe", "topics": ["tasks", "workers", "counts", "progress"]}
        )
        assert sub.topics == ["counts", "progress", "tasks", "workers"]

        trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        submitted = await admin.ask(
            {
                "t": "submit",
                "tasks": [
                    {"type": "echo", "payload": {"n": 1, "b": b"\x00\xff"}, "trace": trace},
                    {"type": "nobody", "idempotency_key": "k1", "depends_on": ["#0"]},
                    {"type": "later", "delay": 600},
                ],
            }
        )
        first, second, later = (t.id for t in submitted.tasks)
        assert [w.type for w in submitted.warnings] == ["echo", "later", "nobody"]
        worker = await _connect(broker, "worker", worker_id="w1", queues=["default"])

        claim = await worker.ask({"t": "claim", "n": 5, "queues": ["default"], "types": ["echo"]})
        [lease] = claim.tasks
        assert lease.id == first and lease.trace == trace
        beat = await worker.ask(
            {
                "t": "heartbeat",
                "leases": [[first, lease.token]],
                "stats": {"cpu": 1.0},
                "progress": [[first, lease.token, 0.5, "half"]],
            }
        )
        assert beat.lost == []
        for q in ("get", "explain", "workflow", "history"):
            await admin.ask({"t": "query", "q": q, "task": first})
        for q in ("stats", "workers", "depth", "health"):
            await admin.ask({"t": "query", "q": q})
        listed = await admin.ask({"t": "query", "q": "list", "limit": 1})
        assert listed.next is not None
        reported = await worker.ask(
            {
                "t": "result",
                "results": [
                    {"id": first, "token": lease.token, "status": "ok", "result": [1, 2.5, None]}
                ],
            }
        )
        assert reported.results[0].accepted
        # a claim with nothing to lease, a refused result: other shapes of the same answers
        empty = await worker.ask({"t": "claim", "n": 1, "queues": ["default"], "types": ["echo"]})
        assert empty.tasks == []
        again = await worker.ask(
            {"t": "result", "results": [{"id": first, "token": lease.token, "status": "ok"}]}
        )
        assert not again.results[0].accepted and again.results[0].reason

        waited = await admin.ask({"t": "wait", "task": first, "timeout": 1})
        assert waited.task.state == "succeeded" and not waited.timed_out
        # timeout 0 on a finished task: answered at once, not timed out
        waited = await admin.ask({"t": "wait", "task": first, "timeout": 0})
        assert waited.task.state == "succeeded" and not waited.timed_out
        assert (await admin.ask({"t": "set_priority", "task": later, "priority": "high"})).task
        assert (await admin.ask({"t": "cancel", "task": later})).task.state == "cancelled"
        assert (await admin.ask({"t": "retry", "task": later})).task.state in (
            "pending",
            "scheduled",
        )
        await admin.ask({"t": "cancel", "task": second})
        await admin.ask({"t": "retry_many", "state": "cancelled", "limit": 10})
        await admin.ask({"t": "purge", "states": ["succeeded"], "older_than": 0, "dry_run": True})

        created = await admin.ask({"t": "keys", "op": "create", "role": "reader", "name": "r"})
        await admin.ask({"t": "keys", "op": "list"})
        await admin.ask({"t": "keys", "op": "revoke", "key_id": created.info.id})
        audit = await admin.ask({"t": "audit", "limit": 2})
        assert len(audit.entries) == 2 and audit.next is not None

        for op in ("pause", "resume"):
            await admin.ask({"t": "queue", "op": op, "queue": "emails"})
        task = {"type": "export"}
        await admin.ask(
            {"t": "schedule", "op": "add", "name": "n", "cron": "0 3 * * *", "task": task}
        )
        await admin.ask({"t": "schedule", "op": "list"})
        for op in ("get", "pause", "resume", "run_now", "remove"):
            await admin.ask({"t": "schedule", "op": op, "name": "n"})
        await admin.ask(
            {
                "t": "cap",
                "op": "set",
                "kind": "queue",
                "name": "emails",
                "concurrency": 2,
                "rate": "10/s",
            }
        )
        depth = await admin.ask({"t": "query", "q": "depth"})
        assert any(q.cap is not None for q in depth.depth.queues)
        await admin.ask({"t": "cap", "op": "list"})
        await admin.ask({"t": "cap", "op": "remove", "kind": "queue", "name": "emails"})

        missing = await admin.ask({"t": "query", "q": "get", "task": "nope"}, "nack")
        assert missing.code == "not_found" and missing.retry_after is None

        await watcher.ask({"t": "unsubscribe"})
        seen = admin.seen | worker.seen | watcher.seen
        assert seen | {"hello"} == set(answers.ANSWERS), set(answers.ANSWERS) - seen

        topics = set()
        for body in watcher.events:
            event = msgpack.unpackb(body)
            strict(body, answers.EVENTS[event["topic"]])
            topics.add(event["topic"])
        assert {"tasks", "workers", "counts", "progress"} <= topics
        for wire in (admin, watcher, worker):
            await wire.stream.aclose()


def _client_core() -> tuple[ClientCore, Connection]:
    core = ClientCore("127.0.0.1:7470", 1 << 20, api.hello("client", "t"))
    rid, _ = core.hello_frame()
    broker = Connection()
    core.receive_data(
        broker.send(
            {
                "t": "ack",
                "id": rid,
                "v": 1,
                "server": "tq/x",
                "broker": "evil",
                "lease_ttl": 30.0,
                "worker_id": None,
                "key_id": None,
                "role": None,
            }
        )
    )
    assert isinstance(core.next_received(), Answer)
    return core, broker


@pytest.mark.parametrize(
    ("call", "answer", "where"),
    [
        (api.get("t1"), {"task": {"id": "t1", "state": "pending"}}, "$.task"),
        (api.stats(), {"stats": []}, "$.stats"),
        (api.list_tasks(), {"tasks": "all of them", "next": None}, "$.tasks"),
        (api.purge(["dead"], 0), {"purged": "1", "matched": 1, "more": False}, "$.purged"),
        (api.remove_cap("queue", "q"), {"kind": "queue", "name": "q"}, "removed"),
        (api.submit_many([{"type": "x"}]), {"tasks": [{"id": 7}], "warnings": []}, "$.tasks[0].id"),
        (api.wait_step("t1", 1.0), {"timed_out": False}, "task"),
    ],
)
def test_a_malformed_answer_is_a_clear_error_not_a_key_error(
    call: api.Call[Any], answer: dict[str, Any], where: str
) -> None:
    core, broker = _client_core()
    rid, _ = core.send(call.message)
    core.receive_data(broker.send({"t": "ack", "id": rid, **answer}))
    item = core.next_received()
    assert isinstance(item, Answer)
    with pytest.raises(answers.BadAnswer, match=r"malformed answer to .* from the broker") as info:
        call.parse(core.result(item))
    assert where in str(info.value)
    assert isinstance(info.value, ProtocolError)


def test_a_malformed_hello_ack_or_nack_breaks_the_connection_saying_why() -> None:
    core = ClientCore("127.0.0.1:7470", 1 << 20, api.hello("client", "t"))
    rid, _ = core.hello_frame()
    core.receive_data(Connection().send({"t": "ack", "id": rid, "v": "one"}))
    with pytest.raises(answers.BadAnswer, match=r"answer to hello.*\$\.v"):
        core.next_received()
    core, broker = _client_core()
    rid, _ = core.send(api.stats().message)
    core.receive_data(broker.send({"t": "nack", "id": rid, "code": 404}))
    item = core.next_received()
    assert isinstance(item, Answer)
    with pytest.raises(answers.BadAnswer, match=r"\$\.code"):
        core.result(item)


def test_a_malformed_event_is_refused_and_an_unknown_topic_passes() -> None:
    with pytest.raises(answers.BadAnswer, match=r"\$\.dropped"):
        api.parse_event(
            {"t": "event", "id": 1, "seq": 2, "topic": "lagged", "time": 1.0, "dropped": "many"}
        )
    event = api.parse_event({"t": "event", "id": 1, "seq": 2, "topic": "new", "time": 1.0, "x": 1})
    assert event.topic == "new" and event.data == {"x": 1}
