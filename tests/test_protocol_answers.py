"""The declared answers (tq/protocol/answers.py): every request has one, every field
says what it means, the documented example answers decode into them strictly and
encode back to the same map, and the Structs encode to the bytes the broker's maps
have always taken (field order and absent-vs-nil included)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest

from tq.core.states import State
from tq.core.task import Lease, Task, TaskError
from tq.protocol import answers
from tq.protocol.schema import BY_TAG

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def _structs() -> set[type[msgspec.Struct]]:
    """Every Struct reachable from the answers, events and the NACK."""
    seen: set[type[msgspec.Struct]] = set()
    todo: list[Any] = [*answers.ANSWERS.values(), *answers.EVENTS.values(), answers.Nack]

    def walk(info: Any) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            todo.append(info.cls)
        for attr in ("type", "item_type", "value_type"):
            inner = getattr(info, attr, None)
            if isinstance(inner, msgspec.inspect.Type):
                walk(inner)
        for inner in getattr(info, "types", ()) or ():
            if isinstance(inner, msgspec.inspect.Type):
                walk(inner)
        for inner in getattr(info, "item_types", ()) or ():
            walk(inner)

    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        for f in info.fields:
            walk(f.type)
    return seen


def test_every_request_type_has_its_answer() -> None:
    for tag in BY_TAG:
        keys = [k for k in answers.ANSWERS if k == tag or k.startswith(tag + ".")]
        assert keys, f"no answer declared for {tag}"
    for key, struct in answers.ANSWERS.items():
        tag, _, sub = key.partition(".")
        assert tag in BY_TAG, key
        assert answers.answer_type(tag, sub or None) is struct
        assert struct.__struct_config__.tag == "ack"
    queries = {k.split(".")[1] for k in answers.ANSWERS if k.startswith("query.")}
    assert queries == {
        "get", "list", "stats", "workers", "depth", "health", "explain", "workflow", "history"
    }  # fmt: skip


def test_every_field_has_a_description() -> None:
    structs = _structs()
    assert answers.TaskMap in structs and answers.KeyInfo in structs
    missing = []
    for cls in structs:
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        for f in info.fields:
            t = f.type
            description = getattr(t, "extra_json_schema", None) or {}
            if not (isinstance(t, msgspec.inspect.Metadata) and "description" in description):
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def _doc_pairs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request, ack) pairs of the document's example blocks that are plain JSON."""
    text = DOC.read_text()
    pairs = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        requests: dict[int, dict[str, Any]] = {}
        for line in block.splitlines():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # elided ({…Task…}): not checkable as a whole
            if msg.get("t") == "ack" and msg["id"] in requests:
                pairs.append((requests[msg["id"]], msg))
            elif msg.get("t") not in ("ack", "nack", "event"):
                requests[msg["id"]] = msg
    return pairs


def test_the_documented_answers_decode_strictly_and_encode_back() -> None:
    pairs = _doc_pairs()
    tags = {request["t"] for request, _ in pairs}
    assert {"hello", "submit", "claim", "result", "heartbeat", "purge", "keys"} <= tags
    for request, ack in pairs:
        sub = request.get(answers.SUB_FIELD.get(request["t"], ""), None)
        kind = answers.answer_type(request["t"], sub)
        typed = answers.convert_answer(ack, kind)
        assert msgpack.unpackb(answers.encode(typed)) == ack, request["t"]


def test_the_documented_events_decode_strictly_and_encode_back() -> None:
    text = DOC.read_text()
    events = [
        json.loads(line)
        for line in text.splitlines()
        if line.startswith('{"t":"event"') and "…" not in line
    ]  # the workers event elides its worker map
    assert {e["topic"] for e in events} >= {"tasks", "counts", "lagged", "progress"}
    for event in events:
        typed = answers.convert_answer(event, answers.EVENTS[event["topic"]])
        assert msgpack.unpackb(answers.encode(typed)) == event


def _task() -> Task:
    return Task(
        id="01a21f99-619b-728d-903a-a9848a5fb4eb",
        type="email",
        queue="default",
        payload={"to": "a@b", "n": [1, 2.5, b"\x00"]},
        priority=200,
        state=State("dead"),
        attempts=1,
        max_retries=3,
        timeout=300.0,
        retry_base=1.0,
        retry_cap=300.0,
        created_at=1795826476.92,
        started_at=1795826477.01,
        error=TaskError("Boom", "it broke", "tb"),
        trace={"traceparent": "00-x"},
        progress=0.5,
    )


def test_a_task_and_a_lease_encode_to_the_bytes_of_their_maps() -> None:
    task = _task()
    typed = answers.convert_answer(task.to_dict(), answers.TaskMap)
    assert answers.encode(typed) == msgpack.packb(task.to_dict(), use_bin_type=True)
    for trace in (None, {"traceparent": "00-x"}):
        lease = Lease("t1", "email", "q", None, 100, 1, 3, 300.0, 2**62 - 1, 1.5, trace)
        typed_lease = answers.convert_answer(lease.to_dict(), answers.LeaseMap)
        assert answers.encode(typed_lease) == msgpack.packb(lease.to_dict(), use_bin_type=True)
    bare = Lease("t1", "e", "q", None, 1, 1, 1, 1.0, 1, 1.0).to_dict()
    assert b"trace" not in answers.encode(answers.convert_answer(bare, answers.LeaseMap))


def test_a_nack_sends_retry_after_only_when_set() -> None:
    plain = {"t": "nack", "id": 9, "code": "not_found", "message": "no task"}
    assert answers.encode(answers.Nack(id=9, code="not_found", message="no task")) == (
        msgpack.packb(plain)
    )
    limited = answers.Nack(id=2, code="rate_limited", message="slow down", retry_after=0.5)
    assert msgpack.unpackb(answers.encode(limited))["retry_after"] == 0.5


@pytest.mark.parametrize(
    ("kind", "answer", "where"),
    [
        (answers.HeartbeatAnswer, {"t": "ack", "id": 1, "lost": [7]}, "$.lost[0]"),
        (answers.ClaimAnswer, {"t": "ack", "id": 1, "tasks": [{"id": "x"}]}, "$.tasks[0]"),
        (answers.HelloAnswer, {"t": "ack", "id": 1, "v": 1}, "server"),
        (answers.HeartbeatAnswer, {"t": "nack", "id": 1, "lost": []}, "t"),
        (answers.PurgeAnswer, {"t": "ack", "id": 1, "purged": True}, "$.purged"),
    ],
)
def test_a_malformed_answer_is_refused_naming_the_field(
    kind: type[msgspec.Struct], answer: dict[str, Any], where: str
) -> None:
    with pytest.raises(answers.BadAnswer, match=re.escape(where)):
        answers.decode_answer(msgpack.packb(answer), kind)


def test_a_nack_and_an_event_go_out_in_their_documented_order() -> None:
    nack = answers.Nack(id=3, code="rate_limited", message="m", retry_after=1.5)
    assert msgpack.unpackb(answers.encode(nack)) == {
        "t": "nack",
        "id": 3,
        "code": "rate_limited",
        "message": "m",
        "retry_after": 1.5,
    }
    event = answers.LaggedEvent(id=9, seq=4, topic="lagged", time=2.0, dropped=3)
    wire = msgpack.unpackb(answers.encode(event))
    assert wire == {"t": "event", "id": 9, "seq": 4, "topic": "lagged", "time": 2.0, "dropped": 3}
    assert list(wire)[:5] == ["t", "id", "seq", "topic", "time"]
