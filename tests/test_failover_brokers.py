"""Clients that fail over, against real brokers on loopback with TLS.

A relay (plain TCP, in this trio run) sits between a client and a broker and can
cut a connection right after the broker has answered a request, before the answer
reaches the client: the one case where a client cannot know whether a write
committed. Two brokers on one PostgreSQL database stand for a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tq.client import BlockingClient, Client
from tq.client.failover import AUTO_KEY_PREFIX, OutcomeUnknown
from tq.core.errors import ConnectionFailed
from tq.testing import RunningBroker, running_broker


class Relay:
    """127.0.0.1:<port> forwarding to ``target``. ``cut()`` arms it: the next request a
    client sends is forwarded, and its answer dropped with the client's connection."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = 0
        self.armed = False
        self.cuts = 0
        self.connections = 0
        self._listeners: list[trio.SocketListener] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.armed = True

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = self._listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, self._listeners)

    async def _handle(self, down: trio.SocketStream) -> None:
        self.connections += 1
        host, port = self.target.rsplit(":", 1)
        try:
            up = await trio.open_tcp_stream(host, int(port))
        except OSError:
            await down.aclose()
            return
        state = {"request_sent": False}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with up, down, trio.open_nursery() as nursery:
                nursery.start_soon(self._upward, down, up, state)
                async for data in up:  # broker -> client
                    if state["request_sent"]:  # the answer: drop it and the connection
                        self.cuts += 1
                        nursery.cancel_scope.cancel()
                        break
                    await down.send_all(data)
                nursery.cancel_scope.cancel()

    async def _upward(self, down: trio.SocketStream, up: trio.SocketStream, state: Any) -> None:
        async for data in down:
            if self.armed:
                self.armed = False
                state["request_sent"] = True
            await up.send_all(data)


@contextlib.asynccontextmanager
async def relayed(broker: RunningBroker) -> AsyncIterator[Relay]:
    relay = Relay(broker.info.address)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        yield relay
        nursery.cancel_scope.cancel()


def _connect(broker: RunningBroker, address: str, **kwargs: Any) -> Any:
    return Client.connect(address, ca=broker.info.ca_file, key=broker.key, **kwargs)


async def _all_tasks(client: Client) -> list[Any]:
    return (await client.list(limit=1000)).tasks


# -- one broker, a connection cut after the broker answered ---------------------------------


