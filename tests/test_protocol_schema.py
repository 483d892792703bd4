"""The typed requests (tq/protocol/schema.py): decoded once at the edge, refused with
the field, the rule and the value sent; the same declaration for the wire (small and
large frames) and for plain data (REST, files)."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tq.core import limits
from tq.core.errors import InvalidRequest, ProtocolError, UnknownMessage
from tq.core.task import TaskSpec, TaskSpecIn
from tq.protocol.frames import INLINE_DECODE
from tq.protocol.parse import MessageError, parse_request
from tq.protocol.schema import BY_TAG, Claim, Heartbeat, Query, Result, Submit


def parse(msg: dict[str, Any]) -> Any:
    return parse_request(msgpack.packb(msg))


def refusal(msg: dict[str, Any]) -> MessageError:
    with pytest.raises(MessageError) as info:
        parse(msg)
    assert info.value.request_id == msg["id"]
    return info.value


def padded(msg: dict[str, Any]) -> bytes:
    """``msg`` in a body over INLINE_DECODE bytes (the broker's large-frame path), by an
    undeclared field, which every request ignores."""
    body = msgpack.packb({**msg, "zz_padding": "x" * (INLINE_DECODE + 1)})
    assert len(body) > INLINE_DECODE
    return body


def test_the_hot_requests_decode_into_their_structs() -> None:
    claim = parse({"t": "claim", "id": 1, "n": 5, "queues": ["a"], "wait": 2})
    assert isinstance(claim, Claim) and (claim.n, claim.queues, claim.wait) == (5, ["a"], 2.0)
    beat = parse({"t": "heartbeat", "id": 2, "leases": [["t1", 7]], "stats": None})
    assert isinstance(beat, Heartbeat) and beat.leases == [("t1", 7)] and beat.stats is None
    result = parse({"t": "result", "id": 3, "results": [{"id": "t1", "token": 7, "status": "ok"}]})
    assert isinstance(result, Result) and result.results[0].status == "ok"
    submit = parse({"t": "submit", "id": 4, "tasks": [{"type": "echo", "payload": [1]}]})
    assert isinstance(submit, Submit) and isinstance(submit.tasks[0], TaskSpecIn)
    get = parse({"t": "query", "id": 5, "q": "get", "task": "t1"})
    assert isinstance(get, Query) and (get.q, get.task) == ("get", "t1")
    assert get.t == "query" and get.get("task") == "t1" and get.get("state", "x") == "x"


def test_every_declared_type_is_a_tag_and_undeclared_fields_are_ignored() -> None:
    assert {"hello", "submit", "claim", "result", "heartbeat", "query", "cap"} <= set(BY_TAG)
    cancel = parse({"t": "cancel", "id": 9, "task": "x", "from_the_future": {"a": 1}})
    assert cancel.t == "cancel" and cancel.get("task") == "x"


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        # a bool is never an integer, on the wire
        (
            {"t": "claim", "id": 1, "n": True, "queues": ["a"]},
            f"claim message: field 'n' must be an integer 1..{limits.MAX_CLAIM}, got bool True",
        ),
        (
            {"t": "claim", "id": 1, "n": limits.MAX_CLAIM + 1, "queues": ["a"]},
            f"field 'n' must be an integer 1..{limits.MAX_CLAIM}, got int {limits.MAX_CLAIM + 1}",
        ),
        # numbers are finite: NaN and the infinities fail the declared bounds
        (
            {"t": "claim", "id": 1, "n": 1, "queues": ["a"], "wait": math.nan},
            "claim message: field 'wait' must be a finite number 0..315360000, got float nan",
        ),
        (
            {"t": "wait", "id": 1, "task": "x", "timeout": -math.inf},
            "wait message: field 'timeout' must be a finite number",
        ),
        (
            {"t": "heartbeat", "id": 1},
            "heartbeat message: field 'leases' must be an array of [task id (a string), "
            "lease token (an integer)] pairs; it is required (nil or missing)",
        ),
        (
            {"t": "heartbeat", "id": 1, "leases": [["t1", True]]},
            "heartbeat message: field 'leases'[0][1] must be an integer 0..2^63-1, got bool True",
        ),
        (
            {"t": "result", "id": 1, "results": [{"id": "t", "token": 1, "status": "done"}]},
            "result message: field 'results'[0].status must be one of ok, reject, release, "
            "retry, got str 'done'",
        ),
        (
            {"t": "query", "id": 1, "q": "list", "limit": 0},
            f"query message: field 'limit' must be an integer 1..{limits.MAX_LIST}, got int 0",
        ),
        (
            {"t": "submit", "id": 1, "tasks": []},
            f"at most {limits.MAX_SUBMIT} tasks (split larger batches into several submits)",
        ),
        # a task spec is named by its index, and nothing of the request is kept
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "a"}, {"type": "b", "timeout": math.inf}]},
            "task 1: task timeout must be a finite number 0.001..1e+300, got float inf; "
            "nothing was submitted",
        ),
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "two words"}]},
            "task 0: task type must be a non-empty string of at most 200 characters, no spaces "
            "or commas, got str 'two words'; nothing was submitted",
        ),
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "a", "prio": 1}]},
            "task 0: unknown task field prio; known: ",
        ),
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "a", "delay": math.nan}]},
            "task 0: task delay must be a finite number of seconds 0..315360000 (10 years), "
            "got float nan",
        ),
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "a", "run_at": "2026-12-01T09:00:00Z"}]},
            "task 0: task run_at must be finite epoch seconds 0..253402300799 (1970..9999), "
            "got str '2026-12-01T09:00:00Z'",
        ),
        (
            {"t": "submit", "id": 1, "tasks": [{"type": "a", "unique_for": True}]},
            "task 0: task unique_for must be a number of seconds 0..31622400 (366 days), "
            "got bool True",
        ),
        (
            {"t": "heartbeat", "id": 1, "leases": [["t1", 7]], "progress": [["t1", 7, 1.5, None]]},
            "heartbeat message: field 'progress'[0][2] must be a finite number 0..1, got float 1.5",
        ),
        (
            {"t": "cap", "id": 1, "op": "set", "kind": "queue", "name": "q", "concurrency": True},
            f"cap message: field 'concurrency' must be an integer 1..{limits.MAX_CAP_CONCURRENCY}, "
            "got bool True",
        ),
    ],
)
def test_a_refusal_names_the_field_the_rule_and_the_value(msg: dict[str, Any], words: str) -> None:
    small = refusal(msg)
    assert isinstance(small.cause, InvalidRequest) and small.code == "invalid"
    assert words in str(small), str(small)
    # the large-frame path (decoded with its containers counted) says the same
    with pytest.raises(MessageError) as large:
        parse_request(padded(msg))
    assert str(large.value) == str(small)


def test_the_envelope_is_classified_before_the_fields() -> None:
    unknown = refusal({"t": "frobnicate", "id": 3, "n": True})
    assert isinstance(unknown.cause, UnknownMessage) and "'t' must be one of" in str(unknown)
    broker_only = refusal({"t": "ack", "id": 4})
    assert isinstance(broker_only.cause, InvalidRequest)
    for body in ([1, 2], {"t": "claim", "id": -1}, {"t": "claim", "id": True}):
        with pytest.raises(ProtocolError) as info:
            parse(body)  # type: ignore[arg-type]
        assert not isinstance(info.value, MessageError)


@given(
    st.one_of(
        st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=3), st.none()
    )
)
def test_claim_n_is_accepted_exactly_when_it_is_an_integer_in_range(n: object) -> None:
    msg = {"t": "claim", "id": 1, "n": n, "queues": ["a"]}
    fits = type(n) is int and 1 <= n <= limits.MAX_CLAIM
    try:
        claim = parse(msg)
    except MessageError as exc:
        assert not fits, exc
        assert "field 'n'" in str(exc)
    else:
        assert fits and claim.n == n


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "a", "max_retries": True},
        {"type": "a", "retry_cap": math.nan},
        {"type": "a", "queue": "x,y"},
        {"type": "a", "depends_on": "t1"},
        {"type": "a", "on_dependency_failure": "ignore"},
        {"type": "a", "surprise": 1},
        {"type": "a", "delay": -1},
        {"type": "a", "unique_key": ""},
        {"type": "a", "unique_key": "k"},  # needs unique_for: a rule joining two fields
        {"type": "a", "delay": -5, "depends_on": ["t1"]},  # a delayed workflow step: checked too
    ],
)
def test_plain_data_and_the_wire_refuse_a_task_in_the_same_words(spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as plain:
        TaskSpec.from_mapping(spec)
    msg = {"t": "submit", "id": 1, "tasks": [spec]}
    try:
        submit = parse(msg)
    except MessageError as wire:  # the declaration's rules: refused as the frame is read
        assert str(wire) == f"task 0: {plain.value}; nothing was submitted"
    else:  # rules joining fields: refused by the service, which adds the same prefix
        with pytest.raises(InvalidRequest) as joined:
            TaskSpec.of(submit.tasks[0])
        assert str(joined.value) == str(plain.value)


# -- the declarations and the stored task ---------------------------------------------------


def test_the_declared_task_spec_is_the_stored_one() -> None:
    assert set(TaskSpecIn.__struct_fields__) == {f.name for f in dataclasses.fields(TaskSpec)}


def _deep_submit(depth: int, pad: int = 0) -> bytes:
    """A submit whose one task has a payload nested ``depth`` arrays deep (written by hand:
    msgpack's packer refuses such depth); ``pad`` bytes of an undeclared field."""
    fields = {"t": "submit", "id": 9, **({"zz": "x" * pad} if pad else {})}
    head = bytes([0x80 | (len(fields) + 1)])
    for key, value in fields.items():
        head += msgpack.packb(key) + msgpack.packb(value)
    task = b"\x82" + msgpack.packb("type") + msgpack.packb("x") + msgpack.packb("payload")
    return head + msgpack.packb("tasks") + b"\x91" + task + b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize("depth", [100, 1000, 1023, 1200, 50_000])
@pytest.mark.parametrize("pad", [0, INLINE_DECODE])
def test_deep_nesting_is_refused_never_raised(depth: int, pad: int) -> None:
    """However deep a payload nests, parsing it ends in the protocol's errors (a refused
    task, or a malformed frame when msgpack itself gives up), never a RecursionError."""
    body = _deep_submit(depth, pad)
    try:
        submit = parse_request(body)
    except MessageError as exc:
        assert exc.request_id == 9 and "nested too deeply" in str(exc)
    except ProtocolError as exc:
        assert "malformed frame" in str(exc)
    else:
        with pytest.raises(InvalidRequest, match="nested deeper than 64 levels"):
            TaskSpec.of(submit.tasks[0])


def test_a_typed_decode_out_of_stack_is_an_answerable_refusal() -> None:
    """msgpack reads the frame but the typed decode runs out of recursion (a deeper call
    stack, as in the broker's tasks): the request is refused by id, not raised. (A large
    frame's payload is converted as it is, without recursing: only the inline path.)"""
    body = _deep_submit(500)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        with pytest.raises(MessageError) as info:
            parse_request(body)
    finally:
        sys.setrecursionlimit(limit)
    assert info.value.request_id == 9 and isinstance(info.value.cause, InvalidRequest)
    assert "submit: a value is nested too deeply to decode" in str(info.value)
    assert "at most 64 levels" in str(info.value)


@pytest.mark.parametrize(
    "spec", [{"payload": 2**64}, {"type": "a b", "payload": 2**64}, {"queue": 1, "payload": []}]
)
def test_the_plain_shortcut_reports_the_first_fault_like_the_full_path(
    spec: dict[str, Any],
) -> None:
    from types import MappingProxyType

    with pytest.raises(InvalidRequest) as shortcut:
        TaskSpec.from_mapping(spec)  # a dict of type/queue/payload: the shortcut
    with pytest.raises(InvalidRequest) as full:
        TaskSpec.from_mapping(MappingProxyType(spec))
    assert str(shortcut.value) == str(full.value)
