"""Broker, worker and clients in one trio run, over loopback TLS."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from tq.client import Client
from tq.client.aio import open_stream
from tq.core.errors import InvalidRequest, NotFound
from tq.protocol import Connection
from tq.testing import RunningBroker, running_broker, running_worker
from tq.worker.executable import parse_exec_spec
from tq.worker.handlers import HandlerRegistry, builtin_registry

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.trio
async def test_failures_retry_with_backoff_then_die(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, running_worker(broker):
        async with broker.client() as client:
            task_id = await client.submit(
                "fail", {"message": "boom"}, max_retries=2, retry_base=0.2, retry_cap=0.4
            )
            seen_failed = False
            with trio.fail_after(20):
                while (task := await client.get(task_id)).state != "dead":
                    seen_failed |= task.state == "failed"
                    if task.state == "failed":
                        assert task.run_at is not None and task.started_at is not None
                        assert task.run_at > task.started_at
                    await trio.sleep(0.01)
            assert seen_failed, "the task should wait in 'failed' between attempts"
            assert task.attempts == 3
            assert task.error is not None and task.error.type == "RuntimeError"
            assert task.error.message == "boom" and "Traceback" in task.error.traceback
            # an operator sends it back: it runs again (and fails again)
            again = await client.retry(task_id)
            assert again.state == "pending" and again.attempts == 0


@pytest.mark.trio
async def test_timeout_fails_a_hung_handler(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, running_worker(broker):
        async with broker.client() as client:
            task_id = await client.submit("sleep", 30, timeout=0.2, max_retries=0)
            task = await client.wait(task_id, timeout=15)
    assert task.state == "dead"
    assert task.error is not None and task.error.type == "Timeout"
    assert "0.2s" in task.error.message


@pytest.mark.trio
async def test_python_handlers_retry_and_reject(tmp_path: Path) -> None:
    from tq.worker.handlers import Reject, Retry

    registry = builtin_registry()
    calls: list[Any] = []

    @registry.handler("flaky")
    def flaky(payload: Any) -> Any:  # a plain def runs in a thread
        calls.append(payload)
        if len(calls) < 2:
            raise Retry("not yet", delay=0.05)
        return {"calls": len(calls)}

    @registry.handler("picky")
    async def picky(payload: Any) -> Any:
        raise Reject("bad input")

    async with running_broker(tmp_path) as broker, running_worker(broker, registry):
        async with broker.client() as client:
            ok = await client.wait(await client.submit("flaky", 1, retry_base=0.05), timeout=15)
            rejected = await client.wait(await client.submit("picky", 1), timeout=15)
    assert ok.state == "succeeded" and ok.result == {"calls": 2} and ok.attempts == 2
    assert rejected.state == "dead" and rejected.attempts == 1
    assert rejected.error is not None and rejected.error.message == "bad input"


@pytest.mark.trio
async def test_exec_handler_result_and_failure(tmp_path: Path) -> None:
    prog = FIXTURES / "prog.py"
    execs = {
        "echo-exec": parse_exec_spec(f"echo-exec={sys.executable} {prog} echo"),
        "crash": parse_exec_spec(f"crash={sys.executable} {prog} exit 3 0 oops"),
    }
    async with (
        running_broker(tmp_path) as broker,
        running_worker(broker, HandlerRegistry(), execs),
        broker.client() as client,
    ):
        good = await client.wait(await client.submit("echo-exec", {"a": [1, 2]}), timeout=20)
        bad = await client.wait(await client.submit("crash", {}), timeout=20)
    assert good.state == "succeeded" and good.result == {"a": [1, 2]}
    assert bad.state == "dead" and bad.error is not None
    assert bad.error.type == "ExitStatus" and "status 3" in bad.error.message


async def _claim_as(broker: RunningBroker, worker_id: str, client: Client) -> dict[str, Any]:
    reply = await client.request({"t": "claim", "n": 1, "queues": ["default"], "wait": 5})
    assert len(reply["tasks"]) == 1, reply
    return reply["tasks"][0]


@pytest.mark.trio
async def test_stale_lease_results_are_refused(tmp_path: Path) -> None:
    """Fencing: a zombie's RESULT after expiry or re-grant does not change the task."""
    async with running_broker(tmp_path, lease_ttl=0.5) as broker:
        zombie_hello = {"worker_id": "zombie", "queues": ["default"]}
        async with (
            broker.client() as client,
            broker.client(kind="worker", hello=zombie_hello) as zombie,
            broker.client(kind="worker", hello={"worker_id": "fresh"}) as fresh,
        ):
            task_id = await client.submit("echo", "payload", max_retries=5)
            lease = await _claim_as(broker, "zombie", zombie)
            await trio.sleep(1.0)  # the lease expires; the reaper re-queues the task
            assert (await client.get(task_id)).state == "pending"
            stale = {"id": task_id, "token": lease["token"], "status": "ok", "result": "zombie"}
            reply = await zombie.request({"t": "result", "results": [stale]})
            assert reply["results"][0]["accepted"] is False
            assert (await client.get(task_id)).state == "pending"
            # re-granted to another worker: the zombie's token is still refused
            new_lease = await _claim_as(broker, "fresh", fresh)
            assert new_lease["token"] != lease["token"] and new_lease["attempt"] == 2
            reply = await zombie.request({"t": "result", "results": [stale]})
            assert reply["results"][0]["accepted"] is False
            beat = await zombie.request(
                {"t": "heartbeat", "leases": [[task_id, lease["token"]]], "stats": {}}
            )
            assert beat["lost"] == [task_id]
            task = await client.get(task_id)
            assert task.state == "running" and task.worker == "fresh" and task.result is None
            good = {**stale, "token": new_lease["token"], "result": "fresh"}
            reply = await fresh.request({"t": "result", "results": [good]})
            assert reply["results"][0]["accepted"] is True
            assert (await client.get(task_id)).result == "fresh"