@pytest.mark.trio
async def test_a_submit_cut_off_before_its_answer_is_resent_and_stored_once(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:
            async with _connect(broker, relay.address, failover=10) as client:
                relay.cut()
                task_id = await client.submit("echo", {"n": 1})  # no key given
                assert relay.cuts == 1 and relay.connections == 2  # cut, reconnected, resent
                relay.cut()
                [again, third] = await client.submit_items(
                    [{"type": "echo", "payload": 2, "idempotency_key": "mine"}, {"type": "echo"}]
                )
                assert relay.cuts == 2
                # made by the first attempt: under the caller's key that is all the broker
                # can say; under the key the client made, the task is this request's own
                assert (again["created"], third["created"]) == (False, True)
                again, third = again["id"], third["id"]
                relay.cut()
                task = await client.get(task_id)  # a read: asked again
                assert relay.cuts == 3
                tasks = await _all_tasks(client)
    assert sorted(t.id for t in tasks) == sorted([task_id, again, third])  # nothing twice
    assert task.idempotency_key is not None and task.idempotency_key.startswith(AUTO_KEY_PREFIX)
    assert {t.id: t.idempotency_key for t in tasks}[again] == "mine"


@pytest.mark.trio
async def test_a_write_that_may_have_committed_is_not_resent_and_says_so(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:
            async with _connect(broker, relay.address, failover=10) as client:
                task_id = await client.submit("echo", 1)
                relay.cut()
                with pytest.raises(OutcomeUnknown, match=r"`cancel` of task .* may or may not"):
                    await client.cancel(task_id)
                assert (await client.get(task_id)).state == "cancelled"  # it had committed
                raw = {"t": "submit", "tasks": [{"type": "echo"}]}
                relay.cut()
                await client.request(raw)  # a raw submit gets a key too: resent safely
                assert len(await _all_tasks(client)) == 2


@pytest.mark.trio
async def test_without_failover_a_lost_connection_fails_at_once_as_before(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:
            async with _connect(broker, relay.address) as client:  # one broker: off
                relay.cut()
                with pytest.raises(ConnectionFailed, match="was lost") as info:
                    await client.submit("echo", 1)
                assert not isinstance(info.value, OutcomeUnknown)
            async with broker.client() as client:
                [task] = await _all_tasks(client)
    assert task.idempotency_key is None  # no failover, no key attached
    assert relay.connections == 1


@pytest.mark.trio
async def test_a_subscription_ends_with_its_connection_and_leaves_the_next_one_alone(
    tmp_path: Path,
) -> None:
    """A reconnect is a new session whose ids start again: the old subscription (id 3)
    ends with an error, and closing it later must not touch the new one (id 3 too)."""
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:
            async with _connect(broker, relay.address, failover=10) as client:
                task_id = await client.submit("echo", 1)  # id 2 (the hello is 1)
                old = client.subscribe(["tasks"])
                await old.start()  # id 3
                relay.cut()
                with pytest.raises(OutcomeUnknown):
                    await client.cancel(task_id)  # cut: not resent, nothing reconnects
                with pytest.raises(ConnectionFailed):
                    await old.__anext__()
                await client.stats()  # reconnects: hello 1, stats 2
                async with client.subscribe(["tasks"]) as new:  # id 3 again
                    await old.aclose()  # its connection is gone: nothing to undo
                    await client.submit("echo", 2)
                    event = await new.__anext__()
    assert event.topic == "tasks" and relay.connections == 2


@pytest.mark.trio
async def test_the_blocking_client_resends_only_what_is_safe(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:

            def scenario() -> tuple[list[str], str]:
                with BlockingClient(
                    relay.address, ca=broker.info.ca_file, key=broker.key, failover=10
                ) as client:
                    relay.cut()
                    first = client.submit("echo", 1)
                    relay.cut()
                    state = client.get(first).state
                    relay.cut()
                    with pytest.raises(OutcomeUnknown, match="`cancel`"):
                        client.cancel(first)
                    return [t.id for t in client.list().tasks], state

            ids, state = await trio.to_thread.run_sync(scenario)
            async with broker.client() as client:
                cancelled = (await client.get(ids[0])).state
    assert len(ids) == 1 and state in ("pending", "running", "succeeded")
    assert relay.cuts == 3 and cancelled == "cancelled"


# -- timing, on trio's clock ------------------------------------------------------------


@pytest.mark.trio
async def test_reconnecting_stops_at_the_failover_window_and_can_be_interrupted(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The broker is gone for good: the read keeps trying (with backoff) for exactly its
    window, then raises the connection error; a caller's cancel ends it at once."""
    mock_clock.autojump_threshold = 0.3  # real seconds idle before trio's clock jumps
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(running_broker(tmp_path, http="off"))
        client = await stack.enter_async_context(_connect(broker, broker.info.address, failover=30))
        broker.shutdown.set()  # the broker stops; nothing listens there any more
        while client.error is None:
            await trio.sleep(0.01)
        started = trio.current_time()
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            await client.stats()
        waited = trio.current_time() - started
        assert 30.0 <= waited < 30.5
        started = trio.current_time()
        with trio.move_on_after(2.0) as scope:
            await client.stats()
        assert scope.cancelled_caught and trio.current_time() - started < 2.5


# -- two brokers on one PostgreSQL database ----------------------------------------------------


@contextlib.asynccontextmanager
async def cluster_broker(
    data: Path, pg_url: str, tls_from: Path | None, **overrides: Any
) -> AsyncIterator[Any]:
    """A broker on ``pg_url``; with ``tls_from``, the same CA and certificate as that one
    (the brokers of a cluster share a CA, so one CA file verifies them all)."""
    if tls_from is not None:
        data.mkdir(mode=0o700)
        shutil.copytree(tls_from / "tls", data / "tls")
    async with running_broker(data, http="off", store=pg_url, **overrides) as broker:
        yield broker


class Stoppable:
    """A cluster broker in a task of its own, so a test can stop it while others run."""

    def __init__(self, data: Path, pg_url: str, tls_from: Path | None, **overrides: Any) -> None:
        self.args = (data, pg_url, tls_from)
        self.overrides = overrides
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def run(self, task_status: trio.TaskStatus[RunningBroker]) -> None:
        try:
            async with cluster_broker(*self.args, **self.overrides) as broker:
                task_status.started(broker)
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


@pytest.mark.trio
async def test_a_client_given_two_brokers_carries_on_when_one_stops(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            first = Stoppable(tmp_path / "a", pg_url, None)
            a = await nursery.start(first.run)
            async with cluster_broker(tmp_path / "b", pg_url, tmp_path / "a") as b:
                both = f"{a.info.address},{b.info.address}"
                async with _connect(a, both) as client:  # failover on: two brokers
                    assert client.address == a.info.address
                    ids = [await client.submit("echo", i) for i in range(5)]
                    generation = client._generation
                    await first.stop()  # broker A stops (its sessions are told, then closed)
                    got: list[Any] = []

                    async def get(task_id: str) -> None:
                        got.append((await client.get(task_id)).id)

                    async with trio.open_nursery() as requests:  # together: one reconnect
                        for task_id in ids:
                            requests.start_soon(get, task_id)
                    assert sorted(got) == sorted(ids)
                    assert client._generation == generation + 1
                    ids += [await client.submit("echo", i) for i in range(5, 10)]
                    assert client.address == b.info.address
                    assert (await client.get(ids[0])).payload == 0
                    tasks = await _all_tasks(client)

                def blocking() -> tuple[str, int]:
                    with BlockingClient(both, ca=a.info.ca_file, key=a.key) as client:
                        return client.address, client.stats()["queues"]["default"]["pending"]

                # A refuses: B, in turn
                assert await trio.to_thread.run_sync(blocking) == (b.info.address, 10)
    assert sorted(t.id for t in tasks) == sorted(ids)
    assert all((t.idempotency_key or "").startswith(AUTO_KEY_PREFIX) for t in tasks)


@pytest.mark.trio
async def test_a_worker_keeps_its_lease_when_it_moves_to_another_broker(
    tmp_path: Path, pg_url: str
) -> None:
    """The worker's broker stops while a task runs longer than the lease: the worker
    moves to the other broker, renews the lease there, and the task succeeds on its
    first attempt (never released, never run twice)."""
    from tq.worker.handlers import HandlerRegistry
    from tq.worker.runner import Worker

    starts: list[Any] = []
    release = trio.Event()
    registry = HandlerRegistry()

    async def hold(payload: Any) -> Any:
        starts.append(payload)
        await release.wait()
        return payload

    registry.register("hold", hold)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            first = Stoppable(tmp_path / "a", pg_url, None, lease_ttl=1.5)
            a = await nursery.start(first.run)
            async with cluster_broker(tmp_path / "b", pg_url, tmp_path / "a", lease_ttl=1.5) as b:
                both = f"{a.info.address},{b.info.address}"
                settings = dataclasses.replace(a.settings, broker=both)
                worker = Worker(settings, registry)
                stop = trio.Event()
                await nursery.start(worker.run, stop)
                async with _connect(a, b.info.address) as client:  # one key: one store
                    task_id = await client.submit("hold", "x")
                    while not starts:
                        await trio.sleep(0.01)
                    await first.stop()  # broker A (the worker's) stops
                    while not any(w["connected"] for w in await client.workers()):
                        await trio.sleep(0.01)  # until the worker is on broker B
                    await trio.sleep(4.0)  # more than two leases long, on broker B
                    assert (await client.get(task_id)).state == "running"
                    release.set()
                    task = await client.wait(task_id, timeout=20)
                    stop.set()
    assert task.state == "succeeded" and task.result == "x"
    assert task.attempts == 1 and starts == ["x"]


@pytest.mark.trio
async def test_client_sockets_notice_a_silent_broker_host(tmp_path: Path) -> None:
    """Keepalive probes and a bound on unacknowledged data: a broker host that vanishes
    without a reset is noticed in about 30 s, not after minutes of retransmissions."""
    import socket

    def check(sock: socket.socket) -> None:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10

    async with running_broker(tmp_path, http="off") as broker:
        async with broker.client() as client:
            stream = client._stream
            assert isinstance(stream, trio.SSLStream)
            transport = stream.transport_stream
            assert isinstance(transport, trio.SocketStream)
            check(transport.socket)  # type: ignore[arg-type]

        def blocking() -> None:
            with broker.blocking_client() as client:
                check(client._sock)

        await trio.to_thread.run_sync(blocking)


@pytest.mark.trio
async def test_a_blocking_client_closed_by_its_owner_does_not_reconnect(tmp_path: Path) -> None:
    """close() from another thread wakes a blocked read, which fails: failover is for
    brokers that go away, not for a client its owner stopped."""
    with trio.fail_after(60):
        async with running_broker(tmp_path, http="off") as broker, relayed(broker) as relay:
            client = await trio.to_thread.run_sync(
                lambda: BlockingClient(
                    relay.address, ca=broker.info.ca_file, key=broker.key, failover=30
                )
            )
            task_id = await trio.to_thread.run_sync(client.submit, "nobody-runs-this")
            outcome: list[BaseException] = []

            def waiting() -> None:
                try:
                    client.wait(task_id, timeout=50)  # blocks: no worker for this type
                except BaseException as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, waiting)
                await trio.sleep(0.5)
                started = trio.current_time()
                client.close()
            assert trio.current_time() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionFailed), outcome
    assert relay.connections == 1
