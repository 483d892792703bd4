"""Hostile input from the network: values that cannot be read back, non-finite
numbers, answers that could not be delivered. Each test drives a live broker
over loopback TLS (and its REST port) the way an outside tester did."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from tq.client.aio import open_stream
from tq.core.errors import FrameTooLarge, InvalidRequest
from tq.core.task import MAX_SUBMIT, TaskSpec
from tq.core.values import MAX_DEPTH, check_plain, readable
from tq.protocol import Connection
from tq.testing import RunningBroker, running_broker, running_worker


async def _raw(broker: RunningBroker, kind: str = "client") -> tuple[trio.abc.Stream, Connection]:
    stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
    conn = Connection()
    hello = {"t": "hello", "id": 1, "v": 1, "kind": kind, "key": broker.key}
    await stream.send_all(conn.send(hello))
    answer = await _read(stream, conn)
    assert answer is not None and answer["t"] == "ack", answer
    return stream, conn


async def _read(stream: trio.abc.Stream, conn: Connection) -> dict[str, Any] | None:
    with trio.fail_after(15):
        while (msg := conn.next_message()) is None:
            try:
                data = await stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            conn.receive_data(bytes(data))
    return msg


async def _ask(stream: trio.abc.Stream, conn: Connection, body: bytes) -> dict[str, Any]:
    """Send one raw msgpack body as a frame; the broker's answer."""
    await stream.send_all(struct.pack(">I", len(body)) + body)
    answer = await _read(stream, conn)
    assert answer is not None, "the broker closed the connection"
    return answer


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


POISON = {
    "deep": _nested(900),
    "nan": {"x": float("nan")},
    "inf": [1.0, float("inf")],
    "timestamp": msgpack.Timestamp(1, 0),
    "ext": msgpack.ExtType(5, b"xyz"),
}


# -- the rule, as pure code ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POISON))
def test_check_plain_refuses_what_cannot_be_read_back(name: str) -> None:
    with pytest.raises(InvalidRequest, match="payload"):
        check_plain(POISON[name], "payload")
    assert readable(POISON[name]).startswith("<unreadable payload")


def test_check_plain_accepts_plain_data_to_the_depth_limit() -> None:
    value = {"a": [1, -(2**63), 2**64 - 1, 1.5, "s", b"b", None, True], 7: {"n": None}}
    check_plain(value)
    check_plain(_nested(MAX_DEPTH - 1))
    with pytest.raises(InvalidRequest, match=f"deeper than {MAX_DEPTH}"):
        check_plain(_nested(MAX_DEPTH + 1))
    with pytest.raises(InvalidRequest, match=r"\['a'\]\[1\] is nan"):
        check_plain({"a": [0, float("nan")]})
    with pytest.raises(InvalidRequest, match="map key of type bytes"):
        check_plain({b"k": 1})


# -- poisoned payloads: refused at submit, on the wire and over REST --------------------


