"""The asyncio client (tq/client/asyncio_client.py) against a real broker process on
loopback with TLS, driven by ``asyncio.run`` (no trio in these tests' clients)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

import tq
from tq.client import AsyncioClient
from tq.client.asyncio_client import AsyncioSubscription
from tq.core.errors import (
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    TLSFailure,
    Unauthorized,
    Unavailable,
)
from tq.core.states import State
from tq.protocol.session import LocalProtocolError
from tq.testing import BrokerProcess

pytestmark = pytest.mark.slow


def connect(broker: BrokerProcess, **options: Any) -> Any:
    return AsyncioClient.connect(broker.address, ca=broker.ca, **broker.client_kwargs(), **options)


async def next_event(events: AsyncioSubscription, topic: str) -> Any:
    async def first() -> Any:
        async for event in events:
            if event.topic == topic:
                return event
        raise AssertionError("the subscription ended")

    return await asyncio.wait_for(first(), 15)


def test_requests_pipeline_on_one_connection(broker_proc: BrokerProcess) -> None:
    broker_proc.start_worker("--concurrency", "8")
    broker_proc.wait_for_workers(1)

    async def main() -> None:
        async with connect(broker_proc) as client:
            assert client.server["v"] == 1 and client.server["role"] == "admin"
            ids = await asyncio.gather(*(client.submit("echo", {"n": n}) for n in range(40)))
            assert len(set(ids)) == 40
            done = await asyncio.gather(*(client.wait(i, timeout=30) for i in ids))
            assert [t.result for t in done] == [{"n": n} for n in range(40)]
            assert all(t.state is State.SUCCEEDED for t in done)
            page = await client.list(state="succeeded", limit=100)
            assert {t.id for t in page.tasks} == set(ids) and page.next is None
            assert (await client.stats())["queues"]["default"]["succeeded"] == 40
            assert (await client.workers())[0]["connected"]
            with pytest.raises(NotFound, match="no task with id nope"):
                await client.get("nope")
            parked = await client.submit("echo", 1, queue="nobody-takes")
            assert (await client.cancel(parked)).state is State.CANCELLED
            with pytest.raises(InvalidRequest, match="claim is for workers"):
                await client.request({"t": "claim", "n": 1, "queues": ["default"]})
            with pytest.raises(TimeoutError):  # a cancelled wait does not break the client
                await asyncio.wait_for(client.wait(await client.submit("sleep", 30)), 0.2)
            assert (await client.get(parked)).state is State.CANCELLED

    asyncio.run(main())


def test_events_while_requests_go_on(broker_proc: BrokerProcess) -> None:
    async def main() -> None:
        async with connect(broker_proc) as client:
            async with client.subscribe(["tasks", "counts"]) as events:
                assert events.topics == ["counts", "tasks"]
                task_id = await client.submit("echo", 1, queue="watched")
                change = (await next_event(events, "tasks")).data["changes"][0]
                assert change["id"] == task_id and change["to"] == "pending"
                with pytest.raises(LocalProtocolError, match="already has a subscription"):
                    await client.subscribe(["workers"]).start()
            async with client.subscribe(["tasks"]) as again:  # unsubscribed: subscribe again
                second = await client.submit("echo", 2, queue="watched")
                assert (await next_event(again, "tasks")).data["changes"][0]["id"] == second
            assert (await client.stats())["queues"]["watched"]["pending"] == 2

    asyncio.run(main())


def test_a_slow_consumer_gets_a_lagged_marker_not_a_stalled_connection() -> None:
    subscription = AsyncioSubscription.__new__(AsyncioSubscription)
    AsyncioSubscription.__init__(subscription, None, ["tasks"], 2)  # type: ignore[arg-type]
    for seq in range(1, 6):
        subscription._offer({"t": "event", "id": 3, "seq": seq, "topic": "tasks", "time": 1.0})
    assert [m["seq"] for m in subscription._queue] == [1, 2]
    subscription._queue.clear()
    subscription._offer({"t": "event", "id": 3, "seq": 6, "topic": "tasks", "time": 2.0})
    lagged, event = subscription._queue
    assert lagged["topic"] == "lagged" and lagged["dropped"] == 3 and lagged["local"] is True
    assert event["seq"] == 6


def test_errors_an_operator_can_act_on(broker_proc: BrokerProcess, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))

    async def main() -> None:
        with pytest.raises(Unauthorized):
            async with AsyncioClient.connect(broker_proc.address, ca=broker_proc.ca, key="tq_x_y"):
                pass
        with pytest.raises(InvalidRequest, match="protocol version 99"):
            async with connect(broker_proc, hello={"v": 99}):
                pass
        with pytest.raises(TLSFailure, match="not signed by CA"):
            async with AsyncioClient.connect(broker_proc.address, ca=other_ca):
                pass
        with pytest.raises(TLSFailure, match="speaks TLS"):  # plaintext to the TLS port
            async with AsyncioClient.connect(broker_proc.address, insecure=True, timeout=5):
                pass
        host = broker_proc.address.rsplit(":", 1)[0]
        with pytest.raises(ConnectionFailed, match="cannot connect to the broker at"):
            async with AsyncioClient.connect(f"{host}:1", ca=broker_proc.ca):
                pass
        with pytest.raises(ConnectionFailed, match="no CA certificate"):
            async with AsyncioClient.connect(broker_proc.address):
                pass

    asyncio.run(main())


def test_the_broker_going_away_is_said_as_such(broker_proc: BrokerProcess) -> None:
    async def main() -> None:
        async with connect(broker_proc) as client, client.subscribe(["counts"]) as events:
            await next_event(events, "counts")
            broker_proc.stop()  # SIGTERM: the broker tells its sessions before it closes
            with pytest.raises((Unavailable, ConnectionFailed)) as raised:
                await next_event(events, "never")
            assert "shutting down" in str(raised.value)
            with pytest.raises(Unavailable, match="shutting down"):
                await client.stats()

    asyncio.run(main())


def test_an_asyncio_application_does_not_load_trio() -> None:
    probe = "import sys, tq.client; tq.client.AsyncioClient; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@tq.task(name="echo")
def echo(x: Any) -> Any:
    return {"x": x}  # what the builtin echo handler of `tq worker` answers: the payload


def test_typed_tasks_under_asyncio_use_the_asyncio_client(broker_proc: BrokerProcess) -> None:
    broker_proc.start_worker()
    broker_proc.wait_for_workers(1)
    where = {"broker": broker_proc.address, "ca": str(broker_proc.ca), "key": broker_proc.key}

    async def main() -> None:
        async with tq.connect(**where) as client:
            assert isinstance(client, AsyncioClient)
            handles = await asyncio.gather(*(echo.submit(x=n) for n in range(5)))
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert results == [{"x": n} for n in range(5)]
            assert (await handles[0].status()).state is State.SUCCEEDED

    asyncio.run(main())


def test_closing_without_waiting_leaves_no_socket_behind(broker_proc: BrokerProcess) -> None:
    """``close()`` (from a UI callback, no await) and the loop ending right after: the
    socket is closed, not left to the garbage collector (a ResourceWarning)."""

    async def main() -> None:
        client = await broker_proc.asyncio_client()
        await client.stats()
        client.close()
        with pytest.raises(ConnectionFailed, match="was closed"):
            await client.stats()

    asyncio.run(main())
    gc.collect()  # an unclosed socket would warn here, and warnings are errors


def test_request_answer_decodes_into_the_declared_answer(broker_proc: BrokerProcess) -> None:
    """``request_answer`` on the asyncio and the blocking client, as on the trio one: the
    ACK comes back as its Struct; a NACK raises; an answer of another shape is refused
    naming the field."""
    from tq.client import BlockingClient
    from tq.protocol import answers

    get = {"t": "query", "q": "get"}

    async def main() -> str:
        async with connect(broker_proc) as client:
            task_id = await client.submit("echo", {"n": 1}, queue="nobody-takes")
            got = await client.request_answer({**get, "task": task_id}, answers.TaskAnswer)
            assert type(got) is answers.TaskAnswer and got.task.id == task_id
            assert got.task.state == "pending" and got.task.queue == "nobody-takes"
            with pytest.raises(NotFound, match="no task with id nope"):
                await client.request_answer({**get, "task": "nope"}, answers.TaskAnswer)
            with pytest.raises(
                answers.BadAnswer, match=r"answer to query depth.*missing required field `depth`"
            ):
                await client.request_answer({**get, "task": task_id}, answers.DepthAnswer)
            return task_id

    task_id = asyncio.run(main())
    with BlockingClient(broker_proc.address, ca=broker_proc.ca, **broker_proc.client_kwargs()) as c:
        got = c.request_answer({**get, "task": task_id}, answers.TaskAnswer)
        assert type(got) is answers.TaskAnswer and got.task.id == task_id
        with pytest.raises(NotFound, match="no task with id nope"):
            c.request_answer({**get, "task": "nope"}, answers.TaskAnswer)
        stats = c.request_answer({"t": "query", "q": "stats"}, answers.StatsAnswer)
        assert stats.stats.queues["nobody-takes"]["pending"] >= 1