@pytest.mark.trio
async def test_heartbeats_keep_a_long_task_leased(tmp_path: Path) -> None:
    # the task runs for three lease lifetimes; heartbeats (every ttl/3) must keep it leased
    async with running_broker(tmp_path, lease_ttl=1.0) as broker, running_worker(broker):
        async with broker.client() as client:
            task = await client.wait(await client.submit("sleep", 3.0), timeout=30)
    assert task.state == "succeeded" and task.attempts == 1


async def _raw(broker: RunningBroker) -> tuple[trio.abc.Stream, Connection]:
    stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
    conn = Connection()
    hello = {"t": "hello", "id": 1, "v": 1, "kind": "client", "key": broker.key}
    await stream.send_all(conn.send(hello))
    await _read(stream, conn)
    return stream, conn


async def _read(stream: trio.abc.Stream, conn: Connection) -> dict[str, Any] | None:
    """The next message, or None when the broker closed the connection."""
    with trio.fail_after(10):
        while (msg := conn.next_message()) is None:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # closed without a TLS close_notify
                return None
            if not data:
                return None
            conn.receive_data(bytes(data))
    return msg


@pytest.mark.trio
async def test_bad_frames_get_nack_and_close_while_others_keep_working(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, running_worker(broker):
        async with broker.client() as good:
            # unknown type: NACK with its id, the connection stays usable
            stream, conn = await _raw(broker)
            body = msgpack.packb({"t": "frobnicate", "id": 9})
            await stream.send_all(struct.pack(">I", len(body)) + body)
            nack = await _read(stream, conn)
            assert nack is not None and nack["id"] == 9 and nack["code"] == "unknown_message"
            await stream.send_all(conn.send({"t": "query", "id": 10, "q": "stats"}))
            reply = await _read(stream, conn)
            assert reply is not None and reply["t"] == "ack"
            # garbage: NACK id 0, then closed
            await stream.send_all(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
            nack = await _read(stream, conn)
            assert nack is not None and nack["id"] == 0 and nack["code"] == "protocol"
            assert await _read(stream, conn) is None
            await stream.aclose()
            # oversize: refused from the header, before the body is sent
            stream, conn = await _raw(broker)
            await stream.send_all(struct.pack(">I", 1 << 30))
            nack = await _read(stream, conn)
            assert nack is not None and nack["code"] == "frame_too_large"
            assert await _read(stream, conn) is None
            await stream.aclose()
            # truncated frame then hang-up: the broker just drops it
            stream, conn = await _raw(broker)
            await stream.send_all(struct.pack(">I", 100) + b"\x81")
            await stream.aclose()
            # the well-behaved client never noticed
            task = await good.wait(await good.submit("echo", 42), timeout=10)
            assert task.result == 42


@pytest.mark.trio
async def test_plaintext_client_on_tls_port_is_dropped(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        plain = await open_stream(broker.info.address, ca=None, insecure=True)
        await plain.send_all(Connection().send({"t": "hello", "id": 1, "v": 1, "kind": "x"}))
        with trio.fail_after(15):
            while await plain.receive_some(1024):
                pass  # TLS alert bytes, then EOF
        await plain.aclose()
        async with broker.client() as client:
            assert (await client.stats())["queues"] == {}


@pytest.mark.trio
async def test_requests_are_validated(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        with pytest.raises(InvalidRequest, match="task 1: unknown task field"):
            await client.submit_many([{"type": "echo"}, {"type": "echo", "bogus": 1}])
        assert (await client.list()).tasks == []
        with pytest.raises(NotFound, match="no task with id nope"):
            await client.get("nope")
        with pytest.raises(InvalidRequest, match="claim is for workers"):
            await client.request({"t": "claim", "n": 1, "queues": ["default"]})
        with pytest.raises(InvalidRequest, match="protocol version 99"):
            async with Client.connect(broker.info.address, ca=broker.info.ca_file, hello={"v": 99}):
                pass


@pytest.mark.trio
async def test_pipelined_requests_on_one_connection(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, running_worker(broker, concurrency=32):
        async with broker.client() as client:
            ids: list[str] = []

            async def submit(n: int) -> None:
                ids.append(await client.submit("echo", n))

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(submit, n)
            results: dict[str, Any] = {}

            async def wait(task_id: str) -> None:
                results[task_id] = (await client.wait(task_id, timeout=30)).result

            async with trio.open_nursery() as nursery:
                for task_id in ids:
                    nursery.start_soon(wait, task_id)
    assert sorted(results.values()) == list(range(200))


@pytest.mark.trio
async def test_idempotency_key_returns_the_first_task(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        first = await client.submit("echo", 1, idempotency_key="order-17")
        second = await client.submit("echo", 2, idempotency_key="order-17")
        assert first == second
        assert (await client.get(first)).payload == 1


@pytest.mark.trio
async def test_cancel_running_task_stops_it_on_the_worker(tmp_path: Path) -> None:
    async with running_broker(tmp_path, lease_ttl=0.6) as broker, running_worker(broker):
        async with broker.client() as client:
            task_id = await client.submit("sleep", 30)
            with trio.fail_after(10):
                while (await client.get(task_id)).state != "running":
                    await trio.sleep(0.02)
            assert (await client.cancel(task_id)).state == "cancelled"
            # the worker learns on its next heartbeat and frees the slot
            with trio.fail_after(10):
                while (await client.workers())[0]["running"]:
                    await trio.sleep(0.05)
            assert (await client.get(task_id)).state == "cancelled"


@pytest.mark.trio
async def test_open_connections_are_told_the_broker_is_shutting_down(tmp_path: Path) -> None:
    from tq.core.errors import Unavailable

    seen: dict[str, BaseException] = {}
    async with running_broker(tmp_path) as broker, broker.client() as client:
        task_id = await client.submit("echo", 1)  # no worker: a wait on it stays in flight

        async def waiting() -> None:
            try:
                await client.wait(task_id, timeout=30)
            except Exception as exc:
                seen["error"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await trio.sleep(0.2)  # the wait is in flight at the broker
            broker.shutdown.set()
    error = seen["error"]
    assert isinstance(error, Unavailable), repr(error)
    assert "the broker is shutting down" in str(error)