@pytest.mark.trio
async def test_poisoned_payloads_are_refused_at_submit(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        stream, conn = await _raw(broker)
        async with stream:
            for rid, (name, payload) in enumerate(sorted(POISON.items()), start=10):
                body = msgpack.packb(
                    {"t": "submit", "id": rid, "tasks": [{"type": "echo", "payload": payload}]}
                )
                answer = await _ask(stream, conn, body)
                assert answer["t"] == "nack" and answer["id"] == rid, (name, answer)
                assert answer["code"] == "invalid", (name, answer)
                assert "payload" in answer["message"], answer
                assert "nothing was submitted" in answer["message"], answer
        async with broker.http_client() as http:
            deep = "[" * 100 + "]" * 100
            for text in (
                f'{{"type": "echo", "payload": {deep}}}',
                '{"type": "e", "payload": 1e400}',
            ):
                r = await http.post(
                    "/api/v1/tasks", content=text, headers={"content-type": "application/json"}
                )
                assert r.status_code == 400, r.text
                assert "payload" in r.json()["detail"]
        async with broker.client() as client:
            assert (await client.stats())["queues"] == {}, "nothing may have been stored"


@pytest.mark.trio
async def test_reads_survive_values_stored_before_the_rules(tmp_path: Path) -> None:
    """Rows written by an older broker (no submit-time rules): every read still works."""
    from tq.store.sqlite import open_sqlite_store

    db = tmp_path / "tq.db"
    async with open_sqlite_store(str(db)) as store:
        stored = await store.submit(
            [TaskSpec(type="echo", payload=POISON[name]) for name in ("deep", "nan", "timestamp")],
            now=1.0,
        )
    ids = [r.id for r in stored]
    async with running_broker(tmp_path) as broker, broker.client() as client:
        for task_id in ids:
            task = await client.get(task_id)
            assert isinstance(task.payload, str) and task.payload.startswith("<unreadable payload")
        page = await client.list(limit=10)
        assert [t.id for t in page.tasks] == ids
        cancelled = await client.cancel(ids[0])
        assert cancelled.state == "cancelled"
        waited = await client.wait(ids[0], timeout=1)
        assert waited.state == "cancelled"
        async with broker.http_client() as http:
            for task_id in ids:
                r = await http.get(f"/api/v1/tasks/{task_id}")
                assert r.status_code == 200, r.text
            assert (await http.get("/api/v1/tasks")).status_code == 200


@pytest.mark.trio
async def test_an_unreadable_result_ends_the_task_with_a_clear_error(tmp_path: Path) -> None:
    from tq.worker.handlers import builtin_registry

    registry = builtin_registry()

    @registry.handler("nan")
    async def nan(payload: Any) -> Any:
        return {"ratio": math.nan}

    async with running_broker(tmp_path) as broker, running_worker(broker, registry):
        async with broker.client() as client:
            task = await client.wait(await client.submit("nan", None, max_retries=0), timeout=15)
    assert task.state == "dead"
    assert task.error is not None and "is nan" in task.error.message


# -- non-finite and out-of-range numbers ---------------------------------------------------


NAN, INF = float("nan"), float("inf")


def _client_requests(task_id: str) -> list[dict[str, Any]]:
    return [
        {"t": "wait", "task": task_id, "timeout": NAN},
        {"t": "wait", "task": task_id, "timeout": INF},
        {"t": "keys", "op": "create", "name": "k", "role": "reader", "expires_at": NAN},
        {"t": "purge", "states": ["succeeded"], "older_than": NAN},
        {"t": "submit", "tasks": [{"type": "e", "timeout": INF}]},
    ]


def _worker_requests(task_id: str) -> list[dict[str, Any]]:
    def result(**fields: Any) -> dict[str, Any]:
        return {"t": "result", "results": [{"id": task_id, **fields}]}

    return [
        {"t": "claim", "n": 1, "queues": ["default"], "wait": NAN},
        result(token=1, status="retry", delay=INF),
        result(token=2**64 - 1, status="ok"),
        {"t": "heartbeat", "leases": [[task_id, -1]]},
    ]


@pytest.mark.trio
async def test_non_finite_numbers_are_refused_with_invalid(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with broker.client() as client:
            task_id = await client.submit("echo", 1)
        stream, conn = await _raw(broker)
        async with stream:
            for rid, request in enumerate(_client_requests(task_id), start=20):
                answer = await _ask(stream, conn, msgpack.packb({**request, "id": rid}))
                assert answer["t"] == "nack" and answer["code"] == "invalid", (request, answer)
                assert "finite" in answer["message"], answer
        worker, wconn = await _raw(broker, kind="worker")
        async with worker:
            for rid, request in enumerate(_worker_requests(task_id), start=40):
                answer = await _ask(worker, wconn, msgpack.packb({**request, "id": rid}))
                assert answer["t"] == "nack" and answer["code"] == "invalid", (request, answer)
            # a heartbeat's host facts are information: a NaN is dropped, never shown
            stats = {"cpu": NAN, "memory": 2**64 - 1}
            beat = {"t": "heartbeat", "id": 60, "leases": [], "stats": stats}
            assert (await _ask(worker, wconn, msgpack.packb(beat)))["t"] == "ack"
            async with broker.http_client() as http:
                r = await http.get("/api/v1/workers")
                assert r.status_code == 200, r.text
                [entry] = r.json()["workers"]
                assert entry["cpu"] is None and entry["memory"] is None


# -- a committed submit is always answered -------------------------------------------------


@pytest.mark.trio
async def test_submit_answer_names_each_unhandled_type_once(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        stream, conn = await _raw(broker)
        tasks = [{"type": f"nobody{i % 3}"} for i in range(5000)]
        async with stream:
            body = msgpack.packb({"t": "submit", "id": 5, "tasks": tasks})
            answer = await _ask(stream, conn, body)
        assert answer["t"] == "ack", answer
        assert len(answer["tasks"]) == 5000
        assert all(set(t) == {"id", "created"} for t in answer["tasks"])
        assert sorted(w["type"] for w in answer["warnings"]) == ["nobody0", "nobody1", "nobody2"]
        async with broker.client() as client:
            items = await client.submit_items([{"type": "nobody0"}, {"type": "nobody1"}])
            assert all("no connected worker handles" in i["warning"] for i in items)


@pytest.mark.trio
async def test_a_submit_whose_answer_could_not_be_sent_is_refused_before_commit(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path, max_frame=128 * 1024) as broker:
        stream, conn = await _raw(broker)
        tasks = [{"type": "a"} for _ in range(5000)]  # ~40 KB asked, ~250 KB to answer
        async with stream:
            body = msgpack.packb({"t": "submit", "id": 6, "tasks": tasks})
            answer = await _ask(stream, conn, body)
        assert answer["t"] == "nack" and answer["code"] == FrameTooLarge.code, answer
        assert "send at most" in answer["message"] and "nothing was submitted" in answer["message"]
        too_many = [{"type": "a"} for _ in range(MAX_SUBMIT + 1)]
        async with broker.client() as client:
            with pytest.raises(InvalidRequest, match=f"at most {MAX_SUBMIT} tasks"):
                await client.submit_many(too_many)
            assert (await client.stats())["queues"] == {}, "nothing may have been stored"


# -- what one frame or body may cost ---------------------------------------------------------


def test_a_frame_of_empty_maps_costs_a_bounded_multiple_of_its_size() -> None:
    import tracemalloc

    from tq.protocol.frames import TooManyContainers, unpack_bounded

    count = 1 << 20  # 1 MiB of empty maps: ~75 MiB of dicts if decoded whole
    body = b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count
    tracemalloc.start()
    try:
        with pytest.raises(TooManyContainers, match="maps and arrays"):
            unpack_bounded(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * len(body), f"decoding peaked at {peak} bytes for {len(body)}"
    # plain data with small containers stays well inside the budget
    pairs = msgpack.packb({"t": "submit", "id": 1, "tasks": [[i, i] for i in range(50_000)]})
    assert len(unpack_bounded(pairs)["tasks"]) == 50_000


@pytest.mark.trio
async def test_large_frames_of_empty_maps_are_refused_and_the_broker_goes_on(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker:
        stream, conn = await _raw(broker)  # an admin: may send frames up to --max-frame
        async with stream:
            tasks = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20)
            body = b"\x83\xa1t\xa6submit\xa2id\x07\xa5tasks" + tasks
            await stream.send_all(struct.pack(">I", len(body)) + body)
            answer = await _read(stream, conn)
            assert answer is not None and answer["t"] == "nack" and answer["id"] == 0
            assert "maps and arrays" in answer["message"]
            assert await _read(stream, conn) is None, "a malformed stream is closed"
        async with broker.http_client() as http:
            flood = b"[" + b"[]," * 300_000 + b"[]]"
            headers = {"content-type": "application/json"}
            r = await http.post("/api/v1/tasks", content=flood, headers=headers)
            assert r.status_code == 400 and "arrays and objects" in r.json()["detail"], r.text
        async with broker.client() as client:
            assert await client.get(await client.submit("echo", 1))


@pytest.mark.trio
async def test_a_reader_key_may_send_only_small_frames(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with broker.client() as admin:
            reply = await admin.request({"t": "keys", "op": "create", "role": "reader"})
        stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
        conn = Connection()
        async with stream:
            hello = {"t": "hello", "id": 1, "v": 1, "kind": "client", "key": reply["key"]}
            await stream.send_all(conn.send(hello))
            assert (await _read(stream, conn) or {}).get("t") == "ack"
            big = {"t": "query", "id": 2, "q": "list", "state": "x" * (100 * 1024)}
            await stream.send_all(conn.send(big))
            answer = await _read(stream, conn)
            assert answer is not None and answer["code"] == FrameTooLarge.code, answer
            assert str(64 * 1024) in answer["message"]


# -- what reads may cost -------------------------------------------------------------------


@pytest.mark.trio
async def test_stats_counts_finished_tasks_without_a_scan(tmp_path: Path) -> None:
    import apsw

    from tq.core.task import Outcome
    from tq.store import schema
    from tq.store.sqlite import open_sqlite_store

    db = tmp_path / "tq.db"
    async with open_sqlite_store(str(db)) as store:
        specs = [TaskSpec(type="t", queue=f"q{i % 3}") for i in range(30)]
        ids = [r.id for r in await store.submit(specs, now=1.0)]
        leases = await store.claim("w", ["q0", "q1", "q2"], None, 20, 2.0, 30.0)
        outcomes = [
            Outcome(lease.id, lease.token, "ok" if i % 2 else "reject")
            for i, lease in enumerate(leases[:12])
        ]
        await store.complete(outcomes, 3.0)
        await store.cancel(ids[-1], 4.0)
        dead = next(o.id for o in outcomes if o.status == "reject")
        await store.retry(dead, 5.0)  # dead -> pending
        await store.purge(["succeeded"], 0.0, 10.0, 3)
        got = (await store.stats()).counts
    conn = apsw.Connection(str(db))
    truth: dict[str, dict[str, int]] = {}
    for queue, state, n in conn.execute(
        "SELECT queue, state, count(*) FROM tasks GROUP BY queue, state"
    ):
        truth.setdefault(queue, {})[state] = n
    assert got == truth
    # no statement behind stats walks the whole table
    from tq.store.schema_ops import DEPTH_STATEMENTS

    for statement in (*DEPTH_STATEMENTS, schema.FINISHED_COUNTS):
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
        assert "SCAN tasks" not in plan or "USING" in plan, plan
        assert "tasks_state" not in plan or "succeeded" not in statement, plan
    conn.close()


@pytest.mark.trio
async def test_a_readiness_probe_does_not_wait_behind_reads(tmp_path: Path) -> None:
    from tq.store.sqlite import open_sqlite_store

    async with open_sqlite_store(str(tmp_path / "tq.db")) as store:
        busy = object()
        await store._read_limiter.acquire_on_behalf_of(busy)  # a long read holds the reader
        try:
            with trio.fail_after(10):
                await store.probe()
        finally:
            store._read_limiter.release_on_behalf_of(busy)


@pytest.mark.trio
async def test_a_peer_that_does_not_read_holds_bounded_answers(tmp_path: Path) -> None:
    from tq.broker.server import OUTBOX_BYTES

    async with running_broker(tmp_path) as broker:
        async with broker.client() as client:
            blob = "x" * (100 * 1024)
            for _ in range(4):
                await client.submit_many([{"type": "t", "payload": blob} for _ in range(50)])
        service_calls = 0
        running = 0
        most = 0
        from tq.broker import service as service_module

        original = service_module.BrokerService.list_tasks

        async def counted(self: Any, msg: Any, principal: Any = None) -> Any:
            nonlocal service_calls, running, most
            service_calls += 1
            running += 1
            most = max(most, running)
            try:
                return await original(self, msg, principal)
            finally:
                running -= 1

        service_module.BrokerService.list_tasks = counted  # type: ignore[method-assign]
        try:
            stream, conn = await _raw(broker)
            async with stream:
                pages = 20  # ~12 MiB each: far more than the broker may hold for one peer
                frames = b"".join(
                    conn.send({"t": "query", "id": 100 + i, "q": "list", "limit": 120})
                    for i in range(pages)
                )
                await stream.send_all(frames)
                await trio.sleep(2)  # the broker does what it may while nobody reads
                assert most == 1, "expensive reads run one at a time per connection"
                held = service_calls * 12 * 1024 * 1024
                assert service_calls <= 3, f"{service_calls} pages built (~{held} bytes)"
                assert OUTBOX_BYTES < 2 * 12 * 1024 * 1024
                seen = set()
                while len(seen) < pages:
                    answer = await _read(stream, conn)
                    assert answer is not None and answer["t"] == "ack", answer
                    seen.add(answer["id"])
        finally:
            service_module.BrokerService.list_tasks = original  # type: ignore[method-assign]


@pytest.mark.trio
async def test_a_large_submit_is_decoded_and_checked_off_the_event_loop(tmp_path: Path) -> None:
    """A large frame's decoding and its tasks' checks walk every value it holds: they run
    in a thread (which gives the interpreter back to the event loop as it goes)."""
    import threading

    from tq.broker import service as service_module
    from tq.protocol import connection as connection_module

    where: dict[str, str] = {}
    real_specs, real_parse = service_module._specs_of, connection_module.Connection.parse_request

    def specs_of(*args: Any) -> Any:
        where.setdefault("specs", threading.current_thread().name)
        return real_specs(*args)

    def parse(self: Any, body: bytes) -> Any:
        if len(body) > 64 * 1024:
            where.setdefault("parse", threading.current_thread().name)
        return real_parse(self, body)

    service_module._specs_of = specs_of  # type: ignore[assignment]
    connection_module.Connection.parse_request = parse  # type: ignore[method-assign]
    try:
        async with running_broker(tmp_path) as broker, broker.client() as client:
            payload = ["ab"] * 100_000  # ~300 KB of short strings
            await client.submit("echo", payload)
    finally:
        service_module._specs_of = real_specs  # type: ignore[assignment]
        connection_module.Connection.parse_request = real_parse  # type: ignore[method-assign]
    main = threading.main_thread().name
    assert where["parse"] != main and where["specs"] != main, where


@pytest.mark.trio
async def test_payloads_nested_past_every_decoder_limit_never_break_the_broker(
    tmp_path: Path,
) -> None:
    """Depths around the typed decoder's recursion limit and msgpack's own: each submit is
    refused by id (the connection goes on) or as a malformed frame (it is closed), never
    with an internal error, and the broker serves the next connection."""
    async with running_broker(tmp_path) as broker:
        for depth in (950, 1000, 1023, 1100, 5000):
            stream, conn = await _raw(broker)
            async with stream:
                body = (
                    b"\x83\xa1t\xa6submit\xa2id\x0b\xa5tasks\x91\x82\xa4type\xa4echo"
                    + b"\xa7payload"
                    + b"\x91" * depth
                    + b"\xc0"
                )
                await stream.send_all(struct.pack(">I", len(body)) + body)
                answer = await _read(stream, conn)
                assert answer is not None and answer["t"] == "nack", (depth, answer)
                assert answer["code"] != "internal", (depth, answer)
                if answer["id"] == 11:  # answerable: refused, and the session goes on
                    assert answer["code"] == "invalid" and "nested" in answer["message"]
                    ping = {"t": "query", "id": 12, "q": "health"}
                    assert (await _ask(stream, conn, msgpack.packb(ping)))["t"] == "ack"
                else:  # msgpack itself gave up: the stream is unusable
                    assert answer["id"] == 0 and "malformed" in answer["message"], answer
        async with broker.client() as client:
            assert (await client.stats())["queues"] == {}, "nothing may have been stored"
