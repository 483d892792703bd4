"""One test per behavioural statement of docs/PROTOCOL.md that the broker or the page got wrong.

Each runs a live broker over TLS and speaks raw frames (tests/protodoc.py),
as a client written from the page alone would.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from protodoc import connect, frame, load_doc, session

from tq.broker.service import parse_outcome
from tq.core.errors import InvalidRequest
from tq.testing import running_broker
from tq.worker.runner import CLAIM_WAIT

DOC = load_doc()


async def _submit(raw: Any, rid: int, **spec: Any) -> str:
    answer = await raw.ask({"t": "submit", "id": rid, "tasks": [{"type": "x", **spec}]})
    assert answer is not None and answer["t"] == "ack", answer
    return str(answer["tasks"][0]["id"])


async def _claim(raw: Any, **fields: Any) -> dict[str, Any]:
    """One lease, or {} if nothing was leased."""
    answer = await raw.ask({"t": "claim", "id": 70, "n": 1, "queues": ["default"], **fields})
    assert answer is not None and answer["t"] == "ack", answer
    return dict(answer["tasks"][0]) if answer["tasks"] else {}


async def _get(raw: Any, task_id: str) -> dict[str, Any]:
    answer = await raw.ask({"t": "query", "id": 77, "q": "get", "task": task_id})
    assert answer is not None and answer["t"] == "ack", answer
    return dict(answer["task"])


@pytest.mark.trio
async def test_hello_with_a_non_numeric_pid_is_nacked_and_the_connection_stays_open(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await connect(broker)
        hello = {"t": "hello", "id": 1, "v": 1, "kind": "worker", "key": broker.key}
        answer = await raw.ask({**hello, "pid": "abc"})
        assert answer is not None and answer["code"] == "invalid" and "'pid'" in answer["message"]
        answer = await raw.ask({**hello, "id": 2, "concurrency": -1})
        assert answer is not None and answer["code"] == "invalid"
        assert "concurrency" in answer["message"]
        answer = await raw.ask({**hello, "id": 3, "pid": 42})
        assert answer is not None and answer["t"] == "ack"
        await raw.aclose()


@pytest.mark.trio
async def test_claim_without_wait_answers_with_every_task_it_leased(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        worker = await session(broker, kind="worker")
        ids = [await _submit(client, 2 + i) for i in range(3)]
        for wait in ({}, {"wait": 0}):
            answer = await worker.ask(
                {"t": "claim", "id": 5, "n": 2, "queues": ["default"], **wait}
            )
            assert answer is not None and answer["t"] == "ack"
            assert len(answer["tasks"]) == (2 if not wait else 1), answer
        states = [(await _get(client, task_id))["state"] for task_id in ids]
        assert states == ["running"] * 3  # every leased task was in an ACK
        answer = await worker.ask({"t": "claim", "id": 6, "n": 2, "queues": ["default"]})
        assert answer is not None and answer["tasks"] == []
        await worker.aclose()
        await client.aclose()


@pytest.mark.trio
async def test_release_returns_the_task_to_pending_and_wakes_a_waiting_claim(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        first = await session(broker, kind="worker", worker_id="first")
        second = await session(broker, kind="worker", worker_id="second")
        task_id = await _submit(client, 2, max_retries=0)
        lease = await _claim(first)
        got: dict[str, Any] = {}

        async def long_poll() -> None:
            msg = {"t": "claim", "id": 4, "n": 1, "queues": ["default"], "wait": 30}
            got.update(await second.ask(msg) or {})

        with trio.fail_after(10):  # the claim waits up to 30 s unless the release wakes it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await trio.sleep(0.2)  # the long poll is waiting
                release = {"id": task_id, "token": lease["token"], "status": "release"}
                answer = await first.ask({"t": "result", "id": 5, "results": [release]})
                assert answer is not None
                assert answer["results"] == [
                    {"id": task_id, "accepted": True, "state": "pending", "reason": ""}
                ]
        assert [t["id"] for t in got["tasks"]] == [task_id]
        assert got["tasks"][0]["attempt"] == 1, "the released attempt does not count"
        task = await _get(client, task_id)
        assert task["state"] == "running" and task["attempts"] == 1 and task["worker"] == "second"
        for raw in (client, first, second):
            await raw.aclose()


@pytest.mark.trio
async def test_frames_behind_a_malformed_one_are_answered_without_more_bytes(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        await raw.send(
            frame({"t": "frobnicate", "id": 2})
            + frame({"t": "cancel", "id": 3})  # no task
            + frame({"t": "query", "id": 4, "q": "health"})
        )
        answers = {}
        for _ in range(3):
            answer = await raw.read(timeout=10)  # nothing more is sent meanwhile
            assert answer is not None
            answers[answer["id"]] = answer.get("code", answer["t"])
        assert answers == {2: "unknown_message", 3: "invalid", 4: "ack"}
        await raw.aclose()


@pytest.mark.trio
async def test_result_needs_a_worker_session(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        answer = await client.ask({"t": "result", "id": 2, "results": []})
        assert answer is not None and answer["code"] == "invalid" and "worker" in answer["message"]
        worker = await session(broker, kind="worker")
        answer = await worker.ask({"t": "result", "id": 2, "results": []})
        assert answer == {"t": "ack", "id": 2, "results": []}
        await client.aclose()
        await worker.aclose()


def test_the_reference_worker_claims_with_the_documented_wait() -> None:
    delivery = DOC.section("7.").text
    stated = re.search(r"with `wait` ([\d.]+)", delivery)
    assert stated is not None and float(stated.group(1)) == CLAIM_WAIT
    claim_example = next(line for _, b in DOC.section("`claim`").blocks for line in b)
    assert f'"wait":{CLAIM_WAIT}' in claim_example


@pytest.mark.trio
async def test_a_success_clears_the_error_of_an_earlier_attempt(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        worker = await session(broker, kind="worker")
        task_id = await _submit(client, 2, retry_base=0, retry_cap=0)
        lease = await _claim(worker)
        error = {"type": "Flaky", "message": "try again"}
        retry = {"id": task_id, "token": lease["token"], "status": "retry", "error": error}
        await worker.ask({"t": "result", "id": 4, "results": [retry]})
        assert (await _get(client, task_id))["error"]["type"] == "Flaky"
        with trio.fail_after(15):  # failed -> pending by the broker's timer, then claimed
            while not (again := await _claim(worker, wait=5)):
                pass
        ok = {"id": task_id, "token": again["token"], "status": "ok", "result": 1}
        await worker.ask({"t": "result", "id": 5, "results": [ok]})
        task = await _get(client, task_id)
        assert task["state"] == "succeeded" and task["attempts"] == 2
        assert task["error"] is None and task["result"] == 1
        await client.aclose()
        await worker.aclose()


@pytest.mark.trio
async def test_a_new_counts_subscriber_first_gets_the_current_counts(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        for i in range(2):
            await _submit(raw, 2 + i)
        answer = await raw.ask({"t": "subscribe", "id": 9, "topics": ["counts", "tasks"]})
        assert answer == {"t": "ack", "id": 9, "topics": ["counts", "tasks"]}
        while (event := await raw.read(timeout=10)) is not None and event["topic"] != "counts":
            assert event["t"] == "event" and event["id"] == 9  # other topics may come first
        assert event is not None and event["queues"] == {"default": {"pending": 2}}
        assert event["seq"] >= 1
        await raw.aclose()


@pytest.mark.trio
async def test_nil_list_order_and_limit_are_the_defaults(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        ids = [await _submit(raw, 2 + i) for i in range(3)]
        for rid, msg in enumerate(({}, {"order": None, "limit": None}), start=10):
            answer = await raw.ask({"t": "query", "id": rid, "q": "list", **msg})
            assert answer is not None and answer["t"] == "ack", answer
            assert [t["id"] for t in answer["tasks"]] == ids  # oldest first
        await raw.ask({"t": "cancel", "id": 12, "task": ids[0]})
        answer = await raw.ask({"t": "wait", "id": 13, "task": ids[0], "timeout": None})
        assert answer is not None and answer["t"] == "ack" and answer["timed_out"] is False
        await raw.aclose()


@pytest.mark.trio
async def test_a_bin_or_missing_t_is_unknown_message_answered_by_id(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        for rid, msg in ((2, {"t": b"query", "q": "stats"}), (3, {"q": "stats"}), (4, {"t": None})):
            answer = await raw.ask({**msg, "id": rid})
            assert answer is not None and (answer["id"], answer["code"]) == (
                rid,
                "unknown_message",
            )
        answer = await raw.ask({"t": "query", "id": 5, "q": "health"})
        assert answer is not None and answer["t"] == "ack"
        await raw.aclose()


@pytest.mark.trio
async def test_extension_values_in_protocol_fields(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        stamp = msgpack.Timestamp(1, 0)
        answer = await raw.ask({"t": "query", "id": 2, "q": msgpack.ExtType(5, b"x")})
        assert answer is not None and answer["code"] == "invalid" and "'q'" in answer["message"]
        answer = await raw.ask({"t": "wait", "id": 3, "task": "x", "timeout": stamp})
        assert answer is not None and answer["code"] == "invalid"
        answer = await raw.ask({"t": "query", "id": stamp, "q": "stats"})
        assert answer is not None and (answer["id"], answer["code"]) == (0, "protocol")
        assert await raw.read() is None
        await raw.aclose()


@pytest.mark.trio
async def test_a_second_hello_is_refused_saying_why(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        admin = await session(broker)
        key = await admin.ask({"t": "keys", "id": 2, "op": "create", "role": "producer"})
        assert key is not None
        raw = await session(broker, key=key["key"])
        again = {"t": "hello", "id": 2, "v": 1, "kind": "worker", "key": broker.key}
        answer = await raw.ask(again)
        assert answer is not None and answer["code"] == "invalid"
        assert "already said hello" in answer["message"]
        answer = await raw.ask({"t": "submit", "id": 3, "tasks": [{"type": "x"}]})
        assert answer is not None and answer["t"] == "ack", "the session goes on as it was"
        await raw.aclose()
        await admin.aclose()


@pytest.mark.trio
async def test_a_token_rounded_to_a_double_is_refused(tmp_path: Path) -> None:
    """Tokens are 62-bit: a client that reads them as doubles loses its results."""
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        worker = await session(broker, kind="worker")
        task_id = await _submit(client, 2)
        lease = await _claim(worker)
        token = lease["token"]
        assert 0 < token < 2**62
        rounded = int(float(token))
        if rounded != token:  # all but one token in 2**9 lose bits as a double
            report = {"id": task_id, "token": rounded, "status": "ok"}
            answer = await worker.ask({"t": "result", "id": 4, "results": [report]})
            assert answer is not None and answer["results"][0]["accepted"] is False
            assert "stale" in answer["results"][0]["reason"]
        report = {"id": task_id, "token": token, "status": "ok"}
        answer = await worker.ask({"t": "result", "id": 5, "results": [report]})
        assert answer is not None and answer["results"][0]["accepted"] is True
        await client.aclose()
        await worker.aclose()


@pytest.mark.trio
async def test_a_listed_field_of_another_type_is_refused_not_guessed(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        await _submit(raw, 2)
        purge = {"t": "purge", "id": 3, "states": ["succeeded"], "older_than": 0}
        answer = await raw.ask({**purge, "dry_run": "no"})  # was taken as a dry run
        assert answer is not None and answer["code"] == "invalid" and "dry_run" in answer["message"]
        answer = await raw.ask({"t": "heartbeat", "id": 4, "leases": [], "stats": "busy"})
        assert answer is not None and answer["code"] == "invalid"
        await raw.aclose()


@pytest.mark.trio
async def test_zero_length_frame_is_a_protocol_error(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        await raw.send(struct.pack(">I", 0))
        answer = await raw.read()
        assert answer is not None and (answer["id"], answer["code"]) == (0, "protocol")
        assert await raw.read() is None
        await raw.aclose()


@pytest.mark.trio
async def test_an_answer_over_the_frame_limit_is_a_nack_for_that_request(tmp_path: Path) -> None:
    async with running_broker(tmp_path, max_frame=20_000) as broker:
        raw = await session(broker)
        for i in range(4):
            await _submit(raw, 2 + i, payload="x" * 6000)
        answer = await raw.ask({"t": "query", "id": 9, "q": "list"})
        assert answer is not None and (answer["id"], answer["code"]) == (9, "frame_too_large")
        assert "the answer is larger than this connection's frame limit" in answer["message"]
        assert "ask for less at once" in answer["message"] and "tasks" not in answer["message"]
        answer = await raw.ask({"t": "query", "id": 10, "q": "list", "limit": 1})
        assert answer is not None and answer["t"] == "ack", "the connection stays usable"
        await raw.aclose()


@pytest.mark.trio
async def test_id_zero_is_accepted_as_a_request_id(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        answer = await raw.ask({"t": "query", "id": 0, "q": "depth"})
        assert answer is not None and (answer["t"], answer["id"]) == ("ack", 0)
        await raw.aclose()


@pytest.mark.trio
async def test_before_hello_other_messages_are_refused_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        raw = await connect(broker)
        answer = await raw.ask({"t": "query", "id": 1, "q": "stats"})
        assert answer is not None and answer["code"] == "invalid"
        assert "first message must be hello" in answer["message"]
        answer = await raw.ask({"t": "hello", "id": 2, "v": 2, "kind": "client", "key": broker.key})
        assert answer is not None and answer["code"] == "invalid", "wrong version: try again"
        answer = await raw.ask({"t": "hello", "id": 3, "v": 1, "kind": "client", "key": broker.key})
        assert answer is not None and answer["t"] == "ack"
        await raw.aclose()


@pytest.mark.trio
async def test_a_hello_refused_for_its_role_closes_the_connection(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        admin = await session(broker)
        key = await admin.ask({"t": "keys", "id": 2, "op": "create", "role": "reader"})
        assert key is not None
        raw = await connect(broker)
        answer = await raw.ask({"t": "hello", "id": 1, "v": 1, "kind": "worker", "key": key["key"]})
        assert answer is not None and answer["code"] == "forbidden"
        assert await raw.read() is None
        await raw.aclose()
        await admin.aclose()


@pytest.mark.trio
async def test_hello_defaults_and_pipelined_requests(tmp_path: Path) -> None:
    """The hello table's defaults, seen in query workers; hello and requests in one write."""
    async with running_broker(tmp_path) as broker:
        raw = await connect(broker)
        hello = {"t": "hello", "id": 1, "v": 1, "kind": "worker", "key": broker.key}
        await raw.send(frame(hello) + frame({"t": "query", "id": 2, "q": "workers"}))
        ack = await raw.read()
        assert ack is not None and re.fullmatch(r"[0-9a-f]{16}", ack["worker_id"])
        assert ack["lease_ttl"] == broker.settings.lease_ttl and ack["role"] == "admin"
        answer = await raw.read()
        assert answer is not None and answer["id"] == 2
        (worker,) = answer["workers"]
        expected = {"id": ack["worker_id"], "name": ack["worker_id"], "queues": ["default"]}
        assert {k: worker[k] for k in expected} == expected
        assert (worker["types"], worker["host"], worker["pid"], worker["concurrency"]) == (
            None,
            "",
            0,
            0,
        )
        await raw.aclose()


def test_an_outcome_delay_is_a_number_of_seconds_or_refused() -> None:
    base = {"id": "x", "token": 1, "status": "retry"}
    for delay in (True, -1, "5", float("nan")):
        with pytest.raises(InvalidRequest, match="delay"):
            parse_outcome({**base, "delay": delay})
    assert parse_outcome({**base, "delay": None}).delay is None
    assert parse_outcome({**base, "delay": 2}).delay == 2.0


@pytest.mark.trio
async def test_outcome_error_maps_are_completed_and_other_values_wrapped(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        client = await session(broker)
        worker = await session(broker, kind="worker")
        errors = []
        for rid, error in enumerate(({"message": "m"}, "plain text"), start=2):
            task_id = await _submit(client, rid, max_retries=0)
            lease = await _claim(worker)
            report = {"id": task_id, "token": lease["token"], "status": "reject", "error": error}
            await worker.ask({"t": "result", "id": 9, "results": [report]})
            errors.append((await _get(client, task_id))["error"])
        assert errors == [
            {"type": "Error", "message": "m", "traceback": ""},
            {"type": "Error", "message": "plain text", "traceback": ""},
        ]
        await client.aclose()
        await worker.aclose()
